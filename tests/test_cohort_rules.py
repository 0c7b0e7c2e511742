"""Every population, comparator and follow-up rule on tiny hand-made CDMs, answers by hand.

Each test builds its own CDM of a handful of persons so the expected persons, dates and days at
risk can be read off the rows. Drugs: T 101, C 102, X 103 (a third candidate). Everyone is
observed 2010-01-01..2015-12-31 and born in 1960 unless a row says otherwise. Day arithmetic:
days at risk = risk end - risk start + 1 (both inclusive).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from cohort.design import (
    CohortDesign,
    ComparatorDef,
    ConceptSetDef,
    Criterion,
    OutcomeDef,
    ScreenDef,
)
from cohort.prepare import prepare_study
from cohort.source import SourceError, open_source
from tests.tiny_cdm import concepts, d, write_cdm

T, C, X, OUT, HTN, CANCER = 101, 102, 103, 201, 301, 302
OBS = (d("2010-01-01"), d("2015-12-31"))
SETS = {"t": ConceptSetDef("t", (T,)), "c": ConceptSetDef("c", (C,)),
        "x": ConceptSetDef("x", (X,)), "o": ConceptSetDef("o", (OUT,)),
        "htn": ConceptSetDef("htn", (HTN,)), "cancer": ConceptSetDef("cancer", (CANCER,))}
VOCABULARY = concepts((T, "drug T", "Drug"), (C, "drug C", "Drug"), (X, "drug X", "Drug"),
                      (OUT, "outcome", "Condition"), (HTN, "hypertension", "Condition"),
                      (CANCER, "cancer", "Condition"), (8507, "MALE", "Gender"),
                      (8532, "FEMALE", "Gender"))


def design(**changes) -> CohortDesign:
    base = dict(
        concept_sets=SETS, exposure_table="drug_era", comparisons=(("t", "c"),),
        prior_observation_days=365, washout_days=365, min_age=None,
        outcomes=(OutcomeDef("o"),), risk_start_day=0, risk_end_day=None,
        exclude_prior_outcome=True, covariate_windows=((-365, -1),),
        covariate_domains=("condition", "demographics"), min_prevalence=0.0,
    )
    base.update(changes)
    return CohortDesign(**base)


def cdm(folder: Path, persons: list[int], eras: list[tuple], conditions=(), **tables) -> Path:
    """Persons born 1960 (male) observed over OBS unless given; everyone has the outcome on
    2015-06-01 (after every time zero here: it never changes who is in a cohort)."""
    tables.setdefault("person", [(p, 8507, 1960) for p in persons])
    tables.setdefault("observation_period", [(p, *OBS) for p in persons])
    conditions = list(conditions) + [(p, OUT, d("2015-06-01")) for p in persons]
    return write_cdm(folder, drug_era=eras, condition_occurrence=conditions,
                     concept=tables.pop("concept", VOCABULARY),
                     concept_ancestor=tables.pop("concept_ancestor", []), **tables)


def era(person: int, drug: int, start: str, end: str | None = None) -> tuple:
    return (person, drug, d(start), d(end or start))


def prepare(tmp_path: Path, folder: Path, study: CohortDesign):
    source = open_source(folder)
    try:
        result = prepare_study(source, study, tmp_path / "ws")
    finally:
        source.close()
    cohort = pd.read_parquet(tmp_path / "ws" / "cohort").astype({"comparison_id": "int64"})
    return result, cohort


def members(cohort: pd.DataFrame, comparison_id: int = 1) -> dict[int, tuple]:
    """person -> (treated, index date, risk end, days at risk) in one comparison."""
    rows = cohort[cohort["comparison_id"] == comparison_id]
    return {int(r.person_id): (bool(r.treated), r.index_date, r.risk_end, int(r.days_at_risk))
            for r in rows.itertuples()}


def steps(result, comparison_id: int = 1) -> dict[str, tuple[int, int]]:
    rows = result.attrition[(result.attrition["comparison_id"] == comparison_id)
                            & result.attrition["outcome"].isna()]
    return {r.step: (r.treated_persons, r.comparator_persons) for r in rows.itertuples()}


# --- population -------------------------------------------------------------------------------

def test_study_window_age_range_and_sex(tmp_path):
    """1 in; 2 time zero after the window; 3 aged 72 (> 70); 4 female; 5 comparator in."""
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4, 5],
                 [era(1, T, "2012-01-01"), era(2, T, "2013-02-01"), era(3, T, "2012-01-01"),
                  era(4, T, "2012-01-01"), era(5, C, "2012-03-01")],
                 person=[(1, 8507, 1960), (2, 8507, 1960), (3, 8507, 1940), (4, 8532, 1960),
                         (5, 8507, 1960)])
    result, cohort = prepare(tmp_path, folder, design(
        study_start=date(2011, 6, 1), study_end=date(2012, 12, 31), min_age=40, max_age=70,
        sexes=(8507,)))
    assert set(members(cohort)) == {1, 5}
    counts = steps(result)
    assert counts["first_exposure"] == (4, 1)
    assert counts["study_window"] == (3, 1)
    assert counts["age"] == (2, 1)
    assert counts["sex"] == (1, 1)


def test_require_exclude_and_indication_windows(tmp_path):
    """require htn in [-365, 0]; exclude cancer in [-365, -1]; all T users index 2012-01-01.
    (3 and 6 also have an earlier htn record, for the min_count case.)

    1 htn on day -306 -> in;  2 htn on day -366 -> fails require;  3 htn on day 0 -> in;
    4 htn ok, cancer on day -1 -> excluded;  5 htn ok, cancer on day 0 -> in (window ends -1);
    6 comparator, htn day -61 -> in.
    """
    conditions = [(1, HTN, d("2011-03-01")), (2, HTN, d("2010-12-31")), (3, HTN, d("2012-01-01")),
                  (4, HTN, d("2011-06-01")), (4, CANCER, d("2011-12-31")),
                  (5, HTN, d("2011-06-01")), (5, CANCER, d("2012-01-01")),
                  (6, HTN, d("2011-11-01")), (1, OUT, d("2013-01-01")),
                  (3, HTN, d("2011-01-01")), (6, HTN, d("2010-06-01"))]
    eras = [era(p, T, "2012-01-01") for p in (1, 2, 3, 4, 5)] + [era(6, C, "2012-01-01")]
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4, 5, 6], eras, conditions)
    criteria = (Criterion("require", "htn", (-365, 0)),
                Criterion("exclude", "cancer", (-365, -1)))
    result, cohort = prepare(tmp_path, folder, design(criteria=criteria))
    assert set(members(cohort)) == {1, 3, 5, 6}
    counts = steps(result)
    assert counts["require_htn"] == (4, 1) and counts["exclude_cancer"] == (3, 1)
    # an indication recorded at least twice in two years: persons 3 and 6 (comparator)
    twice = (Criterion("indication", "htn", (-730, 0), min_count=2),)
    result, cohort = prepare(tmp_path, folder, design(criteria=twice))
    assert steps(result)["indication_htn"] == (1, 1)
    assert set(members(cohort)) == {3, 6}


def test_criterion_on_a_drug_counts_overlapping_eras(tmp_path):
    """require X in [-30, -1]: an X era ending on day -10 overlaps; one ending on day -31 not."""
    eras = [era(1, T, "2012-01-01"), era(1, X, "2011-11-01", "2011-12-22"),
            era(2, T, "2012-01-01"), era(2, X, "2011-11-01", "2011-12-01"),
            era(3, C, "2012-01-01"), era(3, X, "2011-12-31")]
    folder = cdm(tmp_path / "cdm", [1, 2, 3], eras)
    _, cohort = prepare(tmp_path, folder, design(criteria=(
        Criterion("require", "x", (-30, -1)),)))
    assert set(members(cohort)) == {1, 3}


# --- persons in both arms, common period --------------------------------------------------------

BOTH = [era(1, T, "2012-01-01"), era(1, C, "2014-05-01"),   # both eligible, T first
        era(2, T, "2012-01-01"), era(2, C, "2012-01-01"),   # both on the same day
        era(3, C, "2012-06-01"), era(4, T, "2012-06-01")]


def test_both_arms_removed_by_default(tmp_path):
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], BOTH)
    result, cohort = prepare(tmp_path, folder, design())
    assert set(members(cohort)) == {3, 4}
    assert steps(result)["washout"] == (3, 3)
    assert steps(result)["not_in_both"] == (1, 1)


def test_both_arms_first_keeps_the_earlier_arm_and_censors_at_the_other(tmp_path):
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], BOTH)
    _, cohort = prepare(tmp_path, folder, design(both_arms="first"))
    found = members(cohort)
    assert set(found) == {1, 3, 4}  # 2 started both the same day: no first arm
    # 2012-01-01 .. 2014-04-30: 366 + 365 + 120 days
    assert found[1] == (True, d("2012-01-01"), d("2014-04-30"), 366 + 365 + 120)


def test_common_period(tmp_path):
    """T time zeros 2011-06-01 and 2012-06-01; C 2012-01-01 and 2014-01-01: common period is
    2012-01-01..2012-06-01, so T person 1 and C person 4 fall outside."""
    eras = [era(1, T, "2011-06-01"), era(2, T, "2012-06-01"), era(3, C, "2012-01-01"),
            era(4, C, "2014-01-01")]
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], eras)
    result, cohort = prepare(tmp_path, folder, design(common_period=True))
    assert set(members(cohort)) == {2, 3}
    assert steps(result)["common_period"] == (1, 1)


# --- follow-up --------------------------------------------------------------------------------

FOLLOW = [era(1, T, "2012-01-01", "2012-01-30"), era(1, T, "2012-02-20", "2012-03-31"),
          era(1, T, "2012-06-01", "2012-06-30"),
          era(2, T, "2012-01-01", "2012-02-01"),
          era(3, T, "2012-01-01", "2012-02-01"), era(3, C, "2012-05-01", "2012-06-01"),
          era(4, C, "2012-01-01", "2012-01-01")]  # a 0-day exposure (start = end)
DEATH = [(2, d("2012-07-01"))]
EARLY = [(1, OUT, d("2012-01-15"))]  # an event inside even the shortest follow-up


def test_intention_to_treat_censors_at_death_and_optionally_at_switch(tmp_path):
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], FOLLOW, EARLY, death=DEATH)
    _, cohort = prepare(tmp_path, folder, design())
    found = members(cohort)
    end_of_observation = (d("2015-12-31") - d("2012-01-01")).days + 1
    assert found[1][3] == end_of_observation
    assert found[2][2:] == (d("2012-07-01"), 183)  # death day is at risk: Jan 1 .. Jul 1
    assert found[3][3] == end_of_observation       # switching ignored under ITT
    assert found[4][3] == end_of_observation       # a 0-day exposure still starts follow-up
    _, cohort = prepare(tmp_path, folder, design(censor_at_switch=True, censor_at_death=False))
    found = members(cohort)
    assert found[3][2:] == (d("2012-04-30"), 121)  # the day before C starts
    assert found[2][3] == end_of_observation


def test_on_treatment_episodes_bridge_gaps(tmp_path):
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], FOLLOW, EARLY, death=DEATH)
    on_treatment = dict(risk_end_anchor="exposure_end", risk_end_day=0)
    _, cohort = prepare(tmp_path, folder, design(gap_days=30, **on_treatment))
    found = members(cohort)
    assert found[1][2:] == (d("2012-03-31"), 91)   # 20-day gap bridged, 62-day gap not
    assert found[2][2:] == (d("2012-02-01"), 32)
    assert found[4][2:] == (d("2012-01-01"), 1)    # 0-day exposure: one day on treatment
    _, cohort = prepare(tmp_path, folder, design(gap_days=0, **on_treatment))
    assert members(cohort)[1][2:] == (d("2012-01-30"), 30)
    _, cohort = prepare(tmp_path, folder, design(gap_days=30, risk_end_anchor="exposure_end",
                                                 risk_end_day=10))
    assert members(cohort)[1][2:] == (d("2012-04-10"), 101)


def test_max_follow_up_start_day_and_min_days_at_risk(tmp_path):
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], FOLLOW, EARLY, death=DEATH)
    _, cohort = prepare(tmp_path, folder, design(max_follow_up_days=100, risk_start_day=1))
    found = members(cohort)
    assert found[1][2:] == (d("2012-04-10"), 100)  # 2012-01-02 + 99 days
    result, cohort = prepare(tmp_path, folder, design(min_days_at_risk=200))
    assert set(members(cohort)) == {1, 3, 4}       # person 2 died after 183 days
    assert steps(result)["at_risk"] == (2, 1)


# --- comparators ------------------------------------------------------------------------------

def test_other_candidates(tmp_path):
    """Candidates t, c, x compared each with new users of the other two.

    1 T only; 2 C then X 16 months later; 3 T then X 27 months later; 4 X only. In t vs
    others: treated 1, 3; comparators 2 (time zero at C) and 4 (X); 3's X entry comes after T,
    so it is no comparator entry (comparators must not have used the candidate) and 3 stays
    treated, followed to the end of observation. In x vs others 3 is a comparator (T first) and
    a new user of X: kept in the first arm (both_arms first), censored the day before X.
    """
    eras = [era(1, T, "2012-01-01", "2012-01-31"), era(2, C, "2012-02-01"),
            era(2, X, "2013-06-01"), era(3, T, "2012-03-01", "2012-03-31"),
            era(3, X, "2014-06-01"), era(4, X, "2012-01-01")]
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], eras)
    result, cohort = prepare(tmp_path, folder, design(
        comparisons=(("t", "other_candidates"), ("c", "other_candidates"),
                     ("x", "other_candidates")),
        comparator=ComparatorDef("other_candidates"), both_arms="first"))
    t_vs_others = members(cohort, 1)
    assert {p: v[:2] for p, v in t_vs_others.items()} == {
        1: (True, d("2012-01-01")), 2: (False, d("2012-02-01")), 3: (True, d("2012-03-01")),
        4: (False, d("2012-01-01"))}
    assert t_vs_others[3][2] == d("2015-12-31")  # X after T: not a comparator entry, ITT
    x_vs_others = members(cohort, 3)
    assert x_vs_others[3][:3] == (False, d("2012-03-01"), d("2014-05-31"))
    assert x_vs_others[4][:2] == (True, d("2012-01-01"))
    # 2 is a new user of X 16 months after C: a comparator from C, censored the day before X
    assert x_vs_others[2][:3] == (False, d("2012-02-01"), d("2013-05-31"))
    assert set(result.comparisons["comparator"]) == {"other_candidates"}


def test_non_users_matched_calendar(tmp_path):
    """Time zero of a non-user is one of the candidate's new users' first-exposure dates.

    Treated: 1 and 2, both 2012-01-01, so every non-user gets 2012-01-01. Pool: everyone; 1 and
    2 are exposed by then (out); 3 never exposed -> comparator; 6 observed only from 2011-07-01
    -> too little history.
    """
    eras = [era(1, T, "2012-01-01"), era(2, T, "2012-01-01")]
    periods = [(p, *OBS) for p in (1, 2, 3)] + [(6, d("2011-07-01"), OBS[1])]
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 6], eras, observation_period=periods)
    result, cohort = prepare(tmp_path, folder, design(
        comparisons=(("t", "non_users"),), both_arms="first",
        comparator=ComparatorDef("non_users", max_ratio=10)))
    assert {p: v[:2] for p, v in members(cohort).items()} == {
        1: (True, d("2012-01-01")), 2: (True, d("2012-01-01")), 3: (False, d("2012-01-01"))}
    counts = steps(result)
    assert counts["first_exposure"] == (2, 4)
    assert counts["not_exposed"] == (2, 2)
    assert counts["prior_observation"] == (2, 1)


def test_non_users_later_initiators_are_censored(tmp_path):
    """With new users on several dates, each non-user's time zero is one of those dates, they
    have no exposure on or before it, and a non-user who starts later is censored the day
    before (both_arms first keeps the earlier entry)."""
    starts = {1: "2012-01-01", 2: "2012-01-01", 4: "2011-06-01", 5: "2013-01-01"}
    eras = [era(p, T, day) for p, day in starts.items()]
    persons = [1, 2, 3, 4, 5, 7, 8, 9]
    folder = cdm(tmp_path / "cdm", persons, eras)
    _, cohort = prepare(tmp_path, folder, design(
        comparisons=(("t", "non_users"),), both_arms="first",
        comparator=ComparatorDef("non_users", max_ratio=10)))
    found = members(cohort)
    comparators = {p: v for p, v in found.items() if not v[0]}
    assert {3, 7, 8, 9} <= set(comparators)
    for person, (_, index, risk_end, _) in comparators.items():
        assert index in {d(day) for day in starts.values()}
        if person in starts:
            assert d(starts[person]) > index and risk_end == d(starts[person]) - pd.Timedelta(
                days=1)


def test_non_users_random_visit(tmp_path):
    """Non-users get one of their own visit dates; persons without visits are not in the pool."""
    eras = [era(1, T, "2012-01-01")]
    visits = [(2, 9201, d("2012-08-01"), d("2012-08-03")), (3, 9202, d("2011-05-05"),
                                                           d("2011-05-05")),
              (3, 9202, d("2013-05-05"), d("2013-05-05"))]
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], eras, visit_occurrence=visits)
    _, cohort = prepare(tmp_path, folder, design(
        comparisons=(("t", "non_users"),),
        comparator=ComparatorDef("non_users", index_rule="random_visit", max_ratio=10)))
    found = members(cohort)
    assert found[2][:2] == (False, d("2012-08-01"))
    assert found[3][1] in (d("2011-05-05"), d("2013-05-05"))
    assert 4 not in found


def test_comparator_sampling_is_capped_and_stable(tmp_path):
    eras = [era(1, T, "2012-01-01"), era(2, T, "2012-02-01")] + [
        era(p, C, "2012-03-01") for p in range(10, 20)]
    folder = cdm(tmp_path / "cdm", [1, 2, *range(10, 20)], eras)
    sampled = design(comparator=ComparatorDef("active", "c", max_ratio=2))
    result, first = prepare(tmp_path, folder, sampled)
    _, second = prepare(tmp_path, folder, sampled)
    assert steps(result)["comparator_sample"] == (2, 4)
    assert (~first["treated"]).sum() == 4
    assert set(first["person_id"]) == set(second["person_id"])


# --- screens ---------------------------------------------------------------------------------

def test_screen_rolls_products_up_to_ingredients(tmp_path):
    """Ingredients A (products 1001, 1002) and B; min 2 eligible new users.

    A: persons 1 (product 1001), 2 (1002), 3 (ingredient itself, but too little history) -> 2
    eligible, selected. B: persons 4, 5 exposed but 5 aged 12 (min_age 18) -> 1, not selected.
    C is the active comparator (never a candidate).
    """
    A, B, A1, A2 = 111, 112, 1001, 1002
    vocabulary = VOCABULARY + concepts(
        (A, "Ingredient A", "Drug", "RxNorm", "A", "Ingredient"),
        (B, "ingredient b", "Drug", "RxNorm", "B", "Ingredient"),
        (A1, "A 10 MG tablet", "Drug", "RxNorm", "A1", "Clinical Drug"),
        (A2, "A 20 MG tablet", "Drug", "RxNorm", "A2", "Clinical Drug"))
    vocabulary = [(*row[:5], "Ingredient" if row[0] == C else row[5], *row[6:])
                  for row in vocabulary]
    ancestors = [(A, A), (A, A1), (A, A2), (B, B), (C, C)]
    eras = [era(1, A1, "2012-01-01"), era(2, A2, "2012-02-01"), era(4, B, "2012-01-01"),
            era(5, B, "2012-01-01"), era(6, C, "2012-01-01"), era(7, C, "2012-01-01"),
            (3, A, d("2010-06-01"), d("2010-06-01"))]
    folder = cdm(tmp_path / "cdm", list(range(1, 8)), eras, concept=vocabulary,
                 concept_ancestor=ancestors,
                 person=[(p, 8507, 2000 if p == 5 else 1960) for p in range(1, 8)])
    result, cohort = prepare(tmp_path, folder, design(
        comparisons=(), screen=ScreenDef(min_new_users=2), min_age=18,
        comparator=ComparatorDef("active", "c")))
    screen = result.screen.set_index("ingredient")
    assert screen.loc["Ingredient A", ["exposed_persons", "eligible_new_users", "selected"]
                      ].tolist() == [3, 2, True]
    assert screen.loc["ingredient b", ["exposed_persons", "eligible_new_users"]].tolist() == [2, 1]
    assert "drug C" not in screen.index
    assert list(result.comparisons["treatment"]) == ["ingredient_a"]
    assert set(members(cohort)) == {1, 2, 6, 7}
    # excluding a class (an ATC group above A) by id leaves A out of the screen
    atc = 21000001
    vocabulary.append((atc, "ATC group of A", "Drug", "ATC", "X01", "ATC 4th", "C"))
    folder = cdm(tmp_path / "cdm2", list(range(1, 8)), eras, concept=vocabulary,
                 concept_ancestor=[*ancestors, (atc, A), (atc, A1), (atc, A2)],
                 person=[(p, 8507, 2000 if p == 5 else 1960) for p in range(1, 8)])
    result, _ = prepare(tmp_path / "excluded", folder, design(
        comparisons=(), screen=ScreenDef(min_new_users=1, exclude=(atc,)), min_age=18,
        comparator=ComparatorDef("active", "c")))
    assert set(result.screen["ingredient"]) == {"ingredient b"}


def test_screen_needs_a_vocabulary(tmp_path):
    folder = cdm(tmp_path / "cdm", [1, 2], [era(1, T, "2012-01-01"), era(2, C, "2012-01-01")])
    source = open_source(folder)
    try:
        with pytest.raises(SourceError, match=r"treatments screen needs the vocabulary.*"
                                              "concept_ancestor is empty"):
            prepare_study(source, design(comparisons=(), screen=ScreenDef(min_new_users=1),
                                         comparator=ComparatorDef("active", "c")),
                          tmp_path / "ws")
    finally:
        source.close()


# --- dirty data -------------------------------------------------------------------------------

def test_overlapping_periods_and_time_zero_before_birth(tmp_path):
    """1: two overlapping periods (2010-01-01..2012-06-30, 2012-01-01..2014-12-31) combine, so
    follow-up runs to 2014-12-31; 2: born 2013 but exposed in 2012 -> kept with a warning when
    there is no age restriction, removed by min_age 0."""
    periods = [(1, d("2010-01-01"), d("2012-06-30")), (1, d("2012-01-01"), d("2014-12-31")),
               (2, *OBS), (3, *OBS)]
    eras = [era(1, T, "2012-03-01"), era(2, T, "2012-03-01"), era(3, C, "2012-03-01")]
    folder = cdm(tmp_path / "cdm", [1, 2, 3], eras, observation_period=periods,
                 person=[(1, 8507, 1960), (2, 8532, 2013), (3, 8507, 1960)])
    result, cohort = prepare(tmp_path, folder, design())
    found = members(cohort)
    assert found[1][2] == d("2014-12-31")
    assert 2 in found
    assert any("overlapping periods" in w for w in result.warnings)
    assert any("before their year of birth" in w for w in result.warnings)
    _, cohort = prepare(tmp_path, folder, design(min_age=0))
    assert 2 not in members(cohort)


def test_chains_of_overlapping_or_abutting_periods_are_one_stretch_of_observation(tmp_path):
    """Prior observation counts from the start of the chain of periods that overlap or abut
    (end + 1 day = next start) the one holding time zero; a real gap breaks the chain.

    4: 2010-01-01..2012-06-30 overlaps 2012-05-01..2015-12-31, time zero 2013-01-01 (only in
    the second): observed since 2010 -> eligible. 5: 2010..2011-12-31 abuts 2012-01-01..2015,
    time zero 2012-06-01 -> eligible. 6: 2010-01-01..2011-06-30, gap, 2011-09-01..2015, time
    zero 2012-03-01: 182 days observed -> not eligible (365 needed).
    """
    periods = [(4, d("2010-01-01"), d("2012-06-30")), (4, d("2012-05-01"), d("2015-12-31")),
               (5, d("2010-01-01"), d("2011-12-31")), (5, d("2012-01-01"), d("2015-12-31")),
               (6, d("2010-01-01"), d("2011-06-30")), (6, d("2011-09-01"), d("2015-12-31")),
               (3, *OBS)]
    eras = [era(4, T, "2013-01-01"), era(5, T, "2012-06-01"), era(6, T, "2012-03-01"),
            era(3, C, "2012-03-01")]
    folder = cdm(tmp_path / "cdm", [3, 4, 5, 6], eras, observation_period=periods)
    result, cohort = prepare(tmp_path, folder, design())
    found = members(cohort)
    assert {4, 5} <= set(found) and 6 not in found
    assert found[4][2] == found[5][2] == d("2015-12-31")           # to the chain's end
    assert steps(result)["prior_observation"][0] == 2


# --- edge cases found in review ------------------------------------------------------------------

def test_washout_zero_allows_the_other_drug_running_on_day_zero(tmp_path):
    """1 is on C (started before observation, so no C new user) through T's day 0."""
    eras = [era(1, T, "2012-01-01"), era(1, C, "2009-12-01", "2012-01-01"),
            era(2, T, "2012-01-01"), era(3, C, "2012-03-01")]
    folder = cdm(tmp_path / "cdm", [1, 2, 3], eras)
    _, cohort = prepare(tmp_path, folder, design(washout_days=0))
    assert {p for p, v in members(cohort).items() if v[0]} == {1, 2}
    _, cohort = prepare(tmp_path, folder, design(washout_days=30))
    assert {p for p, v in members(cohort).items() if v[0]} == {2}


def test_episode_gap_of_exactly_gap_days_is_bridged(tmp_path):
    """1: refills on consecutive days (no uncovered day); 2: exactly 30 uncovered days."""
    eras = [era(1, T, "2012-01-01", "2012-01-30"), era(1, T, "2012-01-31", "2012-02-29"),
            era(2, T, "2012-01-01", "2012-01-30"), era(2, T, "2012-03-01", "2012-03-30"),
            era(3, C, "2012-01-01", "2012-01-31")]
    folder = cdm(tmp_path / "cdm", [1, 2, 3], eras, [(1, OUT, d("2012-01-15"))])
    on_treatment = dict(risk_end_anchor="exposure_end", risk_end_day=0)
    _, cohort = prepare(tmp_path, folder, design(gap_days=0, **on_treatment))
    assert members(cohort)[1][2] == d("2012-02-29")
    assert members(cohort)[2][2] == d("2012-01-30")
    _, cohort = prepare(tmp_path, folder, design(gap_days=30, **on_treatment))
    assert members(cohort)[2][2] == d("2012-03-30")


OTHERS = dict(comparisons=(("t", "other_candidates"), ("c", "other_candidates"),
                           ("x", "other_candidates")),
              comparator=ComparatorDef("other_candidates"), both_arms="first")


def test_other_candidate_comparators_leave_when_they_start_the_candidate(tmp_path):
    """2 starts C, then X six months later (an X entry failing washout): as a comparator in
    x vs others, 2 is censored the day before X all the same. 3 starts T and X the same day
    (as a combination product does): a new user of each, treated in both t vs others and x vs
    others (never a comparator there: they had used the candidate by time zero)."""
    eras = [era(1, X, "2012-01-01"), era(2, C, "2012-02-01", "2012-02-10"),
            era(2, X, "2012-08-01"), era(3, T, "2012-03-01"), era(3, X, "2012-03-01"),
            era(4, T, "2012-01-01")]
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], eras)
    _, cohort = prepare(tmp_path, folder, design(**OTHERS))
    x_vs_others = members(cohort, 3)
    assert x_vs_others[2][:3] == (False, d("2012-02-01"), d("2012-07-31"))
    assert members(cohort, 1)[3][0] and x_vs_others[3][0]
    assert not members(cohort, 2)[3][0]  # in c vs others 3 is a comparator (never used C)


def test_sampling_never_decides_who_is_treated(tmp_path):
    """With a comparator cap, the treated arm is the same whatever the seed."""
    eras = [era(p, T, "2012-06-01") for p in range(1, 9)] + [
        era(p, C, "2012-01-01") for p in range(20, 40)] + [
        era(p, C, "2011-06-01") for p in range(1, 5)]  # 1-4: C first, then T
    folder = cdm(tmp_path / "cdm", [*range(1, 9), *range(20, 40)], eras)
    treated = []
    for seed in range(4):
        _, cohort = prepare(tmp_path, folder, design(
            comparisons=(("t", "other_candidates"), ("c", "other_candidates")),
            comparator=ComparatorDef("other_candidates", max_ratio=1, seed=seed),
            both_arms="first", washout_days=0))
        treated.append({p for p, v in members(cohort, 1).items() if v[0]})
    assert all(t == treated[0] for t in treated)
    assert treated[0] == set(range(5, 9))  # 1-4 entered the comparator arm first


def test_non_user_who_starts_later_is_in_both_arms_when_kept(tmp_path):
    """both_arms keep (the non-user default): 5, whose one visit (2012-06-01) is their time
    zero as a non-user, is a comparator censored the day before starting T (2013-01-01) and a
    treated person from then on."""
    eras = [era(1, T, "2012-01-01"), era(5, T, "2013-01-01")]
    visits = [(5, 9202, d("2012-06-01"), d("2012-06-01")),
              (3, 9202, d("2012-03-01"), d("2012-03-01"))]
    folder = cdm(tmp_path / "cdm", [1, 3, 5], eras, visit_occurrence=visits)
    _, cohort = prepare(tmp_path, folder, design(
        comparisons=(("t", "non_users"),), both_arms="keep",
        comparator=ComparatorDef("non_users", index_rule="random_visit", max_ratio=10)))
    rows = cohort[cohort["person_id"] == 5].sort_values("index_date")
    assert [(bool(r.treated), r.index_date, r.risk_end) for r in rows.itertuples()] == [
        (False, d("2012-06-01"), d("2012-12-31")), (True, d("2013-01-01"), d("2015-12-31"))]


def test_drug_exposure_without_end_date_lasts_its_days_supply_or_one_day(tmp_path):
    """The CDM's convention for a missing drug_exposure_end_date: the last day is start +
    days_supply - 1, else the start day. 1: 30 days' supply; 2: no supply either; 3: an end
    date; 4: an absurd supply (cut to 100 years, no date overflow)."""
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4], [], [(3, OUT, d("2012-01-15"))])
    exposures = pd.DataFrame({
        "person_id": [1, 2, 3, 4], "drug_concept_id": [T, T, C, T],
        "drug_exposure_start_date": [d("2012-01-01")] * 4,
        "drug_exposure_end_date": [None, None, d("2012-01-31"), None],
        "days_supply": pd.array([30, None, 30, 2_000_000_000], dtype="Int64")})
    exposures.to_parquet(folder / "drug_exposure.parquet", index=False)
    on_treatment = dict(exposure_table="drug_exposure", risk_end_anchor="exposure_end",
                        risk_end_day=0, gap_days=0)
    _, cohort = prepare(tmp_path, folder, design(**on_treatment))
    found = members(cohort)
    assert found[1][2:] == (d("2012-01-30"), 30)   # 30 days' supply: 30 days
    assert found[2][2:] == (d("2012-01-01"), 1)    # the start day only
    assert found[3][2:] == (d("2012-01-31"), 31)
    assert found[4][2:] == (d("2015-12-31"), 1461)  # to the end of observation
    exposures.drop(columns="days_supply").to_parquet(folder / "drug_exposure.parquet",
                                                     index=False)
    _, cohort = prepare(tmp_path, folder, design(**on_treatment))
    assert members(cohort)[1][2:] == (d("2012-01-01"), 1)


def test_non_users_matched_calendar_draws_only_eligible_new_users_dates(tmp_path):
    """1 starts T on 2012-01-01 (eligible); 2 starts on 2010-03-01, two months into their
    observation (not eligible: too little history). Non-users get 2012-01-01 only: time zeros
    of ineligible new users would hand many non-users a date they cannot qualify on."""
    eras = [era(1, T, "2012-01-01"), era(2, T, "2010-03-01")]
    persons = [1, 2, *range(10, 40)]
    folder = cdm(tmp_path / "cdm", persons, eras)
    _, cohort = prepare(tmp_path, folder, design(
        comparisons=(("t", "non_users"),), both_arms="first",
        comparator=ComparatorDef("non_users", max_ratio=100)))
    found = members(cohort)
    assert found[1][:2] == (True, d("2012-01-01")) and 2 not in found
    comparators = {p: v for p, v in found.items() if not v[0]}
    assert set(comparators) == set(range(10, 40))
    assert {v[1] for v in comparators.values()} == {d("2012-01-01")}


@pytest.mark.parametrize("comparator", [
    ComparatorDef("active", "c", max_ratio=2),
    ComparatorDef("non_users", max_ratio=2),
])
def test_sampling_of_a_comparison_does_not_depend_on_the_other_comparisons(tmp_path, comparator):
    """The same comparison samples the same comparator persons when another comparison is
    listed before it (its positional id changes from 1 to 2)."""
    eras = ([era(p, T, "2012-01-01") for p in (1, 2, 3)]
            + [era(p, X, "2012-01-01") for p in (4, 5)]
            + [era(p, C, "2012-02-01") for p in range(10, 40)])
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4, 5, *range(10, 60)], eras)
    other = "c" if comparator.kind == "active" else "non_users"
    alone = design(comparisons=(("t", other),), comparator=comparator, both_arms="first")
    after = design(comparisons=(("x", other), ("t", other)), comparator=comparator,
                   both_arms="first")
    _, first = prepare(tmp_path / "a", folder, alone)
    _, second = prepare(tmp_path / "b", folder, after)
    sampled = {p for p, v in members(first, 1).items() if not v[0]}
    assert len(sampled) == 6                                   # 2 per treated person
    assert sampled == {p for p, v in members(second, 2).items() if not v[0]}
