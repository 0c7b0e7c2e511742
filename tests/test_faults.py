"""Fault injection: hostile study files, hostile queries, dirty data, small cells.

Each test reproduces one finding of the adversarial pass (issue #16) and fails on the code
before it: the numbers of inputs tried are in README's Guarantees table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from flows.config import MAX_STUDY_FILE_BYTES, StudyFileError, load_study
from results.store import StoreError, open_store, query, write_run
from tests.test_bad_inputs import cli_run as cli_run  # a fixture
from tests.test_config import GOOD

ROOT = Path(__file__).parents[1]


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def laughs(levels: int, key: str) -> str:
    """A "billion laughs" study: `levels` anchors, each a list of ten aliases of the one before,
    the last one given as `key` (10**levels values once expanded, in about 1 KB)."""
    lines = ["_0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"_{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    study = GOOD.replace("treatments: [t]", f"treatments: *l{levels - 1}") if key == "treatments" \
        else GOOD + f"{key}: *l{levels - 1}\n"
    return "\n".join(lines) + "\n" + study


# ---- 2. bounded input -------------------------------------------------------------------


@pytest.mark.parametrize(("levels", "key"), [(6, "negative_controls"), (9, "negative_controls"),
                                            (9, "treatments"), (12, "negative_controls")])
def test_alias_bombs_are_refused_cheaply(tmp_path, capsys, levels, key):
    path = write(tmp_path, laughs(levels, key))
    assert path.stat().st_size < 2_000
    started = time.process_time()
    assert main(["validate", "--no-source", str(path)]) == 2
    err = capsys.readouterr().err
    assert "expands (through YAML aliases) to more than 100,000 values" in err
    assert err.count("\n") == 1 and len(err) < 400
    assert time.process_time() - started < 5  # a bound, not a timing: the old code took 17 s+


def test_a_small_alias_still_works(tmp_path):
    text = GOOD.replace("outcomes: [o]", "outcomes: &outs [o]\nnegative_controls: [555]")
    assert load_study(write(tmp_path, text)).config.outcomes == ["o"]


def test_a_recursive_alias_is_refused(tmp_path):
    with pytest.raises(StudyFileError, match="refers to itself"):
        load_study(write(tmp_path, GOOD + "extra: &a [1, *a]\n"))


def test_oversized_files_and_fields_are_refused_with_their_size(tmp_path, capsys):
    big = write(tmp_path, GOOD + f"description: {'x' * (MAX_STUDY_FILE_BYTES + 1)}\n")
    assert main(["validate", "--no-source", str(big)]) == 2
    err = capsys.readouterr().err
    assert "a study file may have at most 1,000,000" in err and len(err) < 300
    long = write(tmp_path, GOOD + f"description: {'x' * 20_000}\n", "long.yaml")
    assert main(["validate", "--no-source", str(long)]) == 2
    err = capsys.readouterr().err
    assert "description: String should have at most 10000 characters" in err and len(err) < 400


def test_a_huge_bad_item_is_not_stringified_whole(tmp_path, capsys):
    items = ", ".join(["[" + ", ".join(["1.5"] * 50) + "]"] * 50)
    path = write(tmp_path, GOOD + f"negative_controls: [{items}]\n")
    assert main(["validate", "--no-source", str(path)]) == 2
    err = capsys.readouterr().err
    assert "expected concept-set names or concept ids" in err and len(err) < 400


def test_the_file_is_parsed_once(tmp_path, monkeypatch):
    import yaml

    calls = []
    for name in ("compose", "safe_load", "load"):
        monkeypatch.setattr(yaml, name, lambda *a, _n=name, **k: calls.append(_n))
    original = yaml.SafeLoader.get_single_node
    monkeypatch.setattr(yaml.SafeLoader, "get_single_node",
                        lambda self: calls.append("parse") or original(self))
    load_study(write(tmp_path, GOOD))
    assert calls == ["parse"]


@pytest.mark.parametrize(("text", "message"), [
    (GOOD + "min_cell_count: 0\n", r"min_cell_count: Input should be greater than or equal to 1"),
    (GOOD + "min_cell_count: true\n", r"min_cell_count: Input should be a valid integer"),
    (GOOD + "min_cell_count: 5.5\n", r"min_cell_count: Input should be a valid integer"),
    (GOOD + "diagnostics: {max_smd: .inf}\n", r"diagnostics\.max_smd: Input should be a finite"),
    (GOOD + "diagnostics: {max_mdrr: .nan}\n", r"diagnostics\.max_mdrr: Input should be a finite"),
    (GOOD + "execution: {memory_limit: 99999999TB}\n",
     r"execution\.memory_limit: expected a memory limit between 100MB and 1000TB"),
    (GOOD + "execution: {memory_limit: 1KB}\n", r"execution\.memory_limit: expected a memory"),
])
def test_values_that_would_switch_protections_off_are_refused(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(StudyFileError, match=message):
        load_study(path)
    assert main(["validate", "--no-source", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---- 5. query: read statements only, bounded ---------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "r.duckdb"
    write_run(path, {"run_id": "a", "status": "completed"}, {})
    return path


@pytest.mark.parametrize(("sql", "message"), [
    ("CALL enable_logging(storage='file', storage_path='log')", "got a CALL statement"),
    ("SELECT * FROM enable_logging(storage='file')", "table function enable_logging()"),
    ("SELECT * FROM runs, (SELECT * FROM duckdb_settings())", "table function duckdb_settings"),
    ("SET memory_limit = '100GB'", "got a SET statement"),
    ("PRAGMA enable_profiling", "got a PRAGMA statement"),
    ("SELECT 1; DELETE FROM runs", "expected one SELECT statement, got 2"),
    ("ATTACH 'other.duckdb'", "got a ATTACH statement"),
    ("DELETE FROM runs", "read-only"),
    ("SELEKT 1", "not valid SQL"),
])
def test_query_refuses_anything_but_one_select_before_duckdb_runs_it(store, capsys, sql,
                                                                      message):
    assert main(["query", sql, "--results", str(store)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert query(store, "SELECT count(*) AS n FROM runs")["n"][0] == 1


def test_enable_logging_no_longer_aborts_the_process(store):
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "query",
         "CALL enable_logging(storage='file', storage_path='x')", "--results", str(store)],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr


def test_query_has_a_time_and_a_memory_limit(store, capsys):
    endless = "SELECT count(*) FROM range(1000000000000) a"
    assert main(["query", endless, "--results", str(store), "--timeout", "1"]) == 2
    assert "query stopped after 1 s" in capsys.readouterr().err
    hungry = "SELECT list(range) FROM range(100000000)"
    assert main(["query", hungry, "--results", str(store), "--memory-limit", "100MB"]) == 2
    assert "Out of Memory" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["query", "SELECT 1", "--results", str(store), "--timeout", "-3"])


def _hold_store(store: Path, seconds: float) -> subprocess.Popen:
    """A process that opens the store for writing (DuckDB's file lock) for `seconds`."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, time, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
         f" time.sleep({seconds}); c.close()", str(store)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_query_waits_for_a_writer_instead_of_failing(store):
    holder = _hold_store(store, 2)
    try:
        with pytest.raises(Exception, match="lock"):  # what README used to recommend
            import duckdb
            duckdb.connect(str(store), read_only=True)
        assert query(store, "SELECT run_id FROM runs")["run_id"].tolist() == ["a"]
    finally:
        holder.wait(timeout=30)


def test_open_store_read_only_gives_up_with_a_clear_line(store):
    holder = _hold_store(store, 5)
    try:
        with pytest.raises(StoreError, match="cannot open"), \
                open_store(store, read_only=True, wait_seconds=0.3):
            pass
    finally:
        holder.kill()
        holder.wait()



# ---- 3. data problems found by validate, before a run -------------------------------------


def _bad_page(folder: Path, table: str) -> None:
    """Rewrite a table with snappy pages and overwrite bytes inside its first data page: the
    footer still reads, the data does not."""
    import pandas as pd

    frame = pd.read_parquet(folder / f"{table}.parquet")
    frame.to_parquet(folder / f"{table}.parquet", compression="snappy", index=False)
    data = bytearray((folder / f"{table}.parquet").read_bytes())
    data[60:300] = b"\xab" * 240
    (folder / f"{table}.parquet").write_bytes(bytes(data))


def _validate(capsys, study: Path) -> tuple[int, str]:
    code = main(["validate", str(study)])
    return code, capsys.readouterr().err


def test_validate_finds_what_the_run_would(tmp_path, capsys):
    import pandas as pd

    from tests.test_bad_inputs import setup_study

    study = setup_study(tmp_path)
    cdm = tmp_path / "cdm"
    era = pd.read_parquet(cdm / "drug_era.parquet")
    era.iloc[:0].to_parquet(cdm / "drug_era.parquet", index=False)
    code, err = _validate(capsys, study)
    assert code == 2 and "table drug_era has no rows" in err and err.count("\n") == 1
    era.assign(drug_era_start_date=None).to_parquet(cdm / "drug_era.parquet", index=False)
    code, err = _validate(capsys, study)
    assert code == 2 and "table drug_era has no rows with a drug_era_start_date" in err
    era.to_parquet(cdm / "drug_era.parquet", index=False)
    _bad_page(cdm, "drug_era")
    code, err = _validate(capsys, study)
    assert code == 2 and err.count("\n") == 1, err
    assert "drug_era.parquet: table drug_era cannot be read" in err


def test_tables_the_study_does_not_need_never_block_it(tmp_path, capsys):
    from tests.test_bad_inputs import setup_study

    study = setup_study(tmp_path)
    (tmp_path / "cdm" / "procedure_occurrence.parquet").write_bytes(b"")
    assert _validate(capsys, study)[0] == 0
    (tmp_path / "cdm" / "drug_era.parquet").write_bytes(b"")
    code, err = _validate(capsys, study)
    assert code == 2 and "drug_era.parquet: not a readable Parquet file" in err


def test_two_files_for_one_table_are_refused(tmp_path, capsys):
    from tests.test_bad_inputs import setup_study

    study = setup_study(tmp_path)
    (tmp_path / "cdm" / "PERSON.parquet").write_bytes(
        (tmp_path / "cdm" / "person.parquet").read_bytes())
    code, err = _validate(capsys, study)
    assert code == 2 and "both PERSON.parquet and person.parquet would be table person" in err


@pytest.mark.parametrize("where", ["source", "atlas"])
def test_fifos_are_refused_not_read(tmp_path, where):
    from tests.test_bad_inputs import STUDY, setup_study

    study = setup_study(tmp_path)
    os.mkfifo(tmp_path / "pipe.duckdb")
    text = (STUDY.replace("source: cdm", "source: pipe.duckdb") if where == "source" else
            STUDY.replace("o: {include: [201]}", "o: {atlas: pipe.duckdb}"))
    study.write_text(text)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(study)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr


def test_results_that_cannot_be_a_store_are_refused_before_any_work(tmp_path, capsys):
    from tests.test_bad_inputs import setup_study

    study = setup_study(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n" * 100)
    data = tmp_path / "data"
    for results in (text, tmp_path, text / "r.duckdb"):
        assert main(["run", str(study), "--results", str(results), "--data-dir", str(data)]) == 2
        err = capsys.readouterr().err
        assert str(results) in err and err.count("\n") == 1, err
    assert not data.exists()
    assert text.read_text() == "my notes\n" * 100


# ---- 1. no small count leaves the store, in any form --------------------------------------

SMALL = 20  # the study's min_cell_count: the t2 arm (12 persons) and 3 odd persons are below


def _small_cells(tables: dict) -> None:
    """12 users of t2 (the rest never exposed), 3 persons born after their time zero (kept,
    with a warning) and 2 observed for less than the 365 days before time zero required."""
    from tests.tiny_cdm import d

    t2_users = sorted(r[0] for r in tables["drug_era"] if r[1] == 103)
    tables["drug_era"] = [r for r in tables["drug_era"] if r[1] != 103 or r[0] in t2_users[:12]]
    tables["person"] = [(p, g, 2015 if p in (3, 6, 9) else y) for p, g, y in tables["person"]]
    tables["observation_period"] = [(p, d("2011-12-15") if p in (12, 15) else s, e)
                                    for p, s, e in tables["observation_period"]]


def _shown_counts_are_safe(frame, columns: list[str]) -> None:
    """Every count shown is 0, at least SMALL, missing, or masked."""
    for column in columns:
        for value in frame[column].dropna().astype(str):
            value = value.removesuffix(".0")
            assert value in ("0", f"<{SMALL}", f"<{SMALL} removed", "<NA>") or \
                int(value) >= SMALL, (column, value)


def _text_is_safe(texts) -> None:
    from results.masking import mask_free_text

    for text in texts:
        if isinstance(text, str):
            assert mask_free_text(text, SMALL) == text, text


def test_small_cells_leave_in_no_form(tmp_path, capsys, cli_run):
    import pandas as pd

    from results.export import EXPORTS, PERSON_COUNTS
    from tests.test_bad_inputs import STUDY, setup_study

    study = setup_study(tmp_path, _small_cells, STUDY + f"min_cell_count: {SMALL}\n")
    argv = [a for a in cli_run(study) if a != "--quiet"]
    assert main(argv) == 0
    terminal = capsys.readouterr().out
    results = study.parent / "results.duckdb"
    with open_store(results, read_only=True) as con:
        (n_t2,) = con.execute("SELECT max(n_treated) FROM estimates WHERE treatment = 't2'"
                              ).fetchone()
        (warnings,) = con.execute("SELECT warnings FROM runs").fetchone()
        (ess,) = con.execute("SELECT max(ess_treated) FROM diagnostics WHERE treatment = 't2'"
                             ).fetchone()
    assert n_t2 == 12 and ess is not None  # the store keeps exact figures
    assert "<20 cohort member(s)" in warnings  # warnings are logged to Prefect as stored
    _text_is_safe(__import__("json").loads(warnings))
    _text_is_safe(line for line in terminal.splitlines() if line.lstrip().startswith("t2"))
    assert "<20" in terminal
    for what in EXPORTS:
        for suffix in (".csv", ".json", ".parquet"):
            out = tmp_path / f"{what}{suffix}"
            assert main(["export", what, "--out", str(out), "--results", str(results)]) == 0
            frame = {".parquet": pd.read_parquet, ".csv": pd.read_csv,
                     ".json": pd.read_json}[suffix](out)
            _shown_counts_are_safe(frame, [c for c in PERSON_COUNTS if c in frame])
            for column in ("message", "reasons", "calibration_note", "description"):
                _text_is_safe(frame.get(column, []))
            if what == "diagnostics":
                masked = frame["n_treated"].astype(str) == f"<{SMALL}"
                assert masked.any() and frame.loc[masked, "ess_treated"].isna().all()
            if what == "attrition":
                _no_small_differences(frame)
    capsys.readouterr()
    assert main(["rank", "--results", str(results), "--format", "csv"]) == 0
    import io
    ranked = pd.read_csv(io.StringIO(capsys.readouterr().out))
    _shown_counts_are_safe(ranked, [c for c in PERSON_COUNTS if c in ranked])
    from results.report import write_report

    html = write_report(results, tmp_path / "report.html").read_text()
    assert "&lt;20 cohort member(s)" in html and "3 cohort member" not in html
    assert "<20 removed</td>" in html  # prior observation removed 2 persons: not shown


def _no_small_differences(frame) -> None:
    """Consecutive counts shown in an attrition table never differ by 1 to SMALL - 1."""
    for _, steps in frame.groupby("comparison_id"):  # one outcome: its step comes last
        for column in ("treated_persons", "comparator_persons"):
            shown = [int(v) for v in steps.sort_values("step_index")[column].astype(str)
                     .str.removesuffix(".0") if v.isdigit()]
            assert all(not 0 < a - b < SMALL for a, b in pairwise(shown)), shown


# ---- 5. results do not depend on how persons are numbered ---------------------------------


@pytest.mark.shared_data
@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "eunomia_gibleed").is_dir(),
                    reason="GiBleed (shared team data) is absent")
def test_relabelled_person_ids_give_identical_estimates_and_verdicts(tmp_path):
    import duckdb

    from tests.plain_run import run_study_plain
    from tests.shared_data import GIBLEED

    negated = tmp_path / "negated"
    negated.mkdir()
    with duckdb.connect() as con:
        for file in sorted(GIBLEED.glob("*.parquet")):
            columns = [c for (c,) in con.execute(
                "SELECT name FROM parquet_schema(?) WHERE name <> 'schema'", [str(file)]
            ).fetchall()]
            select = ("* REPLACE (-CAST(person_id AS BIGINT) AS person_id)"
                      if "person_id" in columns else "*")
            con.execute(f"COPY (SELECT {select} FROM read_parquet(?)) TO "
                        f"'{negated / file.name}' (FORMAT parquet)", [str(file)])
    verdicts = []
    for name, source in (("original", GIBLEED), ("negated", negated)):
        study = tmp_path / f"{name}.yaml"
        study.write_text((ROOT / "configs" / "gibleed.yaml").read_text().replace(
            "source: ../../shared/data/eunomia_gibleed", f"source: {source}"))
        results = tmp_path / f"{name}.duckdb"
        run_study_plain(study, results, tmp_path / f"data-{name}")
        verdicts.append(query(results, """
            SELECT e.estimator, e.n_treated, e.n_comparator, e.estimate, e.ci_low, e.ci_high,
                   d.ps_c, d.ps_auc, d.max_abs_smd_after, d.passed, d.reasons
            FROM estimates e JOIN diagnostics d USING (run_id, comparison_id, outcome, estimator)
            WHERE e.role = 'outcome' ORDER BY e.estimator"""))
    original, relabelled = verdicts
    assert original["n_treated"].tolist() == [1800, 1800, 1800]
    exact = ["estimator", "n_treated", "n_comparator", "ps_c", "passed", "reasons"]
    assert original[exact].equals(relabelled[exact]), (original, relabelled)
    figures = ["estimate", "ci_low", "ci_high", "ps_auc", "max_abs_smd_after"]
    np.testing.assert_allclose(original[figures], relabelled[figures], rtol=1e-9)  # summation


# ---- 4. nothing left running -------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if (Path("/proc") / str(p)).exists()
            and b"(Z)" not in (Path("/proc") / str(p) / "stat").read_bytes()[:80]}


@pytest.mark.slow
def test_a_killed_run_leaves_no_process_behind(tmp_path):
    import signal

    from tests.test_bad_inputs import setup_study

    study = setup_study(tmp_path)
    cli = Path(sys.executable).with_name("cohortflow")
    run = subprocess.Popen([str(cli), "run", str(study), "--quiet", "--results",
                            str(tmp_path / "r.duckdb"), "--data-dir", str(tmp_path / "data")],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not any(b"uvicorn" in _cmdline(p) for p in _descendants(run.pid)):
        assert run.poll() is None, "the run ended before Prefect's temporary server started"
        assert time.monotonic() < deadline, "Prefect's temporary server never started"
        time.sleep(0.1)
    started = _descendants(run.pid)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 60  # SIGTERM, then SIGKILL after 5 s
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(started), [_cmdline(p) for p in _alive(started)]


def test_clean_removes_finished_and_abandoned_workspaces_and_stale_locks(tmp_path, capsys):
    import fcntl

    from tests.plain_run import run_study_plain
    from tests.test_bad_inputs import setup_study

    study, data, results = setup_study(tmp_path), tmp_path / "data", tmp_path / "r.duckdb"
    run = run_study_plain(study, results, data)
    root = data / "workspace"
    finished = root / run["run_id"]
    assert (finished / "cohort.parquet").exists() or any(finished.rglob("*.parquet"))
    abandoned, recent, busy = (root / name for name in ("old-run", "new-run", "busy-run"))
    for folder in (abandoned, recent, busy):
        (folder / "analysis").mkdir(parents=True)
        (folder / "analysis" / "persons.parquet").write_bytes(b"person ids")
    old = time.time() - 30 * 86_400
    for path in (abandoned, abandoned / "analysis", abandoned / "analysis" / "persons.parquet",
                 busy, busy / "analysis", busy / "analysis" / "persons.parquet"):
        os.utime(path, (old, old))
    (root / "gone-run.lock").write_text("")
    report = data / "reports" / "r.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("<html>")
    os.utime(report, (old, old))
    argv = ["clean", "--data-dir", str(data), "--results", str(results),
            "--reports-older-than", "10"]
    with open(root / "busy-run.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run in progress
        assert main([*argv, "--dry-run"]) == 0
        assert finished.exists() and abandoned.exists() and report.exists()
        assert "would remove (dry run): workspaces of completed runs: 1" in capsys.readouterr().out
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("workspaces of completed runs: 1; workspaces of abandoned runs: 1; stale lock "
            "files: 1; old reports: 1; skipped (a run holds its lock): 1") in out
    assert not finished.exists() and not abandoned.exists() and not report.exists()
    assert recent.exists() and busy.exists() and not (root / "gone-run.lock").exists()
    assert query(results, "SELECT count(*) AS n FROM runs")["n"][0] == 1


def test_a_min_cell_count_below_five_is_warned_about(tmp_path):
    from tests.plain_run import run_study_plain
    from tests.test_bad_inputs import STUDY, setup_study

    study = setup_study(tmp_path, study=STUDY + "min_cell_count: 3\n")
    run = run_study_plain(study, tmp_path / "r.duckdb", tmp_path / "data")
    assert run["warnings"][0].startswith("min_cell_count is 3: counts from 3 persons up")


@pytest.mark.parametrize(("text", "masked"), [
    ("only 3 persons in the treated arm", "only <5 persons in the treated arm"),
    ("persons in the treated arm: 3.", "persons in the treated arm: <5."),
    ("person: 3 cohort member(s) with time zero", "person: <5 cohort member(s) with time zero"),
    ("1,800 and 4; 2 of 3", "1,800 and <5; <5 of <5"),
    ("comparison 2 (t vs c) failed", "comparison 2 (t vs c) failed"),  # an id, not a count
    ("window [-30, -1], outcome_1, 0.079, 1:1, 2020-01-05", "window [-30, -1], outcome_1, "
                                                           "0.079, 1:1, 2020-01-05"),
])
def test_free_text_masks_every_small_whole_number(text, masked):
    from results.masking import mask_free_text

    assert mask_free_text(text, 5) == masked


def test_prefect_artifacts_of_a_small_cell_run_hold_no_small_count(tmp_path, monkeypatch):
    import json

    import flows.run_study as run_study
    from tests.plain_run import run_study_plain
    from tests.test_bad_inputs import STUDY, setup_study

    study = setup_study(tmp_path, _small_cells, STUDY + f"min_cell_count: {SMALL}\n"
                        "estimators: [crude]\ndiagnostics: {max_smd: 100, min_equipoise: 0, "
                        "max_mdrr: 1000, max_ease: 100}\n")  # ranked: the table has rows
    run = run_study_plain(study, tmp_path / "r.duckdb", tmp_path / "data")
    published: list = []
    monkeypatch.setattr(run_study, "create_markdown_artifact",
                        lambda markdown, **_: published.append(markdown))
    monkeypatch.setattr(run_study, "create_table_artifact",
                        lambda table, **_: published.append(table))
    run_study._publish_artifacts(run, tmp_path / "r.duckdb")
    markdown, table = published
    _text_is_safe(line for line in markdown.splitlines() if line.startswith("- "))  # failures
    rows = [row for row in table if row.get("treatment") == "t2"]
    assert rows and all(row["n_treated"] == f"<{SMALL}" for row in rows), json.dumps(table)
