"""Comparison cohorts for every treatment-comparator pair, with attrition, in SQL.

Conventions (OHDSI): time zero (day 0) is the first recorded exposure to the drug's concept
set (for non-users, the assigned date); windows are inclusive; days at risk = risk end - risk
start + 1. Each drug's entries are built and checked once and shared by every comparison.

Rules, in attrition order, per comparison and arm (each adds to the previous):
 1. entry: first recorded exposure (non-users: not exposed to the candidate by time zero);
 2. arm-level rules (cohort.eligibility): in observation with a person row, study window,
    prior observation, age, sex;
 3. washout: observed at least `washout_days` before time zero (so the first recorded exposure
    is a new one) and no exposure to the other arm's drugs in [-washout_days, -1];
 4. require / exclude / indication criteria, one step each;
 5. persons eligible for both arms: removed from both (`remove`), or kept in the arm entered
    first and censored the day before the other arm's drug starts (`first`);
 6. common period: time zero within the dates both arms have entries (optional);
 7. at least `min_days_at_risk` days at risk in [anchor + start_day, min(anchor + end_day,
    end of observation, death, day before switching, start + max_follow_up_days - 1)];
 8. comparator sample: at most `max_ratio` comparator persons per treated person (optional).
"""

from __future__ import annotations

import pandas as pd

from cohort.comparators import (
    build_comparator_entries,
    register_arm_sets,
    uniform_sql,
)
from cohort.design import CohortDesign, ComparatorDef
from cohort.eligibility import arm_steps, criteria_steps, eligible_entries, flag_entries
from cohort.exposures import EXPOSURE_COLUMNS, build_exposures
from cohort.source import RecordSource

__all__ = ["EXPOSURE_COLUMNS", "attrition_steps", "build_cohorts", "comparator_of"]


def comparator_of(design: CohortDesign) -> ComparatorDef:
    """The design's comparator; plain designs name it as the second of each pair."""
    return design.comparator or ComparatorDef("active")


def attrition_steps(design: CohortDesign) -> list[tuple[str, str, str]]:
    """(step, description, SQL condition on cf_cmp_entry) in order."""
    comparator = comparator_of(design)
    entry = "first recorded exposure to the drug (time zero)"
    if comparator.kind == "other_candidates":
        entry += ("; comparator: the earliest first exposure to another candidate that passes "
                  "the arm-level rules")
    if comparator.kind == "battery":
        entry += "; comparator: first recorded exposure to the trial's comparator drug"
    if comparator.kind == "non_users":
        rule = ("a treated person's first-exposure date" if comparator.index_rule ==
                "matched_calendar" else "a randomly chosen visit")
        entry += f"; comparator: persons given {rule} as time zero"
    if comparator.max_ratio is not None:
        entry += (f" (comparator pool pre-sampled at random to about "
                  f"{comparator.max_ratio * 2:g} per treated person)")
    steps = [("first_exposure", entry, "true")]
    if comparator.kind != "active":
        steps.append(("not_exposed", "comparator not exposed to the candidate on or before "
                      "time zero", "not_exposed"))
    steps += arm_steps(design)
    steps.append(("washout", f"no exposure to the other arm's drug in the "
                  f"{design.washout_days} days before time zero (and observed that long)",
                  "washout_ok"))
    steps += criteria_steps(design)
    steps.append(("not_in_both", {
        "remove": "not eligible for both arms (such persons are removed from both)",
        "first": "eligible for both arms: kept in the arm entered first, censored when the "
                 "other arm's drug starts",
        "keep": "eligible for both arms: kept in both, the earlier entry censored when the "
                "other arm's drug starts",
        "treated": "eligible for both arms: kept in the treated arm only (Zang et al.); "
                   "comparators are censored when they start the candidate"}[design.both_arms],
        "NOT dropped_in_both"))
    if design.common_period:
        steps.append(("common_period", "time zero within the period both arms have entries",
                      "in_common_period"))
    steps.append(("at_risk", f"at least {design.min_days_at_risk} day(s) at risk",
                  "days_at_risk >= $min_days"))
    if comparator.max_ratio is not None:
        steps.append(("comparator_sample", f"comparator persons sampled at random to at most "
                      f"{comparator.max_ratio:g} per treated person", "sampled"))
    return steps


def build_cohorts(source: RecordSource, design: CohortDesign,
                  comparisons: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Create temp tables cf_comparison, cf_arm_set, cf_arm_concept and cf_cohort; return
    attrition rows for all comparisons.

    `comparisons` (treatment, comparator label) defaults to design.comparisons. Needs temp
    table cf_concept_set (cohort.concepts). `cf_cohort` has one row per person and comparison:
    comparison_id, row_id (0-based, ordered by person), person_id, treated, index_date,
    risk_start, risk_end, days_at_risk, year_of_birth, gender_concept_id, disease_onset (the
    first record of a disease cohort's disease, else NULL). `cf_arm_concept`
    (comparison_id, treated, concept_id) lists the concepts that define each arm (never
    covariates).
    """
    con = source.con
    comparator = comparator_of(design)
    pairs = list(comparisons if comparisons is not None else design.comparisons)
    if comparator.pooled:
        pairs = [(t, comparator.kind) for t, _ in pairs]
    register_arm_sets(source, pairs, comparator)
    arm_sets = [r[0] for r in con.execute(
        "SELECT DISTINCT set_name FROM cf_arm_set ORDER BY 1").fetchall()]
    build_exposures(source, design, arm_sets)
    if comparator.pooled:
        eligible_entries(source, design, "cf_candidate_entry")
    build_comparator_entries(source, comparator)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cf_cmp_raw AS
        SELECT c.comparison_id, e.set_name, e.person_id, e.index_date, e.episode_end,
               true AS treated
        FROM cf_comparison c JOIN cf_entry e ON e.set_name = c.treatment
        UNION ALL SELECT * FROM cf_comparator_raw
    """)
    con.execute("DROP TABLE cf_comparator_raw")
    flag_entries(source, design, "cf_cmp_raw", "cf_cmp_flagged")
    con.execute("DROP TABLE cf_cmp_raw")
    _comparison_rules(source, design)
    steps = attrition_steps(design)
    keep = " AND ".join(f"({condition})" for _, _, condition in steps)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_cohort AS
        SELECT comparison_id,
               (row_number() OVER (PARTITION BY comparison_id ORDER BY person_id, treated)
                - 1)::INTEGER AS row_id,
               person_id, treated, index_date, risk_start, risk_end,
               days_at_risk::INTEGER AS days_at_risk, year_of_birth, gender_concept_id,
               disease_onset
        FROM cf_cmp_entry WHERE {keep}
    """, {"min_days": design.min_days_at_risk})
    attrition = _attrition(source, steps, design.min_days_at_risk)
    # Nothing later reads them: free their memory (~1.3 GB at a million persons) for the
    # covariate and outcome joins.
    for table in ("cf_cmp_entry", "cf_exposure", "cf_entry"):
        con.execute(f"DROP TABLE IF EXISTS {table}")
    return attrition


def _comparison_rules(source: RecordSource, design: CohortDesign) -> None:
    """Create cf_cmp_entry: flagged entries plus the rules that depend on the comparison."""
    con = source.con
    comparator = comparator_of(design)
    arm_rules = [c for _, _, c in arm_steps(design) + criteria_steps(design)]
    anchor = {"time_zero": "index_date", "exposure_end": "episode_end"}
    start_anchor, end_anchor = anchor[design.risk_start_anchor], anchor[design.risk_end_anchor]
    not_exposed = ("f.treated OR NOT coalesce(o.ever_before, false)"
                   if comparator.kind != "active" else "true")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_cmp_stage AS
        WITH other_arm AS (
            SELECT e.comparison_id, e.person_id, e.treated,
                   bool_or($washout > 0 AND x.start_date < e.index_date
                           AND x.end_date >= e.index_date - $washout::INTEGER) AS recent,
                   bool_or(x.start_date <= e.index_date) AS ever_before,
                   min(x.start_date) FILTER (WHERE x.start_date > e.index_date) AS switch_date
            FROM cf_cmp_flagged e
            JOIN cf_arm_set a ON a.comparison_id = e.comparison_id AND a.treated <> e.treated
            JOIN cf_exposure x ON x.set_name = a.set_name AND x.person_id = e.person_id
            GROUP BY e.comparison_id, e.person_id, e.treated
        ), ruled AS (
            SELECT f.*, o.switch_date,
                   {not_exposed} AS not_exposed,
                   f.washout_observed AND NOT coalesce(o.recent, false) AS washout_ok
            FROM cf_cmp_flagged f LEFT JOIN other_arm o
              ON o.comparison_id = f.comparison_id AND o.person_id = f.person_id
             AND o.treated = f.treated
        ), eligible AS (
            SELECT *, not_exposed AND washout_ok AND {" AND ".join(arm_rules)}
                      AS eligible_so_far
            FROM ruled
        ), overlap AS (
            -- Only a person with records of the other arm's drugs can be eligible for both
            -- arms, so the per-person windows run over those few rows (~2% at national scale)
            -- instead of every comparison's entries.
            SELECT comparison_id, person_id, index_date, treated,
                   count(*) FILTER (WHERE eligible_so_far) OVER person_in_comparison > 1
                       AS in_both,
                   min(index_date) FILTER (WHERE eligible_so_far) OVER person_in_comparison
                       AS first_index,
                   count(*) FILTER (WHERE eligible_so_far) OVER (
                       PARTITION BY comparison_id, person_id, index_date) AS entries_that_day
            FROM eligible
            WHERE (comparison_id, person_id) IN (
                SELECT DISTINCT comparison_id, person_id FROM other_arm)
            WINDOW person_in_comparison AS (PARTITION BY comparison_id, person_id)
        )
        SELECT e.*,
               coalesce(o.in_both, false) AS in_both,
               CASE WHEN o.person_id IS NOT NULL THEN o.first_index
                    WHEN e.eligible_so_far THEN e.index_date END AS first_index,
               CASE WHEN o.person_id IS NOT NULL THEN o.entries_that_day
                    ELSE e.eligible_so_far::INTEGER END AS entries_that_day
        FROM eligible e LEFT JOIN overlap o
          ON o.comparison_id = e.comparison_id AND o.person_id = e.person_id
         AND o.treated = e.treated
    """, {"washout": design.washout_days})
    con.execute("DROP TABLE cf_cmp_flagged")
    # a comparator of a candidate (other candidates, non-users) leaves that arm when it starts
    # the candidate, whether or not that later start is itself an eligible entry
    censor_switch = ("true" if design.censor_at_switch else
                     "NOT treated" if design.both_arms == "treated" else
                     "in_both" if comparator.kind == "active" else "in_both OR NOT treated")
    dropped = {"remove": "in_both", "keep": "false", "treated": "in_both AND NOT treated",
               "first": "in_both AND (index_date > first_index OR entries_that_day > 1)"}[
        design.both_arms]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_cmp_window AS
        SELECT *, {dropped} AS dropped_in_both,
               {start_anchor} + $start_day::INTEGER AS risk_start,
               least(CASE WHEN $end_day::INTEGER IS NULL THEN op_end
                          ELSE {end_anchor} + $end_day::INTEGER END,
                     op_end,
                     CASE WHEN $censor_death THEN death_date END,
                     CASE WHEN {censor_switch} THEN switch_date - 1 END,
                     CASE WHEN $max_days::INTEGER IS NOT NULL
                          THEN {start_anchor} + $start_day::INTEGER + $max_days::INTEGER - 1
                     END) AS risk_end
        FROM cf_cmp_stage
    """, {"start_day": design.risk_start_day, "end_day": design.risk_end_day,
          "censor_death": design.censor_at_death, "max_days": design.max_follow_up_days})
    con.execute("DROP TABLE cf_cmp_stage")
    before_common = "eligible_so_far AND NOT dropped_in_both"
    # The comparator cap ranks only the comparator rows that reach it (a hash draw per
    # comparison); every other row is kept as it is.
    sample = ("SELECT r.*, true AS sampled FROM ranked r" if comparator.max_ratio is None else f"""
        , drawn AS (
            SELECT r.comparison_id, r.person_id,
                   row_number() OVER (PARTITION BY r.comparison_id ORDER BY
                       {uniform_sql("r.person_id", "c.treatment", "c.comparator", 3)},
                       r.person_id) AS position
            FROM ranked r JOIN cf_comparison c USING (comparison_id)
            WHERE NOT r.treated AND r.before_sample
        ), cap AS (
            SELECT comparison_id,
                   floor($max_ratio::DOUBLE * count(*) FILTER (WHERE treated AND before_sample))
                       AS persons
            FROM ranked GROUP BY comparison_id
        )
        SELECT r.*, r.treated OR NOT r.before_sample OR d.position <= k.persons AS sampled
        FROM ranked r
        LEFT JOIN drawn d ON NOT r.treated AND d.comparison_id = r.comparison_id
                         AND d.person_id = r.person_id
        LEFT JOIN cap k ON k.comparison_id = r.comparison_id""")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_cmp_entry AS
        WITH period AS (
            SELECT comparison_id,
                   greatest(min(index_date) FILTER (WHERE treated),
                            min(index_date) FILTER (WHERE NOT treated)) AS period_start,
                   least(max(index_date) FILTER (WHERE treated),
                         max(index_date) FILTER (WHERE NOT treated)) AS period_end
            FROM cf_cmp_window WHERE {before_common} GROUP BY comparison_id
        ), ranked AS MATERIALIZED (
            SELECT w.*, in_common_period, days_at_risk,
                   {before_common} AND ({"in_common_period" if design.common_period
                                         else "true"}) AND days_at_risk >= $min_days
                       AS before_sample
            FROM cf_cmp_window w LEFT JOIN period p USING (comparison_id),
            LATERAL (SELECT coalesce(w.index_date BETWEEN p.period_start AND p.period_end,
                                     false) AS in_common_period,
                            coalesce(datediff('day', w.risk_start, w.risk_end) + 1, 0)
                                AS days_at_risk)
        ) {sample}
    """, {"min_days": design.min_days_at_risk,
          **({"max_ratio": comparator.max_ratio, "seed": comparator.seed}
             if comparator.max_ratio is not None else {})})
    con.execute("DROP TABLE cf_cmp_window")


def _attrition(source: RecordSource, steps: list[tuple[str, str, str]],
               min_days: int) -> pd.DataFrame:
    counts, cumulative = [], []
    for index, (_, _, condition) in enumerate(steps):
        cumulative.append(f"({condition})")
        where = " AND ".join(cumulative)
        counts.append(
            f"count(*) FILTER (WHERE treated AND {where}) AS t{index}, "
            f"count(*) FILTER (WHERE NOT treated AND {where}) AS c{index}"
        )
    wide = source.con.execute(f"""
        SELECT c.comparison_id, {", ".join(counts)}
        FROM cf_comparison c LEFT JOIN cf_cmp_entry e USING (comparison_id)
        GROUP BY c.comparison_id ORDER BY c.comparison_id
    """, {"min_days": min_days}).df()
    rows = [
        {
            "comparison_id": int(record["comparison_id"]),
            "step_index": index + 1,
            "step": step,
            "description": description,
            "outcome": None,
            "treated_persons": int(record[f"t{index}"]),
            "comparator_persons": int(record[f"c{index}"]),
        }
        for record in wide.to_dict("records")
        for index, (step, description, _) in enumerate(steps)
    ]
    return pd.DataFrame(rows)
