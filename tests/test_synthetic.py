"""Tests of the synthetic demo CDM: determinism, schema, integrity and the planted causal model."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cohort.synthetic import (
    _OUTCOME_MODEL,
    _U_CHOICE,
    CDM_SCHEMA,
    COMPARATOR,
    DEMO_CONCEPTS,
    GENDER_FEMALE,
    GENDER_MALE,
    INDICATIONS,
    NEGATIVE_CONTROLS,
    OUTCOME_VARIANT_CONCEPTS,
    OUTCOMES,
    PRODUCT_CONCEPTS,
    STUDY_DRUGS,
    TREATMENTS,
    TRUE_HR,
    _outcome_records,
    _Persons,
    _piecewise_first,
    generate_demo_cdm,
)
from estimators.cox import fit_cox

PERSONS = 20_000
EUNOMIA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eunomia_gibleed"
DEMO_STUDY = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
CLINICAL = ("person", "observation_period", "drug_era", "drug_exposure", "condition_occurrence",
            "procedure_occurrence", "measurement", "observation", "death", "visit_occurrence")


@pytest.fixture(scope="module")
def cdm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_cdm")
    generate_demo_cdm(out, persons=PERSONS, seed=11)
    return out


def connect(folder: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for table in CDM_SCHEMA:
        con.sql(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{folder / table}.parquet')")
    return con


def scalar(con: duckdb.DuckDBPyConnection, query: str):
    return con.sql(query).fetchall()[0][0]


# Study-drug new users: first era of each study ingredient, with the observation period around it.
NEW_USERS = """
CREATE TABLE new_users AS
WITH first AS (
    SELECT person_id, drug_concept_id, min(drug_era_start_date) AS index_date
    FROM drug_era WHERE drug_concept_id IN ({ids}) GROUP BY ALL
)
SELECT f.*, op.observation_period_start_date AS obs_start,
       op.observation_period_end_date AS obs_end
FROM first f JOIN observation_period op ON op.person_id = f.person_id
 AND f.index_date BETWEEN op.observation_period_start_date AND op.observation_period_end_date
"""


def new_users(con: duckdb.DuckDBPyConnection) -> None:
    con.sql(NEW_USERS.format(ids=", ".join(str(DEMO_CONCEPTS[d]) for d in STUDY_DRUGS)))


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_tables_other_seed_differs(tmp_path: Path) -> None:
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "other"
    two.mkdir()
    (two / "keep.txt").write_text("not ours")
    (two / "person.parquet").write_text("stale")
    truth = generate_demo_cdm(one, persons=3_000, seed=7)
    assert truth == one / "truth.csv"
    generate_demo_cdm(two, persons=3_000, seed=7)
    generate_demo_cdm(other, persons=3_000, seed=8)
    assert (two / "keep.txt").read_text() == "not ours"  # only its own files are written
    assert sorted(p.name for p in one.iterdir()) == sorted(
        [f"{t}.parquet" for t in CDM_SCHEMA] + ["truth.csv"]
    )
    for table in CDM_SCHEMA:
        a, b = pq.read_table(one / f"{table}.parquet"), pq.read_table(two / f"{table}.parquet")
        assert a.equals(b), table
    assert (one / "truth.csv").read_bytes() == (two / "truth.csv").read_bytes()
    for table in ("person", "condition_occurrence", "drug_era", "measurement"):
        a, b = pq.read_table(one / f"{table}.parquet"), pq.read_table(other / f"{table}.parquet")
        assert not a.equals(b), table


def test_unmeasured_confounding_changes_only_drug_choice_and_outcomes(tmp_path: Path) -> None:
    """``u`` has its own random stream and is recorded nowhere: switching it off leaves every
    table that depends on neither drug choice nor outcomes byte-identical."""
    on, off = tmp_path / "on", tmp_path / "off"
    generate_demo_cdm(on, persons=3_000, seed=7)
    generate_demo_cdm(off, persons=3_000, seed=7, unmeasured_confounding=0.0)
    for table in ("person", "observation_period", "procedure_occurrence", "measurement",
                  "concept", "concept_ancestor", "vocabulary"):
        a, b = pq.read_table(on / f"{table}.parquet"), pq.read_table(off / f"{table}.parquet")
        assert a.equals(b), table
    for table in ("drug_era", "drug_exposure", "condition_occurrence"):
        a, b = pq.read_table(on / f"{table}.parquet"), pq.read_table(off / f"{table}.parquet")
        assert not a.equals(b), table
    assert (on / "truth.csv").read_bytes() == (off / "truth.csv").read_bytes()  # bias, not effect
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="unmeasured_confounding"):
            generate_demo_cdm(tmp_path / "bad", persons=10, unmeasured_confounding=bad)


@pytest.mark.parametrize("persons", [1, 40])
def test_tiny_populations_still_write_every_table(tmp_path: Path, persons: int) -> None:
    generate_demo_cdm(tmp_path, persons=persons, seed=3)
    con = connect(tmp_path)
    assert scalar(con, "SELECT count(*) FROM person") == persons
    assert scalar(con, "SELECT count(*) FROM concept") > 500


# --------------------------------------------------------------------------- schema
def test_tables_have_v53_columns_and_types(cdm: Path) -> None:
    con = connect(cdm)
    for table, columns in CDM_SCHEMA.items():
        described = con.sql(f"DESCRIBE {table}").fetchall()
        assert [(r[0], r[1]) for r in described] == list(columns), table
    id_columns = con.sql(
        "SELECT count(*) FROM (DESCRIBE condition_occurrence) WHERE column_name LIKE '%_id' "
        "AND column_type <> 'BIGINT'"
    ).fetchall()[0][0]
    assert id_columns == 0
    assert scalar(con, "SELECT cdm_version FROM cdm_source") == "v5.3"
    assert scalar(con, "SELECT count(*) FROM cdm_source") == 1
    vocabularies = {r[0] for r in con.sql("SELECT vocabulary_id FROM vocabulary").fetchall()}
    assert {"Cohortflow Demo", "Gender"} <= vocabularies
    for table in ("observation", "death", "visit_occurrence", "concept_relationship"):
        assert scalar(con, f"SELECT count(*) FROM {table}") == 0
    assert scalar(con, "SELECT count(*) FROM person") == PERSONS
    for table in ("condition_occurrence", "drug_era", "drug_exposure", "procedure_occurrence",
                  "measurement"):
        assert scalar(con, f"SELECT count(*) FROM {table}") > PERSONS, table


@pytest.mark.shared_data
def test_column_names_match_eunomia_cdm(cdm: Path) -> None:
    if not EUNOMIA.is_dir():
        pytest.skip(f"shared data absent: {EUNOMIA}")
    for table, columns in CDM_SCHEMA.items():
        theirs = pq.read_schema(EUNOMIA / f"{table}.parquet").names
        assert [c for c, _ in columns] == theirs, table


def test_every_concept_used_is_in_the_vocabulary(cdm: Path) -> None:
    con = connect(cdm)
    used = []
    for table in CLINICAL:
        for column, _ in CDM_SCHEMA[table]:
            if column.endswith("_concept_id"):
                used.append(f"SELECT {column} AS concept_id FROM {table}")
    missing = con.sql(
        f"SELECT DISTINCT u.concept_id FROM ({' UNION ALL '.join(used)}) u "
        "ANTI JOIN concept c ON c.concept_id = u.concept_id WHERE u.concept_id IS NOT NULL"
    ).fetchall()
    assert missing == []
    # Private range except 0 and gender; names and ids as exported.
    outside = scalar(con, f"SELECT count(*) FROM concept WHERE concept_id < 2000000000 "
                          f"AND concept_id NOT IN (0, {GENDER_MALE}, {GENDER_FEMALE})")
    assert outside == 0
    names = dict(con.sql("SELECT concept_name, concept_id FROM concept").fetchall())
    for name, concept_id in DEMO_CONCEPTS.items():
        assert names[name] == concept_id
    assert scalar(con, "SELECT count(*) FROM concept") == scalar(
        con, "SELECT count(DISTINCT concept_id) FROM concept")
    domains = dict(con.sql("SELECT concept_id, domain_id FROM concept").fetchall())
    assert {domains[DEMO_CONCEPTS[c]] for c in (*OUTCOMES, *NEGATIVE_CONTROLS, *INDICATIONS)} == {
        "Condition"}
    counts = dict(con.sql("SELECT domain_id, count(*) FROM concept GROUP BY ALL").fetchall())
    assert counts["Condition"] >= 300 and counts["Procedure"] >= 100
    assert counts["Measurement"] >= 40 and counts["Drug"] >= 60


def test_forty_negative_controls_with_events_and_in_the_demo_study(cdm: Path) -> None:
    assert len(NEGATIVE_CONTROLS) == 40
    assert NEGATIVE_CONTROLS[0] == "nc_01" and NEGATIVE_CONTROLS[-1] == "nc_40"
    ids = [DEMO_CONCEPTS[nc] for nc in NEGATIVE_CONTROLS]
    assert ids == list(range(2_000_001_201, 2_000_001_241))
    con = connect(cdm)
    domains = dict(con.sql(f"SELECT concept_id, domain_id FROM concept "
                           f"WHERE concept_id IN ({', '.join(map(str, ids))})").fetchall())
    assert domains == dict.fromkeys(ids, "Condition")
    events = dict(con.sql(f"SELECT condition_concept_id, count(DISTINCT person_id) "
                          f"FROM condition_occurrence WHERE condition_concept_id "
                          f"IN ({', '.join(map(str, ids))}) GROUP BY ALL").fetchall())
    assert set(events) == set(ids) and min(events.values()) > 100, events
    # Some depend on measured covariates (confounded by indication), some on nothing measured.
    measured = [nc for nc in NEGATIVE_CONTROLS if _OUTCOME_MODEL[nc][2]]
    assert 20 <= len(measured) <= 32
    assert any(k.startswith("indication_") for nc in measured for k in _OUTCOME_MODEL[nc][2])
    study = yaml.safe_load(DEMO_STUDY.read_text())
    assert study["negative_controls"] == ids
    assert study["outcomes"] == list(OUTCOMES)


def test_concept_ancestor_has_self_rows_and_hierarchy(cdm: Path) -> None:
    con = connect(cdm)
    no_self = scalar(con, """
        SELECT count(*) FROM concept c WHERE standard_concept = 'S' AND NOT EXISTS (
          SELECT 1 FROM concept_ancestor a WHERE a.ancestor_concept_id = c.concept_id
          AND a.descendant_concept_id = c.concept_id AND a.min_levels_of_separation = 0)""")
    assert no_self == 0
    pairs = set(con.sql(
        "SELECT ancestor_concept_id, descendant_concept_id FROM concept_ancestor "
        "WHERE min_levels_of_separation = 1").fetchall())
    for drug, products in PRODUCT_CONCEPTS.items():
        for product in products:
            assert (DEMO_CONCEPTS[drug], product) in pairs
    for outcome, variant in OUTCOME_VARIANT_CONCEPTS.items():
        assert (DEMO_CONCEPTS[outcome], variant) in pairs
    # Every drug_exposure product rolls up to the ingredient of its era, and back.
    orphan_products = scalar(con, """
        SELECT count(DISTINCT e.drug_concept_id) FROM drug_exposure e
        JOIN concept c ON c.concept_id = e.drug_concept_id
        WHERE c.concept_class_id <> 'Clinical Drug' OR NOT EXISTS (
          SELECT 1 FROM concept_ancestor a JOIN concept i ON i.concept_id = a.ancestor_concept_id
          WHERE a.descendant_concept_id = e.drug_concept_id AND i.concept_class_id = 'Ingredient'
          AND a.min_levels_of_separation = 1)""")
    assert orphan_products == 0
    not_ingredient = scalar(con, """
        SELECT count(*) FROM drug_era e JOIN concept c ON c.concept_id = e.drug_concept_id
        WHERE c.concept_class_id <> 'Ingredient'""")
    assert not_ingredient == 0


# --------------------------------------------------------------------------- integrity
def test_records_fall_in_observation_except_documented_dirt(cdm: Path) -> None:
    con = connect(cdm)
    outside = """
        SELECT {what} FROM {table} r WHERE NOT EXISTS (
          SELECT 1 FROM observation_period op WHERE op.person_id = r.person_id
          AND r.{start} BETWEEN op.observation_period_start_date
                            AND op.observation_period_end_date{end_clause})"""
    for table, start, end in (
        ("drug_era", "drug_era_start_date", "drug_era_end_date"),
        ("drug_exposure", "drug_exposure_start_date", "drug_exposure_end_date"),
        ("procedure_occurrence", "procedure_date", None),
        ("measurement", "measurement_date", None),
    ):
        end_clause = (f" AND r.{end} BETWEEN op.observation_period_start_date"
                      f" AND op.observation_period_end_date") if end else ""
        n = scalar(con, outside.format(what="count(*)", table=table, start=start,
                                       end_clause=end_clause))
        assert n == 0, table
    # Conditions: only the planted dirt (noise concepts, ~0.1%) lies after observation.
    dirt = con.sql(outside.format(what="r.condition_concept_id", table="condition_occurrence",
                                  start="condition_start_date", end_clause="")).fetchall()
    total = scalar(con, "SELECT count(*) FROM condition_occurrence")
    assert 0 < len(dirt) < 0.005 * total
    study = {*DEMO_CONCEPTS.values(), *OUTCOME_VARIANT_CONCEPTS.values()}
    assert not {row[0] for row in dirt} & study
    # Real-data dirt: observation periods of ids without a person; persons with two periods.
    assert scalar(con, "SELECT count(*) FROM observation_period op ANTI JOIN person p "
                       "USING (person_id)") > 0
    assert scalar(con, "SELECT count(*) FROM (SELECT person_id FROM observation_period "
                       "GROUP BY ALL HAVING count(*) > 1)") > 0
    overlapping = scalar(con, """
        SELECT count(*) FROM observation_period a JOIN observation_period b
        ON a.person_id = b.person_id AND a.observation_period_id < b.observation_period_id
        AND a.observation_period_end_date >= b.observation_period_start_date""")
    assert overlapping == 0
    assert scalar(con, "SELECT count(*) FROM person p ANTI JOIN observation_period "
                       "USING (person_id)") == 0


def test_exposures_make_up_their_eras(cdm: Path) -> None:
    con = connect(cdm)
    assert scalar(con, "SELECT count(*) FROM drug_era "
                       "WHERE drug_era_end_date < drug_era_start_date") == 0
    assert scalar(con, "SELECT count(*) FROM drug_exposure "
                       "WHERE drug_exposure_end_date < drug_exposure_start_date") == 0
    assert scalar(con, "SELECT count(*) FROM drug_exposure "
                       "WHERE days_supply <> drug_exposure_end_date - drug_exposure_start_date "
                       "+ 1") == 0
    # Each exposure lies inside exactly one era of its ingredient; counts and ends agree.
    con.sql("""
        CREATE TABLE matched AS
        SELECT x.drug_exposure_id, e.drug_era_id, x.drug_exposure_end_date AS x_end
        FROM drug_exposure x
        JOIN concept_ancestor a ON a.descendant_concept_id = x.drug_concept_id
         AND a.min_levels_of_separation = 1
        JOIN drug_era e ON e.person_id = x.person_id AND e.drug_concept_id = a.ancestor_concept_id
         AND x.drug_exposure_start_date >= e.drug_era_start_date
         AND x.drug_exposure_end_date <= e.drug_era_end_date""")
    n_exposures = scalar(con, "SELECT count(*) FROM drug_exposure")
    assert scalar(con, "SELECT count(DISTINCT drug_exposure_id) FROM matched") == n_exposures
    assert scalar(con, "SELECT count(*) FROM matched") == n_exposures
    mismatched = scalar(con, """
        SELECT count(*) FROM drug_era e JOIN (
          SELECT drug_era_id, count(*) AS n, max(x_end) AS last_end FROM matched GROUP BY ALL
        ) m USING (drug_era_id)
        WHERE m.n <> e.drug_exposure_count OR m.last_end <> e.drug_era_end_date""")
    assert mismatched == 0
    assert scalar(con, "SELECT count(*) FROM drug_era") == scalar(
        con, "SELECT count(DISTINCT drug_era_id) FROM matched")
    lengths = con.sql("SELECT min(d), max(d), median(d) FROM (SELECT drug_era_end_date - "
                      "drug_era_start_date + 1 AS d FROM drug_era)").fetchall()[0]
    assert lengths[0] <= 30 and 300 < lengths[1] <= 1_100 and lengths[2] < 200


# --------------------------------------------------------------------------- causal model
def test_study_drug_use_has_the_planned_shape(cdm: Path) -> None:
    con = connect(cdm)
    new_users(con)
    users = scalar(con, "SELECT count(DISTINCT person_id) FROM new_users")
    assert 0.55 * PERSONS < users < 0.65 * PERSONS
    per_drug = dict(con.sql("SELECT drug_concept_id, count(*) FROM new_users GROUP BY ALL")
                    .fetchall())
    assert per_drug[DEMO_CONCEPTS[COMPARATOR]] > max(per_drug[DEMO_CONCEPTS[t]]
                                                     for t in TREATMENTS)
    assert min(per_drug.values()) > 0.08 * PERSONS
    both = scalar(con, "SELECT count(*) FROM (SELECT person_id FROM new_users "
                       "GROUP BY ALL HAVING count(*) > 1)")
    assert 0.02 * users < both < 0.08 * users
    early = scalar(con, "SELECT count(*) FROM new_users WHERE index_date - obs_start < 365")
    assert 0.01 * users < early < 0.15 * users
    # Restarts: some persons have a later era of the same study drug.
    assert scalar(con, """SELECT count(*) FROM drug_era e JOIN new_users n USING (person_id,
        drug_concept_id) WHERE e.drug_era_start_date > n.index_date""") > 0.05 * users
    # Outcomes on a descendant concept, and prior outcomes to exclude.
    variants = ", ".join(str(v) for v in OUTCOME_VARIANT_CONCEPTS.values())
    assert scalar(con, f"SELECT count(*) FROM condition_occurrence "
                       f"WHERE condition_concept_id IN ({variants})") > 100
    prior = scalar(con, f"""SELECT count(DISTINCT n.person_id) FROM new_users n
        JOIN condition_occurrence c ON c.person_id = n.person_id
        AND c.condition_start_date < n.index_date
        WHERE c.condition_concept_id = {DEMO_CONCEPTS["outcome_1"]}""")
    assert prior > 20


def indication_prevalence(con: duckdb.DuckDBPyConnection, drug: str, indication: str) -> float:
    return scalar(con, f"""
        SELECT avg(CASE WHEN EXISTS (
          SELECT 1 FROM condition_occurrence c WHERE c.person_id = n.person_id
          AND c.condition_concept_id = {DEMO_CONCEPTS[indication]}
          AND c.condition_start_date BETWEEN n.index_date - 365 AND n.index_date - 1
        ) THEN 1.0 ELSE 0.0 END)
        FROM new_users n WHERE n.drug_concept_id = {DEMO_CONCEPTS[drug]}""")


@pytest.mark.parametrize(("drug", "indication"), [
    ("drug_a", "indication_1"), ("drug_b", "indication_3"), ("drug_c", "indication_5"),
    ("drug_d", "indication_6"),
])
def test_treatment_choice_depends_on_indications(cdm: Path, drug: str, indication: str) -> None:
    con = connect(cdm)
    new_users(con)
    treated = indication_prevalence(con, drug, indication)
    comparator = indication_prevalence(con, COMPARATOR, indication)
    smd = (treated - comparator) / (
        (treated * (1 - treated) + comparator * (1 - comparator)) / 2) ** 0.5
    assert 0.25 < smd < 0.8, (treated, comparator, smd)


def follow_up(con: duckdb.DuckDBPyConnection, treatment: str, outcome: str,
              strata: tuple[str, ...] = ()) -> list[tuple[str, bool, int, int]]:
    """Events and person-days by (stratum, treated): first outcome (with descendants) after
    index to end of observation; new users with 365 days of prior observation, no prior
    outcome, not in both arms. Strata: indications recorded in the 365 days before index."""
    ids = (DEMO_CONCEPTS[treatment], DEMO_CONCEPTS[COMPARATOR])
    flags = "".join(
        f""" || CASE WHEN EXISTS (SELECT 1 FROM condition_occurrence c
              WHERE c.person_id = a.person_id AND c.condition_concept_id = {DEMO_CONCEPTS[s]}
              AND c.condition_start_date BETWEEN a.index_date - 365 AND a.index_date - 1)
              THEN '1' ELSE '0' END""" for s in strata)
    return con.sql(f"""
        WITH arm AS (
          SELECT * FROM new_users WHERE drug_concept_id IN {ids}
          AND index_date - obs_start >= 365
          QUALIFY count(*) OVER (PARTITION BY person_id) = 1
        ), events AS (
          SELECT a.person_id, min(c.condition_start_date) FILTER (
                   WHERE c.condition_start_date >= a.index_date) AS first_after,
                 bool_or(c.condition_start_date < a.index_date) AS prior
          FROM arm a JOIN condition_occurrence c ON c.person_id = a.person_id
          JOIN concept_ancestor ca ON ca.descendant_concept_id = c.condition_concept_id
           AND ca.ancestor_concept_id = {DEMO_CONCEPTS[outcome]}
          WHERE c.condition_start_date <= a.obs_end GROUP BY ALL
        )
        SELECT '' {flags} AS stratum, a.drug_concept_id = {ids[0]} AS treated,
               count(e.first_after)::INT AS events,
               sum(coalesce(e.first_after, a.obs_end) - a.index_date + 1)::INT AS days
        FROM arm a LEFT JOIN events e USING (person_id) WHERE NOT coalesce(e.prior, false)
        GROUP BY ALL ORDER BY ALL""").fetchall()


def rate_ratios(rows: list[tuple[str, bool, int, int]]) -> tuple[float, float, int, int]:
    """Crude and Mantel-Haenszel (over strata) rate ratios, events treated and comparator."""
    cells: dict[str, dict[bool, tuple[int, int]]] = {}
    for stratum, treated, events, days in rows:
        cells.setdefault(stratum, {})[treated] = (events, days)
    e1 = sum(c[True][0] for c in cells.values() if True in c)
    e0 = sum(c[False][0] for c in cells.values() if False in c)
    d1 = sum(c[True][1] for c in cells.values() if True in c)
    d0 = sum(c[False][1] for c in cells.values() if False in c)
    num = den = 0.0
    for c in cells.values():
        if True in c and False in c:
            (a, t1), (b, t0) = c[True], c[False]
            num += a * t0 / (t1 + t0)
            den += b * t1 / (t1 + t0)
    return (e1 / d1) / (e0 / d0), num / den, e1, e0


def test_crude_rate_ratios_follow_planted_effects(cdm: Path) -> None:
    con = connect(cdm)
    new_users(con)
    protective, _, events_t, events_c = rate_ratios(follow_up(con, "drug_a", "outcome_1"))
    assert events_t > 30 and events_c > 60
    assert protective < 1.0  # planted 0.5
    harmful, _, events_t, _ = rate_ratios(follow_up(con, "drug_c", "outcome_4"))
    assert events_t > 50 and harmful > 2.0  # planted 4.0


@pytest.mark.parametrize(("treatment", "outcome", "confounders", "bias"), [
    ("drug_a", "outcome_1", ("indication_1", "indication_2", "indication_3", "indication_4"), 1),
    ("drug_c", "outcome_4", ("indication_1", "indication_5"), -1),
])
def test_recorded_indications_explain_the_confounding(
    cdm: Path, treatment: str, outcome: str, confounders: tuple[str, ...], bias: int
) -> None:
    """Stratifying on the outcome's risk factors recorded in the 365 days before index moves
    the crude ratio (biased up for drug_a, down for drug_c) to near the planted one (up to the
    smaller bias of the unmeasured confounder)."""
    con = connect(cdm)
    new_users(con)
    crude, adjusted, _, _ = rate_ratios(follow_up(con, treatment, outcome, confounders))
    truth = TRUE_HR[(treatment, outcome)]
    assert bias * math.log(crude / adjusted) > 0.1, (crude, adjusted)
    assert abs(math.log(adjusted / truth)) < math.log(1.4), (adjusted, truth)


def test_truth_table_lists_the_planted_effects(cdm: Path) -> None:
    with (cdm / "truth.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["treatment", "treatment_concept_id", "comparator",
                             "comparator_concept_id", "outcome", "outcome_concept_id", "role",
                             "true_hr"]
    assert len(rows) == len(TREATMENTS) * (len(OUTCOMES) + len(NEGATIVE_CONTROLS))
    truth = {(r["treatment"], r["outcome"]): float(r["true_hr"]) for r in rows}
    assert truth[("drug_a", "outcome_1")] == 0.5
    assert truth[("drug_a", "outcome_2")] == 0.67
    assert truth[("drug_b", "outcome_1")] == 2.0
    assert truth[("drug_b", "outcome_3")] == 1.5
    assert truth[("drug_c", "outcome_4")] == 4.0
    assert all(truth[("drug_d", o)] == 1.0 for o in (*OUTCOMES, *NEGATIVE_CONTROLS))
    assert all(truth[(t, nc)] == 1.0 for t in TREATMENTS for nc in NEGATIVE_CONTROLS)
    assert {k for k, v in truth.items() if v != 1.0} == set(TRUE_HR)
    allowed = {0.5, 0.67, 1.0, 1.5, 2.0, 4.0}
    assert set(truth.values()) <= allowed
    for r in rows:
        assert r["comparator"] == COMPARATOR
        assert int(r["comparator_concept_id"]) == DEMO_CONCEPTS[COMPARATOR]
        assert int(r["treatment_concept_id"]) == DEMO_CONCEPTS[r["treatment"]]
        assert int(r["outcome_concept_id"]) == DEMO_CONCEPTS[r["outcome"]]
        assert r["role"] == ("outcome" if r["outcome"] in OUTCOMES else "negative_control")


# --------------------------------------------------------------------------- unmeasured confounding
@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_unmeasured_confounder_sways_drug_choice_only_by_its_strength(strength: float) -> None:
    p = _Persons(20_000, 5, strength)
    assert abs(p.u.mean()) < 0.03 and abs(p.u.std() - 1) < 0.03
    for k in range(p.x.shape[1]):  # independent of everything measured
        assert abs(np.corrcoef(p.u, p.x[:, k])[0, 1]) < 0.03
    assert abs(np.corrcoef(p.u, p.h)[0, 1]) < 0.03
    comparator = p.u[p.drug == 0].mean()
    for j, drug in enumerate(TREATMENTS, start=1):
        shift = p.u[p.drug == j].mean() - comparator
        expected = 0.8 * strength * _U_CHOICE[drug]  # ~0.8 SD of u per unit of log-odds
        assert abs(shift - expected) < 0.08, (drug, shift, expected)
    assert abs(p.u[p.drug == -1].mean() - p.u.mean()) < 0.05  # being a user does not depend on u


@pytest.mark.parametrize(("strength", "depends"), [(0.0, False), (1.0, True)])
def test_outcomes_depend_on_u_only_when_switched_on(strength: float, depends: bool) -> None:
    p = _Persons(5_000, 5, strength)
    first = _outcome_records(p, np.random.default_rng(1))
    p.u = -p.u  # another unmeasured confounder, same measured world and drug choice
    again = _outcome_records(p, np.random.default_rng(1))
    same = all(a.shape == b.shape and (a == b).all() for a, b in zip(first, again, strict=True))
    assert same is not depends


NC_RATES = """
WITH arm AS (
  SELECT * FROM new_users WHERE drug_concept_id IN {arms}
  AND index_date - obs_start >= 365
  QUALIFY count(*) OVER (PARTITION BY person_id) = 1
), nc AS (SELECT unnest({ids}) AS concept_id), events AS (
  SELECT a.person_id, c.condition_concept_id AS concept_id,
         min(c.condition_start_date) FILTER (WHERE c.condition_start_date >= a.index_date)
           AS first_after,
         bool_or(c.condition_start_date < a.index_date) AS prior
  FROM arm a JOIN condition_occurrence c ON c.person_id = a.person_id
  WHERE c.condition_concept_id IN (SELECT concept_id FROM nc)
    AND c.condition_start_date <= a.obs_end
  GROUP BY ALL
)
SELECT a.drug_concept_id = {arms[0]} AS treated, count(e.first_after) AS events,
       sum(coalesce(e.first_after, a.obs_end) - a.index_date + 1) AS days
FROM arm a CROSS JOIN nc LEFT JOIN events e
  ON e.person_id = a.person_id AND e.concept_id = nc.concept_id
WHERE NOT coalesce(e.prior, false)
GROUP BY ALL ORDER BY treated DESC"""


def test_unmeasured_confounding_biases_negative_controls_and_switches_off(tmp_path: Path) -> None:
    """Negative controls that depend on nothing measured need no adjustment: their pooled crude
    rate ratio is ~1 without ``u``, and with it moves the way ``u`` pushes each comparison."""
    unconfounded = [DEMO_CONCEPTS[nc] for nc in NEGATIVE_CONTROLS if not _OUTCOME_MODEL[nc][2]]
    assert len(unconfounded) >= 10
    log_rr = {}
    for strength in (0.0, 1.0):
        folder = tmp_path / str(strength)
        generate_demo_cdm(folder, persons=50_000, seed=11, unmeasured_confounding=strength)
        con = connect(folder)
        new_users(con)
        for drug in ("drug_a", "drug_d"):  # the strongest pulls, up and down
            arms = (DEMO_CONCEPTS[drug], DEMO_CONCEPTS[COMPARATOR])
            (_, e1, d1), (_, e0, d0) = con.sql(
                NC_RATES.format(arms=arms, ids=unconfounded)).fetchall()
            assert e1 > 700 and e0 > 1_000  # standard error of the log ratio ~0.04
            log_rr[drug, strength] = math.log((e1 / d1) / (e0 / d0))
    for drug in ("drug_a", "drug_d"):
        sign = math.copysign(1, _U_CHOICE[drug])
        assert abs(log_rr[drug, 0.0]) < 0.15, log_rr
        assert 0.08 < sign * log_rr[drug, 1.0] < 0.4, log_rr
        assert sign * (log_rr[drug, 1.0] - log_rr[drug, 0.0]) > 0.08, log_rr


# --------------------------------------------------------------------------- exposure effect
ITT_DIGESTS = {  # content of generate_demo_cdm(persons=3_000, seed=7) before the mode existed
    "person": "104a0c4073b04f22",
    "observation_period": "0521af13a6e316ad",
    "drug_era": "f763b4410dd5fbe1",
    "drug_exposure": "0d2334a15b9d0da7",
    "condition_occurrence": "ca092b9cf393328c",
    "procedure_occurrence": "120fefdb9f288807",
    "measurement": "efef6e8ed4d7d541",
    "observation": "cb69585a79b84b3d",
    "death": "e0dfcd7b3d5f3c5e",
    "visit_occurrence": "62d6c421fea3ae8a",
    "concept": "06bee5f3f64adced",
    "concept_ancestor": "aa641f8c82f01f27",
    "concept_relationship": "7bb7196ccb40fd15",
    "vocabulary": "0a995428749a2fdd",
    "cdm_source": "a3b75dd1f5e9c10c",
    "truth": "f34c2017471e993d",
}


def content_digests(folder: Path) -> dict[str, str]:
    """Per table, a digest of its values (not of the Parquet bytes, which may change with the
    pyarrow version while the data do not); truth.csv by its bytes."""
    out = {t: hashlib.sha256(repr(pq.read_table(folder / f"{t}.parquet").to_pydict()).encode())
           .hexdigest()[:16] for t in CDM_SCHEMA}
    out["truth"] = hashlib.sha256((folder / "truth.csv").read_bytes()).hexdigest()[:16]
    return out


def test_itt_mode_is_the_generator_as_it_was(tmp_path: Path) -> None:
    """The default and explicit "itt" write the data pinned before on-treatment mode existed."""
    generate_demo_cdm(tmp_path / "default", persons=3_000, seed=7)
    generate_demo_cdm(tmp_path / "itt", persons=3_000, seed=7, exposure_effect="itt")
    assert content_digests(tmp_path / "default") == ITT_DIGESTS
    assert content_digests(tmp_path / "itt") == ITT_DIGESTS
    with pytest.raises(ValueError, match="exposure_effect"):
        generate_demo_cdm(tmp_path / "bad", persons=10, exposure_effect="per_protocol")


def test_on_treatment_mode_changes_only_outcome_events(tmp_path: Path) -> None:
    """Without u (so discontinuation is not informative) the two modes share every record but
    the outcome events (one random stream: after the first planted outcome the draws move on);
    truth.csv is the same."""
    itt, ot = tmp_path / "itt", tmp_path / "ot"
    for folder, mode in ((itt, "itt"), (ot, "on_treatment")):
        generate_demo_cdm(folder, persons=3_000, seed=7, unmeasured_confounding=0.0,
                          exposure_effect=mode)
    a, b = content_digests(itt), content_digests(ot)
    assert {t for t in a if a[t] != b[t]} == {"condition_occurrence", "cdm_source"}
    outcomes = sorted({DEMO_CONCEPTS[o] for o in (*OUTCOMES, *NEGATIVE_CONTROLS)}
                      | set(OUTCOME_VARIANT_CONCEPTS.values()))
    query = ("SELECT person_id, condition_concept_id, condition_start_date, "
             "condition_end_date FROM read_parquet('{}/condition_occurrence.parquet') "
             f"WHERE condition_concept_id {{}} IN ({', '.join(map(str, outcomes))}) ORDER BY ALL")
    assert (duckdb.sql(query.format(itt, "NOT")).fetchall()
            == duckdb.sql(query.format(ot, "NOT")).fetchall())
    assert (duckdb.sql(query.format(itt, "")).fetchall()
            != duckdb.sql(query.format(ot, "")).fetchall())
    assert "on-treatment" in scalar(connect(ot), "SELECT source_description FROM cdm_source")
    # With u, high-frailty persons stop their first treatment sooner (informative
    # discontinuation), so drug eras differ too.
    generate_demo_cdm(tmp_path / "ot_u", persons=3_000, seed=7, exposure_effect="on_treatment")
    assert content_digests(tmp_path / "ot_u")["drug_era"] != ITT_DIGESTS["drug_era"]


def test_piecewise_first_event_inverts_the_cumulative_hazard() -> None:
    """Hand cases: the budget spent on treatment, after it, or never; one rate is one piece."""
    excess = np.array([0.5, 1.5, 3.2, 0.2])
    on, off = np.array([0.1, 0.1, 0.1, 0.02]), np.array([0.05, 0.05, 0.05, 0.02])
    span_on, span = np.array([10.0, 10.0, 10.0, 5.0]), np.array([50.0, 50.0, 50.0, 50.0])
    after, offset = _piecewise_first(excess, on, off, span_on, span)
    # 0.5 / 0.1 = day 5 on treatment; (1.5 - 1.0) / 0.05 = 10 days after its 10; 3.2 > 1 + 2;
    # a single rate: floor(0.2 / 0.02) = 10 (up to rounding at the boundary).
    assert after.tolist() == [0, 1, 3]
    assert offset[:2].tolist() == [5.0, 20.0] and offset[2] in (9.0, 10.0)


ON_TREATMENT_COHORT = """
WITH ordered AS (   -- the engine's episodes: eras of the drug at most 30 days apart
  SELECT person_id, drug_concept_id, drug_era_start_date AS s, drug_era_end_date AS e,
         max(drug_era_end_date) OVER (PARTITION BY person_id, drug_concept_id
           ORDER BY drug_era_start_date ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev
  FROM drug_era WHERE drug_concept_id IN {arms}
), numbered AS (
  SELECT *, sum(CASE WHEN prev IS NULL OR s > prev + 30 THEN 1 ELSE 0 END) OVER (
           PARTITION BY person_id, drug_concept_id ORDER BY s ROWS UNBOUNDED PRECEDING) AS k
  FROM ordered
), first AS (
  SELECT person_id, drug_concept_id, min(s) AS index_date, max(e) AS episode_end
  FROM numbered WHERE k = 1 GROUP BY ALL
), arm AS (
  SELECT f.*, op.observation_period_end_date AS obs_end
  FROM first f JOIN observation_period op ON op.person_id = f.person_id
   AND f.index_date BETWEEN op.observation_period_start_date AND op.observation_period_end_date
  WHERE f.index_date - op.observation_period_start_date >= 365
  QUALIFY count(*) OVER (PARTITION BY f.person_id) = 1
), events AS (
  SELECT a.person_id, min(c.condition_start_date) FILTER (
           WHERE c.condition_start_date > a.index_date) AS first_after,
         bool_or(c.condition_start_date <= a.index_date) AS prior
  FROM arm a JOIN condition_occurrence c ON c.person_id = a.person_id
  JOIN concept_ancestor ca ON ca.descendant_concept_id = c.condition_concept_id
   AND ca.ancestor_concept_id = {outcome}
  WHERE c.condition_start_date <= a.obs_end GROUP BY ALL
)
SELECT a.drug_concept_id = {arms[0]} AS treated,
       a.obs_end - a.index_date AS itt_days,
       least(a.episode_end + 30, a.obs_end) - a.index_date AS ot_days,
       e.first_after - a.index_date AS event_day, '' {flags} AS stratum
FROM arm a LEFT JOIN events e USING (person_id) WHERE NOT coalesce(e.prior, false)
"""


@pytest.fixture(scope="module")
def on_treatment_cdm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("on_treatment_cdm")
    generate_demo_cdm(out, persons=50_000, seed=11, unmeasured_confounding=0.0,
                      exposure_effect="on_treatment")
    return out


@pytest.mark.parametrize(("treatment", "outcome", "confounders"), [
    ("drug_c", "outcome_4", ("indication_1", "indication_5")),
    ("drug_b", "outcome_1", ("indication_1", "indication_2", "indication_3", "indication_4")),
])
def test_on_treatment_analysis_recovers_the_planted_hr(
    on_treatment_cdm: Path, treatment: str, outcome: str, confounders: tuple[str, ...],
) -> None:
    """New users, 365 days prior observation, no prior outcome; Cox stratified on the recorded
    confounding indications (u is off). Follow-up from the day after index to the end of the
    first episode (eras joined across gaps <= 30 days) + 30 days recovers the planted HR; to
    the end of observation (ITT) it is diluted toward 1 by the unexposed time."""
    con = connect(on_treatment_cdm)
    flags = "".join(
        f""" || CASE WHEN EXISTS (SELECT 1 FROM condition_occurrence c
              WHERE c.person_id = a.person_id AND c.condition_concept_id = {DEMO_CONCEPTS[s]}
              AND c.condition_start_date BETWEEN a.index_date - 365 AND a.index_date - 1)
              THEN '1' ELSE '0' END""" for s in confounders)
    arms = (DEMO_CONCEPTS[treatment], DEMO_CONCEPTS[COMPARATOR])
    rows = con.sql(ON_TREATMENT_COHORT.format(arms=arms, outcome=DEMO_CONCEPTS[outcome],
                                              flags=flags)).df()
    treated = rows["treated"].to_numpy(dtype=bool)
    event_day = rows["event_day"].to_numpy(dtype=float, na_value=np.inf)
    strata = np.unique(rows["stratum"].to_numpy(), return_inverse=True)[1]
    fits = {}
    for analysis in ("itt", "ot"):
        end = rows[f"{analysis}_days"].to_numpy(dtype=float)
        event = event_day <= end
        fits[analysis] = fit_cox(np.minimum(event_day, end), event, treated, strata=strata)
    truth = math.log(TRUE_HR[treatment, outcome])
    ot, itt = fits["ot"], fits["itt"]
    assert ot.events > 80
    assert abs(ot.log_hr - truth) < 3 * ot.se, (math.exp(ot.log_hr), ot.se)
    assert 0 < itt.log_hr < 0.6 * truth, math.exp(itt.log_hr)  # diluted toward 1
    assert abs(itt.log_hr - truth) > abs(ot.log_hr - truth)
