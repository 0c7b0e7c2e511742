"""Cohort rules on a hand-made CDM: every expected person, date, time and count worked by hand.

Drugs: T (treatment, 101) and C (comparator, 102). Outcome OUT (201) with a child concept 202.
Persons (observation periods and eras are chosen so each one tests a rule):
  1  T user, index 2012-01-01, event 2013-01-01            -> treated, time 367, event
  2  C user, index 2011-06-01, event on day 0 (child code)  -> comparator, time 1, event
  3  T user with 100 days of prior observation              -> fails prior observation
  4  T user aged 10 at index                                -> fails min age 18
  5  T 2012-05-01 and C 2014-05-01, both eligible           -> removed from both arms
  6  C user with an outcome before index                    -> dropped for the outcome only
  7  T first era before observation start (later one in)    -> fails "in observation"
  8  T era, observation period but no person row            -> fails "in observation"
  9  C user, event on the last day of observation           -> time 730 = days at risk, event
 10  T era starting on the last observation day             -> 1 day at risk, censored
 11  T 2012-12-01; C 2013-03-01 within T's washout          -> treated only (C entry fails)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cohort.comparison_data import load_comparison
from cohort.concepts import concept_set_labels
from cohort.design import CohortDesign, ConceptSetDef, OutcomeDef
from cohort.prepare import prepare_study
from cohort.source import SourceError, open_source
from tests.tiny_cdm import concepts, d, write_cdm

T, C, OUT, OUT_CHILD, COND, OTHER_DRUG = 101, 102, 201, 202, 301, 401


def tiny_cdm(folder: Path) -> Path:
    obs = "2010-01-01"
    return write_cdm(
        folder,
        person=[(1, 8507, 1960), (2, 8532, 1970), (3, 8507, 1950), (4, 8532, 2002),
                (5, 8507, 1965), (6, 8532, 1955), (7, 8507, 1960), (9, 8532, 1945),
                (10, 8507, 1980), (11, 8532, 1975)],
        observation_period=[
            (1, d(obs), d("2015-12-31")), (2, d(obs), d("2014-06-30")),
            (3, d("2011-09-23"), d("2015-12-31")), (4, d(obs), d("2015-12-31")),
            (5, d(obs), d("2016-12-31")), (6, d(obs), d("2015-12-31")),
            (7, d(obs), d("2015-12-31")), (8, d(obs), d("2015-12-31")),
            (9, d(obs), d("2014-12-31")), (10, d(obs), d("2012-12-31")),
            (11, d(obs), d("2015-12-31")),
        ],
        drug_era=[
            (1, T, d("2012-01-01"), d("2012-03-01")),
            (1, OTHER_DRUG, d("2011-11-01"), d("2012-02-01")),
            (2, C, d("2011-06-01"), d("2011-07-01")),
            (3, T, d("2012-01-01"), d("2012-02-01")),
            (4, T, d("2012-01-01"), d("2012-02-01")),
            (5, T, d("2012-05-01"), d("2012-06-01")), (5, C, d("2014-05-01"), d("2014-06-01")),
            (6, C, d("2011-01-01"), d("2011-02-01")),
            (7, T, d("2009-06-01"), d("2009-07-01")), (7, T, d("2012-01-01"), d("2012-02-01")),
            (8, T, d("2012-01-01"), d("2012-02-01")),
            (9, C, d("2013-01-01"), d("2013-02-01")),
            (10, T, d("2012-12-31"), d("2012-12-31")),
            (11, T, d("2012-12-01"), d("2013-01-15")), (11, C, d("2013-03-01"), d("2013-04-01")),
        ],
        condition_occurrence=[
            (1, OUT, d("2013-01-01")), (1, OUT, d("2014-01-01")),
            (1, COND, d("2011-12-15")), (1, COND, d("2012-01-01")),
            (2, OUT_CHILD, d("2011-06-01")),
            (6, OUT, d("2010-06-01")), (6, OUT, d("2012-01-01")),
            (9, OUT, d("2014-12-31")),
        ],
        concept=concepts((T, "drug T", "Drug"), (C, "drug C", "Drug"),
                         (OUT, "outcome O", "Condition"),
                         (OUT_CHILD, "outcome O child", "Condition"),
                         (COND, "condition X", "Condition"), (OTHER_DRUG, "drug Y", "Drug"),
                         (8507, "MALE", "Gender"), (8532, "FEMALE", "Gender")),
        concept_ancestor=[(T, T), (C, C), (OUT, OUT), (OUT, OUT_CHILD), (OUT_CHILD, OUT_CHILD)],
    )


def design(**changes) -> CohortDesign:
    base = dict(
        concept_sets={"t": ConceptSetDef("t", (T,)), "c": ConceptSetDef("c", (C,)),
                      "o": ConceptSetDef("o", (OUT,))},
        exposure_table="drug_era", comparisons=(("t", "c"),),
        prior_observation_days=365, washout_days=365, min_age=18,
        outcomes=(OutcomeDef("o"),), risk_start_day=0, risk_end_day=None,
        exclude_prior_outcome=True, covariate_windows=((-365, -1), (-30, -1)),
        covariate_domains=("condition", "drug", "demographics"), min_prevalence=0.0,
    )
    base.update(changes)
    return CohortDesign(**base)


@pytest.fixture
def prepared(tmp_path):
    def run(**changes):
        source = open_source(tiny_cdm(tmp_path / "cdm"))
        try:
            result = prepare_study(source, design(**changes), tmp_path / "ws")
            cohort = pd.read_parquet(tmp_path / "ws" / "cohort")
        finally:
            source.close()
        return result, cohort
    return run


def test_attrition_counts_every_rule(prepared):
    result, _ = prepared()
    steps = result.attrition.set_index("step")
    expected = {  # step: (treated, comparator) persons remaining
        "first_exposure": (8, 5), "in_observation": (6, 5), "prior_observation": (5, 5),
        "age": (4, 5), "washout": (4, 4), "not_in_both": (3, 3), "at_risk": (3, 3),
        "no_prior_outcome": (3, 2),
    }
    for step, (treated, comparator) in expected.items():
        assert (steps.loc[step, "treated_persons"], steps.loc[step, "comparator_persons"]) == (
            treated, comparator), step


def test_cohort_members_dates_and_times(prepared, tmp_path):
    _, cohort = prepared()
    cohort = cohort.sort_values("person_id").set_index("person_id")
    assert list(cohort.index) == [1, 2, 6, 9, 10, 11]
    assert list(cohort["treated"]) == [True, False, False, False, True, True]
    assert cohort.loc[1, "index_date"] == d("2012-01-01")
    assert cohort.loc[10, "days_at_risk"] == 1
    assert cohort.loc[9, "days_at_risk"] == 730  # 2013-01-01 .. 2014-12-31 inclusive
    data = load_comparison(tmp_path / "ws", 1, [1])
    outcome = data.outcomes[1]
    row = {pid: i for i, pid in enumerate(cohort.index)}  # row_id is ordered by person_id
    assert outcome.time[row[1]] == 367 and outcome.event[row[1]] == 1    # leap year 2012
    assert outcome.time[row[2]] == 1 and outcome.event[row[2]] == 1      # day-0 event, child code
    assert outcome.time[row[9]] == 730 and outcome.event[row[9]] == 1    # last day at risk
    assert outcome.time[row[10]] == 1 and outcome.event[row[10]] == 0
    assert outcome.prior[row[6]] and outcome.event[row[6]] == 1          # prior and later event
    assert outcome.prior.sum() == 1


def test_risk_window_start_and_end_days(prepared, tmp_path):
    result, cohort = prepared(risk_start_day=1, risk_end_day=365)
    steps = result.attrition.set_index("step")
    assert steps.loc["at_risk", "treated_persons"] == 2     # person 10 has no day 1
    data = load_comparison(tmp_path / "ws", 1, [1])
    cohort = cohort.sort_values("person_id").set_index("person_id")
    row = {pid: i for i, pid in enumerate(cohort.index)}
    assert cohort.loc[1, "days_at_risk"] == 365
    assert data.outcomes[1].event[row[1]] == 0             # event on day 366 is after the end
    assert data.outcomes[1].time[row[1]] == 365
    assert data.outcomes[1].event[row[2]] == 0             # day-0 event is before the start
    assert data.outcomes[1].prior[row[2]]                  # ... so it counts as prior


def test_keeping_prior_outcomes(prepared):
    result, _ = prepared(exclude_prior_outcome=False)
    steps = result.attrition.set_index("step")
    assert steps.loc["no_prior_outcome", "comparator_persons"] == 3


def test_covariates_windows_and_exclusions(prepared, tmp_path):
    prepared()
    data = load_comparison(tmp_path / "ws", 1, [1])
    reference = pd.read_parquet(tmp_path / "ws" / "covariate_ref.parquet")
    names = dict(zip(reference["covariate_id"], reference["covariate_name"], strict=True))
    person1 = data.X[0].indices  # person 1 is row 0
    got = sorted(names[cid] for cid in data.covariate_ids[person1])
    assert got == sorted([
        "condition in [-365, -1]: condition X",    # 2011-12-15; the day-0 record is not baseline
        "condition in [-30, -1]: condition X",
        "drug in [-365, -1]: drug Y",               # era overlapping both windows
        "drug in [-30, -1]: drug Y",
        "sex = MALE", "age group: 50-54", "index year: 2012",
        "index month: January",
    ])
    assert not any(cid // 1000 in (T, C) for cid in data.covariate_ids)


def test_min_prevalence_drops_rare_covariates(prepared, tmp_path):
    prepared(min_prevalence=0.5)
    data = load_comparison(tmp_path / "ws", 1, [1])
    prevalence = np.asarray(data.X.mean(axis=0)).ravel()
    assert prevalence.min() >= 0.5
    assert data.X.shape[1] >= 1


def test_descendants_can_be_switched_off(prepared, tmp_path):
    sets = {"t": ConceptSetDef("t", (T,)), "c": ConceptSetDef("c", (C,)),
            "o": ConceptSetDef("o", (OUT,), descendants=False)}
    prepared(concept_sets=sets)
    data = load_comparison(tmp_path / "ws", 1, [1])
    assert data.outcomes[1].event[1] == 0  # person 2's event was recorded on the child concept


def test_exclude_removes_concepts(prepared, tmp_path):
    sets = {"t": ConceptSetDef("t", (T,)), "c": ConceptSetDef("c", (C,)),
            "o": ConceptSetDef("o", (OUT,), exclude=(OUT_CHILD,))}
    prepared(concept_sets=sets)
    data = load_comparison(tmp_path / "ws", 1, [1])
    events = data.outcomes[1].event
    assert events[1] == 0               # person 2's event was on the excluded child concept
    assert events.sum() == 3            # persons 1, 6 (after its prior outcome) and 9


def test_unknown_concept_id_is_named(tmp_path):
    source = open_source(tiny_cdm(tmp_path / "cdm"))
    sets = {"t": ConceptSetDef("t", (T,)), "c": ConceptSetDef("c", (999999,)),
            "o": ConceptSetDef("o", (OUT,))}
    with pytest.raises(SourceError, match=r"not in the source's concept table \(c: 999999\)"):
        prepare_study(source, design(concept_sets=sets), tmp_path / "ws")


def test_drug_exposure_as_exposure_table(tmp_path):
    folder = tiny_cdm(tmp_path / "cdm")
    eras = pd.read_parquet(folder / "drug_era.parquet")
    eras.columns = ["person_id", "drug_concept_id", "drug_exposure_start_date",
                    "drug_exposure_end_date"]
    eras.to_parquet(folder / "drug_exposure.parquet", index=False)
    source = open_source(folder)
    result = prepare_study(source, design(exposure_table="drug_exposure"), tmp_path / "ws")
    assert result.attrition.set_index("step").loc["at_risk", "treated_persons"] == 3


def test_stable_identifiers_for_joining_outside_evidence(tmp_path):
    folder = tiny_cdm(tmp_path / "cdm")
    concept = pd.read_parquet(folder / "concept.parquet")
    atc = pd.DataFrame([{"concept_id": 9001, "concept_name": "coxibs", "domain_id": "Drug",
                         "vocabulary_id": "ATC", "concept_code": "M01AH"}])
    pd.concat([concept, atc]).to_parquet(folder / "concept.parquet", index=False)
    ancestor = pd.read_parquet(folder / "concept_ancestor.parquet")
    pd.concat([ancestor, pd.DataFrame({"ancestor_concept_id": [9001],
                                       "descendant_concept_id": [T]})]).to_parquet(
        folder / "concept_ancestor.parquet", index=False)
    source = open_source(folder)
    labels = concept_set_labels(source, design().concept_sets).set_index("set_name")
    assert list(labels.loc["t", "codes"]) == ["Test:101"]
    assert list(labels.loc["t", "names"]) == ["drug T"]
    assert list(labels.loc["t", "atc"]) == ["M01AH coxibs"]
    assert list(labels.loc["c", "atc"]) == []
    result = prepare_study(source, design(), tmp_path / "ws")
    assert list(result.comparisons.loc[0, "treatment_atc"]) == ["M01AH coxibs"]
    assert list(result.outcomes.loc[0, "codes"]) == ["Test:201"]
