"""Baseline covariates for every comparison in one SQL pass (tables covariate, covariate_ref).

Binary indicators, as in OHDSI FeatureExtraction: a concept recorded in a window of days
relative to time zero (inclusive; records with a span, such as drug eras, count when they
overlap the window), plus sex, 5-year age group and index year. Covariate ids follow
FeatureExtraction's scheme: concept_id * 1000 + analysis_id. Concepts of the comparison's own
treatment and comparator concept sets are never covariates. Covariates present in fewer than
`min_prevalence` of a comparison's persons are dropped for that comparison.
"""

from __future__ import annotations

import pandas as pd

from cohort.concepts import concept_names
from cohort.design import CohortDesign
from cohort.source import RecordSource

# domain -> (analysis code, table, concept column, start column, end column or None)
DOMAIN_RECORDS = {
    "condition": (1, "condition_occurrence", "condition_concept_id", "condition_start_date",
                  None),
    "drug": (2, "drug_era", "drug_concept_id", "drug_era_start_date", "drug_era_end_date"),
    "procedure": (3, "procedure_occurrence", "procedure_concept_id", "procedure_date", None),
    "measurement": (4, "measurement", "measurement_concept_id", "measurement_date", None),
}
DRUG_EXPOSURE_RECORDS = (2, "drug_exposure", "drug_concept_id", "drug_exposure_start_date",
                         "drug_exposure_end_date")
SEX, AGE_GROUP, INDEX_YEAR = 901, 902, 903


def domain_records(source: RecordSource, domain: str) -> tuple[int, str, str, str, str | None]:
    """Where a domain's records live; drugs come from drug_era, else drug_exposure."""
    if domain == "drug" and not source.has_rows("drug_era"):
        return DRUG_EXPOSURE_RECORDS
    return DOMAIN_RECORDS[domain]


def build_covariates(source: RecordSource, design: CohortDesign) -> pd.DataFrame:
    """Create temp tables covariate(comparison_id, row_id, covariate_id) and covariate_ref.

    Returns covariate_ref: covariate_id, covariate_name, analysis, concept_id, window_start,
    window_end.
    """
    con = source.con
    windows = pd.DataFrame(
        [(i, start, end) for i, (start, end) in enumerate(design.covariate_windows)],
        columns=["window_id", "start_day", "end_day"],
    )
    con.register("cf_window_input", windows)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cf_covariate_window AS SELECT window_id::INTEGER AS "
        "window_id, start_day::INTEGER AS start_day, end_day::INTEGER AS end_day "
        "FROM cf_window_input"
    )
    con.unregister("cf_window_input")
    parts = []
    for domain in design.covariate_domains:
        if domain == "demographics":
            continue
        code, table, concept, start, end = domain_records(source, domain)
        parts.append(f"""
            SELECT h.comparison_id, h.row_id,
                   r.{concept} * 1000 + {code * 10} + w.window_id AS covariate_id
            FROM cf_cohort h
            JOIN {table} r ON r.person_id = h.person_id
            JOIN cf_covariate_window w
              ON r.{start}::DATE <= h.index_date + w.end_day
             AND coalesce(greatest(r.{end or start}, r.{start}), r.{start})::DATE
                 >= h.index_date + w.start_day
            WHERE r.{concept} IS NOT NULL AND r.{concept} <> 0
        """)
    if "demographics" in design.covariate_domains:
        parts.append(f"""
            SELECT comparison_id, row_id, gender_concept_id * 1000 + {SEX} AS covariate_id
            FROM cf_cohort WHERE gender_concept_id IS NOT NULL AND gender_concept_id <> 0
            UNION ALL
            SELECT comparison_id, row_id,
                   (floor((year(index_date) - year_of_birth) / 5))::BIGINT * 1000 + {AGE_GROUP}
            FROM cf_cohort WHERE year_of_birth IS NOT NULL
            UNION ALL
            SELECT comparison_id, row_id, year(index_date)::BIGINT * 1000 + {INDEX_YEAR}
            FROM cf_cohort
        """)
    if not parts:
        parts.append(
            "SELECT NULL::INTEGER AS comparison_id, NULL::INTEGER AS row_id, "
            "NULL::BIGINT AS covariate_id WHERE false"
        )
    union = " UNION ALL ".join(f"({part})" for part in parts)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_covariate_all AS
        SELECT DISTINCT comparison_id, row_id, covariate_id::BIGINT AS covariate_id
        FROM ({union}) c
        WHERE NOT EXISTS (
            SELECT 1 FROM cf_arm_concept a
            WHERE a.comparison_id = c.comparison_id
              AND a.concept_id = c.covariate_id // 1000
              AND c.covariate_id % 1000 < 900
        )
    """)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cf_covariate AS
        WITH size AS (SELECT comparison_id, count(*) AS n FROM cf_cohort GROUP BY comparison_id),
        prevalence AS (
            SELECT comparison_id, covariate_id, count(*) AS persons
            FROM cf_covariate_all GROUP BY comparison_id, covariate_id
        )
        SELECT a.comparison_id, a.row_id, a.covariate_id
        FROM cf_covariate_all a
        JOIN prevalence p USING (comparison_id, covariate_id)
        JOIN size s USING (comparison_id)
        WHERE p.persons >= greatest(1, $min_prevalence * s.n)
    """, {"min_prevalence": design.min_prevalence})
    con.execute("DROP TABLE cf_covariate_all")
    return _reference(source, design)


def _reference(source: RecordSource, design: CohortDesign) -> pd.DataFrame:
    domain_cases = " ".join(
        f"WHEN {code} THEN '{domain}'" for domain, (code, *_rest) in DOMAIN_RECORDS.items()
    )
    return source.con.execute(f"""
        WITH ids AS (SELECT DISTINCT covariate_id FROM cf_covariate),
        parsed AS (
            SELECT covariate_id, covariate_id // 1000 AS concept_id,
                   (covariate_id % 1000)::INTEGER AS analysis_id
            FROM ids
        ), names AS ({concept_names(source)})
        SELECT p.covariate_id,
               CASE p.analysis_id
                   WHEN {SEX} THEN 'sex = ' || coalesce(n.concept_name, p.concept_id::VARCHAR)
                   WHEN {AGE_GROUP} THEN 'age group: ' || (p.concept_id * 5)::VARCHAR || '-'
                                         || (p.concept_id * 5 + 4)::VARCHAR
                   WHEN {INDEX_YEAR} THEN 'index year: ' || p.concept_id::VARCHAR
                   ELSE (CASE p.analysis_id // 10 {domain_cases} END)
                        || ' in [' || w.start_day::VARCHAR || ', ' || w.end_day::VARCHAR
                        || ']: ' || coalesce(n.concept_name, 'concept '
                        || p.concept_id::VARCHAR)
               END AS covariate_name,
               CASE WHEN p.analysis_id >= 900 THEN 'demographics'
                    ELSE (CASE p.analysis_id // 10 {domain_cases} END) END AS analysis,
               CASE WHEN p.analysis_id IN ({SEX}) OR p.analysis_id < 900
                    THEN p.concept_id END AS concept_id,
               w.start_day AS window_start, w.end_day AS window_end
        FROM parsed p
        LEFT JOIN names n ON n.concept_id = p.concept_id
                         AND (p.analysis_id < 900 OR p.analysis_id = {SEX})
        LEFT JOIN cf_covariate_window w
               ON p.analysis_id < 900 AND w.window_id = p.analysis_id % 10
        ORDER BY p.covariate_id
    """).df()
