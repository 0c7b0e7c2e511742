"""The result store: one DuckDB file, many runs; every table carries run_id.

A run is written in a single transaction at its end, so readers see a run completely or not
at all. DuckDB allows one writing process at a time: writers wait (with a timeout) for the
file lock instead of failing. Readers open the file read-only.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd

from results.triangulation import META_COLUMNS, TRIANGULATION_VIEW, refresh_meta_analysis

SCHEMA_VERSION = 1

TABLES: dict[str, str] = {
    "runs": """
        run_id VARCHAR PRIMARY KEY, study VARCHAR, description VARCHAR,
        study_file VARCHAR, config_sha256 VARCHAR, config_json VARCHAR,
        source_path VARCHAR, source_sha256 VARCHAR, source_fingerprint VARCHAR,
        cdm_version VARCHAR, started_at TIMESTAMP, finished_at TIMESTAMP, status VARCHAR,
        n_comparisons INTEGER, n_outcomes INTEGER, n_estimates INTEGER,
        n_estimates_failed INTEGER, warnings VARCHAR, versions VARCHAR, timings VARCHAR""",
    "comparisons": """
        run_id VARCHAR, comparison_id INTEGER, treatment VARCHAR, comparator VARCHAR,
        strategy VARCHAR, trial INTEGER, n_treated BIGINT, n_comparator BIGINT,
        cohort_note VARCHAR""",
    "attrition": """
        run_id VARCHAR, comparison_id INTEGER, treatment VARCHAR, comparator VARCHAR,
        outcome VARCHAR, step_index INTEGER, step VARCHAR, description VARCHAR,
        treated_persons BIGINT, comparator_persons BIGINT, strategy VARCHAR""",
    "diagnostics": """
        run_id VARCHAR, comparison_id INTEGER, treatment VARCHAR, comparator VARCHAR,
        outcome VARCHAR, estimator VARCHAR, n_treated BIGINT, n_comparator BIGINT,
        n_covariates INTEGER, ps_auc DOUBLE, ps_c DOUBLE, equipoise DOUBLE,
        max_abs_smd_before DOUBLE, max_abs_smd_after DOUBLE,
        ess_treated DOUBLE, ess_comparator DOUBLE, mdrr DOUBLE,
        max_smd_threshold DOUBLE, min_equipoise_threshold DOUBLE, max_mdrr_threshold DOUBLE,
        smd_pass BOOLEAN, equipoise_pass BOOLEAN, mdrr_pass BOOLEAN, passed BOOLEAN,
        reasons VARCHAR, null_mean DOUBLE, null_sd DOUBLE, ease DOUBLE,
        n_negative_controls INTEGER, n_positive_controls INTEGER, calibration_note VARCHAR,
        max_ease_threshold DOUBLE, ease_pass BOOLEAN, strategy VARCHAR, trial INTEGER,
        share_imbalanced DOUBLE, max_share_imbalanced_threshold DOUBLE, share_pass BOOLEAN,
        ps_selection VARCHAR, ps_covariates_selected INTEGER, ps_note VARCHAR""",
    "balance": """
        run_id VARCHAR, comparison_id INTEGER, adjustment VARCHAR, covariate_id BIGINT,
        covariate_name VARCHAR, analysis VARCHAR, concept_id BIGINT,
        mean_treated_before DOUBLE, mean_comparator_before DOUBLE, smd_before DOUBLE,
        mean_treated_after DOUBLE, mean_comparator_after DOUBLE, smd_after DOUBLE""",
    "ps_distribution": """
        run_id VARCHAR, comparison_id INTEGER, arm VARCHAR, bin_low DOUBLE, bin_high DOUBLE,
        persons BIGINT""",
    "km_curves": """
        run_id VARCHAR, comparison_id INTEGER, outcome VARCHAR, adjustment VARCHAR,
        arm VARCHAR, day DOUBLE, survival DOUBLE, at_risk BIGINT""",
    "screen": """
        run_id VARCHAR, ingredient_concept_id BIGINT, ingredient VARCHAR, set_name VARCHAR,
        exposed_persons BIGINT, eligible_new_users BIGINT, selected BOOLEAN,
        atc_classes VARCHAR[], random_trials INTEGER, same_class_trials INTEGER,
        battery_note VARCHAR""",
    "estimates": """
        run_id VARCHAR, comparison_id INTEGER, treatment VARCHAR, comparator VARCHAR,
        outcome VARCHAR, role VARCHAR, estimator VARCHAR, measure VARCHAR, estimand VARCHAR,
        estimate DOUBLE, ci_low DOUBLE, ci_high DOUBLE, se DOUBLE, p_value DOUBLE,
        calibrated_estimate DOUBLE, calibrated_ci_low DOUBLE, calibrated_ci_high DOUBLE,
        calibrated_p_value DOUBLE,
        n_treated BIGINT, n_comparator BIGINT, events_treated BIGINT,
        events_comparator BIGINT, person_days_treated BIGINT, person_days_comparator BIGINT,
        treatment_concept_ids BIGINT[], comparator_concept_ids BIGINT[],
        outcome_concept_ids BIGINT[], status VARCHAR, message VARCHAR,
        true_effect_size DOUBLE, calibrated_se DOUBLE, e_value DOUBLE, e_value_ci DOUBLE,
        q_value DOUBLE, rank INTEGER, treatment_codes VARCHAR[], treatment_names VARCHAR[],
        treatment_atc VARCHAR[], comparator_codes VARCHAR[], comparator_names VARCHAR[],
        comparator_atc VARCHAR[], outcome_codes VARCHAR[], outcome_names VARCHAR[],
        strategy VARCHAR, trial INTEGER""",
    # one row per screened candidate x outcome x comparator strategy x estimator: the battery
    # of trials pooled (results.candidates)
    "candidate_evidence": """
        run_id VARCHAR, treatment VARCHAR, outcome VARCHAR, role VARCHAR, strategy VARCHAR,
        estimator VARCHAR, trials_run INTEGER, trials_estimable INTEGER,
        trials_balanced INTEGER, balanced_rate DOUBLE, estimate DOUBLE, ci_low DOUBLE,
        ci_high DOUBLE, se DOUBLE, p_value DOUBLE, q_value DOUBLE, calibrated BOOLEAN,
        share_protective DOUBLE, share_harmful DOUBLE, reported BOOLEAN, rank INTEGER,
        identified BOOLEAN, reason VARCHAR""",
}
RUN_TABLES = tuple(TABLES)
DERIVED_TABLES = {"meta_analysis": META_COLUMNS}  # rebuilt per study when a run is written

VIEWS = {
    # Candidates that pass every diagnostic gate, best evidence first (see results.ranking).
    "rankings": """
        SELECT r.study, e.run_id, r.finished_at, e.outcome, e.estimator, e.rank,
               e.treatment, e.comparator,
               coalesce(e.calibrated_estimate, e.estimate) AS hr,
               coalesce(e.calibrated_ci_low, e.ci_low) AS ci_low,
               coalesce(e.calibrated_ci_high, e.ci_high) AS ci_high,
               coalesce(e.calibrated_p_value, e.p_value) AS p_value, e.q_value,
               e.calibrated_estimate IS NOT NULL AS calibrated,
               e.estimate AS uncalibrated_hr, e.ci_low AS uncalibrated_ci_low,
               e.ci_high AS uncalibrated_ci_high, e.e_value, e.e_value_ci,
               e.n_treated, e.n_comparator, e.events_treated, e.events_comparator,
               e.treatment_concept_ids, e.comparator_concept_ids, e.outcome_concept_ids,
               e.treatment_codes, e.treatment_names, e.treatment_atc, e.outcome_codes,
               e.outcome_names, d.ps_note
        FROM estimates e JOIN runs r USING (run_id)
        LEFT JOIN diagnostics d USING (run_id, comparison_id, outcome, estimator)
        WHERE e.rank IS NOT NULL""",
    "triangulation": TRIANGULATION_VIEW,
    # Every screened ingredient of every run, with what became of it (results.account).
    "candidate_account": """
        WITH trial AS (
            SELECT run_id, treatment, comparison_id, strategy, cohort_note,
                   n_treated > 0 AND n_comparator > 0 AS both_arms
            FROM comparisons
        ), per_trial AS (
            SELECT t.*, e.outcome, e.estimator, e.status, e.message, d.passed, d.reasons,
                   d.ps_covariates_selected
            FROM trial t
            JOIN estimates e ON e.run_id = t.run_id AND e.comparison_id = t.comparison_id
            LEFT JOIN diagnostics d
              ON d.run_id = e.run_id AND d.comparison_id = e.comparison_id
             AND d.outcome = e.outcome AND d.estimator = e.estimator
            WHERE e.role = 'outcome'
        ), trials AS (
            SELECT run_id, treatment, outcome, estimator,
                   count(*) AS trials_run,
                   count(*) FILTER (WHERE both_arms) AS trials_with_both_arms,
                   count(*) FILTER (WHERE status = 'ok') AS trials_estimable,
                   count(*) FILTER (WHERE passed) AS trials_balanced,
                   count(*) FILTER (WHERE ps_covariates_selected = 0)
                       AS trials_ps_without_covariates,
                   mode(reasons) FILTER (WHERE status = 'ok' AND NOT coalesce(passed, false))
                       AS commonest_failed_gate,
                   mode(message) FILTER (WHERE status <> 'ok') AS commonest_failure,
                   mode(cohort_note) AS commonest_cohort_note
            FROM per_trial GROUP BY ALL
        ), pooled AS (
            SELECT run_id, treatment, outcome, estimator, min(rank) AS best_rank,
                   arg_min(strategy, rank) AS rank_strategy,
                   bool_or(coalesce(identified, false)) AS identified,
                   bool_or(reported) AS reported,
                   string_agg(strategy || ': HR ' || coalesce(printf('%.2f', estimate), '-')
                              || ' (' || trials_balanced || '/' || trials_run
                              || ' trials balanced)', '; ' ORDER BY strategy) AS by_strategy,
                   string_agg(reason, '; ' ORDER BY strategy) FILTER (WHERE reason IS NOT NULL)
                       AS pooled_reason
            FROM candidate_evidence WHERE role = 'outcome' GROUP BY ALL
        )
        SELECT s.run_id, r.study, s.set_name AS treatment, s.ingredient,
               s.ingredient_concept_id, s.eligible_new_users, s.selected, s.atc_classes,
               s.random_trials, s.same_class_trials, s.battery_note,
               t.outcome, t.estimator, t.trials_run, t.trials_with_both_arms,
               t.trials_estimable, t.trials_balanced, t.trials_ps_without_covariates,
               t.commonest_cohort_note, t.commonest_failure, t.commonest_failed_gate,
               p.by_strategy, p.best_rank AS rank, p.rank_strategy,
               coalesce(p.identified, false) AS identified,
               CASE
                   WHEN NOT s.selected THEN 'not screened: fewer eligible new users than the '
                        || 'screen minimum'
                   WHEN t.trials_run IS NULL THEN 'no trial formed'
                        || coalesce(': ' || s.battery_note, '')
                   WHEN t.trials_with_both_arms = 0 THEN 'every trial has an empty arm'
                        || coalesce(' (' || t.commonest_cohort_note || ')', '')
                   WHEN t.trials_estimable = 0 THEN 'no trial estimable'
                        || coalesce(': ' || t.commonest_failure, '')
                   WHEN t.trials_balanced = 0 THEN 'no trial passed the diagnostics'
                        || coalesce(': ' || t.commonest_failed_gate, '')
                   WHEN p.best_rank IS NOT NULL AND coalesce(p.identified, false)
                        THEN 'ranked; identified (beneficial under every comparator strategy)'
                   WHEN p.best_rank IS NOT NULL THEN 'ranked'
                   ELSE 'not ranked' || coalesce(': ' || p.pooled_reason, '')
               END AS status
        FROM screen s JOIN runs r USING (run_id)
        LEFT JOIN trials t ON t.run_id = s.run_id AND t.treatment = s.set_name
        LEFT JOIN pooled p ON p.run_id = t.run_id AND p.treatment = t.treatment
         AND p.outcome = t.outcome AND p.estimator = t.estimator""",
}


class StoreError(Exception):
    """The result store cannot be opened or written; the message says why."""


def columns(table: str) -> list[str]:
    """Column names of a store table, in order."""
    return [part.split()[0] for part in TABLES[table].split(",") if part.strip()]


@contextmanager
def open_store(
    path: str | Path, *, read_only: bool = False, wait_seconds: float = 300.0
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Connect to the store; a writer waits while another process holds the file lock."""
    path = Path(path)
    if read_only and not path.exists():
        raise StoreError(f"{path}: no result store here yet (run a study first)")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        try:
            # Readers get no file or network access beyond the store (COPY TO, read_csv, INSTALL).
            config = {"enable_external_access": False} if read_only else {}
            con = duckdb.connect(str(path), read_only=read_only, config=config)
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise StoreError(f"{path}: cannot open the result store ({exc})") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        except duckdb.Error as exc:
            raise StoreError(f"{path}: not a readable result store ({exc})") from None
    try:
        if not read_only:
            _ensure_schema(con)
        yield con
    finally:
        con.close()


def check_store(path: str | Path) -> None:
    """Refuse, before any work, a results path that is not and cannot become a result store:
    a folder, FIFO or device, a file DuckDB cannot open, or a place nothing can be written."""
    path = Path(path)
    if path.exists():
        if not path.is_file():
            raise StoreError(f"{path}: not a regular file (expected a DuckDB result store)")
        with open_store(path, read_only=True):
            return
    parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise StoreError(f"{path}: cannot create the result store ({parent} is not a writable "
                         "folder)")


def _ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS schema_info (version INTEGER)")
    if not con.execute("SELECT version FROM schema_info").fetchall():
        con.execute("INSERT INTO schema_info VALUES (?)", [SCHEMA_VERSION])
    for table, ddl in {**TABLES, **DERIVED_TABLES}.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({ddl})")
        present = {row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()}
        for column in ddl.split(","):
            name, kind = column.split()[0], " ".join(column.split()[1:])
            if name not in present:  # a store written by an older cohortflow
                con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    for view, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {view} AS {sql}")


def write_run(path: str | Path, run: dict, tables: dict[str, pd.DataFrame]) -> None:
    """Write one run's rows to every table in a single transaction (replacing that run_id).

The study's cross-source meta-analysis is rebuilt in the same transaction.
"""
    run_id = run["run_id"]
    frames = {"runs": pd.DataFrame([_run_row(run)])}
    for table in RUN_TABLES[1:]:
        frame = tables.get(table, pd.DataFrame())
        frame = frame.assign(run_id=run_id).reindex(columns=columns(table))
        frames[table] = frame
    with open_store(path) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            for table, frame in frames.items():
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
                if len(frame):
                    con.register("incoming", frame)
                    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
                    con.unregister("incoming")
            if run.get("study") and run.get("status") == "completed":
                refresh_meta_analysis(con, run["study"], run_id)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def _run_row(run: dict) -> dict:
    row = {name: run.get(name) for name in columns("runs")}
    for name in ("source_fingerprint", "warnings", "versions", "timings", "config_json"):
        if row[name] is not None and not isinstance(row[name], str):
            row[name] = json.dumps(row[name], sort_keys=True, default=str)
    return row


QUERY_TIMEOUT_S = 60.0
QUERY_MEMORY_LIMIT = "2GB"
# Table functions a reader may call; every other one (enable_logging, read_*, ...) is refused.
READER_TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "duckdb_tables", "duckdb_columns", "duckdb_views",
    "duckdb_schemas", "duckdb_types", "duckdb_constraints", "duckdb_indexes"})


def query(path: str | Path, sql: str, *, timeout_s: float = QUERY_TIMEOUT_S,
          memory_limit: str = QUERY_MEMORY_LIMIT) -> pd.DataFrame:
    """Run one read statement against the store, checked before DuckDB executes anything,
    within a time and memory limit; a writer holding the file makes it wait, not fail."""
    check_read_only_sql(sql)
    with open_store(path, read_only=True) as con:
        timer = threading.Timer(timeout_s, con.interrupt)
        try:
            con.execute("SET memory_limit = ?", [memory_limit])
            con.execute("SET lock_configuration = true")
            timer.start()
            return con.execute(sql).df()
        except duckdb.InterruptException:
            raise StoreError(f"query stopped after {timeout_s:g} s (the limit; --timeout "
                             "raises it)") from None
        except duckdb.Error as exc:
            message = str(exc).splitlines()[0]
            if "read-only" in message.lower() or "read only" in message.lower():
                raise StoreError(
                    f"the result store is opened read-only; queries cannot modify it ({message})"
                ) from None
            raise StoreError(f"query failed: {message}") from None
        finally:
            timer.cancel()


def check_read_only_sql(sql: str) -> None:
    """Refuse anything but one SELECT (CALL, SET, PRAGMA, ATTACH, COPY, several statements)
    and table functions outside READER_TABLE_FUNCTIONS, by parsing alone."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise StoreError(f"query is not valid SQL: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise StoreError(f"expected one SELECT statement, got {len(statements)} statements")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise StoreError(f"the store is read-only here: only SELECT queries are allowed "
                         f"(got a {kind.name} statement)")
    with duckdb.connect() as parser:
        tree = json.loads(parser.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    if tree.get("error"):
        raise StoreError(f"query is not valid SQL: {tree.get('error_message', '')}")
    refused = sorted(set(_table_functions(tree)) - READER_TABLE_FUNCTIONS)
    if refused:
        raise StoreError(f"table function {refused[0]}() is not allowed in queries (allowed: "
                         f"{', '.join(sorted(READER_TABLE_FUNCTIONS))})")


def _table_functions(node: object) -> Iterator[str]:
    """Names of the table functions in a json_serialize_sql tree."""
    if isinstance(node, dict):
        if node.get("type") == "TABLE_FUNCTION":
            yield str((node.get("function") or {}).get("function_name", "")).lower()
        for value in node.values():
            yield from _table_functions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _table_functions(value)
