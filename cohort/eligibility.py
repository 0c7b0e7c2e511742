"""Arm-level eligibility of candidate entries: the rules that depend only on the person and time
zero, never on the comparison (observation, study window, prior observation, age, sex, the
history needed for washout, and require/exclude/indication criteria).

`flag_entries` turns a table of entries (comparison_id, set_name, person_id, index_date,
episode_end, any further columns) into the same rows with the person's data and one boolean
column per rule, so the screen (counting eligible new users per ingredient) and the
comparisons share one definition.
"""

from __future__ import annotations

import pandas as pd

from cohort.design import CohortDesign, Criterion
from cohort.events import concept_set_events
from cohort.source import RecordSource

GENDER_NAMES = {8507: "male", 8532: "female"}


def arm_steps(design: CohortDesign) -> list[tuple[str, str, str]]:
    """(step, description, SQL condition) for the arm-level rules, in attrition order."""
    steps = [("in_observation", "time zero inside an observation period, person record present",
              "in_observation")]
    if design.study_start or design.study_end:
        steps.append(("study_window", f"time zero from {design.study_start or 'the start'} to "
                      f"{design.study_end or 'the end'} of the data", "in_window"))
    steps.append(("prior_observation", f"at least {design.prior_observation_days} days of "
                  "observation before time zero", "prior_observation_ok"))
    steps.append(("age", _age_description(design), "age_ok"))
    if design.sexes:
        names = ", ".join(GENDER_NAMES.get(s, f"gender concept {s}") for s in design.sexes)
        steps.append(("sex", f"sex: {names}", "sex_ok"))
    if design.disease:
        steps.append(("disease", _disease_description(design), "disease_ok"))
    return steps


def _disease_description(design: CohortDesign) -> str:
    assert design.disease is not None
    start, end = design.disease.window
    span = f"{start} or more days" if end is None else f"{start} to {end} days"
    return (f"time zero {span} after the first record of {design.disease.concept_set} "
            "(disease cohort)")


def build_disease_onset(source: RecordSource, design: CohortDesign) -> None:
    """Create temp table cf_disease_onset(person_id, onset_date): each person's first record of
    the disease concept set (once per run; the disease cohort's anchor and a covariate)."""
    if design.disease is None:
        return
    con = source.con
    exists = con.execute("SELECT count(*) FROM duckdb_tables() "
                         "WHERE table_name = 'cf_disease_onset' AND temporary").fetchone()
    if exists and exists[0]:
        return
    events = concept_set_events(source, [design.disease.concept_set], "population.disease")
    con.execute(f"""
        CREATE TEMP TABLE cf_disease_onset AS
        WITH event AS ({events})
        SELECT person_id, min(start_date) AS onset_date FROM event
        WHERE person_id IS NOT NULL GROUP BY person_id
    """, {"event_sets": [design.disease.concept_set]})


def criteria_steps(design: CohortDesign) -> list[tuple[str, str, str]]:
    """One attrition step per require/exclude/indication criterion."""
    steps = []
    for index, criterion in enumerate(design.criteria, start=1):
        start, end = criterion.window
        times = "" if criterion.min_count == 1 else f" at least {criterion.min_count} times"
        verb = {"require": "with", "indication": "indication:", "exclude": "without"}[
            criterion.kind]
        steps.append((f"{criterion.kind}_{criterion.concept_set}",
                      f"{verb} {criterion.concept_set}{times} in days [{start}, {end}] of "
                      "time zero", f"criterion_{index}"))
    return steps


def _age_description(design: CohortDesign) -> str:
    low, high = design.min_age, design.max_age
    if low is None and high is None:
        return "no age restriction"
    if high is None:
        return f"aged {low} or more at time zero"
    if low is None:
        return f"aged {high} or less at time zero"
    return f"aged {low} to {high} at time zero"


def flag_entries(source: RecordSource, design: CohortDesign, raw: str, out: str) -> None:
    """Create temp table `out` from entries table `raw` (internal names) with rule flags."""
    con = source.con
    build_disease_onset(source, design)
    disease_join, disease = "", "NULL::DATE AS disease_onset, true AS disease_ok"
    params = {}
    if design.disease:
        disease_join = "LEFT JOIN cf_disease_onset dx ON dx.person_id = j.person_id"
        disease = """dx.onset_date AS disease_onset,
               coalesce(datediff('day', dx.onset_date, j.index_date)
                            BETWEEN $disease_from AND coalesce($disease_to::INTEGER, 2147483647),
                        false) AS disease_ok"""
        params = dict(zip(("disease_from", "disease_to"), design.disease.window, strict=True))
    death = ("SELECT person_id, min(death_date) AS death_date FROM death "
             "WHERE death_date IS NOT NULL GROUP BY person_id"
             if "death" in source.tables and "death_date" in source.tables["death"] else
             "SELECT NULL::BIGINT AS person_id, NULL::DATE AS death_date WHERE false")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {out} AS
        WITH period_row AS (
            SELECT person_id, observation_period_start_date AS op_start,
                   observation_period_end_date AS op_end
            FROM observation_period
            WHERE observation_period_start_date IS NOT NULL
              AND observation_period_end_date >= observation_period_start_date
        ), chained AS (
            -- periods that overlap or abut the ones before them continue the same stretch
            SELECT *, sum(CASE WHEN op_start <= reach + 1 THEN 0 ELSE 1 END) OVER (
                          PARTITION BY person_id ORDER BY op_start, op_end
                          ROWS UNBOUNDED PRECEDING) AS stretch
            FROM (SELECT *, max(op_end) OVER (PARTITION BY person_id ORDER BY op_start, op_end
                                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                                AS reach
                  FROM period_row)
        ), period AS (
            SELECT person_id, min(op_start) AS op_start, max(op_end) AS op_end
            FROM chained GROUP BY person_id, stretch
        ), person_row AS (
            SELECT person_id, min(year_of_birth) AS year_of_birth,
                   min(gender_concept_id) AS gender_concept_id
            FROM person WHERE person_id IS NOT NULL GROUP BY person_id
        ), death_row AS ({death}), entry_key AS (
            SELECT DISTINCT person_id, index_date FROM {raw}
        ), keyed AS (
            -- once per person and time zero (shared by every comparison and arm entry)
            SELECT k.person_id, k.index_date,
                   min(p.op_start) AS op_start, max(p.op_end) AS op_end,
                   any_value(pr.year_of_birth) AS year_of_birth,
                   any_value(pr.gender_concept_id) AS gender_concept_id,
                   bool_or(pr.person_id IS NOT NULL) AS has_person
            FROM entry_key k
            LEFT JOIN period p ON p.person_id = k.person_id
                              AND k.index_date BETWEEN p.op_start AND p.op_end
            LEFT JOIN person_row pr ON pr.person_id = k.person_id
            GROUP BY k.person_id, k.index_date
        ), joined AS (
            SELECT r.*, k.op_start, k.op_end, k.year_of_birth, k.gender_concept_id,
                   coalesce(k.has_person, false) AS has_person
            FROM {raw} r JOIN keyed k
              ON k.person_id IS NOT DISTINCT FROM r.person_id
             AND k.index_date IS NOT DISTINCT FROM r.index_date
        )
        SELECT j.*, dr.death_date,
               j.op_start IS NOT NULL AND j.has_person AS in_observation,
               datediff('day', j.op_start, j.index_date) AS observed_before,
               ($study_start::DATE IS NULL OR j.index_date >= $study_start::DATE)
                   AND ($study_end::DATE IS NULL OR j.index_date <= $study_end::DATE)
                   AS in_window,
               coalesce(datediff('day', j.op_start, j.index_date) >= $prior, false)
                   AS prior_observation_ok,
               ($min_age::INTEGER IS NULL
                    OR coalesce(year(j.index_date) - j.year_of_birth >= $min_age, false))
               AND ($max_age::INTEGER IS NULL
                    OR coalesce(year(j.index_date) - j.year_of_birth <= $max_age, false))
                   AS age_ok,
               len($sexes::BIGINT[]) = 0
                   OR coalesce(list_contains($sexes::BIGINT[], j.gender_concept_id), false)
                   AS sex_ok,
               coalesce(datediff('day', j.op_start, j.index_date) >= $washout, false)
                   AS washout_observed,
               {disease}
        FROM joined j LEFT JOIN death_row dr ON dr.person_id = j.person_id
        {disease_join}
    """, {"study_start": design.study_start, "study_end": design.study_end,
          "prior": design.prior_observation_days, "min_age": design.min_age,
          "max_age": design.max_age, "sexes": list(design.sexes),
          "washout": design.washout_days, **params})
    _flag_criteria(source, design.criteria, out)


def _flag_criteria(source: RecordSource, criteria: tuple[Criterion, ...], out: str) -> None:
    """Add boolean columns criterion_1..n to `out` (true = the entry passes the criterion)."""
    if not criteria:
        return
    con = source.con
    table = pd.DataFrame(
        [(i, c.kind, c.concept_set, c.window[0], c.window[1], c.min_count)
         for i, c in enumerate(criteria, start=1)],
        columns=["criterion_id", "kind", "set_name", "start_day", "end_day", "min_count"])
    con.register("cf_criterion_input", table)
    con.execute("CREATE OR REPLACE TEMP TABLE cf_criterion AS SELECT * FROM cf_criterion_input")
    con.unregister("cf_criterion_input")
    names = list(dict.fromkeys(c.concept_set for c in criteria))
    events = concept_set_events(source, names, "population criteria")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_criterion_hit AS
        WITH event AS ({events})
        SELECT r.comparison_id, r.set_name, r.person_id, k.criterion_id,
               count(*) >= any_value(k.min_count) AS found
        FROM {out} r
        JOIN event ev ON ev.person_id = r.person_id
        JOIN cf_criterion k ON k.set_name = ev.set_name
        WHERE ev.start_date <= r.index_date + k.end_day::INTEGER
          AND ev.end_date >= r.index_date + k.start_day::INTEGER
        GROUP BY r.comparison_id, r.set_name, r.person_id, k.criterion_id
    """, {"event_sets": names})
    columns = ", ".join(
        f"coalesce(bool_or(h.found) FILTER (WHERE h.criterion_id = {i}), false) "
        f"{'= false' if c.kind == 'exclude' else ''} AS criterion_{i}"
        for i, c in enumerate(criteria, start=1))
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_criterion_flagged AS
        SELECT r.*, {columns}
        FROM {out} r LEFT JOIN cf_criterion_hit h
          ON h.comparison_id = r.comparison_id AND h.set_name = r.set_name
         AND h.person_id = r.person_id
        GROUP BY ALL
    """)
    con.execute(f"DROP TABLE cf_criterion_hit; DROP TABLE {out}; "
                f"ALTER TABLE cf_criterion_flagged RENAME TO {out}")


def eligible_entries(source: RecordSource, design: CohortDesign, out: str) -> None:
    """Create temp table `out`: the rows of cf_entry that pass every arm-level rule and have
    the history washout needs (eligible new users, whatever they are compared with)."""
    con = source.con
    con.execute("CREATE OR REPLACE TEMP TABLE cf_entry_all AS "
                "SELECT 0 AS comparison_id, * FROM cf_entry")
    flag_entries(source, design, "cf_entry_all", "cf_entry_flagged")
    rules = [condition for _, _, condition in arm_steps(design) + criteria_steps(design)]
    rules.append("washout_observed")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {out} AS
        SELECT set_name, person_id, index_date, episode_end FROM cf_entry_flagged
        WHERE {" AND ".join(f"({rule})" for rule in rules)}
    """)
    con.execute("DROP TABLE cf_entry_all; DROP TABLE cf_entry_flagged")

