"""Comparator arms: which drugs define each arm, and the comparator entries of every comparison.

- active: new users of one named drug (its first exposure is time zero); a battery's trial
  (cohort.battery) is the same, with its own comparator drug per comparison.
- other_candidates: new users of any other candidate; time zero is the person's earliest first
  exposure to another candidate that passes the arm-level rules (cf_candidate_entry: a first
  exposure in childhood would otherwise shut adults out of every comparator arm), and the
  person must not have used the candidate before it (see cohorts.py); the drug behind it
  defines their exposure episode.
- non_users: persons not exposed to the candidate on or before a time zero given by
  `index_rule`: `matched_calendar` draws it from the first-exposure dates of the candidate's
  eligible new users (cf_candidate_entry; prescription-time distribution matching, so calendar
  time and the time since entering the data compare like for like); `random_visit` takes one
  of the person's visits.

Large pools (and, with `max_ratio`, the users of a single comparator drug) are sampled with a
stable hash of (person, treatment and comparator names, seed),
so adding a comparison to a study leaves the others' samples alone: a pre-sample before
the eligibility rules (about twice the target size; said in the first attrition step) and a
final cap at `max_ratio` comparator persons per treated person (its own step). The candidate's
own users are always in the pre-sample, so whether a person ends up treated never depends on
the draw.
"""

from __future__ import annotations

import pandas as pd

from cohort.design import ComparatorDef
from cohort.source import RecordSource, SourceError

PRESAMPLE_FACTOR = 2.0  # the pre-sample aims at this multiple of the final comparator size


def register_arm_sets(source: RecordSource, comparisons: list[tuple[str, str]],
                      comparator: ComparatorDef) -> None:
    """Create cf_comparison and cf_arm_set(comparison_id, treated, set_name)."""
    con = source.con
    frame = pd.DataFrame([(i, t, c) for i, (t, c) in enumerate(comparisons, start=1)],
                         columns=["comparison_id", "treatment", "comparator"])
    candidates = list(dict.fromkeys(frame["treatment"]))
    rows = []
    for comparison_id, treatment, other in frame.itertuples(index=False):
        rows.append((comparison_id, True, treatment))
        if comparator.single_drug:
            rows.append((comparison_id, False, other))
        elif comparator.kind == "other_candidates":
            rows += [(comparison_id, False, c) for c in candidates if c != treatment]
    arms = pd.DataFrame(rows, columns=["comparison_id", "treated", "set_name"])
    con.register("cf_comparison_input", frame)
    con.register("cf_arm_set_input", arms)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cf_comparison AS
        SELECT comparison_id::INTEGER AS comparison_id, treatment, comparator
        FROM cf_comparison_input;
        CREATE OR REPLACE TEMP TABLE cf_arm_set AS
        SELECT comparison_id::INTEGER AS comparison_id, treated, set_name FROM cf_arm_set_input;
        CREATE OR REPLACE TEMP TABLE cf_arm_concept AS
        SELECT DISTINCT a.comparison_id, a.treated, cs.concept_id
        FROM cf_arm_set a JOIN cf_concept_set cs USING (set_name);
    """)
    con.unregister("cf_comparison_input")
    con.unregister("cf_arm_set_input")


def presample_probability_sql(comparator: ComparatorDef) -> str:
    """SQL expression for the pre-sample probability from n_treated and pool (per comparison)."""
    if comparator.max_ratio is None:
        return "1.0"
    return (f"least(1.0, {float(PRESAMPLE_FACTOR * comparator.max_ratio)!r} * n_treated "
            "/ greatest(pool, 1))")


def uniform_sql(person: str, treatment: str, comparator: str, salt: int) -> str:
    """A stable pseudo-random number in [0, 1) per person and comparison (SQL expressions).

    Keyed on the comparison's treatment and comparator names, not its positional id, a
    comparison samples the same persons when other comparisons are added to or removed from
    the study.
    """
    return (f"(hash({person}, {treatment}, {comparator}, $seed::BIGINT, {int(salt)}) "
            "% 1000000) / 1000000.0")


def build_comparator_entries(source: RecordSource, comparator: ComparatorDef) -> None:
    """Create cf_comparator_raw (comparison_id, set_name, person_id, index_date, episode_end,
    treated) with every comparator entry; needs cf_comparison, cf_arm_set and cf_entry (and for
    other_candidates and non_users cf_candidate_entry, the arm-eligible entries)."""
    con = source.con
    params = {"seed": comparator.seed}
    probability = presample_probability_sql(comparator)
    if comparator.single_drug:
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE cf_comparator_raw AS
            WITH users AS (SELECT set_name, count(*) AS persons FROM cf_entry GROUP BY set_name),
            size AS (
                SELECT c.comparison_id, coalesce(t.persons, 0) AS n_treated,
                       coalesce(p.persons, 0) AS pool
                FROM cf_comparison c LEFT JOIN users t ON t.set_name = c.treatment
                LEFT JOIN users p ON p.set_name = c.comparator
            )
            SELECT c.comparison_id, e.set_name, e.person_id, e.index_date, e.episode_end,
                   false AS treated
            FROM cf_comparison c JOIN size USING (comparison_id)
            JOIN cf_entry e ON e.set_name = c.comparator
            WHERE {uniform_sql("e.person_id", "c.treatment", "c.comparator", 1)} < {probability}
               OR e.person_id IN (SELECT person_id FROM cf_entry t  -- the candidate's users:
                                  WHERE t.set_name = c.treatment)  -- always
        """, params)
        return
    if comparator.kind == "other_candidates":
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE cf_comparator_raw AS
            WITH candidate_entry AS (
                SELECT *, row_number() OVER (PARTITION BY person_id
                                             ORDER BY index_date, set_name) AS rank
                FROM cf_candidate_entry
                WHERE set_name IN (SELECT treatment FROM cf_comparison)
            ), first_two AS (SELECT * FROM candidate_entry WHERE rank <= 2),
            first_set AS (
                SELECT person_id, any_value(set_name) FILTER (WHERE rank = 1) AS set_name,
                       count(*) = 2 AS has_second
                FROM first_two GROUP BY person_id
            ), only_one AS (
                SELECT set_name, count(*) AS persons FROM first_set WHERE NOT has_second
                GROUP BY set_name
            ), size AS (
                SELECT c.comparison_id,
                       (SELECT count(*) FROM cf_entry e WHERE e.set_name = c.treatment)
                           AS n_treated,
                       (SELECT count(*) FROM first_set) - coalesce(o.persons, 0) AS pool
                FROM cf_comparison c LEFT JOIN only_one o ON o.set_name = c.treatment
            )
            SELECT c.comparison_id, r.set_name, r.person_id, r.index_date, r.episode_end,
                   false AS treated
            FROM cf_comparison c JOIN size USING (comparison_id)
            JOIN first_two r ON r.set_name <> c.treatment
            JOIN first_set f ON f.person_id = r.person_id
            WHERE (r.rank = 1 OR f.set_name = c.treatment)
              AND ({uniform_sql("r.person_id", "c.treatment", "c.comparator", 1)} < {probability}
                   OR r.person_id IN (SELECT person_id FROM cf_entry t  -- the candidate's
                                      WHERE t.set_name = c.treatment))  -- users: always
        """, params)
        return
    _non_user_entries(source, comparator, probability, params)


def _non_user_entries(source: RecordSource, comparator: ComparatorDef, probability: str,
                      params: dict) -> None:
    con = source.con
    if comparator.index_rule == "random_visit" and not source.has_rows("visit_occurrence"):
        raise SourceError(f"{source.path}: comparator non_users with index_rule random_visit "
                          "needs visit_occurrence rows; the source has none")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_non_user_pool AS
        WITH treated AS (
            SELECT c.comparison_id, e.person_id, e.index_date
            FROM cf_comparison c JOIN cf_candidate_entry e ON e.set_name = c.treatment
        ), size AS (
            SELECT c.comparison_id, count(t.person_id) AS n_treated,
                   (SELECT count(DISTINCT person_id) FROM person) - count(t.person_id) AS pool
            FROM cf_comparison c LEFT JOIN treated t USING (comparison_id)
            GROUP BY c.comparison_id
        ), persons AS (SELECT DISTINCT person_id FROM person WHERE person_id IS NOT NULL)
        SELECT c.comparison_id, p.person_id, size.n_treated,
               hash(p.person_id, c.treatment, c.comparator, $seed::BIGINT, 2) AS draw
        FROM cf_comparison c JOIN size USING (comparison_id) CROSS JOIN persons p
        WHERE size.n_treated > 0
          AND ({uniform_sql("p.person_id", "c.treatment", "c.comparator", 1)} < {probability}
               OR p.person_id IN (SELECT person_id FROM cf_entry t
                                  WHERE t.set_name = c.treatment))
    """, params)
    if comparator.index_rule == "matched_calendar":
        assign = """
            SELECT p.comparison_id, p.person_id, t.index_date
            FROM cf_non_user_pool p
            JOIN (SELECT c.comparison_id, e.index_date,
                         row_number() OVER (PARTITION BY c.comparison_id
                                            ORDER BY e.person_id) - 1 AS position
                  FROM cf_comparison c
                  JOIN cf_candidate_entry e ON e.set_name = c.treatment) t
              ON t.comparison_id = p.comparison_id AND t.position = p.draw % p.n_treated
        """
    else:
        assign = """
            SELECT p.comparison_id, p.person_id,
                   arg_min(v.visit_start_date,
                           hash(v.visit_start_date, p.draw)) AS index_date
            FROM cf_non_user_pool p JOIN visit_occurrence v ON v.person_id = p.person_id
            WHERE v.visit_start_date IS NOT NULL
            GROUP BY p.comparison_id, p.person_id
        """
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_comparator_raw AS
        SELECT a.comparison_id, 'non_users' AS set_name, a.person_id, a.index_date,
               NULL::DATE AS episode_end, false AS treated
        FROM ({assign}) a
    """)
    con.execute("DROP TABLE cf_non_user_pool")
