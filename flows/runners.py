"""Where the comparison tasks run: threads, worker processes or a Dask cluster.

Process and Dask workers talk to the Prefect API themselves; without a Prefect server each would
start its own temporary one, so `local_prefect_server` starts a real one when none is set.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

RunnerKind = Literal["threads", "processes", "dask"]
RUNNERS: tuple[str, ...] = ("threads", "processes", "dask")
DEFAULT_WORKERS = 2
# One BLAS/OpenMP thread per concurrent task: oversubscription made PS fits ~3x slower.
PINNED_THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                         "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                                         "NUMEXPR_NUM_THREADS")}


@dataclass(frozen=True)
class Execution:
    """How the comparison tasks of a run are executed."""

    runner: str = "threads"
    workers: int = DEFAULT_WORKERS
    dask_address: str | None = None

    def describe(self) -> str:
        where = f" at {self.dask_address}" if self.dask_address else ""
        return f"{self.runner} ({self.workers} workers{where})"


def resolve_execution(study_execution: object | None, runner: str | None = None,
                      workers: int | None = None, dask_address: str | None = None) -> Execution:
    """Command line over the study file's `execution:` over the defaults (threads, 2 workers)."""
    runner = runner or getattr(study_execution, "runner", None) or (
        "dask" if dask_address else "threads")
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r} (expected one of {', '.join(RUNNERS)})")
    if runner == "dask":
        dask_address = dask_address or getattr(study_execution, "dask_address", None)
    elif dask_address:
        raise ValueError(f"a Dask address needs the runner 'dask', not {runner!r}")
    workers = workers or getattr(study_execution, "workers", None) or DEFAULT_WORKERS
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return Execution(runner, int(workers), dask_address)


def make_task_runner(execution: Execution) -> TaskRunner:
    """A fresh Prefect task runner for the comparison tasks (use it as a context manager)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if execution.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=execution.workers)
    os.environ.update(PINNED_THREADS)  # inherited by the worker processes spawned below
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    if execution.runner == "processes":
        return ProcessPoolTaskRunner(max_workers=execution.workers)
    from prefect_dask import DaskTaskRunner

    if execution.dask_address:
        return DaskTaskRunner(address=execution.dask_address)
    keep_malloc_defaults()
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": execution.workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": None})


def keep_malloc_defaults() -> None:
    """Let Dask's nannies keep glibc's adaptive malloc (its MALLOC_TRIM_THRESHOLD_=65536 made
    every large array a fresh mmap: analyses ran ~25% slower on this VM)."""
    import dask

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


def api_url() -> str | None:
    """The Prefect API the current process talks to (None: a temporary local server)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until GET {url}/health answers (raise if the server process exits or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the Prefect server at {url} was not ready after {timeout:.0f} s")


def stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process started in its own session and everything it started (SIGTERM, SIGKILL)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            os.killpg(process.pid, signal.SIGKILL)  # stragglers left by the group leader
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


@contextmanager
def local_prefect_server(home: Path | None = None, port: int | None = None,
                         timeout: float = 90.0, log: Path | None = None) -> Iterator[str]:
    """Run `prefect server start` on 127.0.0.1 for the block; yield its API URL."""
    port = port or free_port()
    owned = home is None
    home = Path(tempfile.mkdtemp(prefix="cohortflow-prefect-")) if home is None else home
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": ""}
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [*command, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, timeout, process)
        yield url
    finally:
        stop_group(process)
        if log:
            out.close()
        if owned:
            shutil.rmtree(home, ignore_errors=True)
