"""No SQL from study files: injection strings in every string field are refused or kept as data.

Identifier-like fields (study, concept-set names and the names that refer to them, and the
fields with a fixed vocabulary) refuse anything but their identifiers with one line naming the
file and field; free text (description) and the source path are data: stored verbatim, opened
as a path. Either way the CDM files stay byte-identical and a result store written before keeps
its run. Config text reaches SQL only as bound parameters or registered tables: concept ids and
names through registered DataFrames (cohort/concepts.py, cohorts.py, outcomes.py), numbers
through $parameters (cohorts.py, covariates.py, outcomes.py), table and column names from
constant dicts keyed by validated literals (EXPOSURE_COLUMNS, DOMAIN_RECORDS), source paths
through `ATTACH ?` and read_parquet(path); the store writes registered frames.
"""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from flows.cli import main
from tests.plain_run import run_study_plain
from tests.test_bad_inputs import STUDY, cdm_tables
from tests.tiny_cdm import write_cdm

INJECTIONS = [
    "x'); DROP TABLE person; --",
    "1; DELETE FROM runs",
    '" OR 1=1 --',
    'c"; DROP VIEW person; --',
    "o\nDROP TABLE estimates",
    "t1;",
    "ünïcødé_名前",
    "$(touch pwned) `id`",
]

# field -> (how to put the text in the study, expected message as a regular expression)
REFUSED = {
    "study": (lambda s, x: s.update(study=x), r"study: expected an identifier"),
    "concept-set name": (
        lambda s, x: (s["concept_sets"].update({x: s["concept_sets"].pop("t1")}),
                      s.update(treatments=[x, "t2"])),
        r"concept_sets: concept-set name .* is not an identifier"),
    "treatments": (lambda s, x: s.update(treatments=["t1", x]),
                   r"treatments: unknown concept set .* \(defined: c, o, o2, t1, t2\)"),
    "comparator": (lambda s, x: s.update(comparator={"active": x}),
                   r"comparator\.active: unknown concept set"),
    "outcomes": (lambda s, x: s.update(outcomes=[x]), r"outcomes: unknown concept set"),
    "negative_controls": (lambda s, x: s.update(negative_controls=[x]),
                          r"negative_controls: unknown concept set"),
    "exposure_table": (lambda s, x: s.update(exposure_table=x),
                       r"exposure_table: Input should be 'drug_era' or 'drug_exposure', got"),
    "time_zero": (lambda s, x: s.update(time_zero=x),
                  r"time_zero: Input should be 'first_exposure', got"),
    "follow_up.strategy": (lambda s, x: s.update(follow_up={"strategy": x}),
                           r"follow_up\.strategy: Input should be 'intention_to_treat' or "
                           r"'on_treatment', got"),
    "covariates.domains": (lambda s, x: s["covariates"].update(domains=["condition", x]),
                           r"covariates\.domains: unknown covariate domain"),
    "estimators": (lambda s, x: s.update(estimators=["crude", x]),
                   r"estimators: unknown estimator"),
    "concept_sets.atlas": (lambda s, x: s["concept_sets"]["o"].update(atlas=x),
                           r"concept_sets\.o\.atlas: (contains a control character|"
                           r".*(cannot read the ATLAS concept-set file|not valid JSON|"
                           r"expected an ATLAS))"),
    "treatments.screen.exclude": (
        lambda s, x: s.update(treatments={"screen": {"exclude": [x]}}),
        r"treatments\.screen\.exclude: unknown concept set"),
    "population.require": (
        lambda s, x: s.update(population={"require": [{"concept_set": x}]}),
        r"population\.require\.concept_set: unknown concept set"),
    "execution.runner": (lambda s, x: s.update(execution={"runner": x}),
                         r"execution\.runner: Input should be 'threads', 'processes' or 'dask'"),
    "execution.dask_address": (
        lambda s, x: s.update(execution={"runner": "dask", "dask_address": x}),
        r"execution: expected a scheduler address like tcp://host:8786, got"),
    "schedule": (lambda s, x: s.update(schedule=x),
                 r"schedule: (Invalid cron string|'schedule' .* not supported)"),
}


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.iterdir()) if f.is_file()}


def _store_snapshot(results: Path, run_id: str) -> dict:
    """The tables of the store and every row of one run, as plain values."""
    with duckdb.connect(str(results), read_only=True) as con:
        tables = sorted(r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables").fetchall())
        rows = {table: con.execute(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY ALL",
                                   [run_id]).fetchall()
                for table in ("runs", "attrition", "estimates", "diagnostics", "balance")}
    return {"tables": tables, "rows": rows}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny CDM, a clean study and a result store holding one completed run of it."""
    root = tmp_path_factory.mktemp("injection")
    write_cdm(root / "cdm", **cdm_tables())
    study = yaml.safe_load(STUDY)
    (root / "clean.yaml").write_text(STUDY)
    results = root / "results.duckdb"
    run = run_study_plain(root / "clean.yaml", results, root / "data")
    return {"root": root, "study": study, "results": results, "run_id": run["run_id"],
            "cdm": _digest(root / "cdm"), "store": _store_snapshot(results, run["run_id"])}


def assert_intact(world: dict) -> None:
    """The CDM files are unchanged and the earlier run is still in the store, row for row."""
    assert _digest(world["root"] / "cdm") == world["cdm"]
    assert _store_snapshot(world["results"], world["run_id"]) == world["store"]


def write_study(world: dict, name: str, change) -> Path:
    study = copy.deepcopy(world["study"])
    change(study)
    path = world["root"] / name
    path.write_text(yaml.safe_dump(study, allow_unicode=True, sort_keys=False),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("field", list(REFUSED))
def test_refused_in_identifier_fields(world, capsys, field):
    put, message = REFUSED[field]
    for text in INJECTIONS:
        path = write_study(world, "injected.yaml", lambda s, text=text: put(s, text))
        for command in (["validate", str(path)], ["run", str(path), "--results",
                                                   str(world["results"])]):
            assert main(command) == 2, text
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err, (text, err)
            assert f"{path}:" in err and re.search(message, err), (text, err)
    assert_intact(world)


def test_source_path_is_only_a_path(world, capsys):
    """A missing source named like SQL is reported as a missing path; control characters are
    refused before any file is touched."""
    for text in INJECTIONS:
        path = write_study(world, "injected.yaml", lambda s, text=text: s.update(source=text))
        assert main(["run", str(path), "--results", str(world["results"])]) == 2, text
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (text, err)
        if "\n" in text:
            assert re.search(r"source: contains a control character \(newline, tab, "
                             r"NUL\.\.\.\)", err), err
        else:
            assert "no such file or folder (expected an OMOP CDM)" in err, err
    assert_intact(world)


def test_free_text_and_paths_named_like_sql_are_data(world, capsys):
    """A description of injection strings is stored verbatim, a CDM in a folder (and a .duckdb
    file) named like SQL is read like any other, and the earlier run stays as it was."""
    description = " | ".join(INJECTIONS)
    folder = world["root"] / "cdm x'); DROP TABLE person; -- \" OR 1=1 --"
    shutil.copytree(world["root"] / "cdm", folder)
    with duckdb.connect(str(world["root"] / "cdm'; DETACH cdm; --.duckdb")) as con:
        for file in sorted(folder.glob("*.parquet")):
            con.execute(f"CREATE TABLE {file.stem} AS SELECT * FROM read_parquet(?)",
                        [str(file)])
    as_file = write_study(world, "as_file.yaml",
                          lambda s: s.update(source="cdm'; DETACH cdm; --.duckdb"))
    assert main(["validate", str(as_file)]) == 0
    path = write_study(world, "described.yaml",
                       lambda s: s.update(description=description, source=folder.name))
    assert main(["validate", str(path)]) == 0
    capsys.readouterr()
    run = run_study_plain(path, world["results"], world["root"] / "data")
    with duckdb.connect(str(world["results"]), read_only=True) as con:
        stored, source = con.execute("SELECT description, source_path FROM runs WHERE run_id = ?",
                                     [run["run_id"]]).fetchone()
        estimates = con.execute(
            "SELECT treatment, estimator, estimate FROM estimates WHERE run_id = ? ORDER BY ALL",
            [run["run_id"]]).fetchall()
        before = con.execute(
            "SELECT treatment, estimator, estimate FROM estimates WHERE run_id = ? ORDER BY ALL",
            [world["run_id"]]).fetchall()
    assert stored == description and source == str(folder)
    assert estimates == before  # same data, same results
    assert _digest(folder) == world["cdm"]
    assert_intact(world)


QUERIES = [
    # (command line, exit code, expected output on stdout or stderr)
    (["query", "1; DELETE FROM runs"], 2, r"query is not valid SQL: Parser Error"),
    (["query", "SELECT 1; DELETE FROM runs"], 2, r"expected one SELECT statement, got 2"),
    (["query", "DROP TABLE runs"], 2, r"read-only here: only SELECT queries are allowed"),
    (["rank", "--study", "x' OR 1=1 --"], 0, r"\(no rows\)"),
    (["rank", "--outcome", "o'; DROP TABLE estimates; --"], 0, r"\(no rows\)"),
]


@pytest.mark.parametrize(("argv", "code", "expected"), QUERIES)
def test_store_commands_do_not_execute_injected_text(world, capsys, argv, code, expected):
    assert main([*argv, "--results", str(world["results"])]) == code
    out, err = capsys.readouterr()
    assert re.search(expected, out + err), out + err
    assert "Traceback" not in err and err.count("\n") == (1 if code else 0)
    assert_intact(world)
