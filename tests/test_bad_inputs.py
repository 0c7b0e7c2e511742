"""Bad inputs, each with its exact error or recorded failure ("Reliability and safety").

Counted together with tests/test_config.py (its BAD_FILES, 29 when this file was written, plus
its missing file, missing source, missing table, missing column, unknown concept id and
wrong-kind source cases) and the unknown concept id of tests/test_cohorts.py, which are not
repeated here.

Decisions tested here:
- a key given twice in one mapping is refused (PyYAML would keep the last one silently);
- study and concept-set names are ASCII identifiers: non-ASCII names and names with a trailing
  newline are refused (they become run ids, paths and column values); free text such as
  `description` may hold any Unicode;
- follow-up never starts before time zero (`start_day` >= 0), windows reach back at most 100
  years and are listed once;
- an empty (or date-less) person, observation_period, exposure or condition_occurrence table,
  a study that leaves no comparison with persons in both arms (e.g. min_age 150) and a study
  with no outcome event at all are input errors (exit 2, one line) raised while preparing the
  run: nothing would be estimable;
- records the cohort rules skip or repair (NULL dates, ends before starts, duplicate persons,
  overlapping observation periods, time zero before birth) are counted in the run's warnings;
  duplicated records never double-count persons or events.
"""

from __future__ import annotations

import re
import sys
import types
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from flows.cli import main
from flows.config import StudyFileError, load_study
from tests.plain_run import run_study_plain
from tests.tiny_cdm import concepts, d, write_cdm

T1, T2, C, OUT, OUT2, COND, MARKER, EVERYONE = 101, 103, 102, 201, 202, 301, 999, 998

STUDY = """\
study: bad_inputs
source: cdm
concept_sets:
  t1: {include: [101]}
  t2: {include: [103]}
  c: {include: [102]}
  o: {include: [201]}
  o2: {include: [202]}
treatments: [t1, t2]
comparator: {active: c}
outcomes: [o]
covariates: {domains: [condition, demographics]}
"""


def cdm_tables(n: int = 90, seed: int = 0) -> dict[str, list[tuple]]:
    """Two treatments and a comparator (a third of the persons each), a baseline condition in
    40% and the outcome after time zero in about a third; everyone observed 2010-2016."""
    rng = np.random.default_rng(seed)
    person, period, era, condition = [], [], [], []
    for pid in range(1, n + 1):
        drug = (T1, T2, C)[pid % 3]
        person.append((pid, 8507 if pid % 2 else 8532, 1940 + pid % 40))
        period.append((pid, d("2010-01-01"), d("2016-12-31")))
        index = d("2012-01-01") + timedelta(days=int(rng.integers(0, 300)))
        era.append((pid, drug, index, index + timedelta(days=30)))
        if rng.random() < 0.4:
            condition.append((pid, COND, index - timedelta(days=10)))
        if rng.random() < 0.35:
            condition.append((pid, OUT, index + timedelta(days=int(rng.integers(1, 900)))))
    return dict(
        person=person, observation_period=period, drug_era=era, condition_occurrence=condition,
        concept=concepts((T1, "drug T1", "Drug"), (T2, "drug T2", "Drug"), (C, "drug C", "Drug"),
                         (OUT, "outcome O", "Condition"), (OUT2, "outcome O2", "Condition"),
                         (COND, "condition X", "Condition"), (MARKER, "marker", "Condition"),
                         (EVERYONE, "recorded for all", "Condition"),
                         (8507, "MALE", "Gender"), (8532, "FEMALE", "Gender")),
        concept_ancestor=[(x, x) for x in (T1, T2, C, OUT, OUT2, COND, MARKER, EVERYONE)],
    )


def setup_study(tmp_path: Path, change=None, study: str = STUDY) -> Path:
    """Write the tiny CDM (after `change(tables)`) and the study file; return the study path."""
    tables = cdm_tables()
    if change is not None:
        change(tables)
    write_cdm(tmp_path / "cdm", **tables)
    path = tmp_path / "study.yaml"
    path.write_text(study)
    return path


def run_plain(study_file: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Run without Prefect; return the run record, its estimates and its attrition rows."""
    results = study_file.parent / "results.duckdb"
    run = run_study_plain(study_file, results, study_file.parent / "data")
    with duckdb.connect(str(results), read_only=True) as con:
        estimates, attrition = (
            con.execute(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY ALL",
                        [run["run_id"]]).df()
            for table in ("estimates", "attrition"))
    return run, estimates, attrition


def input_error(capsys, argv: list[str], path: Path | str, fragment: str) -> str:
    """The CLI refuses with exit code 2 and one line naming `path`, matching `fragment`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err
    assert re.search(fragment, err), err
    return err


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> pd.DataFrame:
    """Estimates of the clean tiny CDM, for comparing data oddities against."""
    _, estimates, _ = run_plain(setup_study(tmp_path_factory.mktemp("baseline")))
    assert (estimates["status"] == "ok").all() and len(estimates) == 6
    return estimates.set_index(["treatment", "outcome", "estimator"])


@pytest.fixture
def cli_run(monkeypatch):
    """`cohortflow run` with the plain runner in place of the Prefect flow (fast, same stages)."""
    fake = types.ModuleType("flows.run_study")

    def with_workers(workers: int):
        def flow(study_file: str, results_path: str, data_dir: str, show_progress: bool,
                 **options):
            return run_study_plain(Path(study_file), Path(results_path), Path(data_dir))
        return flow

    fake.with_workers = with_workers
    monkeypatch.setitem(sys.modules, "flows.run_study", fake)
    monkeypatch.setattr("flows.cli._quiet_prefect", lambda verbose, quiet: None)

    def run(study_file: Path) -> list[str]:
        return ["run", str(study_file), "--quiet", "--results",
                str(study_file.parent / "results.duckdb"),
                "--data-dir", str(study_file.parent / "data")]
    return run


# --- 1. Study files: refused by validation (validate --no-source) ------------------------------

LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
BAD_FILES = [
    # (text, expected message fragment as a regular expression)
    (STUDY.replace("  t1: {include", "\tt1: {include"),
     r"study\.yaml:4: not valid YAML: found character '\\t' that cannot start any token"),
    (STUDY + "study: other\n", r"study\.yaml:13: study: duplicate key \(first given on line 1\)"),
    (STUDY + "concept_sets:\n  t1: {include: [999]}\n",
     r"study\.yaml:13: concept_sets: duplicate key \(first given on line 3\)"),
    (STUDY.replace("  o2: {include: [202]}", "  o2: {include: [202]}\n  t1: {include: [999]}"),
     r"study\.yaml:9: concept_sets\.t1: duplicate key \(first given on line 4\)"),
    (STUDY + "population: {min_age: 18, min_age: 40}\n",
     r"study\.yaml:13: population\.min_age: duplicate key \(first given on line 13\)"),
    (STUDY + "---\n" + STUDY, r"study\.yaml:13: not valid YAML: but found another document"),
    ("", r"study\.yaml: expected a mapping of study keys at the top level"),
    (STUDY + "description: " + "[" * 600 + "]" * 600 + "\n",
     r"study\.yaml: not valid YAML: nested too deeply"),
    (STUDY + "l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + LAUGHS.replace("l8: &l8",
                                                                      "min_cell_count: &l8"),
     r"study\.yaml:\d+: the document expands \(through YAML aliases\) to more than 100,000"),
    (STUDY.replace("  t1: {include: [101]}", "  t1: [101]"),
     r"study\.yaml:4: concept_sets\.t1: Input should be a valid dictionary or instance of "
     r"ConceptSet, got \[101\]"),
    (STUDY.replace("[101]", "101"),
     r"study\.yaml:4: concept_sets\.t1\.include: Input should be a valid list, got 101"),
    (STUDY.replace("[101]", "[101.5]"),
     r"concept_sets\.t1\.include\.0: Input should be a valid integer, got a number with a "
     r"fractional part"),
    (STUDY.replace("[101]", "[true]"),
     r"concept_sets\.t1\.include\.0: expected a concept id \(a positive integer\), got True"),
    (STUDY.replace("[101]", "[99999999999999999999]"),
     r"concept_sets\.t1\.include\.0: Input should be less than or equal to 2147483647"),
    (STUDY.replace("comparator: {active: c}", "comparator: c"),
     r"study\.yaml:10: comparator: Input should be a valid dictionary or instance of Comparator"),
    (STUDY.replace("treatments: [t1, t2]", "treatments: t1"),
     r"study\.yaml:9: treatments: Input should be a valid list, got 't1'"),
    (STUDY.replace("study: bad_inputs", "study: 123"),
     r"study\.yaml:1: study: Input should be a valid string, got 123"),
    (STUDY.replace("covariates: {domains", "covariates: {windows: [[-365]], domains"),
     r"study\.yaml:12: covariates\.windows\.0\.1: a value is missing \(too few items\)"),
    (STUDY.replace("covariates: {domains", "covariates: {windows: [[-365, -1, 5]], domains"),
     r"covariates\.windows\.0: Tuple should have at most 2 items after validation, not 3"),
    (STUDY.replace("covariates: {domains", "covariates: {windows: [[-100000, -1]], domains"),
     r"study\.yaml:12: covariates\.windows: window \[-100000, -1\] reaches back more than 100 "
     r"years"),
    (STUDY.replace("covariates: {domains", "covariates: {windows: [[-30, -1], [-30, -1]], "
                                           "domains"),
     r"covariates\.windows: a window is listed twice"),
    (STUDY + "follow_up: {end_day: 100000}\n",
     r"study\.yaml:13: follow_up\.end_day: Input should be less than or equal to 36500, "
     r"got 100000"),
    (STUDY + "follow_up: {start_day: -30}\n",
     r"follow_up: start_day \(-30\) is before time zero"),
    (STUDY + "follow_up: {exclude_prior_outcome: maybe}\n",
     r"follow_up\.exclude_prior_outcome: Input should be a valid boolean.*'maybe'"),
    (STUDY + "diagnostics: {max_smd: .nan}\n",
     r"diagnostics\.max_smd: Input should be a finite number, got nan"),
    (STUDY + "population: {min_age: 151}\n",
     r"population\.min_age: Input should be less than or equal to 150, got 151"),
    (STUDY.replace("study: bad_inputs", "study: étude"),
     r"study\.yaml:1: study: expected an identifier: a letter, then letters, digits, _ or -"),
    (STUDY.replace("t1", "tä"),
     r"study\.yaml:3: concept_sets: concept-set name 'tä' is not an identifier"),
    (STUDY.replace("study: bad_inputs", 'study: "bad_inputs\\n"'),
     r"study\.yaml:1: study: expected an identifier"),
    (STUDY.replace("t1", '"t1\\n"'),
     r"concept_sets: concept-set name 't1\\n' is not an identifier"),
    (STUDY + "negative_controls: [0]\n",
     r"study\.yaml:13: negative_controls: expected concept-set names or concept ids \(positive "
     r"integers\), got 0"),
    (STUDY + "negative_controls: [true]\n",
     r"negative_controls: expected concept-set names or concept ids .*, got True"),
    (STUDY + "negative_controls: [555, 555]\n",
     r"negative_controls: a negative control is listed twice"),
    (STUDY.replace("source: cdm", "source: ''"),
     r"study\.yaml:2: source: String should have at least 1 character"),
    (STUDY.replace("source: cdm", 'source: "cdm\\0x"'),
     r"study\.yaml:2: source: contains a control character \(newline, tab, NUL\.\.\.\): "
     r"'cdm\\x00x'"),
    (STUDY.replace("source: cdm", "source: ~no_such_user_cf/cdm"),
     r"study\.yaml:2: source: cannot expand the path"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_study_files(tmp_path, capsys, text, message):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(StudyFileError, match=message):
        load_study(path)
    input_error(capsys, ["validate", "--no-source", str(path)], path, message)


def test_study_file_not_utf8(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_bytes(STUDY.encode().replace(b"bad_inputs", b"bad\xff"))
    input_error(capsys, ["validate", "--no-source", str(path)], path,
                r"study\.yaml: cannot read the file \('utf-8' codec can't decode byte 0xff")


def test_unicode_description_is_free_text(tmp_path, capsys):
    """The counterpart of the identifier rules: free text may hold any Unicode."""
    path = tmp_path / "study.yaml"
    path.write_text(STUDY + "description: 'Étude: naproxène vs célécoxib — 胃肠道出血'\n",
                    encoding="utf-8")
    assert main(["validate", "--no-source", str(path)]) == 0
    assert load_study(path).config.description.endswith("胃肠道出血")


# --- 2. Sources: refused by validate (file kinds, tables, columns, types) ----------------------

def _to_duckdb(folder: Path, target: Path) -> None:
    with duckdb.connect(str(target)) as con:
        for file in sorted(folder.glob("*.parquet")):
            con.execute(f"CREATE TABLE {file.stem} AS SELECT * FROM read_parquet(?)",
                        [str(file)])


def _rewrite(folder: Path, table: str, change) -> None:
    frame = pd.read_parquet(folder / f"{table}.parquet")
    change(frame).to_parquet(folder / f"{table}.parquet", index=False)


def _corrupt(tmp: Path, name: str, content: bytes) -> str:
    (tmp / name).write_bytes(content)
    return name


def _empty_folder(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "person.csv").write_text("person_id\n1\n")
    return "empty"


BAD_SOURCES = [
    # (id, make the source under tmp and return the study's `source`, expected message)
    ("a .parquet file", lambda tmp: "cdm/person.parquet",
     r"cdm/person\.parquet: expected a folder of <table>\.parquet files or a \.duckdb file"),
    ("a .csv file", lambda tmp: _corrupt(tmp, "cdm.csv", b"person_id\n1\n"),
     r"cdm\.csv: expected a folder of <table>\.parquet files or a \.duckdb file"),
    ("a folder without parquet files", _empty_folder,
     r"empty: no person table found; is this an OMOP CDM\?"),
    ("a corrupt .duckdb file", lambda tmp: _corrupt(tmp, "cdm.duckdb", b"garbage" * 100),
     r"cdm\.duckdb: not a readable DuckDB database \(IO Error: .* not a valid DuckDB database"),
    ("an empty .duckdb file", lambda tmp: _corrupt(tmp, "cdm.duckdb", b""),
     r"cdm\.duckdb: not a readable DuckDB database"),
    ("a corrupt parquet table",
     lambda tmp: _corrupt(tmp, "cdm/drug_era.parquet", b"not parquet at all") and "cdm",
     r"cdm/drug_era\.parquet: not a readable Parquet file \(Invalid Input Error: No magic bytes"),
    ("a missing year_of_birth", lambda tmp: _rewrite(
        tmp / "cdm", "person", lambda f: f.drop(columns=["year_of_birth"])) or "cdm",
     r"cdm: table person lacks column\(s\) year_of_birth"),
    ("person ids stored as text", lambda tmp: _rewrite(
        tmp / "cdm", "person", lambda f: f.assign(person_id="p" + f["person_id"].astype(str)))
     or "cdm", r"cdm: table person column person_id is VARCHAR \(expected an integer\)"),
    ("dates stored as text", lambda tmp: _rewrite(
        tmp / "cdm", "drug_era",
        lambda f: f.assign(drug_era_start_date=f["drug_era_start_date"].astype(str))) or "cdm",
     r"cdm: table drug_era column drug_era_start_date is VARCHAR \(expected DATE\)"),
]


@pytest.mark.parametrize(("make", "message"), [case[1:] for case in BAD_SOURCES],
                         ids=[case[0] for case in BAD_SOURCES])
def test_bad_sources(tmp_path, capsys, make, message):
    path = setup_study(tmp_path)
    source = make(tmp_path)
    path.write_text(STUDY.replace("source: cdm", f"source: {source}"))
    input_error(capsys, ["validate", str(path)], tmp_path / source, message)


def test_missing_table_of_a_requested_covariate_domain(tmp_path, capsys):
    path = setup_study(tmp_path, study=STUDY.replace("[condition, demographics]",
                                                     "[condition, procedure]"))
    (tmp_path / "cdm" / "procedure_occurrence.parquet").unlink()
    input_error(capsys, ["validate", str(path)], tmp_path / "cdm",
                r"cdm: table procedure_occurrence is missing$")
    path.write_text(STUDY)  # the default study does not read procedures
    assert main(["validate", str(path)]) == 0


def test_duckdb_source_and_timestamp_dates_give_the_same_results(tmp_path, baseline):
    """Sources that used to crash the SQL: dates stored as timestamps (pandas datetime64)."""
    setup_study(tmp_path)
    for table, column in (("drug_era", "drug_era_start_date"),
                          ("condition_occurrence", "condition_start_date"),
                          ("observation_period", "observation_period_end_date")):
        _rewrite(tmp_path / "cdm", table, lambda f, c=column: f.assign(**{c: pd.to_datetime(f[c])}))
    _to_duckdb(tmp_path / "cdm", tmp_path / "cdm.duckdb")
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.replace("source: cdm", "source: cdm.duckdb"))
    _, estimates, _ = run_plain(path)
    got = estimates.set_index(["treatment", "outcome", "estimator"])
    assert (got["status"] == "ok").all()
    assert np.allclose(got["estimate"], baseline.loc[got.index, "estimate"])


# --- 3. Data that leave nothing to estimate: input errors while preparing the run --------------

def _empty(table: str):
    def change(tables):
        tables[table] = []
    return change


def _no_dates(table: str, position: int):
    def change(tables):
        tables[table] = [(*row[:position], None, *row[position + 1:]) for row in tables[table]]
    return change


def _events_before_index(tables):
    tables["condition_occurrence"] = [
        (p, c, day - timedelta(days=1500)) if c == OUT else (p, c, day)
        for p, c, day in tables["condition_occurrence"]]


NOTHING_TO_ESTIMATE = [
    ("empty observation_period", _empty("observation_period"), STUDY,
     r"cdm: table observation_period has no rows$"),
    ("empty person", _empty("person"), STUDY, r"cdm: table person has no rows$"),
    ("empty drug_era", _empty("drug_era"), STUDY, r"cdm: table drug_era has no rows$"),
    ("empty condition_occurrence", _empty("condition_occurrence"), STUDY,
     r"cdm: table condition_occurrence has no rows$"),
    ("drug_era_start_date all NULL", _no_dates("drug_era", 2), STUDY,
     r"cdm: table drug_era has no rows with a drug_era_start_date$"),
    ("min_age 150", None, STUDY + "population: {min_age: 150}\n",
     r"cdm: no comparison has persons in both arms; t1 vs c: no treated and comparator persons "
     r"left after step age \(aged 150 or more at time zero\); t2 vs c: no treated and "
     r"comparator persons left after step age"),
    ("no exposure to any comparator", lambda t: t.update(
        drug_era=[r for r in t["drug_era"] if r[1] != C]), STUDY,
     r"no comparison has persons in both arms; t1 vs c: no comparator persons left after step "
     r"first_exposure \(first recorded exposure to the drug \(time zero\)\)"),
    ("no outcome event during follow-up", _events_before_index, STUDY,
     r"cdm: no outcome events: no outcome \(o\) has a record in condition_occurrence during "
     r"follow-up in any comparison$"),
]


@pytest.mark.parametrize(("change", "study", "message"),
                         [case[1:] for case in NOTHING_TO_ESTIMATE],
                         ids=[case[0] for case in NOTHING_TO_ESTIMATE])
def test_nothing_to_estimate(tmp_path, capsys, cli_run, change, study, message):
    path = setup_study(tmp_path, change, study)
    input_error(capsys, cli_run(path), tmp_path / "cdm", message)
    assert not (tmp_path / "results.duckdb").exists()  # nothing written


def test_all_null_condition_dates_typed_date(tmp_path, capsys, cli_run):
    """A DATE column holding only NULLs (as a CDM export would write it)."""
    path = setup_study(tmp_path)
    file = tmp_path / "cdm" / "condition_occurrence.parquet"
    new = tmp_path / "condition_occurrence.parquet"
    with duckdb.connect() as con:
        con.read_parquet(str(file)).project(
            "* REPLACE (NULL::DATE AS condition_start_date)").write_parquet(str(new))
    new.replace(file)
    input_error(capsys, cli_run(path), tmp_path / "cdm",
                r"cdm: table condition_occurrence has no rows with a condition_start_date$")


# --- 4. Data problems inside a run: recorded per comparison / outcome, the rest completes ------

def test_outcome_without_events_is_a_recorded_failure(tmp_path):
    path = setup_study(tmp_path, study=STUDY.replace("outcomes: [o]", "outcomes: [o, o2]"))
    run, estimates, _ = run_plain(path)
    failed = estimates[estimates["outcome"] == "o2"]
    assert len(failed) == 6 and (failed["status"] == "failed").all()
    assert set(failed["message"]) == {"no outcome events: hazard ratio not estimable"}
    assert (estimates.loc[estimates["outcome"] == "o", "status"] == "ok").all()
    assert run["n_estimates_failed"] == 6


def _marker_for(drugs: tuple[int, ...], concept: int = MARKER):
    """A baseline condition recorded 5 days before time zero for every user of `drugs`."""
    def change(tables):
        tables["condition_occurrence"] += [
            (p, concept, start - timedelta(days=5))
            for p, drug, start, _ in tables["drug_era"] if drug in drugs]
    return change


def test_separation_fails_only_ps_estimates_and_constant_covariates_are_harmless(
        tmp_path, baseline):
    """Users of t1 alone have MARKER (perfect separation in t1 vs c); everyone has EVERYONE
    (a constant covariate in both comparisons)."""
    def change(tables):
        _marker_for((T1,))(tables)
        _marker_for((T1, T2, C), EVERYONE)(tables)
    _, estimates, _ = run_plain(setup_study(tmp_path, change))
    rows = estimates.set_index(["treatment", "estimator"])
    separated = "propensity model separates the arms perfectly (AUC 1.00): no overlap to compare"
    for estimator in ("iptw", "ps_strata"):
        assert rows.loc[("t1", estimator), "status"] == "failed"
        assert rows.loc[("t1", estimator), "message"] == separated
    assert rows.loc[("t1", "crude"), "status"] == "ok"
    assert np.isclose(rows.loc[("t1", "crude"), "estimate"],
                      baseline.loc[("t1", "o", "crude"), "estimate"])
    assert (rows.loc["t2", "status"] == "ok").all()
    assert np.allclose(rows.loc["t2", "estimate"],
                       baseline.loc["t2"].xs("o")["estimate"].loc[rows.loc["t2"].index],
                       rtol=1e-3)


def test_one_empty_arm_is_a_recorded_failure(tmp_path):
    path = setup_study(tmp_path, lambda t: t.update(
        drug_era=[r for r in t["drug_era"] if r[1] != T2]))
    _, estimates, _ = run_plain(path)
    empty = estimates[estimates["treatment"] == "t2"]
    assert len(empty) == 3 and (empty["status"] == "failed").all()
    assert empty["message"].str.contains("treated arm is empty").all()
    assert (estimates.loc[estimates["treatment"] == "t1", "status"] == "ok").all()


def test_a_run_where_every_estimate_fails_is_stored(tmp_path):
    path = setup_study(tmp_path, _marker_for((T1, T2)), STUDY + "estimators: [iptw]\n")
    run, estimates, _ = run_plain(path)
    assert (estimates["status"] == "failed").all() and run["n_estimates_failed"] == 2


# --- 5. Odd records: no crash, no silent drop, no double count ---------------------------------

def _eras_ending_before_start(tables):
    tables["drug_era"] = [(p, c, s, s - timedelta(days=10)) for p, c, s, _ in tables["drug_era"]]


def _periods_ending_before_start(tables):  # every 10th person: swapped dates
    tables["observation_period"] = [(p, e, s) if p % 10 == 0 else (p, s, e)
                                    for p, s, e in tables["observation_period"]]


def _born_after_time_zero(tables):  # every 10th person: born 2015, time zero 2012
    tables["person"] = [(p, g, 2015 if p % 10 == 0 else y) for p, g, y in tables["person"]]


def _some_outcome_dates_null(tables):  # the outcome of 5 t1 users (one record each)
    rows, t1_users = tables["condition_occurrence"], {r[0] for r in tables["drug_era"]
                                                      if r[1] == T1}
    outcome = [i for i, row in enumerate(rows) if row[1] == OUT and row[0] in t1_users][:5]
    tables["condition_occurrence"] = [(p, c, None if i in outcome else day)
                                      for i, (p, c, day) in enumerate(rows)]


def _duplicate(*names: str):
    def change(tables):
        for name in names:
            tables[name] = tables[name] * 2
    return change


def _null_every_tenth(table: str, position: int):
    """Every 10th person's rows of `table` with the value at `position` set to NULL."""
    def change(tables):
        tables[table] = [(*row[:position], None, *row[position + 1:]) if row[0] % 10 == 0
                         else row for row in tables[table]]
    return change


def _overlapping_periods(tables):
    tables["observation_period"] += [(p, d("2011-06-01"), d("2014-12-31"))
                                     for p, _, _ in tables["observation_period"]]


ODD_RECORDS = [
    # (id, change, warning expected in the run record (None: none), per-arm persons, events)
    ("drug_era_end_date before start", _eras_ending_before_start,
     "drug_era: 90 row(s) ending before they start (counted as one-day exposures)", 30, 0),
    ("observation period ending before it starts", _periods_ending_before_start,
     "observation_period: 9 row(s) ending before they start (ignored)", 27, None),
    ("time zero before birth", _born_after_time_zero,
     "person: 9 cohort member(s) with time zero before their year of birth (kept; "
     "population.min_age excludes them)", 30, 0),
    ("some outcome dates NULL", _some_outcome_dates_null,
     "condition_occurrence: 5 row(s) without condition_start_date (ignored)", 30, -5),
    ("duplicated person, drug_era and condition rows",
     _duplicate("person", "drug_era", "condition_occurrence"),
     "person: 90 duplicate person_id row(s) (the lowest year_of_birth and gender_concept_id "
     "are used)", 30, 0),
    ("NULL person_id in 10% of drug_era rows", _null_every_tenth("drug_era", 0),
     "drug_era: 9 row(s) without person_id (ignored)", 27, None),
    ("NULL drug_era_end_date", _null_every_tenth("drug_era", 3),
     "drug_era: 9 row(s) without drug_era_end_date (counted as one-day exposures)", 30, 0),
    ("NULL year_of_birth", _null_every_tenth("person", 2),
     "person: 9 row(s) without year_of_birth (such persons fail any age criterion and get no "
     "age covariate)", 30, 0),
    ("overlapping observation periods", _overlapping_periods,
     "observation_period: 90 person(s) with overlapping periods (overlapping or abutting "
     "periods are combined into one stretch of observation)", 30, 0),
]


@pytest.mark.parametrize(("change", "warning", "persons", "events"),
                         [case[1:] for case in ODD_RECORDS], ids=[case[0] for case in ODD_RECORDS])
def test_odd_records(tmp_path, baseline, change, warning, persons, events):
    run, estimates, attrition = run_plain(setup_study(tmp_path, change))
    assert run["warnings"] == ([warning] if warning else [])
    assert (estimates["status"] == "ok").all() and len(estimates) == 6
    assert (estimates["n_treated"] == persons).all()
    assert (estimates["n_comparator"] == persons).all()
    if events is not None:  # events change by `events` in all (never double-counted)
        crude = estimates[estimates["estimator"] == "crude"].set_index("treatment")
        before = baseline.xs("crude", level="estimator").xs("o", level="outcome")
        total = crude["events_treated"] + crude["events_comparator"]
        expected = before["events_treated"] + before["events_comparator"]
        assert (total - expected.loc[total.index]).sum() == events
    steps = attrition[attrition["outcome"].isna()].groupby("step")["treated_persons"].sum()
    assert steps["at_risk"] == 2 * persons
