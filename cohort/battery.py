"""Comparator batteries: the emulated trials of a screen, each candidate against single drugs.

IBM's framework (Ozery-Flato et al. 2020) and Zang et al. (2023) emulate every candidate in a
battery of trials, each against new users of ONE other drug: drugs drawn at random from the
other screened ingredients outside the candidate's ATC class (so the two strategies never share
a trial and "beneficial under both" means two independent batteries), and drugs of the
candidate's own class (which share its indication, so less confounding by indication is left to
adjust for). A trial is then an ordinary active-comparator comparison.

Draws are set-based (one query over all candidate pairs) and stable: each candidate orders the
other drugs by a hash of (candidate, other drug, strategy, seed) and takes the first k, so
adding a candidate to the screen changes another candidate's battery by at most that one drug.
Same-class membership is read from the vocabulary: ATC classes of the chosen level
(`concept.vocabulary_id = 'ATC'`, class 'ATC 1st'..'ATC 5th') above the ingredient in
`concept_ancestor`. A vocabulary without them forms no same-class trial and says so.
"""

from __future__ import annotations

import pandas as pd

from cohort.design import BatteryDef
from cohort.source import RecordSource, SourceError

ATC_CLASSES = {1: "ATC 1st", 2: "ATC 2nd", 3: "ATC 3rd", 4: "ATC 4th", 5: "ATC 5th"}
BATTERY_COLUMNS = ["treatment", "comparator", "strategy", "trial"]


def candidate_classes(source: RecordSource, candidates: pd.DataFrame, level: int) -> pd.DataFrame:
    """(set_name, class_concept_id, class_code, class_name): the ATC classes of each candidate.

    `candidates` has set_name and ingredient_concept_id. Empty when the vocabulary has no ATC
    class of that level above them.
    """
    con = source.con
    con.register("cf_battery_candidate", candidates[["set_name", "ingredient_concept_id"]])
    try:
        return con.execute("""
            SELECT DISTINCT c.set_name, k.concept_id AS class_concept_id,
                   k.concept_code AS class_code, k.concept_name AS class_name
            FROM cf_battery_candidate c
            JOIN concept_ancestor a ON a.descendant_concept_id = c.ingredient_concept_id
            JOIN concept k ON k.concept_id = a.ancestor_concept_id
            WHERE k.vocabulary_id = 'ATC' AND k.concept_class_id = $class
            ORDER BY c.set_name, k.concept_code
        """, {"class": ATC_CLASSES[level]}).df()
    finally:
        con.unregister("cf_battery_candidate")


def battery_trials(source: RecordSource, battery: BatteryDef, candidates: pd.DataFrame,
                   seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Form every candidate's trials.

    Random draws leave out the candidate's classmates at the battery's ATC level (classes are
    read for both strategies). Returns (trials, plan, warnings): trials has one row per emulated
    trial (treatment,
    comparator, strategy, trial number from 1 within the candidate's strategy); plan has one
    row per candidate (set_name, atc_classes, random_trials, same_class_trials, battery_note);
    warnings say what could not be formed. A battery that forms no trial at all is an error.
    """
    con = source.con
    classes = candidate_classes(source, candidates, battery.atc_level)
    con.register("cf_battery_candidate", candidates[["set_name"]])
    con.register("cf_battery_class", classes[["set_name", "class_concept_id"]])
    try:
        trials = con.execute("""
            WITH shared AS (
                SELECT DISTINCT a.set_name AS treatment, b.set_name AS comparator
                FROM cf_battery_class a JOIN cf_battery_class b
                  ON a.class_concept_id = b.class_concept_id AND a.set_name <> b.set_name
            ), pair AS (  -- random comparators come from the other classes
                SELECT t.set_name AS treatment, c.set_name AS comparator
                FROM cf_battery_candidate t JOIN cf_battery_candidate c
                  ON c.set_name <> t.set_name
                WHERE (t.set_name, c.set_name) NOT IN (SELECT treatment, comparator FROM shared)
            ), drawn AS (
                SELECT treatment, comparator, 'random' AS strategy,
                       row_number() OVER (PARTITION BY treatment ORDER BY
                           hash(treatment, comparator, 'random', $seed::BIGINT), comparator)
                           AS trial
                FROM pair WHERE $random > 0
                UNION ALL
                SELECT treatment, comparator, 'same_class',
                       row_number() OVER (PARTITION BY treatment ORDER BY
                           hash(treatment, comparator, 'same_class', $seed::BIGINT), comparator)
                FROM shared WHERE $same_class IS NULL OR $same_class > 0
            )
            SELECT treatment, comparator, strategy, trial::INTEGER AS trial FROM drawn
            WHERE (strategy = 'random' AND trial <= $random)
               OR (strategy = 'same_class' AND ($same_class IS NULL OR trial <= $same_class))
            ORDER BY treatment, strategy DESC, trial
        """, {"seed": seed, "random": battery.random, "same_class": battery.same_class}).df()
    finally:
        con.unregister("cf_battery_candidate")
        con.unregister("cf_battery_class")
    plan, warnings = _plan(battery, candidates, classes, trials)
    if trials.empty:
        raise SourceError(f"{source.path}: comparator battery: no trial can be formed "
                          f"({'; '.join(warnings) or 'fewer than two candidates'})")
    return trials[BATTERY_COLUMNS], plan, warnings


def _plan(battery: BatteryDef, candidates: pd.DataFrame, classes: pd.DataFrame,
          trials: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per candidate: its classes, trials per strategy and why a strategy fell short."""
    counts = trials.groupby(["treatment", "strategy"]).size().unstack(fill_value=0)
    class_codes = classes.groupby("set_name")["class_code"].agg(list)
    level = ATC_CLASSES[battery.atc_level]
    rows, warnings = [], []
    for name in candidates["set_name"]:
        random = int(counts.at[name, "random"]) if "random" in counts and name in counts.index \
            else 0
        same = int(counts.at[name, "same_class"]) if ("same_class" in counts
                                                      and name in counts.index) else 0
        notes = []
        if battery.random and random < battery.random:
            notes.append(f"{random} of {battery.random} random trials (too few candidates "
                         "outside its class)")
        if "same_class" in battery.strategies:
            if name not in class_codes.index:
                notes.append(f"no {level} class in the vocabulary: no same-class trial")
            elif same == 0:
                notes.append(f"no other screened ingredient in its {level} class "
                             f"({', '.join(class_codes[name])})")
            elif battery.same_class is not None and same < battery.same_class:
                notes.append(f"{same} of {battery.same_class} same-class trials (class "
                             "has too few other candidates)")
        rows.append({"set_name": name,
                     "atc_classes": list(class_codes.get(name, [])),
                     "random_trials": random, "same_class_trials": same,
                     "battery_note": "; ".join(notes) or None})
    plan = pd.DataFrame(rows, columns=["set_name", "atc_classes", "random_trials",
                                       "same_class_trials", "battery_note"])
    if "same_class" in battery.strategies:
        if classes.empty:
            warnings.append(f"comparator battery: the vocabulary has no {level} classes above "
                            "the screened ingredients (no ATC in concept/concept_ancestor): no "
                            "same-class trial can be formed")
        else:
            lonely = int((plan["same_class_trials"] == 0).sum())
            if lonely:
                warnings.append(f"comparator battery: {lonely} of {len(plan)} candidates have "
                                f"no other screened ingredient in their {level} class (no "
                                "same-class trial; see the screen table's battery_note)")
    return plan, warnings
