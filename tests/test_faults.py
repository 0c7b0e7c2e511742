"""Fault injection: hostile study files, hostile queries, dirty data, small cells.

Each test reproduces one finding of the adversarial pass (issue #16) and fails on the code
before it: the numbers of inputs tried are in README's Guarantees table.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from flows.config import MAX_STUDY_FILE_BYTES, StudyFileError, load_study
from results.store import StoreError, open_store, query, write_run
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


def test_query_waits_for_a_writer_instead_of_failing(store):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, time, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
         " time.sleep(2); c.close()", str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match="lock"):  # what README used to recommend
            import duckdb
            duckdb.connect(str(store), read_only=True)
        assert query(store, "SELECT run_id FROM runs")["run_id"].tolist() == ["a"]
    finally:
        holder.wait(timeout=30)


def test_open_store_read_only_gives_up_with_a_clear_line(store):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, time, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
         " time.sleep(5)", str(store)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        with pytest.raises(StoreError, match="cannot open"), \
                open_store(store, read_only=True, wait_seconds=0.3):
            pass
    finally:
        holder.kill()
        holder.wait()

