"""Dated records of named concept sets from whichever CDM tables hold their domains.

Criteria (require/exclude/indication) look for a concept set in a window around time zero; the
set may be a condition, a drug, a procedure, a measurement, an observation or a visit type. With
a concept table the concepts' domain_id picks the tables to read; without one, every present
event table is read. Drug records come from drug_exposure (every concept level: products and
ingredients), or from drug_era (ingredients only) when drug_exposure is empty.
"""

from __future__ import annotations

from cohort.source import RecordSource, SourceError

# domain_id -> (table, concept column, start column, end column or None)
EVENT_TABLES: dict[str, tuple[str, str, str, str | None]] = {
    "Condition": ("condition_occurrence", "condition_concept_id", "condition_start_date", None),
    "Drug": ("drug_exposure", "drug_concept_id", "drug_exposure_start_date",
             "drug_exposure_end_date"),
    "Procedure": ("procedure_occurrence", "procedure_concept_id", "procedure_date", None),
    "Measurement": ("measurement", "measurement_concept_id", "measurement_date", None),
    "Observation": ("observation", "observation_concept_id", "observation_date", None),
    "Visit": ("visit_occurrence", "visit_concept_id", "visit_start_date", None),
}


def set_domains(source: RecordSource, set_names: list[str]) -> dict[str, list[str]]:
    """Per concept set (in cf_concept_set), the domains of its concepts; all when unknown."""
    if not source.has_rows("concept"):
        return {name: list(EVENT_TABLES) for name in set_names}
    rows = source.con.execute("""
        SELECT cs.set_name, list(DISTINCT coalesce(c.domain_id, '?') ORDER BY 1)
        FROM cf_concept_set cs LEFT JOIN concept c ON c.concept_id = cs.concept_id
        WHERE cs.set_name IN (SELECT unnest($names)) GROUP BY cs.set_name
    """, {"names": set_names}).fetchall()
    found = {name: domains for name, domains in rows}
    return {name: found.get(name, []) for name in set_names}


MAX_DAYS_SUPPLY = 36_500
"""Longer supplies (data errors) are cut to this, so a date never overflows."""


def record_end_sql(source: RecordSource, table: str, start: str, end: str) -> str:
    """SQL for a record's last day (alias r; inclusive, as every end date here): its end date,
    else for drug exposures start + days_supply - 1 (the CDM's convention for a missing
    drug_exposure_end_date), else its start day; never before the start."""
    fallbacks = [f"r.{end}"]
    if table == "drug_exposure" and "days_supply" in source.tables.get("drug_exposure", []):
        supply = "try_cast(r.days_supply AS INTEGER)"  # least() would skip a NULL
        fallbacks.append(f"r.{start} + (CASE WHEN {supply} > {MAX_DAYS_SUPPLY} "
                         f"THEN {MAX_DAYS_SUPPLY} ELSE {supply} END - 1)")
    fallbacks.append(f"r.{start}")
    return f"greatest(coalesce({', '.join(fallbacks)}), r.{start})"


def concept_set_events(source: RecordSource, set_names: list[str], what: str) -> str:
    """SQL for (set_name, person_id, start_date, end_date) of the sets' records.

    `what` names the use in error messages. A set with concepts of a domain no table holds is
    a SourceError naming it.
    """
    domains = set_domains(source, set_names)
    unsupported = sorted({(name, d) for name, ds in domains.items() for d in ds
                          if d not in EVENT_TABLES and d != "?"})
    if unsupported:
        listed = ", ".join(f"{name} ({domain})" for name, domain in unsupported)
        raise SourceError(f"{source.path}: {what}: concept sets with concepts of a domain no "
                          f"event table holds: {listed}")
    needed = sorted({d for ds in domains.values() for d in ds if d in EVENT_TABLES}
                    | ({d for d in EVENT_TABLES} if any("?" in ds for ds in domains.values())
                       else set()))
    parts = []
    for domain in needed:  # constant table and column names only reach the SQL
        table, concept, start, end = EVENT_TABLES[domain]
        if domain == "Drug" and not source.has_rows("drug_exposure"):  # eras: ingredients only
            table, concept, start, end = ("drug_era", "drug_concept_id", "drug_era_start_date",
                                          "drug_era_end_date")
        if not source.has_rows(table):
            continue
        end_sql = record_end_sql(source, table, start, end) if end else f"r.{start}"
        parts.append(f"""
            SELECT cs.set_name, r.person_id, r.{start} AS start_date, {end_sql} AS end_date
            FROM {table} r JOIN cf_concept_set cs ON cs.concept_id = r.{concept}
            WHERE cs.set_name IN (SELECT unnest($event_sets)) AND r.{start} IS NOT NULL
        """)
    if not parts:
        return ("SELECT NULL::VARCHAR AS set_name, NULL::BIGINT AS person_id, "
                "NULL::DATE AS start_date, NULL::DATE AS end_date "
                "WHERE len($event_sets) < 0")  # uses the parameter the caller binds
    return " UNION ALL ".join(f"({part})" for part in parts)
