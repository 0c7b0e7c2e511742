"""Covariates on tiny hand-made CDMs: every expected covariate id per person worked out by hand.

Each test writes its own CDM (a handful of persons), puts the cohort rows (cf_cohort) and the
arms' concepts (cf_arm_concept) in place as cohort.cohorts would, runs build_covariates and
compares each person's covariate ids with the hand-written set. Time zero is 2020-07-01 unless
a test says otherwise; records are placed by day relative to it. The last test checks the
real Eunomia GiBleed CDM against independent DuckDB SQL over its Parquet files.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

import cohort.covariates as covariates
from cohort.comparison_data import load_comparison
from cohort.covariates import build_covariates, covariate_catalogue
from cohort.design import COVARIATE_DOMAINS, CohortDesign, ConceptSetDef, OutcomeDef
from cohort.prepare import prepare_study
from cohort.source import open_source
from tests.shared_data import GIBLEED, SYNTHEA, needs
from tests.test_cohorts import design as cohort_design
from tests.test_cohorts import tiny_cdm
from tests.tiny_cdm import concepts, write_cdm

INDEX = date(2020, 7, 1)
MALE, FEMALE = 8507, 8532
COND_A, COND_B, COND_C, COND_D = 501, 502, 503, 504
COND_P, COND_CHILD = 510, 511                    # an arm defined by a condition, and its child
OBS = 601
INPATIENT, OUTPATIENT = 9201, 9202
ING_A, ING_B, ING_C = 1101, 1102, 1103          # ingredients
PROD_A1, PROD_A2, PROD_AB, PROD_C = 1111, 1112, 1121, 1131  # products (AB: two ingredients)
VACCINE = 1199                                   # no ingredient ancestor
# Charlson: FeatureExtraction's ancestor concepts, plus two made-up descendants
MI, CHF, DIABETES, DIABETES_COMPLICATION = 4329847, 316139, 201820, 443767
MILD_LIVER, SEVERE_LIVER, MALIGNANCY, METASTASIS = 4064161, 4245975, 443392, 432851
DIABETIC_NEPHROPATHY = 9_900_001                 # under diabetes and its complications
HEPATIC_COMA = 9_900_002                         # under moderate to severe liver disease

GENDER_CONCEPTS = ((MALE, "MALE", "Gender"), (FEMALE, "FEMALE", "Gender"))


def day(k: int, index: date = INDEX) -> date:
    return index + timedelta(days=k)


def design(**changes) -> CohortDesign:
    base = dict(
        concept_sets={}, exposure_table="drug_era", comparisons=(),
        prior_observation_days=0, washout_days=0, min_age=None, outcomes=(),
        risk_start_day=0, risk_end_day=None, exclude_prior_outcome=False,
        covariate_windows=((-365, -1),), covariate_domains=("condition",), min_prevalence=0.0,
    )
    base.update(changes)
    return CohortDesign(**base)


def self_ancestry(*ids: int) -> list[tuple[int, int]]:
    return [(i, i) for i in ids]


def run(folder: Path, entries: list[tuple], arms: list[tuple] = (), **changes):
    """Build covariates for cohort `entries` (comparison_id, person_id[, index date]) with arm
    concepts `arms` (comparison_id, treated, concept_id); return ids per (comparison, person),
    covariate_ref and warnings."""
    source = open_source(folder)
    try:
        persons = source.con.execute(
            "SELECT person_id, year_of_birth, gender_concept_id FROM person").df()
        cohort = pd.DataFrame(
            [(e[0], e[1], e[2] if len(e) > 2 else INDEX) for e in entries],
            columns=["comparison_id", "person_id", "index_date"],
        ).merge(persons, on="person_id", how="left")
        cohort["row_id"] = cohort.groupby("comparison_id")["person_id"].rank(method="first") - 1
        source.con.register("cohort_input", cohort)
        source.con.execute("""
            CREATE TEMP TABLE cf_cohort AS
            SELECT comparison_id::INTEGER AS comparison_id, row_id::INTEGER AS row_id,
                   person_id::BIGINT AS person_id, true AS treated,
                   index_date::DATE AS index_date, index_date::DATE AS risk_start,
                   index_date::DATE AS risk_end, 1 AS days_at_risk,
                   year_of_birth::BIGINT AS year_of_birth,
                   gender_concept_id::BIGINT AS gender_concept_id
            FROM cohort_input
        """)
        source.con.register("arm_input", pd.DataFrame(
            list(arms), columns=["comparison_id", "treated", "concept_id"]).astype(
            {"comparison_id": "int64", "treated": "bool", "concept_id": "int64"}))
        source.con.execute("CREATE TEMP TABLE cf_arm_concept AS SELECT comparison_id::INTEGER "
                           "AS comparison_id, treated, concept_id FROM arm_input")
        warnings: list[str] = []
        reference = build_covariates(source, design(**changes), warnings)
        rows = source.con.execute("""
            SELECT h.comparison_id, h.person_id, c.covariate_id
            FROM cf_covariate c JOIN cf_cohort h USING (comparison_id, row_id)
        """).fetchall()
    finally:
        source.close()
    found: dict[tuple[int, int], set[int]] = {(e[0], e[1]): set() for e in entries}
    for comparison_id, person_id, covariate_id in rows:
        found[(comparison_id, person_id)].add(covariate_id)
    return found, reference, warnings


def by_person(found: dict, comparison_id: int = 1) -> dict[int, set[int]]:
    return {person: ids for (c, person), ids in found.items() if c == comparison_id}


def persons(*ids: int, born: int = 1960, sex: int = MALE) -> list[tuple]:
    return [(i, sex, born) for i in ids]


def test_window_boundaries_are_inclusive(tmp_path):
    """[-365, -1]: records on day -365 and day -1 count, day -366 and day 0 do not; an era
    counts when it overlaps the window; [-30, -1] sees only the last month."""
    folder = write_cdm(
        tmp_path / "cdm", person=persons(1),
        condition_occurrence=[(1, COND_A, day(-366)), (1, COND_B, day(-365)),
                              (1, COND_C, day(-1)), (1, COND_D, day(0))],
        drug_era=[(1, ING_A, day(-400), day(-365)), (1, ING_B, day(0), day(30)),
                  (1, ING_C, day(-40), day(-31))],
    )
    found, _, _ = run(folder, [(1, 1)], covariate_windows=((-365, -1), (-30, -1)),
                      covariate_domains=("condition", "drug"))
    assert found[(1, 1)] == {
        COND_B * 1000 + 10, COND_C * 1000 + 10, COND_C * 1000 + 11,
        ING_A * 1000 + 20, ING_C * 1000 + 20,
    }


def test_observation_domain(tmp_path):
    folder = write_cdm(
        tmp_path / "cdm", person=persons(1, 2),
        observation=[(1, OBS, day(-100)), (1, OBS, day(-5)), (2, OBS, day(0))],
        concept=concepts((OBS, "smoker", "Observation")),
    )
    found, reference, _ = run(folder, [(1, 1), (1, 2)],
                              covariate_windows=((-365, -1), (-30, -1)),
                              covariate_domains=("observation",))
    assert by_person(found) == {1: {OBS * 1000 + 50, OBS * 1000 + 51}, 2: set()}
    names = dict(zip(reference["covariate_id"], reference["covariate_name"], strict=True))
    assert names[OBS * 1000 + 51] == "observation in [-30, -1]: smoker"
    assert set(reference["analysis"]) == {"observation"}


def test_visit_count_bands(tmp_path):
    """Bands 1 | 2-3 | 4-7 | 8+ per visit concept and window; visits overlapping a window
    count (a stay from day -370 to -364), window days are inclusive, day 0 is not baseline."""
    visits = [
        (1, INPATIENT, day(0), day(2)), (1, INPATIENT, day(-366), day(-366)),   # 0 visits
        (2, INPATIENT, day(-365), day(-365)),                                     # 1
        (3, INPATIENT, day(-1), day(-1)), (3, INPATIENT, day(-200), day(-198)),  # 2
        (4, INPATIENT, day(-365), day(-365)), (4, INPATIENT, day(-1), day(-1)),
        (4, INPATIENT, day(-100), day(-100)),                                     # 3
        (5, INPATIENT, day(-370), day(-364)), (5, INPATIENT, day(-10), day(-10)),
        (5, INPATIENT, day(-20), day(-20)), (5, INPATIENT, day(-30), day(-30)),  # 4
        *[(6, INPATIENT, day(-300 + 10 * k), day(-300 + 10 * k)) for k in range(8)],  # 8
        (6, OUTPATIENT, day(-5), day(-5)),
    ]
    folder = write_cdm(
        tmp_path / "cdm", person=persons(1, 2, 3, 4, 5, 6), visit_occurrence=visits,
        concept=concepts((INPATIENT, "Inpatient Visit", "Visit"),
                         (OUTPATIENT, "Outpatient Visit", "Visit")),
    )
    found, reference, _ = run(folder, [(1, p) for p in range(1, 7)],
                              covariate_windows=((-365, -1), (-30, -1)),
                              covariate_domains=("visit",))
    assert by_person(found) == {
        1: set(),
        2: {9201060},                      # 1 visit in [-365, -1]
        3: {9201070, 9201061},             # 2 in [-365, -1], 1 in [-30, -1]
        4: {9201070, 9201061},             # 3, 1
        5: {9201080, 9201071},             # 4 (the stay overlaps day -365), 3
        6: {9201090, 9202060, 9202061},    # 8 inpatient; 1 outpatient in both windows
    }
    names = dict(zip(reference["covariate_id"], reference["covariate_name"], strict=True))
    assert names[9201070] == "visits in [-365, -1]: Inpatient Visit, 2-3"
    assert names[9201090] == "visits in [-365, -1]: Inpatient Visit, 8+"
    assert names[9202061] == "visits in [-30, -1]: Outpatient Visit, 1"
    row = reference.set_index("covariate_id").loc[9201071]
    assert (row["analysis"], row["concept_id"], row["window_start"], row["window_end"]) == (
        "visit", INPATIENT, -30, -1)


DRUG_VOCABULARY = dict(
    concept=concepts(
        (ING_A, "ingredient A", "Drug", "RxNorm", None, "Ingredient"),
        (ING_B, "ingredient B", "Drug", "RxNorm", None, "Ingredient"),
        (ING_C, "ingredient C", "Drug", "RxNorm", None, "Ingredient"),
        (PROD_A1, "A 10 mg tablet", "Drug", "RxNorm", None, "Clinical Drug"),
        (PROD_A2, "A 20 mg tablet", "Drug", "RxNorm", None, "Clinical Drug"),
        (PROD_AB, "A / B tablet", "Drug", "RxNorm", None, "Clinical Drug"),
        (PROD_C, "C 5 mg tablet", "Drug", "RxNorm", None, "Clinical Drug"),
        (VACCINE, "a vaccine", "Drug", "CVX", None, "CVX"),
        (COND_P, "condition P", "Condition"), (COND_CHILD, "condition P child", "Condition"),
        (COND_A, "condition A", "Condition"),
    ),
    concept_ancestor=[
        *self_ancestry(ING_A, ING_B, ING_C, PROD_A1, PROD_A2, PROD_AB, PROD_C, VACCINE, COND_P,
                       COND_CHILD, COND_A),
        (ING_A, PROD_A1), (ING_A, PROD_A2), (ING_A, PROD_AB), (ING_B, PROD_AB),
        (ING_C, PROD_C), (COND_P, COND_CHILD),
    ],
)


def test_drug_exposure_rolls_up_to_ingredients(tmp_path):
    """No drug_era rows: products become their ingredients (a combination product both);
    a concept without an ingredient ancestor stays at its own id, with a warning."""
    folder = write_cdm(
        tmp_path / "cdm", person=persons(1, 2, 3),
        drug_exposure=[(1, PROD_A1, day(-10), day(-1)), (1, PROD_A2, day(-400), day(-360)),
                       (2, PROD_AB, day(-100), day(-70)), (3, VACCINE, day(-50), day(-50)),
                       (3, PROD_C, day(0), day(10))],
        **DRUG_VOCABULARY,
    )
    found, reference, warnings = run(folder, [(1, 1), (1, 2), (1, 3)],
                                     covariate_domains=("drug",))
    assert by_person(found) == {1: {1101020}, 2: {1101020, 1102020}, 3: {1199020}}
    names = dict(zip(reference["covariate_id"], reference["covariate_name"], strict=True))
    assert names == {1101020: "drug in [-365, -1]: ingredient A",
                     1102020: "drug in [-365, -1]: ingredient B",
                     1199020: "drug in [-365, -1]: a vaccine"}
    assert len(warnings) == 1
    assert "1 drug concept(s) (1 records) have no ingredient ancestor" in warnings[0]
    assert str(VACCINE) in warnings[0]


def test_without_vocabulary_drugs_stay_at_product_level(tmp_path):
    folder = write_cdm(
        tmp_path / "cdm", person=persons(1),
        drug_exposure=[(1, PROD_A1, day(-10), day(-1)), (1, PROD_AB, day(-20), day(-20))],
        concept=DRUG_VOCABULARY["concept"],
    )
    found, _, warnings = run(folder, [(1, 1)], covariate_domains=("drug",))
    assert found[(1, 1)] == {PROD_A1 * 1000 + 20, PROD_AB * 1000 + 20}
    assert any("cannot roll drug_exposure up to ingredients" in w and "all 2 drug concept(s)"
               in w for w in warnings)
    assert any("concept_ancestor table is empty" in w for w in warnings)


def test_arm_concepts_descendants_and_ingredients_are_excluded(tmp_path):
    """Comparison 1: A (an ingredient, listed without descendants) vs C; comparison 2: the
    condition P vs the product C 5 mg; comparison 3: the A / B product vs P. Person 1 is in
    all three, with the same time zero."""
    folder = write_cdm(
        tmp_path / "cdm", person=persons(1),
        drug_exposure=[(1, PROD_A2, day(-10), day(-10)), (1, PROD_AB, day(-20), day(-20)),
                       (1, PROD_C, day(-30), day(-30)), (1, VACCINE, day(-3), day(-3))],
        condition_occurrence=[(1, COND_CHILD, day(-5)), (1, COND_A, day(-5))],
        **DRUG_VOCABULARY,
    )
    arms = [(1, True, ING_A), (1, False, ING_C), (2, True, COND_P), (2, False, PROD_C),
            (3, True, PROD_AB), (3, False, COND_P)]
    found, _, _ = run(folder, [(1, 1), (2, 1), (3, 1)], arms,
                      covariate_domains=("condition", "drug"))
    assert found[(1, 1)] == {
        ING_B * 1000 + 20,       # A's combination partner stays; A (from A 20 mg, A / B) goes
        VACCINE * 1000 + 20,     # C 5 mg rolls up to C, the comparator: gone
        COND_CHILD * 1000 + 10, COND_A * 1000 + 10,
    }
    assert found[(2, 1)] == {
        ING_A * 1000 + 20, ING_B * 1000 + 20, VACCINE * 1000 + 20,   # C 5 mg's ingredient gone
        COND_A * 1000 + 10,                                          # P's child gone
    }
    assert found[(3, 1)] == {  # an arm of only a combination product: both ingredients go
        ING_C * 1000 + 20, VACCINE * 1000 + 20, COND_A * 1000 + 10,
    }


def test_product_level_covariates_of_an_ingredient_arm_are_excluded(tmp_path):
    """A vocabulary with descendants but no ingredient classes: drug covariates stay at
    product level, and an arm listed as ingredient A (no descendants) still excludes A's
    products through concept_ancestor."""
    vocabulary = concepts(*[(cid, f"drug {cid}", "Drug") for cid in (
        ING_A, ING_C, PROD_A1, PROD_A2, PROD_AB, PROD_C, VACCINE)])
    folder = write_cdm(
        tmp_path / "cdm", person=persons(1),
        drug_exposure=[(1, PROD_A2, day(-10), day(-10)), (1, PROD_AB, day(-20), day(-20)),
                       (1, PROD_C, day(-30), day(-30)), (1, VACCINE, day(-3), day(-3))],
        concept=vocabulary, concept_ancestor=DRUG_VOCABULARY["concept_ancestor"],
    )
    found, _, warnings = run(folder, [(1, 1)], [(1, True, ING_A), (1, False, ING_C)],
                             covariate_domains=("drug",))
    assert found[(1, 1)] == {VACCINE * 1000 + 20}
    assert "4 drug concept(s) (4 records) have no ingredient ancestor" in warnings[0]


def test_drug_era_ingredient_of_a_product_arm_is_excluded(tmp_path):
    folder = write_cdm(
        tmp_path / "cdm", person=persons(1),
        drug_era=[(1, ING_A, day(-50), day(-40)), (1, ING_B, day(-50), day(-40))],
        **DRUG_VOCABULARY,
    )
    found, _, _ = run(folder, [(1, 1)], [(1, True, PROD_A1), (1, False, PROD_C)],
                      covariate_domains=("drug",))
    assert found[(1, 1)] == {ING_B * 1000 + 20}


def test_demographics_with_index_month(tmp_path):
    folder = write_cdm(
        tmp_path / "cdm", person=[(1, MALE, 1960), (2, FEMALE, 1987)],
        concept=concepts(*GENDER_CONCEPTS),
    )
    found, reference, _ = run(folder, [(1, 1, date(2012, 3, 15)), (1, 2, date(2019, 12, 31))],
                              covariate_domains=("demographics",))
    assert by_person(found) == {
        1: {MALE * 1000 + 901, 10902, 2012903, 3904},     # aged 52: group 50-54; March
        2: {FEMALE * 1000 + 901, 6902, 2019903, 12904},   # aged 32: group 30-34; December
    }
    names = dict(zip(reference["covariate_id"], reference["covariate_name"], strict=True))
    assert names == {MALE * 1000 + 901: "sex = MALE", FEMALE * 1000 + 901: "sex = FEMALE",
                     10902: "age group: 50-54", 6902: "age group: 30-34",
                     2012903: "index year: 2012", 2019903: "index year: 2019",
                     3904: "index month: March", 12904: "index month: December"}
    assert set(reference["analysis"]) == {"demographics"}


CHARLSON_CDM = dict(
    person=persons(1, 2, 3, 4, 5),
    condition_occurrence=[
        (1, DIABETIC_NEPHROPATHY, day(-400)),      # diabetes (1) + complications (2)
        (2, MILD_LIVER, day(-3000)), (2, HEPATIC_COMA, day(-20)), (2, MI, day(-1)),
        (3, METASTASIS, day(-10)), (3, CHF, day(0)),
        (5, MI, day(-365)),
    ],
    concept_ancestor=[
        *self_ancestry(MI, CHF, DIABETES, DIABETES_COMPLICATION, MILD_LIVER, SEVERE_LIVER,
                       MALIGNANCY, METASTASIS, DIABETIC_NEPHROPATHY, HEPATIC_COMA),
        (DIABETES, DIABETIC_NEPHROPATHY), (DIABETES_COMPLICATION, DIABETIC_NEPHROPATHY),
        (SEVERE_LIVER, HEPATIC_COMA), (MALIGNANCY, METASTASIS),
    ],
)


def band(lowest: int) -> int:
    return lowest * 1000 + 910


def category(category_id: int) -> int:
    return category_id * 1000 + 911


def test_charlson_index_with_hierarchy(tmp_path):
    """All conditions up to the window end (day -1) count, however old. Scores by hand:
    1: diabetes 1 + complications 2, diabetes replaced -> 2
    2: mild liver 1 + severe liver 3 + MI 1, mild replaced -> 4 (band 3-4)
    3: metastasis is also a malignancy: 6 + 2 = 8 (5+); CHF on day 0 is not baseline
    4: nothing -> 0;  5: MI on day -365 -> 1."""
    folder = write_cdm(tmp_path / "cdm", **CHARLSON_CDM)
    found, reference, _ = run(folder, [(1, p) for p in range(1, 6)],
                              covariate_windows=((-365, -1), (-30, -1)),
                              covariate_domains=("charlson",))
    assert by_person(found) == {
        1: {band(2), category(10), category(11)},
        2: {band(3), category(9), category(15), category(1)},
        3: {band(5), category(14), category(16)},
        4: {band(0)},
        5: {band(1), category(1)},
    }
    names = dict(zip(reference["covariate_id"], reference["covariate_name"], strict=True))
    assert names[band(3)] == "Charlson index (Romano), conditions up to day -1: 3-4"
    assert names[band(0)] == "Charlson index (Romano), conditions up to day -1: 0"
    assert names[category(11)] == ("Charlson category, conditions up to day -1: "
                                   "Diabetes with chronic complications")
    row = reference.set_index("covariate_id").loc[band(5)]
    assert (row["analysis"], row["window_end"]) == ("charlson", -1)
    assert pd.isna(row["window_start"]) and pd.isna(row["concept_id"])


def test_charlson_as_featureextraction_sums_it(tmp_path, monkeypatch):
    """Without the hierarchy (FeatureExtraction's SQL): 1 -> 3, 2 -> 5; day 0 counts when a
    window ends on day 0."""
    monkeypatch.setattr(covariates, "CHARLSON_HIERARCHY", False)
    folder = write_cdm(tmp_path / "cdm", **CHARLSON_CDM)
    found, _, _ = run(folder, [(1, p) for p in range(1, 6)],
                      covariate_windows=((-365, 0),), covariate_domains=("charlson",))
    scores = {p: {i for i in ids if i % 1000 == 910} for p, ids in by_person(found).items()}
    assert scores == {1: {band(3)}, 2: {band(5)}, 3: {band(5)}, 4: {band(0)}, 5: {band(1)}}
    assert category(2) in found[(1, 3)]  # CHF on day 0


def test_min_prevalence_per_comparison(tmp_path):
    """Condition A in 1 of 4 persons of comparison 1 (25%) but 1 of 2 in comparison 2 (50%);
    condition B in 2 of 4 (50%). At 0.3: A goes in comparison 1 only."""
    folder = write_cdm(
        tmp_path / "cdm", person=persons(1, 2, 3, 4),
        condition_occurrence=[(1, COND_A, day(-10)), (1, COND_B, day(-10)),
                              (2, COND_B, day(-10))],
    )
    found, _, _ = run(folder, [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 3)],
                      min_prevalence=0.3)
    assert by_person(found, 1) == {1: {COND_B * 1000 + 10}, 2: {COND_B * 1000 + 10},
                                   3: set(), 4: set()}
    assert by_person(found, 2) == {1: {COND_A * 1000 + 10, COND_B * 1000 + 10}, 3: set()}


def test_catalogue_lists_every_analysis():
    catalogue = covariate_catalogue(design(covariate_windows=((-365, -1), (-30, -1)),
                                           covariate_domains=COVARIATE_DOMAINS))
    assert list(catalogue.columns) == ["analysis_id", "domain", "window_start", "window_end",
                                       "band", "covariate_id_formula", "description"]
    expected = {10, 11, 20, 21, 30, 31, 40, 41, 50, 51,        # concept domains x 2 windows
                60, 61, 70, 71, 80, 81, 90, 91,                # visit bands x 2 windows
                901, 902, 903, 904, 910, 911}
    assert set(catalogue["analysis_id"]) == expected
    assert catalogue["analysis_id"].is_unique
    visits = catalogue[catalogue["domain"] == "visit"].set_index("analysis_id")
    assert visits.loc[71, "band"] == "2-3"
    assert (visits.loc[71, "window_start"], visits.loc[71, "window_end"]) == (-30, -1)
    assert visits.loc[71, "covariate_id_formula"] == "visit_concept_id * 1000 + 71"
    charlson = catalogue.set_index("analysis_id").loc[910]
    assert charlson["window_end"] == -1 and pd.isna(charlson["window_start"])
    only = covariate_catalogue(design(covariate_domains=("condition",)))
    assert list(only["analysis_id"]) == [10]


def test_prepare_study_with_every_domain(tmp_path):
    """The whole preparation on test_cohorts' CDM: every id is in the catalogue, X is 0/1, and
    the arms' drugs (T, C) never appear."""
    source = open_source(tiny_cdm(tmp_path / "cdm"))
    chosen = cohort_design(covariate_domains=COVARIATE_DOMAINS)
    try:
        prepare_study(source, chosen, tmp_path / "ws")
    finally:
        source.close()
    data = load_comparison(tmp_path / "ws", 1, [1])
    assert data.X.shape[0] == data.n and data.X.max() == 1
    analyses = set(covariate_catalogue(chosen)["analysis_id"])
    assert {int(i) % 1000 for i in data.covariate_ids} <= analyses
    assert not any(i // 1000 in (101, 102) for i in data.covariate_ids if i % 1000 < 900)
    reference = pd.read_parquet(tmp_path / "ws" / "covariate_ref.parquet")
    assert reference["covariate_name"].notna().all()
    assert {"charlson", "demographics", "condition", "drug"} <= set(reference["analysis"])



# Written out again here (not imported) so the check is independent of the module's table.
FE_CHARLSON = {  # category: (weight, ancestor concept ids), FeatureExtraction CharlsonIndex.sql
    1: (1, [4329847]), 2: (1, [316139]), 3: (1, [321052]), 4: (1, [381591, 434056]),
    5: (1, [4182210]), 6: (1, [4063381]),
    7: (1, [257628, 134442, 80800, 80809, 256197, 255348]), 8: (1, [4247120]),
    9: (1, [4064161, 4212540]), 10: (1, [201820]), 11: (2, [443767, 442793]),
    12: (2, [192606, 374022]), 13: (2, [4030518]), 14: (2, [443392]),
    15: (3, [4245975, 4029488, 192680, 24966]), 16: (6, [432851]), 17: (6, [439727]),
}

INDEPENDENT = """
WITH cohort AS (SELECT person_id, index_date FROM read_parquet('{ws}/cohort/*/*.parquet',
                hive_partitioning = true) WHERE comparison_id = 1),
condition AS (
    SELECT co.condition_concept_id * 1000 + 10 AS covariate_id, count(DISTINCT h.person_id) AS n
    FROM cohort h JOIN '{d}/condition_occurrence.parquet' co USING (person_id)
    WHERE co.condition_start_date BETWEEN h.index_date - 365 AND h.index_date - 1
    GROUP BY ALL),
drug AS (
    SELECT e.drug_concept_id * 1000 + 21 AS covariate_id, count(DISTINCT h.person_id) AS n
    FROM cohort h JOIN '{d}/drug_era.parquet' e USING (person_id)
    WHERE e.drug_era_start_date <= h.index_date - 1 AND e.drug_era_end_date >= h.index_date - 30
      AND e.drug_concept_id NOT IN (1118084, 1124300)
    GROUP BY ALL),
visits AS (
    SELECT h.person_id, v.visit_concept_id, count(*) AS k
    FROM cohort h JOIN '{d}/visit_occurrence.parquet' v USING (person_id)
    WHERE v.visit_start_date <= h.index_date - 1
      AND greatest(v.visit_end_date, v.visit_start_date) >= h.index_date - 365
    GROUP BY ALL),
visit AS (
    SELECT visit_concept_id * 1000 + CASE WHEN k = 1 THEN 60 WHEN k <= 3 THEN 70
                                          WHEN k <= 7 THEN 80 ELSE 90 END AS covariate_id,
           count(*) AS n
    FROM visits GROUP BY ALL),
month AS (SELECT month(index_date) * 1000 + 904 AS covariate_id, count(*) AS n
          FROM cohort GROUP BY ALL),
charlson_concept AS (
    SELECT c.category, a.descendant_concept_id AS concept_id
    FROM charlson c JOIN '{d}/concept_ancestor.parquet' a
      ON a.ancestor_concept_id = c.ancestor),
present AS (
    SELECT DISTINCT h.person_id, k.category
    FROM cohort h JOIN '{d}/condition_occurrence.parquet' co USING (person_id)
    JOIN charlson_concept k ON k.concept_id = co.condition_concept_id
    WHERE co.condition_start_date <= h.index_date - 1),
score AS (
    SELECT h.person_id, coalesce(sum(w.weight) FILTER (
               WHERE NOT (p.category = 10 AND 11 IN (SELECT category FROM present q
                                                     WHERE q.person_id = h.person_id))
                 AND NOT (p.category = 9 AND 15 IN (SELECT category FROM present q
                                                    WHERE q.person_id = h.person_id))), 0) AS s
    FROM cohort h LEFT JOIN present p USING (person_id)
    LEFT JOIN (SELECT DISTINCT category, weight FROM charlson) w USING (category)
    GROUP BY h.person_id),
charlson_band AS (
    SELECT CASE WHEN s >= 5 THEN 5 WHEN s >= 3 THEN 3 ELSE s END * 1000 + 910 AS covariate_id,
           count(*) AS n
    FROM score GROUP BY ALL),
charlson_category AS (SELECT category * 1000 + 911 AS covariate_id, count(*) AS n
                      FROM present GROUP BY ALL)
SELECT * FROM condition UNION ALL SELECT * FROM drug UNION ALL SELECT * FROM visit
UNION ALL SELECT * FROM month UNION ALL SELECT * FROM charlson_band
UNION ALL SELECT * FROM charlson_category
"""


@pytest.mark.shared_data
@needs(GIBLEED)
def test_gibleed_prevalences_match_independent_sql(tmp_path):
    """Celecoxib vs diclofenac new users: persons per covariate for conditions in [-365, -1],
    drug eras in [-30, -1], inpatient visit bands, index month and the Charlson bands and
    categories, each recomputed from the raw Parquet by hand-written SQL."""
    chosen = CohortDesign(
        concept_sets={"celecoxib": ConceptSetDef("celecoxib", (1118084,)),
                      "diclofenac": ConceptSetDef("diclofenac", (1124300,)),
                      "gi_bleed": ConceptSetDef("gi_bleed", (192671,))},
        exposure_table="drug_era", comparisons=(("celecoxib", "diclofenac"),),
        prior_observation_days=365, washout_days=365, min_age=18,
        outcomes=(OutcomeDef("gi_bleed"),), risk_start_day=0, risk_end_day=None,
        exclude_prior_outcome=True, covariate_windows=((-365, -1), (-30, -1)),
        covariate_domains=COVARIATE_DOMAINS, min_prevalence=0.0,
    )
    source = open_source(GIBLEED)
    try:
        prepare_study(source, chosen, tmp_path / "ws")
    finally:
        source.close()
    con = duckdb.connect()
    con.register("charlson", pd.DataFrame(
        [(c, w, a) for c, (w, ancestors) in FE_CHARLSON.items() for a in ancestors],
        columns=["category", "weight", "ancestor"]))
    expected = dict(con.execute(INDEPENDENT.format(d=GIBLEED, ws=tmp_path / "ws")).fetchall())
    data = load_comparison(tmp_path / "ws", 1, [])
    got = dict(zip(data.covariate_ids.tolist(),
                   np.asarray(data.X.sum(axis=0)).ravel().astype(int).tolist(), strict=True))
    checked = {cid: got.get(cid, 0) for cid in expected}
    assert checked == expected
    # every analysis above is complete: nothing found that the hand-written SQL did not find
    for analysis in (10, 21, 60, 70, 80, 90, 904, 910, 911):
        assert {c for c in got if c % 1000 == analysis} == {
            c for c in expected if c % 1000 == analysis}, analysis
    # enough of each kind to make the comparison mean something
    kinds = pd.Series([c % 1000 for c in expected]).value_counts()
    assert kinds[10] > 20 and kinds[911] >= 3 and kinds[910] >= 3 and kinds[904] == 12
    assert np.sum([n for c, n in expected.items() if c % 1000 == 60]) > 0




@pytest.mark.shared_data
@needs(SYNTHEA)
def test_synthea_without_hierarchy_says_what_it_cannot_do():
    """CDM v5.4 with empty concept_ancestor and drug_era, 32-bit id columns: every domain
    still runs, drugs stay at product level, and the warnings say so."""
    source = open_source(SYNTHEA)
    try:
        source.con.execute("""
            CREATE TEMP TABLE cf_cohort AS
            SELECT 1 AS comparison_id, (row_number() OVER (ORDER BY person_id) - 1)::INTEGER
                   AS row_id, person_id, true AS treated, DATE '2019-01-01' AS index_date,
                   NULL::DATE AS risk_start, NULL::DATE AS risk_end, 1 AS days_at_risk,
                   year_of_birth, gender_concept_id
            FROM person
        """)
        source.con.execute("CREATE TEMP TABLE cf_arm_concept AS SELECT 1 AS comparison_id, "
                           "true AS treated, 1118084::BIGINT AS concept_id")
        warnings: list[str] = []
        reference = build_covariates(source, design(
            covariate_domains=COVARIATE_DOMAINS, covariate_windows=((-3650, -1),)), warnings)
    finally:
        source.close()
    assert {"drug", "visit", "observation", "charlson", "demographics"} <= set(
        reference["analysis"])
    assert reference["covariate_id"].min() > 0
    assert any("product-level id" in w for w in warnings)
    assert any(w.startswith("Charlson index: the source's concept_ancestor") for w in warnings)
    assert any(w.startswith("covariates: the source's concept_ancestor") for w in warnings)
