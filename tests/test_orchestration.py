"""Orchestration: run identity, resume after SIGKILL, failure isolation and retries, the Dask and
process runners, served deployments (serve, submit, batch) and concurrent runs.

The Prefect tests share one real server (`prefect server start` on a free 127.0.0.1 port,
PREFECT_HOME in tmp) and stop every process they start, even when they fail.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from cohort.synthetic import generate_demo_cdm
from flows import pipeline
from flows.config import load_study
from flows.runners import local_prefect_server, resolve_execution, stop_group
from results.store import open_store
from tests.plain_run import KEYS, run_study_plain
from tests.plain_run import stored_estimates as estimates
from tests.store_watch import watch_while_writing

ROOT = Path(__file__).parents[1]
STUDY = """\
study: orchestration
source: cdm
concept_sets:
  comparator_drug: {include: [2000000100]}
  drug_a: {include: [2000000101]}
  drug_b: {include: [2000000102]}
  drug_c: {include: [2000000103]}
  drug_d: {include: [2000000104]}
  outcome_1: {include: [2000001001]}
  outcome_4: {include: [2000001004]}
treatments: [drug_a, drug_b, drug_c, drug_d]
comparator: {active: comparator_drug}
outcomes: [outcome_1, outcome_4]
negative_controls: [2000001201, 2000001202, 2000001203, 2000001204, 2000001205, 2000001206]
follow_up: {start_day: 1}
"""

# `cohortflow ...` in a child process whose Nth comparison analysis SIGKILLs the process.
CHILD = textwrap.dedent("""
    import os, signal, sys, threading
    sys.path.insert(0, {root!r})
    import flows.pipeline
    from flows.cli import main

    real, calls, lock = flows.pipeline.analyze_comparison, [], threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            calls.append(1)
            n = len(calls)
        if n == int(os.environ.get("KILL_AT_CALL") or 0):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    flows.pipeline.analyze_comparison = counted
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("orchestration")
    generate_demo_cdm(out / "cdm", persons=8_000, seed=5)
    (out / "study.yaml").write_text(STUDY)
    (out / "other.yaml").write_text(STUDY.replace("study: orchestration", "study: orchestration_b"))
    (out / "child.py").write_text(CHILD.format(root=str(ROOT)))
    run_study_plain(out / "study.yaml", out / "reference.duckdb", out / "ref-data")
    return out, estimates(out / "reference.duckdb")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server for the module; yields (API URL, environment for children)."""
    home = tmp_path_factory.mktemp("prefect-home")
    with local_prefect_server(home=home, log=home / "server.log", timeout=120) as url:
        env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
               "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        yield url, env




def runs(store: Path) -> pd.DataFrame:
    with open_store(store, read_only=True) as con:
        frame = con.execute("SELECT run_id, study, status, finished_at, timings, "
                            "(SELECT count(*) FROM estimates e WHERE e.run_id = r.run_id) "
                            "AS n FROM runs r ORDER BY run_id").df()
    frame["timings"] = frame["timings"].map(json.loads)
    return frame.set_index("run_id")


def cli(env: dict, *args: str, cwd: Path = ROOT, kill_at_call: int = 0,
        child: Path | None = None) -> subprocess.Popen:
    """Start `cohortflow ARGS` in its own session (stop it with stop_group)."""
    script = [str(child)] if child else ["-m", "flows.cli"]
    return subprocess.Popen([sys.executable, *script, *args], cwd=cwd,
                            env={**env, "KILL_AT_CALL": str(kill_at_call)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        stop_group(process)
    return process.returncode, out, err


def run_id_of(study_file: Path, store: Path, data: Path) -> str:
    return pipeline.new_run(load_study(study_file), store, data).run_id


# --- plain functions, no Prefect ----------------------------------------------------------------

def test_run_identity_is_the_study_content_and_the_data(world, tmp_path):
    out, _ = world
    store = tmp_path / "s.duckdb"
    first = run_id_of(out / "study.yaml", store, tmp_path)
    assert first == run_id_of(out / "study.yaml", store, tmp_path)
    assert first.startswith("orchestration-")
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    linked.mkdir()
    (linked / "cdm").symlink_to(out / "cdm")
    same = linked / "same.yaml"   # comments, schedule and execution are not what a run computes
    same.write_text("# a comment\n" + STUDY + "schedule: '0 3 * * *'\n"
                    "execution: {runner: dask, workers: 4}\n")
    assert run_id_of(same, store, tmp_path) == first
    edited = linked / "edited.yaml"
    edited.write_text(STUDY + "min_cell_count: 10\n")
    assert run_id_of(edited, store, tmp_path) != first
    shutil.copytree(out / "cdm", copied / "cdm")              # same data elsewhere (copy2)
    (copied / "study.yaml").write_text(STUDY)
    assert run_id_of(copied / "study.yaml", store, tmp_path) == first
    table = copied / "cdm" / "condition_occurrence.parquet"
    os.utime(table, ns=(table.stat().st_atime_ns, table.stat().st_mtime_ns + 10**9))
    assert run_id_of(copied / "study.yaml", store, tmp_path) != first   # the data changed


def test_execution_comes_from_the_command_line_then_the_study_file():
    study = load_study(ROOT / "configs" / "gibleed.yaml").config
    assert resolve_execution(study.execution) == resolve_execution(None)
    assert resolve_execution(None).runner == "threads" and resolve_execution(None).workers == 2
    from flows.config import Execution

    declared = Execution(runner="dask", workers=3, dask_address="tcp://h:8786")
    assert resolve_execution(declared).dask_address == "tcp://h:8786"
    assert resolve_execution(declared, runner="threads").runner == "threads"
    assert resolve_execution(declared, workers=5).workers == 5
    assert resolve_execution(None, dask_address="tcp://x:1").runner == "dask"
    with pytest.raises(ValueError, match="needs the runner 'dask'"):
        resolve_execution(None, runner="processes", dask_address="tcp://x:1")


def test_plain_resume_reuses_finished_work_and_recomputes_failures(world, tmp_path):
    out, reference = world
    study_file, store = str(out / "study.yaml"), tmp_path / "store.duckdb"
    paths = pipeline.new_run(load_study(study_file), store, tmp_path / "data")
    workspace = str(paths.workspace)
    prepared = pipeline.prepare(study_file, workspace)
    assert not prepared["reused"]
    assert pipeline.prepare(study_file, workspace, resume=True)["reused"]
    ids = prepared["comparison_ids"]
    assert ids == [1, 2, 3, 4] and pipeline.finished(workspace, 1) is None
    first = pipeline.analyze(study_file, workspace, 1)
    assert pipeline.finished(workspace, 1)["seconds"] == first["seconds"]
    failed = pipeline.record_failure(study_file, workspace, 2, "RuntimeError: planted")
    assert failed["failed"] == 24 and pipeline.finished(workspace, 2) is None
    assert not list((paths.workspace / "analysis").glob(".*.tmp"))   # no temporary leftovers
    analyses = [pipeline.finished(workspace, 1), failed,
                pipeline.analyze(study_file, workspace, 3),
                pipeline.analyze(study_file, workspace, 4)]
    run = pipeline.finalize(study_file, paths, prepared, analyses, datetime.now(UTC), {})
    assert run["timings"]["reused"] == [1]
    got = estimates(store)
    broken = got["treatment"] == "drug_b"
    assert (got.loc[broken, "status"] == "failed").all() and (broken.sum() == 24)
    pd.testing.assert_frame_equal(got[~broken].reset_index(drop=True),
                                  reference[reference["treatment"] != "drug_b"]
                                  .reset_index(drop=True), check_dtype=False)
    with open_store(store, read_only=True) as con:
        message = con.execute("SELECT DISTINCT message FROM estimates WHERE status = 'failed' "
                              "AND treatment = 'drug_b'").fetchall()
    assert message == [("RuntimeError: planted",)]


def test_prepared_work_records_the_code_that_made_it(world, tmp_path):
    out, _ = world
    study_file = str(out / "study.yaml")
    workspace = pipeline.new_run(load_study(study_file), tmp_path / "s.duckdb",
                                 tmp_path / "data").workspace
    assert pipeline.workspace_code_matches(workspace)                 # nothing prepared yet
    pipeline.prepare(study_file, str(workspace))
    marker = workspace / pipeline.PREPARED_MARKER
    recorded = json.loads(marker.read_text())
    assert recorded["code"] == pipeline.code_fingerprint() and len(recorded["code"]) == 64
    assert pipeline.workspace_code_matches(workspace)
    marker.write_text(json.dumps({**recorded, "code": "older"}))
    assert not pipeline.workspace_code_matches(workspace)
    marker.write_text(json.dumps({k: v for k, v in recorded.items() if k != "code"}))
    assert not pipeline.workspace_code_matches(workspace)            # a cohortflow before this


def test_a_second_process_cannot_run_the_same_run(world, tmp_path):
    out, _ = world
    paths = pipeline.new_run(load_study(out / "study.yaml"), tmp_path / "s.duckdb", tmp_path)
    with (pipeline.run_lock(paths),
          pytest.raises(pipeline.RunBusyError, match="already in progress"),
          pipeline.run_lock(paths)):
        pass
    with pipeline.run_lock(paths):   # released
        pass


def test_batch_plan_picks_changed_and_never_run_studies(world, tmp_path):
    out, _ = world
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "cdm").symlink_to(out / "cdm")
    for name in ("study", "other"):
        shutil.copy(out / f"{name}.yaml", folder / f"{name}.yaml")
    (folder / "broken.yaml").write_text("study: [\n")
    store, data = tmp_path / "store.duckdb", tmp_path / "data"
    run_study_plain(folder / "study.yaml", store, data)
    plan = {item.study_file.name: item for item in pipeline.batch_plan(folder, store, data)}
    assert not plan["study.yaml"].changed and "unchanged" in plan["study.yaml"].reason
    assert plan["other.yaml"].changed and plan["other.yaml"].reason == "never run"
    assert plan["broken.yaml"].run_id is None and "unusable" in plan["broken.yaml"].reason
    (folder / "study.yaml").write_text(STUDY + "min_cell_count: 11\n")
    again = {item.study_file.name: item for item in pipeline.batch_plan(folder, store, data)}
    assert again["study.yaml"].changed and "changed since run" in again["study.yaml"].reason


# --- through Prefect, on a real server ------------------------------------------------------------

@pytest.mark.slow
def test_run_killed_mid_analysis_resumes_with_finished_comparisons_reused(world, server, tmp_path):
    out, reference = world
    _, env = server
    store, data = tmp_path / "store.duckdb", tmp_path / "data"
    args = ["run", str(out / "study.yaml"), "--results", str(store), "--data-dir", str(data),
            "--workers", "2", "--quiet"]
    code, _, err = finish(cli(env, *args, kill_at_call=3, child=out / "child.py"))
    assert code == -9, err[-2000:]                                     # SIGKILLed
    assert not store.exists() or runs(store).empty                     # nothing half-written
    workspace = data / "workspace" / run_id_of(out / "study.yaml", store, data)
    done = {int(f.parent.name.split("_")[1]): f.stat().st_mtime_ns
            for f in workspace.glob("analysis/comparison_*/done.json")}
    assert 1 <= len(done) <= 2, done                                   # killed part-way
    code, stdout, err = finish(cli(env, *args, child=out / "child.py"))   # resume (default)
    assert code == 0, err[-2000:]
    record = runs(store)
    assert list(record.index) == [stdout.strip()] and record["n"].iloc[0] == len(reference)
    timings = record["timings"].iloc[0]
    assert timings["reused"] == sorted(done)                           # not recomputed...
    assert {int(f.parent.name.split("_")[1]): f.stat().st_mtime_ns
            for f in workspace.glob("analysis/comparison_*/done.json") if
            int(f.parent.name.split("_")[1]) in done} == done          # ...files untouched
    got = estimates(store)
    assert not got.duplicated(KEYS).any()
    pd.testing.assert_frame_equal(got, reference)                      # as if uninterrupted
    code, _, err = finish(cli(env, *args, "--fresh"))                  # --fresh recomputes
    assert code == 0, err[-2000:]
    assert runs(store)["timings"].iloc[0]["reused"] == []
    pd.testing.assert_frame_equal(estimates(store), reference)
    marker = workspace / pipeline.PREPARED_MARKER                      # work of other code:
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "code": "older"}))
    code, _, err = finish(cli(env, *args))                             # resume recomputes it
    assert code == 0, err[-2000:]
    assert runs(store)["timings"].iloc[0]["reused"] == []
    assert json.loads(marker.read_text())["code"] == pipeline.code_fingerprint()
    pd.testing.assert_frame_equal(estimates(store), reference)


@pytest.mark.slow
def test_failing_comparison_is_recorded_and_transient_errors_retried(world, server, tmp_path,
                                                                     monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.run_study import run_study

    out, reference = world
    url, _ = server
    real, attempts = pipeline.analyze_comparison, collections.Counter()

    def flaky(*args, **kwargs):
        comparison = kwargs["seed"]              # the pipeline seeds with the comparison id
        attempts[comparison] += 1
        if comparison == 2:
            raise RuntimeError("planted bug in comparison 2")
        if comparison == 3 and attempts[comparison] == 1:
            raise OSError("planted transient I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "analyze_comparison", flaky)
    store, data = tmp_path / "store.duckdb", tmp_path / "data"
    with temporary_settings({PREFECT_API_URL: url}):
        run = run_study(str(out / "study.yaml"), str(store), str(data), show_progress=False)
        assert attempts == {1: 1, 2: 1, 3: 2, 4: 1}                    # OSError retried once
        assert run["n_estimates_failed"] == 24 and any(
            "planted bug in comparison 2" in w for w in run["warnings"])
        got = estimates(store)
        broken = got["treatment"] == "drug_b"
        assert set(got.loc[broken, "status"]) == {"failed"}
        pd.testing.assert_frame_equal(got[~broken].reset_index(drop=True),
                                      reference[reference["treatment"] != "drug_b"]
                                      .reset_index(drop=True), check_dtype=False)
        monkeypatch.undo()
        again = run_study(str(out / "study.yaml"), str(store), str(data), show_progress=False)
    assert again["run_id"] == run["run_id"] and again["timings"]["reused"] == [1, 3, 4]
    assert list(runs(store).index) == [run["run_id"]]
    pd.testing.assert_frame_equal(estimates(store), reference)


@pytest.mark.slow
def test_dask_local_cluster_with_two_worker_processes(world, server, tmp_path):
    out, reference = world
    _, env = server
    store, data = tmp_path / "store.duckdb", tmp_path / "data"
    process = cli(env, "run", str(out / "study.yaml"), "--runner", "dask", "--workers", "2",
                  "--results", str(store), "--data-dir", str(data), "--quiet")
    code, _, err = finish(process)
    assert code == 0, err[-3000:]
    timings = runs(store)["timings"].iloc[0]
    assert timings["runner"] == "dask" and timings["workers"] == 2
    workers = {json.loads(f.read_text())["worker"]
               for f in data.glob("workspace/*/analysis/comparison_*/done.json")}
    assert len(workers) == timings["worker_processes"] == 2, workers    # two worker processes
    assert all(not w.endswith(f":{process.pid}") for w in workers)      # none is the flow's
    pd.testing.assert_frame_equal(estimates(store), reference)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status
    except OSError:
        return 0


def _artifacts(url: str, flow_run_id: str) -> set[str]:
    body = json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode()
    request = urllib.request.Request(f"{url}/artifacts/filter", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return {a["key"] for a in json.loads(answer.read())}


@pytest.mark.slow
def test_served_deployments_run_submitted_and_batch_studies(world, server, tmp_path):
    out, reference = world
    url, env = server
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "cdm").symlink_to(out / "cdm")
    for name in ("study", "other"):
        shutil.copy(out / f"{name}.yaml", folder / f"{name}.yaml")
    store, data = tmp_path / "served.duckdb", tmp_path / "data"
    serving = cli(env, "serve", "--studies", str(folder), "--results", str(store),
                  "--data-dir", str(data), cwd=tmp_path)                # runs start elsewhere
    try:
        deadline = time.monotonic() + 60
        while _get(f"{url}/deployments/name/batch/batch") != 200:
            assert serving.poll() is None, serving.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the deployments were not registered"
            time.sleep(0.5)
        submitted = cli(env, "submit", str(folder / "study.yaml"), "--wait", cwd=tmp_path)
        code, stdout, err = finish(submitted, timeout=120)
        assert code == 0, (stdout, err[-3000:])
        flow_run_id = stdout.split()[2]
        assert "prefect flow-run logs" in stdout and "Completed" in stdout
        first = runs(store)
        assert list(first["study"]) == ["orchestration"] and first["n"].iloc[0] == len(reference)
        pd.testing.assert_frame_equal(estimates(store), reference)
        assert _artifacts(url, flow_run_id) == {"orchestration-summary",
                                                "orchestration-top-candidates"}
        batch = subprocess.run(
            [sys.executable, "-c", "from prefect.deployments import run_deployment; "
             "print(run_deployment('batch/batch', timeout=150, as_subflow=False).state_name)"],
            env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
        assert batch.stdout.strip() == "Completed", batch.stderr[-3000:]
        after = runs(store)
        assert sorted(after["study"]) == ["orchestration", "orchestration_b"]   # never run: ran
        unchanged = first.index[0]
        assert after.loc[unchanged, "finished_at"] == first.loc[unchanged, "finished_at"]
    finally:
        stop_group(serving)
    assert serving.poll() is not None


@pytest.mark.slow
def test_two_concurrent_runs_both_land_and_readers_never_see_half(world, server, tmp_path):
    out, reference = world
    _, env = server
    store, data = tmp_path / "store.duckdb", tmp_path / "data"
    with open_store(store):
        pass
    common = ["--results", str(store), "--data-dir", str(data), "--quiet"]
    writers = [cli(env, "run", str(out / "study.yaml"), "--runner", "processes", *common),
               cli(env, "run", str(out / "other.yaml"), *common)]
    try:
        reads = watch_while_writing(store, writers, len(reference))
        results = [finish(w) for w in writers]
    finally:
        for w in writers:
            stop_group(w)
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    assert reads > 0
    landed = runs(store)
    assert sorted(landed["study"]) == ["orchestration", "orchestration_b"]
    assert set(landed["n"]) == {len(reference)}
    for run_id in landed.index:
        pd.testing.assert_frame_equal(estimates(store, run_id), reference)
