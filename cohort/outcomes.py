"""Outcome times for every comparison and outcome in one pass (table `outcome_time`).

An event is the first outcome record (condition_occurrence, the concept set with descendants)
dated within the risk window; survival time is event day - risk start + 1, matching
CohortMethod. A record before the risk window start marks a prior outcome; persons with one are
dropped per outcome when the study excludes them (done in attrition and at analysis).
"""

from __future__ import annotations

import pandas as pd

from cohort.design import CohortDesign
from cohort.source import RecordSource, SourceError

OUTCOME_DOMAINS = ("Condition",)


def build_outcomes(source: RecordSource, design: CohortDesign) -> pd.DataFrame:
    """Create temp table outcome_time; return the outcome list (outcome_id, name, role)."""
    con = source.con
    outcomes = pd.DataFrame(
        [(i, o.name, o.role) for i, o in enumerate(design.outcomes, start=1)],
        columns=["outcome_id", "outcome", "role"],
    )
    con.register("cf_outcome_input", outcomes)
    con.execute("CREATE OR REPLACE TEMP TABLE cf_outcome AS SELECT * FROM cf_outcome_input")
    con.unregister("cf_outcome_input")
    _check_domains(source)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cf_outcome_time AS
        WITH event AS (
            SELECT o.outcome_id, c.person_id, c.condition_start_date AS event_date
            FROM condition_occurrence c
            JOIN cf_concept_set cs ON cs.concept_id = c.condition_concept_id
            JOIN cf_outcome o ON o.outcome = cs.set_name
            WHERE c.person_id IN (SELECT person_id FROM cf_cohort)
              AND c.condition_start_date IS NOT NULL
        )
        SELECT h.comparison_id, h.row_id, e.outcome_id,
               (datediff('day', h.risk_start, min(e.event_date) FILTER (
                    WHERE e.event_date BETWEEN h.risk_start AND h.risk_end)) + 1)::INTEGER
                   AS event_time,
               bool_or(e.event_date < h.risk_start) AS prior_outcome
        FROM cf_cohort h JOIN event e ON e.person_id = h.person_id
        GROUP BY h.comparison_id, h.row_id, e.outcome_id, h.risk_start, h.risk_end
    """)
    return outcomes


def outcome_attrition(source: RecordSource, design: CohortDesign) -> pd.DataFrame:
    """Per comparison and outcome: persons left after dropping those with a prior outcome."""
    description = (
        "no outcome before the start of follow-up" if design.exclude_prior_outcome
        else "persons with a prior outcome kept (exclude_prior_outcome: false)"
    )
    return source.con.execute("""
        WITH total AS (
            SELECT comparison_id, count(*) FILTER (WHERE treated) AS treated_total,
                   count(*) FILTER (WHERE NOT treated) AS comparator_total
            FROM cf_cohort GROUP BY comparison_id
        ), prior AS (
            SELECT t.comparison_id, t.outcome_id,
                   count(*) FILTER (WHERE h.treated) AS treated_prior,
                   count(*) FILTER (WHERE NOT h.treated) AS comparator_prior
            FROM cf_outcome_time t JOIN cf_cohort h USING (comparison_id, row_id)
            WHERE t.prior_outcome AND $exclude
            GROUP BY t.comparison_id, t.outcome_id
        )
        SELECT c.comparison_id, 8 AS step_index, 'no_prior_outcome' AS step,
               $description AS description, o.outcome,
               coalesce(total.treated_total, 0) - coalesce(p.treated_prior, 0)
                   AS treated_persons,
               coalesce(total.comparator_total, 0) - coalesce(p.comparator_prior, 0)
                   AS comparator_persons
        FROM cf_comparison c CROSS JOIN cf_outcome o
        LEFT JOIN total ON total.comparison_id = c.comparison_id
        LEFT JOIN prior p ON p.comparison_id = c.comparison_id AND p.outcome_id = o.outcome_id
        ORDER BY c.comparison_id, o.outcome_id
    """, {"description": description, "exclude": design.exclude_prior_outcome}).df()


def _check_domains(source: RecordSource) -> None:
    """Outcomes are read from condition_occurrence only; refuse concepts of other domains."""
    if not source.has_rows("concept"):
        return
    others = source.con.execute("""
        SELECT DISTINCT o.outcome, c.domain_id
        FROM cf_outcome o JOIN cf_concept_set cs ON cs.set_name = o.outcome
        JOIN concept c ON c.concept_id = cs.concept_id
        WHERE c.domain_id IS NOT NULL AND c.domain_id NOT IN (SELECT unnest($domains))
        ORDER BY 1, 2
    """, {"domains": list(OUTCOME_DOMAINS)}).fetchall()
    if others:
        listed = ", ".join(f"{name} ({domain})" for name, domain in others)
        raise SourceError(
            f"{source.path}: outcome concept sets with concepts outside the Condition domain "
            f"are not supported yet: {listed}"
        )
