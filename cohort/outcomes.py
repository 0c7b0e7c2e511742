"""Outcome times for every comparison and outcome in one pass (table `cf_outcome_time`).

What: an outcome is a concept set (with descendants) searched in the event tables its concepts
belong to (condition_occurrence, procedure_occurrence, measurement, observation), or, under the
name `death` when no concept set has that name, all-cause death (the death table). An event is
the first record dated within the risk window; event_time = event day - risk start + 1
(CohortMethod), so an event on the last day at risk counts. A record before the risk start
(within `prior_outcome_lookback_days` of it when set) marks a prior outcome; persons with one are
dropped per outcome when the study excludes them (done in attrition and at analysis).

Why this shape: outcomes are often procedures (surgery), measurements (a lab value) or
observations, not only diagnoses, and a concept's domain_id says where OMOP stores its records.
Reading the domains lets us scan only the tables an outcome can be in; concepts of domains that
have no dated event table here (Drug, Device, ...) are refused rather than silently never found.
All outcomes and comparisons are answered by one set-based query (a UNION ALL over the needed
tables): its cost is a scan per table, not per outcome. Table and column names in the SQL come
from the constants below; concept-set names and ids travel as data (registered tables).
"""

from __future__ import annotations

import pandas as pd

from cohort.design import DEATH, CohortDesign
from cohort.events import EVENT_TABLES as ALL_EVENT_TABLES
from cohort.source import REQUIRED_COLUMNS, RecordSource, SourceError

# domain_id -> (table, concept column, date column); the order is the scan order
OUTCOME_DOMAINS = ("Condition", "Procedure", "Measurement", "Observation")
EVENT_TABLES: dict[str, tuple[str, str, str]] = {
    domain: ALL_EVENT_TABLES[domain][:3] for domain in OUTCOME_DOMAINS}
DEATH_TABLE = ("death", "death_date")


def is_all_cause_death(name: str, design: CohortDesign) -> bool:
    """True when outcome `name` means all-cause death: `death` and not a defined concept set."""
    return name == DEATH and name not in design.concept_sets


def outcome_requirements(
    source: RecordSource, design: CohortDesign,
) -> dict[str, tuple[str, ...]]:
    """Tables (-> required columns) this design's outcomes read; usable before concept sets
    are resolved (reads the ids the sets list, not `cf_concept_set`).

    With a concept table, a concept set needs the tables of its listed concepts' domains; a set
    whose domains cannot be read from its listed ids (no concept table, source-code items)
    needs every event table the source has. All-cause death needs the death table. A listed
    concept of an unsupported domain raises SourceError here already.
    """
    listed = pd.DataFrame(
        [(outcome.name, item.concept_id) for outcome in design.outcomes
         if outcome.name in design.concept_sets
         for item in design.concept_sets[outcome.name].all_items() if not item.excluded],
        columns=["set_name", "concept_id"],
    )
    unknown = set(listed.loc[listed["concept_id"].isna(), "set_name"])  # source-code items
    listed = listed.dropna().astype({"concept_id": "int64"})
    plan = _tables_by_set(source, listed)
    needs: dict[str, tuple[str, ...]] = {}
    for outcome in design.outcomes:
        if is_all_cause_death(outcome.name, design):
            tables: tuple[str, ...] = (DEATH_TABLE[0],)
        elif outcome.name in unknown:
            tables = _present_event_tables(source)
        else:
            tables = plan.get(outcome.name, ())
        for table in tables:
            needs[table] = REQUIRED_COLUMNS[table]
    return needs


def build_outcomes(source: RecordSource, design: CohortDesign) -> pd.DataFrame:
    """Create temp tables cf_outcome and cf_outcome_time; return the outcome list.

    Needs cf_cohort and cf_concept_set. Returns (outcome_id, outcome, role).
    """
    lookback = design.prior_outcome_lookback_days
    if lookback is not None and lookback < 0:
        raise ValueError(f"prior_outcome_lookback_days must be >= 0 or None, not {lookback}")
    con = source.con
    outcomes = pd.DataFrame(
        [(i, o.name, o.role) for i, o in enumerate(design.outcomes, start=1)],
        columns=["outcome_id", "outcome", "role"],
    )
    con.register("cf_outcome_input", outcomes)
    con.execute("CREATE OR REPLACE TEMP TABLE cf_outcome AS SELECT * FROM cf_outcome_input")
    con.unregister("cf_outcome_input")

    scan = _scan_plan(source, design, outcomes)
    source.require({table: REQUIRED_COLUMNS[table] for table in scan["table_name"].unique()})
    con.register("cf_outcome_scan_input", scan)
    con.execute("CREATE OR REPLACE TEMP TABLE cf_outcome_scan AS "
                "SELECT * FROM cf_outcome_scan_input")
    con.unregister("cf_outcome_scan_input")

    needed = set(scan["table_name"])
    branches = [  # constant table and column names only reach the SQL
        f"""SELECT w.outcome_id, r.person_id, r.{day} AS event_date
            FROM {table} r JOIN wanted w
              ON w.table_name = '{table}' AND w.concept_id = r.{concept}
            WHERE r.person_id IN (SELECT person_id FROM cf_cohort) AND r.{day} IS NOT NULL"""
        for table, concept, day in EVENT_TABLES.values() if table in needed
    ]
    if DEATH_TABLE[0] in needed:
        table, day = DEATH_TABLE
        branches.append(f"""SELECT s.outcome_id, r.person_id, r.{day} AS event_date
            FROM {table} r JOIN cf_outcome_scan s ON s.table_name = '{table}'
            WHERE r.person_id IN (SELECT person_id FROM cf_cohort) AND r.{day} IS NOT NULL""")
    if not branches:
        branches = ["SELECT NULL::BIGINT AS outcome_id, NULL::BIGINT AS person_id, "
                    "NULL::DATE AS event_date WHERE false"]
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE cf_outcome_time AS
        WITH wanted AS (
            SELECT s.table_name, s.outcome_id, cs.concept_id
            FROM cf_outcome_scan s JOIN cf_outcome o USING (outcome_id)
            JOIN cf_concept_set cs ON cs.set_name = o.outcome
        ), event AS (
            {" UNION ALL ".join(branches)}
        )
        SELECT h.comparison_id, h.row_id, e.outcome_id,
               (datediff('day', h.risk_start, min(e.event_date) FILTER (
                    WHERE e.event_date BETWEEN h.risk_start AND h.risk_end)) + 1)::INTEGER
                   AS event_time,
               bool_or(e.event_date < h.risk_start AND (
                   $lookback::INTEGER IS NULL
                   OR e.event_date >= h.risk_start - $lookback::INTEGER)) AS prior_outcome
        FROM cf_cohort h JOIN event e ON e.person_id = h.person_id
        GROUP BY h.comparison_id, h.row_id, e.outcome_id, h.risk_start, h.risk_end
    """, {"lookback": lookback})
    return outcomes


def outcome_attrition(source: RecordSource, design: CohortDesign) -> pd.DataFrame:
    """Per comparison and outcome: persons left after dropping those with a prior outcome."""
    lookback = design.prior_outcome_lookback_days
    if not design.exclude_prior_outcome:
        description = "persons with a prior outcome kept (exclude_prior_outcome: false)"
    elif lookback is None:
        description = "no outcome before the start of follow-up"
    else:
        description = f"no outcome in the {lookback} days before the start of follow-up"
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


def _scan_plan(source: RecordSource, design: CohortDesign, outcomes: pd.DataFrame
               ) -> pd.DataFrame:
    """(outcome_id, table_name): which table each outcome is searched in (resolved sets)."""
    con = source.con
    plan = _tables_by_set(source, con.execute(
        "SELECT DISTINCT cs.set_name, cs.concept_id FROM cf_concept_set cs "
        "WHERE cs.set_name IN (SELECT outcome FROM cf_outcome)").df())
    rows = []
    for outcome_id, name in zip(outcomes["outcome_id"], outcomes["outcome"], strict=True):
        if is_all_cause_death(name, design):
            _check_death_rows(source, name)
            rows.append((outcome_id, DEATH_TABLE[0]))
        else:
            rows += [(outcome_id, table) for table in plan.get(name, ())]
    return pd.DataFrame(rows, columns=["outcome_id", "table_name"]).astype(
        {"outcome_id": "int64", "table_name": "str"})


def _tables_by_set(source: RecordSource, pairs: pd.DataFrame) -> dict[str, tuple[str, ...]]:
    """Event tables per concept set, from the domains of its concepts (pairs: set_name,
    concept_id). Concepts without a known domain follow the known ones of their set (a hierarchy
    stays in one domain); a set with no known domain at all (no concept table, or ids missing
    from it) is searched in every event table present. Other domains raise SourceError."""
    everywhere = _present_event_tables(source)
    if not source.has_rows("concept"):
        return {name: everywhere for name in pairs["set_name"].unique()}
    con = source.con
    con.register("cf_outcome_pairs", pairs.astype({"concept_id": "int64"}))
    try:
        domains = con.execute("""
            SELECT p.set_name, list(DISTINCT c.domain_id ORDER BY c.domain_id)
                       FILTER (WHERE c.domain_id IS NOT NULL) AS domains
            FROM cf_outcome_pairs p LEFT JOIN concept c ON c.concept_id = p.concept_id
            GROUP BY p.set_name ORDER BY p.set_name
        """).fetchall()
    finally:
        con.unregister("cf_outcome_pairs")
    others = [(name, domain) for name, found in domains for domain in found or []
              if domain not in EVENT_TABLES]
    if others:
        listed = ", ".join(f"{name} ({domain})" for name, domain in others)
        raise SourceError(
            f"{source.path}: outcome concept sets with concepts outside the "
            f"{', '.join(OUTCOME_DOMAINS[:-1])} and {OUTCOME_DOMAINS[-1]} domains are not "
            f"supported: {listed}"
        )
    return {
        name: tuple(table for domain, (table, _, _) in EVENT_TABLES.items()
                    if domain in found) if found else everywhere
        for name, found in domains
    }


def _present_event_tables(source: RecordSource) -> tuple[str, ...]:
    return tuple(table for table, _, _ in EVENT_TABLES.values() if table in source.tables)


def _check_death_rows(source: RecordSource, name: str) -> None:
    """All-cause death needs a death table with dated rows; say so when it has none."""
    table, day = DEATH_TABLE
    if table not in source.tables:
        raise SourceError(f"{source.path}: outcome {name} (all-cause death) needs the death "
                          "table, and the source has none")
    source.require({table: REQUIRED_COLUMNS[table]})
    if not source.has_rows(table) or not source.con.execute(
            f"SELECT EXISTS (SELECT 1 FROM {table} WHERE {day} IS NOT NULL)").fetchall()[0][0]:
        raise SourceError(f"{source.path}: outcome {name} (all-cause death) needs death "
                          f"records, and the source's death table has no rows with a {day}")
