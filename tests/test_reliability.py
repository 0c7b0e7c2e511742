"""Interrupted runs, concurrent writers and determinism, on a small synthetic CDM.

A run is killed with SIGKILL inside cohort preparation, inside the analysis of a comparison and
inside the final write transaction (before COMMIT), and at random moments; each time the store
must hold every earlier run intact and nothing of the killed one, and a rerun must give exactly
the estimates of an uninterrupted run. A run is named by its study content and data, so a rerun
replaces its own rows; two runs of different studies write the same store at once while a
reader polls it; both land and the reader never sees half a run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from cohort.synthetic import generate_demo_cdm
from results.store import open_store
from tests.plain_run import run_study_plain
from tests.plain_run import stored_estimates as estimates
from tests.store_watch import watch_while_writing

ROOT = Path(__file__).parents[1]
STUDY = """\
study: reliability
source: cdm
concept_sets:
  comparator_drug: {include: [2000000100]}
  drug_a: {include: [2000000101]}
  drug_c: {include: [2000000103]}
  outcome_1: {include: [2000001001]}
  outcome_4: {include: [2000001004]}
treatments: [drug_a, drug_c]
comparator: {active: comparator_drug}
outcomes: [outcome_1, outcome_4]
negative_controls: [2000001201, 2000001202, 2000001203, 2000001204, 2000001205, 2000001206]
follow_up: {start_day: 1}
"""

# Runs the study in a child process; KILL_AT names a function to replace by a SIGKILL.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.plain_run import run_study_plain
    import cohort.prepare, flows.pipeline, results.store

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    kill_at = os.environ.get("KILL_AT")
    if kill_at == "prepare":              # after cohorts and outcomes, before covariates
        cohort.prepare.build_covariates = die
    elif kill_at == "analyze":            # in the middle of the first comparison's analysis
        flows.pipeline.analyze_comparison = die
    elif kill_at == "write":              # rows inserted, transaction not committed
        results.store.refresh_meta_analysis = die
    run_study_plain(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
""")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability")
    generate_demo_cdm(out / "cdm", persons=8_000, seed=5)
    (out / "study.yaml").write_text(STUDY)
    (out / "other.yaml").write_text(STUDY.replace("study: reliability", "study: reliability_b"))
    (out / "child.py").write_text(CHILD.format(root=str(ROOT)))
    reference = out / "reference.duckdb"
    run_study_plain(out / "study.yaml", reference, out / "data")
    return out, estimates(reference)




def child(out: Path, store: Path, kill_at: str | None = None,
          study: str = "study.yaml") -> subprocess.Popen:
    env = {**os.environ, "KILL_AT": kill_at or ""}
    return subprocess.Popen([sys.executable, str(out / "child.py"), str(out / study),
                             str(store), str(out / "data")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_ids(store: Path) -> dict[str, int]:
    with open_store(store, read_only=True) as con:
        rows = con.execute("SELECT run_id, (SELECT count(*) FROM estimates e "
                           "WHERE e.run_id = r.run_id) FROM runs r").fetchall()
    return dict(rows)


@pytest.mark.parametrize("kill_at", ["prepare", "analyze", "write"])
def test_killed_run_leaves_nothing_and_rerun_equals_uninterrupted(world, tmp_path, kill_at):
    out, reference = world
    store = tmp_path / "store.duckdb"
    run_study_plain(out / "study.yaml", store, out / "data")          # an earlier run
    before = run_ids(store)
    killed = child(out, store, kill_at)
    assert killed.wait(timeout=300) == -signal.SIGKILL
    assert run_ids(store) == before                                  # nothing half-written
    for table in ("attrition", "diagnostics", "balance", "estimates", "meta_analysis"):
        with open_store(store, read_only=True) as con:
            runs = {r[0] for r in con.execute(f"SELECT DISTINCT run_id FROM {table}").fetchall()}
        assert runs <= set(before), table
    rerun = run_study_plain(out / "study.yaml", store, out / "data")
    pd.testing.assert_frame_equal(estimates(store, rerun["run_id"]), reference)


def test_random_kills_never_leave_partial_runs(world, tmp_path):
    out, reference = world
    store = tmp_path / "store.duckdb"
    started = time.monotonic()
    run_study_plain(out / "study.yaml", store, out / "data")
    duration = time.monotonic() - started
    rng = random.Random(7)
    for _ in range(4):
        process = child(out, store)
        time.sleep(rng.uniform(0.2, duration + 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        counts = run_ids(store)
        assert set(counts.values()) == {len(reference)}             # every run complete
    for run_id in run_ids(store):
        pd.testing.assert_frame_equal(estimates(store, run_id), reference)


def test_two_writers_and_a_reader(world, tmp_path):
    out, reference = world
    store = tmp_path / "store.duckdb"
    with open_store(store):
        pass
    writers = [child(out, store), child(out, store, study="other.yaml")]  # distinct runs
    reads = watch_while_writing(store, writers, len(reference))
    assert [w.returncode for w in writers] == [0, 0], [w.stderr.read()[-2000:] for w in writers]
    assert reads > 0                                                 # the reader did read
    counts = run_ids(store)
    assert len(counts) == 2 and set(counts.values()) == {len(reference)}
    for run_id in counts:                                            # and deterministic
        pd.testing.assert_frame_equal(estimates(store, run_id), reference)
