"""Exposure records of the arm drugs, and each person's first exposure per drug (time zero).

`cf_exposure` holds one row per exposure record of every drug that defines an arm (a candidate,
an active comparator, or a screened ingredient), whichever concept of the drug's set it names.
`cf_entry` holds each person's first exposure per drug and, when follow-up is anchored on the
end of exposure, the end of the first treatment episode: records of the drug separated by at
most `gap_days` days form one episode (on-treatment persistence).
"""

from __future__ import annotations

from cohort.design import CohortDesign
from cohort.events import record_end_sql
from cohort.source import RecordSource

EXPOSURE_COLUMNS = {
    "drug_era": ("drug_era", "drug_concept_id", "drug_era_start_date", "drug_era_end_date"),
    "drug_exposure": (
        "drug_exposure", "drug_concept_id", "drug_exposure_start_date", "drug_exposure_end_date",
    ),
}


def needs_episodes(design: CohortDesign) -> bool:
    return "exposure_end" in (design.risk_start_anchor, design.risk_end_anchor)


def build_exposures(source: RecordSource, design: CohortDesign, arm_sets: list[str]) -> None:
    """Create temp tables cf_exposure and cf_entry for the given concept sets."""
    con = source.con
    table, concept_col, start_col, end_col = EXPOSURE_COLUMNS[design.exposure_table]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_exposure AS
        SELECT cs.set_name, r.person_id,
               r.{start_col} AS start_date,
               {record_end_sql(source, table, start_col, end_col)} AS end_date
        FROM {table} r
        JOIN cf_concept_set cs ON r.{concept_col} = cs.concept_id
        WHERE cs.set_name IN (SELECT unnest($sets))
          AND r.person_id IS NOT NULL AND r.{start_col} IS NOT NULL
    """, {"sets": arm_sets})
    if not needs_episodes(design):
        con.execute("""
            CREATE OR REPLACE TEMP TABLE cf_entry AS
            SELECT set_name, person_id, min(start_date) AS index_date,
                   NULL::DATE AS episode_end
            FROM cf_exposure GROUP BY set_name, person_id
        """)
        return
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cf_entry AS
        WITH ordered AS (
            SELECT set_name, person_id, start_date, end_date,
                   max(end_date) OVER (PARTITION BY set_name, person_id
                       ORDER BY start_date, end_date
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_end
            FROM cf_exposure
        ), numbered AS (
            SELECT *, sum(CASE WHEN earlier_end IS NULL
                               OR start_date > earlier_end + $gap::INTEGER + 1
                          THEN 1 ELSE 0 END)
                      OVER (PARTITION BY set_name, person_id ORDER BY start_date, end_date
                            ROWS UNBOUNDED PRECEDING) AS episode
            FROM ordered
        )
        SELECT set_name, person_id, min(start_date) AS index_date, max(end_date) AS episode_end
        FROM numbered WHERE episode = 1 GROUP BY set_name, person_id
    """, {"gap": design.gap_days})
