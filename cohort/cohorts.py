"""New-user comparison cohorts for every treatment-comparator pair, with attrition, in SQL.

Conventions (OHDSI): time zero (day 0) is the first recorded exposure to the concept set;
windows are inclusive; days at risk = risk end - risk start + 1. Each drug's entries are built
once and shared by every comparison that uses the drug.

Rules, in attrition order, per comparison and arm:
 1. first exposure to the drug anywhere in the data (time zero);
 2. time zero inside an observation period, and the person has a person row;
 3. at least `prior_observation_days` of continuous observation before time zero;
 4. age (calendar-year difference) at least `min_age` at time zero;
 5. washout: at least `washout_days` observed before time zero (so the first recorded exposure
    is a new one) and no exposure to the other arm's drug in [-washout_days, -1];
 6. persons eligible for both arms are removed from both;
 7. at least one day at risk in [time zero + start_day, min(end of observation,
    time zero + end_day)].
"""

from __future__ import annotations

import pandas as pd

from cohort.design import CohortDesign
from cohort.source import RecordSource

EXPOSURE_COLUMNS = {
    "drug_era": ("drug_era", "drug_concept_id", "drug_era_start_date", "drug_era_end_date"),
    "drug_exposure": (
        "drug_exposure", "drug_concept_id", "drug_exposure_start_date", "drug_exposure_end_date",
    ),
}


def attrition_steps(design: CohortDesign) -> list[tuple[str, str, str]]:
    """(step, description, SQL condition on cmp_entry) in order; each adds to the previous."""
    min_age = design.min_age
    return [
        ("first_exposure", "first recorded exposure to the drug (time zero)", "true"),
        ("in_observation", "time zero inside an observation period, person record present",
         "in_observation"),
        ("prior_observation",
         f"at least {design.prior_observation_days} days of observation before time zero",
         "prior_observation_ok"),
        ("min_age",
         "no age restriction" if min_age is None else f"aged {min_age} or more at time zero",
         "age_ok"),
        ("washout",
         f"no exposure to the other arm's drug in the {design.washout_days} days before "
         "time zero (and observed that long)", "washout_ok"),
        ("not_in_both", "not eligible for both arms (such persons are removed from both)",
         "NOT in_both"),
        ("at_risk", "at least one day at risk", "days_at_risk >= 1"),
    ]


def build_cohorts(source: RecordSource, design: CohortDesign) -> pd.DataFrame:
    """Create temp tables `comparison`, `arm_concept` and `cohort`; return attrition rows.

    Needs temp table concept_set (see cohort.concepts). `cohort` has one row per person and
    comparison: comparison_id, row_id (0-based, ordered by person), person_id, treated,
    index_date, risk_start, risk_end, days_at_risk, year_of_birth, gender_concept_id.
    `arm_concept` (comparison_id, treated, concept_id) lists the concepts that define each arm
    (never covariates).
    """
    con = source.con
    comparisons = pd.DataFrame(
        [(i, t, c) for i, (t, c) in enumerate(design.comparisons, start=1)],
        columns=["comparison_id", "treatment", "comparator"],
    )
    con.register("cf_comparison_input", comparisons)
    con.execute("CREATE OR REPLACE TEMP TABLE cf_comparison AS SELECT * FROM cf_comparison_input")
    con.unregister("cf_comparison_input")
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cf_arm_concept AS
        SELECT DISTINCT c.comparison_id, cs.set_name = c.treatment AS treated, cs.concept_id
        FROM cf_comparison c JOIN cf_concept_set cs
          ON cs.set_name = c.treatment OR cs.set_name = c.comparator
    """)

    table, concept_col, start_col, end_col = EXPOSURE_COLUMNS[design.exposure_table]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_exposure AS
        SELECT cs.set_name, e.person_id,
               e.{start_col} AS start_date,
               greatest(coalesce(e.{end_col}, e.{start_col}), e.{start_col}) AS end_date
        FROM {table} e
        JOIN cf_concept_set cs ON e.{concept_col} = cs.concept_id
        WHERE cs.set_name IN (SELECT treatment FROM cf_comparison
                              UNION SELECT comparator FROM cf_comparison)
          AND e.person_id IS NOT NULL AND e.{start_col} IS NOT NULL
    """)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cf_entry AS
        WITH first_exposure AS (
            SELECT set_name, person_id, min(start_date) AS index_date
            FROM cf_exposure GROUP BY set_name, person_id
        ), period AS (
            SELECT person_id, observation_period_start_date AS op_start,
                   observation_period_end_date AS op_end
            FROM observation_period
            WHERE observation_period_start_date IS NOT NULL
              AND observation_period_end_date >= observation_period_start_date
        ), person_row AS (
            SELECT person_id, min(year_of_birth) AS year_of_birth,
                   min(gender_concept_id) AS gender_concept_id
            FROM person WHERE person_id IS NOT NULL GROUP BY person_id
        )
        SELECT f.set_name, f.person_id, f.index_date,
               min(p.op_start) AS op_start, max(p.op_end) AS op_end,
               any_value(r.year_of_birth) AS year_of_birth,
               any_value(r.gender_concept_id) AS gender_concept_id,
               bool_or(r.person_id IS NOT NULL) AS has_person
        FROM first_exposure f
        LEFT JOIN period p ON p.person_id = f.person_id
                          AND f.index_date BETWEEN p.op_start AND p.op_end
        LEFT JOIN person_row r ON r.person_id = f.person_id
        GROUP BY f.set_name, f.person_id, f.index_date
    """)
    params = {
        "prior": design.prior_observation_days,
        "washout": design.washout_days,
        "min_age": design.min_age,
        "start_day": design.risk_start_day,
        "end_day": design.risk_end_day,
    }
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cf_cmp_entry AS
        WITH paired AS (
            SELECT c.comparison_id, e.*, e.set_name = c.treatment AS treated,
                   CASE WHEN e.set_name = c.treatment THEN c.comparator ELSE c.treatment END
                       AS other_set,
                   e.op_start IS NOT NULL AND e.has_person AS in_observation,
                   datediff('day', e.op_start, e.index_date) AS observed_before
            FROM cf_comparison c
            JOIN cf_entry e ON e.set_name = c.treatment OR e.set_name = c.comparator
        ), flagged AS (
            SELECT *,
                   coalesce(observed_before >= $prior, false) AS prior_observation_ok,
                   $min_age IS NULL OR coalesce(
                       year(index_date) - year_of_birth >= $min_age, false) AS age_ok,
                   coalesce(observed_before >= $washout, false) AND NOT EXISTS (
                       SELECT 1 FROM cf_exposure x
                       WHERE x.person_id = paired.person_id AND x.set_name = paired.other_set
                         AND x.start_date <= paired.index_date - 1
                         AND x.end_date >= paired.index_date - $washout::INTEGER
                   ) AS washout_ok,
                   index_date + $start_day::INTEGER AS risk_start,
                   CASE WHEN $end_day IS NULL THEN op_end
                        ELSE least(op_end, index_date + $end_day::INTEGER) END AS risk_end
            FROM paired
        ), eligible AS (
            SELECT *, in_observation AND prior_observation_ok AND age_ok AND washout_ok
                       AS eligible_so_far
            FROM flagged
        )
        SELECT *,
               eligible_so_far AND count(*) FILTER (WHERE eligible_so_far) OVER (
                   PARTITION BY comparison_id, person_id) > 1 AS in_both,
               coalesce(datediff('day', risk_start, risk_end) + 1, 0) AS days_at_risk
        FROM eligible
    """, params)
    steps = attrition_steps(design)
    keep = " AND ".join(f"({condition})" for _, _, condition in steps)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_cohort AS
        SELECT comparison_id,
               (row_number() OVER (PARTITION BY comparison_id ORDER BY person_id) - 1)::INTEGER
                   AS row_id,
               person_id, treated, index_date, risk_start, risk_end,
               days_at_risk::INTEGER AS days_at_risk, year_of_birth, gender_concept_id
        FROM cf_cmp_entry WHERE {keep}
    """)
    return _attrition(source, steps)


def _attrition(source: RecordSource, steps: list[tuple[str, str, str]]) -> pd.DataFrame:
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
    """).df()
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
