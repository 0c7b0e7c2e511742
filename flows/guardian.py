"""Children die with their parent: nothing a cohortflow command starts outlives it.

A run starts processes it does not own the code of (Prefect's temporary API server, a uvicorn
of ~255 MB; `prefect server start` for process workers; report workers). Killed with SIGKILL,
the command cannot stop them, and they were left running, reparented to PID 1. So the command
marks its environment with a token its children inherit, and starts a tiny watchdog in its own
session that waits on a pipe only the command holds: when the command ends, however it ends,
the pipe closes and the watchdog stops every process carrying the token.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_VARIABLE = "COHORTFLOW_GUARD"
_held: list[int] = []  # the pipe's write end, open for the life of this process


def guard_children() -> str:
    """Mark this process's future children and start their watchdog; return the token.

    Idempotent: a process (or a child of one) already guarded keeps its token.
    """
    if os.environ.get(TOKEN_VARIABLE):
        return os.environ[TOKEN_VARIABLE]
    token = uuid.uuid4().hex
    read, write = os.pipe()  # not inheritable: only this process holds the write end
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}
    subprocess.Popen([sys.executable, "-m", "flows.guardian", token, str(read)],
                     pass_fds=(read,), start_new_session=True, env=env,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    os.close(read)
    _held.append(write)
    os.environ[TOKEN_VARIABLE] = token
    return token


def marked_processes(token: str) -> list[int]:
    """Pids of the processes (other than this one) whose environment carries the token."""
    mark = f"{TOKEN_VARIABLE}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if mark in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def stop_marked(token: str, grace: float = 5.0) -> None:
    """SIGTERM every marked process, then SIGKILL those still there after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        pids = marked_processes(token)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline and marked_processes(token):
            time.sleep(0.2)


def _watch(token: str, fd: int) -> None:
    """The watchdog: block until the guarded command's pipe closes, then stop its children."""
    while os.read(fd, 1):
        pass
    stop_marked(token)


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
