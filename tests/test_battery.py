"""Comparator batteries, the Zang both-arms rule and disease cohorts, on hand-made CDMs.

Vocabulary: ingredients A1, A2, A3 in ATC class X01 (2nd level), B1, B2 in class Y01, C1 in
no class; one ATC 1st-level group above X01 and Y01. Everyone is observed 2010-2015, born 1960.
"""

from __future__ import annotations

import pandas as pd
import pytest

from cohort.battery import battery_trials
from cohort.design import BatteryDef, ComparatorDef, DiseaseDef, ScreenDef
from cohort.prepare import arm_loss_notes, arm_losses
from cohort.source import SourceError, open_source
from tests.test_cohort_rules import VOCABULARY, cdm, design, era, members, prepare, steps
from tests.tiny_cdm import concepts, d

A1, A2, A3, B1, B2, C1 = 501, 502, 503, 511, 512, 521
X01, Y01, TOP = 9001, 9002, 9000
MCI = 401
INGREDIENTS = {"a1": A1, "a2": A2, "a3": A3, "b1": B1, "b2": B2, "c1": C1}
ATC_VOCABULARY = VOCABULARY + concepts(
    *[(cid, name, "Drug", "RxNorm", name, "Ingredient") for name, cid in INGREDIENTS.items()],
    (X01, "class X", "Drug", "ATC", "X01", "ATC 2nd", "C"),
    (Y01, "class Y", "Drug", "ATC", "Y01", "ATC 2nd", "C"),
    (TOP, "group", "Drug", "ATC", "X", "ATC 1st", "C"),
    (MCI, "mild cognitive impairment", "Condition"))
ATC_ANCESTORS = ([(cid, cid) for cid in INGREDIENTS.values()]
                 + [(X01, c) for c in (A1, A2, A3)] + [(Y01, c) for c in (B1, B2)]
                 + [(TOP, c) for c in (A1, A2, A3, B1, B2)] + [(TOP, X01), (TOP, Y01)])


def candidates(names=tuple(INGREDIENTS)) -> pd.DataFrame:
    return pd.DataFrame({"set_name": list(names),
                         "ingredient_concept_id": [INGREDIENTS[n] for n in names]})


def vocabulary_source(tmp_path, with_atc: bool = True):
    folder = cdm(tmp_path / "cdm", [1], [era(1, A1, "2012-01-01")],
                 concept=ATC_VOCABULARY if with_atc else [*ATC_VOCABULARY[:-4],
                                                          ATC_VOCABULARY[-1]],
                 concept_ancestor=ATC_ANCESTORS if with_atc else [
                     (c, c) for c in INGREDIENTS.values()])
    return open_source(folder)


def test_same_class_trials_come_from_the_vocabulary(tmp_path):
    source = vocabulary_source(tmp_path)
    try:
        trials, plan, warnings = battery_trials(
            source, BatteryDef(random=0, same_class=None, atc_level=2), candidates(), seed=0)
    finally:
        source.close()
    pairs = {(t, c) for t, c in zip(trials["treatment"], trials["comparator"], strict=True)}
    assert pairs == {("a1", "a2"), ("a1", "a3"), ("a2", "a1"), ("a2", "a3"), ("a3", "a1"),
                     ("a3", "a2"), ("b1", "b2"), ("b2", "b1")}
    assert set(trials["strategy"]) == {"same_class"}
    assert sorted(trials[trials["treatment"] == "a1"]["trial"]) == [1, 2]
    plan = plan.set_index("set_name")
    assert plan.loc["a1", "atc_classes"] == ["X01"]
    assert plan.loc["c1", "same_class_trials"] == 0
    assert "no ATC 2nd class" in plan.loc["c1", "battery_note"]
    assert warnings == ["comparator battery: 1 of 6 candidates have no other screened "
                        "ingredient in their ATC 2nd class (no same-class trial; see the "
                        "screen table's battery_note)"]
    # level 1: every classed ingredient shares the group, so a1 gets a2, a3, b1, b2
    source = vocabulary_source(tmp_path / "level1")
    try:
        trials, _, _ = battery_trials(source, BatteryDef(random=0, same_class=None,
                                                         atc_level=1), candidates(), seed=0)
    finally:
        source.close()
    assert set(trials[trials["treatment"] == "a1"]["comparator"]) == {"a2", "a3", "b1", "b2"}


def test_random_trials_are_reproducible_stable_and_outside_the_class(tmp_path):
    """Random comparators never share the candidate's ATC class (the two strategies never share
    a trial); draws repeat with the seed and move by at most the one added candidate."""
    source = vocabulary_source(tmp_path)
    try:
        battery = BatteryDef(random=2, same_class=1, atc_level=2)
        first, _, _ = battery_trials(source, battery, candidates(), seed=3)
        again, _, _ = battery_trials(source, battery, candidates(), seed=3)
        fewer, _, _ = battery_trials(source, battery, candidates(("a1", "a2", "b1", "b2", "c1")),
                                     seed=3)
        other_seeds = [battery_trials(source, battery, candidates(), seed=s)[0]
                       for s in range(4, 12)]
    finally:
        source.close()
    pd.testing.assert_frame_equal(first, again)
    random = first[first["strategy"] == "random"]
    assert (random.groupby("treatment").size() == 2).all()
    classes = {"a1": "X", "a2": "X", "a3": "X", "b1": "Y", "b2": "Y"}
    assert not any(classes.get(t) is not None and classes.get(t) == classes.get(c)
                   for t, c in zip(random["treatment"], random["comparator"], strict=True))
    assert (random["treatment"] != random["comparator"]).all()
    assert not random.duplicated(["treatment", "comparator"]).any()
    # a same_class cap of 1 draws one of a1's two classmates
    assert len(first[(first["treatment"] == "a1") & (first["strategy"] == "same_class")]) == 1
    # adding a3 to the screen changes another candidate's battery by at most a3 itself
    for name in ("a1", "a2", "b1", "b2", "c1"):
        before = set(fewer[(fewer["treatment"] == name) & (fewer["strategy"] == "random")]
                     ["comparator"])
        after = set(random[random["treatment"] == name]["comparator"])
        assert after - before <= {"a3"} and len(before - after) <= 1
    assert any(not o.equals(first) for o in other_seeds)  # the seed matters


def test_a_vocabulary_without_atc_forms_no_same_class_trial_and_says_so(tmp_path):
    source = vocabulary_source(tmp_path, with_atc=False)
    try:
        trials, _, warnings = battery_trials(
            source, BatteryDef(random=1, same_class=None), candidates(), seed=0)
        assert set(trials["strategy"]) == {"random"}
        assert "the vocabulary has no ATC 2nd classes" in warnings[0]
        with pytest.raises(SourceError, match="no trial can be formed"):
            battery_trials(source, BatteryDef(random=0, same_class=None), candidates(), seed=0)
    finally:
        source.close()


def same_class_screen(tmp_path, persons: list[int], eras: list[tuple], min_new_users: int):
    """A screen with a same-class battery (every classmate) and the Zang both-arms rule: the
    prepared result, the cohort rows and the comparisons keyed by (treatment, comparator)."""
    folder = cdm(tmp_path / "cdm", persons, eras, concept=ATC_VOCABULARY,
                 concept_ancestor=ATC_ANCESTORS)
    result, cohort = prepare(tmp_path, folder, design(
        comparisons=(), screen=ScreenDef(min_new_users=min_new_users),
        comparator=ComparatorDef("battery", battery=BatteryDef(random=0, same_class=None)),
        both_arms="treated"))
    return result, cohort, result.comparisons.set_index(["treatment", "comparator"])


def test_battery_screen_end_to_end_with_the_zang_both_arms_rule(tmp_path):
    """Screen a1, a2, b1 (min 2 new users); same-class battery: a1 vs a2 and a2 vs a1.

    1, 2: a1 only. 3, 6: a2 only. 4: a2 (2012) then a1 (2013): a new user of both, so in
    a1 vs a2 treated (time zero 2013) and out of the control arm (Zang: persons in both arms
    stay treated); likewise treated only in a2 vs a1. 5: a1 in 2010 (too little history to be
    an eligible a1 entry), a2 in 2012: a2-treated in a2 vs a1, and in a1 vs a2 dropped from the
    control arm for having used a1 before time zero. 7, 8: b1, whose class has no other
    candidate (no same-class trial, said in the screen's battery_note).
    """
    eras = [era(1, A1, "2012-01-01"), era(2, A1, "2012-02-01"), era(3, A2, "2012-01-01"),
            era(4, A2, "2012-01-01"), era(4, A1, "2013-01-01"),
            era(5, A1, "2010-03-01"), era(5, A2, "2012-06-01"),
            era(7, B1, "2012-01-01"), era(8, B1, "2012-01-01"), era(6, A2, "2012-03-01")]
    result, cohort, comparisons = same_class_screen(tmp_path, list(range(1, 9)), eras, 2)
    assert set(comparisons.index) == {("a1", "a2"), ("a2", "a1")}
    assert set(comparisons["strategy"]) == {"same_class"}
    a1_vs_a2 = members(cohort, int(comparisons.loc[("a1", "a2"), "comparison_id"]))
    # treated: 1, 2, 4 (a1 new user 2013); comparators: 3, 6 (4 left the control arm;
    # 5 used a1 before time zero)
    assert {p: v[0] for p, v in a1_vs_a2.items()} == {1: True, 2: True, 4: True, 3: False,
                                                       6: False}
    assert a1_vs_a2[4][1] == d("2013-01-01")
    a2_vs_a1 = members(cohort, int(comparisons.loc[("a2", "a1"), "comparison_id"]))
    # treated: 3, 4, 5 (a2 new users; 5's earlier a1 does not matter to its own arm), 6;
    # comparators: 1, 2 (never a2); 4 is an a1 entrant too but stays treated only
    assert {p: v[0] for p, v in a2_vs_a1.items()} == {3: True, 4: True, 5: True, 6: True,
                                                       1: False, 2: False}
    counts = steps(result, int(comparisons.loc[("a1", "a2"), "comparison_id"]))
    assert counts["not_exposed"][1] < counts["first_exposure"][1]
    screen = result.screen.set_index("set_name")
    assert "no other screened ingredient" in screen.loc["b1", "battery_note"]


def test_zang_rule_censors_a_comparator_who_starts_the_candidate(tmp_path):
    """3 is an a2 new user (2012-01-01 to 2012-12-31) who starts a1 on 2013-01-01, an a1 entry
    that fails the washout (a2 in the year before): in a1 vs a2 3 is a comparator only,
    censored the day before starting the candidate; treated persons are never censored."""
    eras = [era(1, A1, "2012-01-01"), era(2, A1, "2012-02-01"), era(3, A2, "2012-01-01",
                                                                    "2012-12-31"),
            era(3, A1, "2013-01-01"), era(4, A2, "2012-05-01")]
    _, cohort, comparisons = same_class_screen(tmp_path, [1, 2, 3, 4], eras, 1)
    a1_vs_a2 = members(cohort, int(comparisons.loc[("a1", "a2"), "comparison_id"]))
    assert a1_vs_a2[3][:3] == (False, d("2012-01-01"), d("2012-12-31"))
    assert a1_vs_a2[1][2] == d("2015-12-31")  # treated: intention to treat, no censoring


def test_disease_cohort_time_zero_follows_the_first_diagnosis(tmp_path):
    """MCI first recorded: 1 on 2011-06-01, T 2012-01-01 (214 days later) -> in;
    2 MCI 2012-06-01 after T 2012-01-01 -> out; 3 no MCI -> out; 4 MCI 2010-02-01, T
    2012-01-01 (699 days) -> out with window [0, 365], in with [0, null]; 5 comparator C with MCI
    on its time zero (day 0) -> in; 6 MCI 2011-12-01 and again 2013-01-01 (first counts) -> in."""
    conditions = [(1, MCI, d("2011-06-01")), (2, MCI, d("2012-06-01")),
                  (4, MCI, d("2010-02-01")), (5, MCI, d("2012-01-01")),
                  (6, MCI, d("2011-12-01")), (6, MCI, d("2013-01-01"))]
    eras = [era(p, 101, "2012-01-01") for p in (1, 2, 3, 4, 6)] + [era(5, 102, "2012-01-01")]
    vocabulary = VOCABULARY + concepts((MCI, "mild cognitive impairment", "Condition"))
    folder = cdm(tmp_path / "cdm", [1, 2, 3, 4, 5, 6], eras, conditions, concept=vocabulary)
    sets = {**design().concept_sets, "mci": design().concept_sets["o"].__class__("mci", (MCI,))}
    result, cohort = prepare(tmp_path, folder, design(
        concept_sets=sets, disease=DiseaseDef("mci", (0, 365)),
        covariate_domains=("demographics",)))
    assert set(members(cohort)) == {1, 5, 6}
    assert steps(result)["disease"] == (2, 1)
    assert any("0 to 365 days after the first record of mci" in text
               for text in result.attrition["description"])
    _, wide_cohort = prepare(tmp_path / "wide", folder, design(
        concept_sets=sets, disease=DiseaseDef("mci", (0, None)),
        covariate_domains=("demographics",)))
    assert set(members(wide_cohort)) == {1, 4, 5, 6}
    # days since diagnosis is a covariate: 1 at 214 days (band 4, 181-365), 5 at 0 days (band
    # 1, 0-30), 6 at 31 days (band 2, 31-90)
    covariates = pd.read_parquet(tmp_path / "ws" / "entry_covariate.parquet")
    cohort_rows = cohort.set_index("person_id")["entry_id"]
    bands = {int(p): sorted(int(c) // 1000 for c in covariates.loc[
        covariates["entry_id"] == cohort_rows[p], "covariate_id"] if int(c) % 1000 == 905)
        for p in (1, 5, 6)}
    assert bands == {1: [4], 5: [1], 6: [2]}


def test_arm_loss_notes_name_the_rule_without_counts():
    attrition = pd.DataFrame({
        "comparison_id": [1, 1, 1, 2, 2, 2], "step_index": [1, 2, 3, 1, 2, 3],
        "step": ["first_exposure", "not_in_both", "at_risk"] * 2,
        "outcome": [None] * 6,
        "treated_persons": [1543, 2, 2, 100, 90, 90],
        "comparator_persons": [500, 400, 0, 50, 45, 44]})
    notes = arm_loss_notes(arm_losses(attrition))
    assert notes == {1: "rule not_in_both removed more than half of the treated arm; "
                        "rule at_risk emptied the comparator arm"}
    assert not any(ch.isdigit() for ch in notes[1].replace("not_in_both", ""))
