"""Triangulation: the same question answered by methods, comparators and data sources whose
biases differ. Agreement across them is evidence no single estimate can give.

`meta_analysis` rows pool each treatment x comparator x outcome x estimator across the latest
completed run of every data source of a study (DerSimonian-Laird random effects, with I^2 and
tau); they are rebuilt for the study inside the transaction that writes each of its runs. The
`triangulation` view summarises, per treatment x outcome, the estimates of every adjusted
method family, comparator and source, and whether they agree in direction and significance.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from estimators.meta import random_effects

METHOD_FAMILY = {
    "iptw": "weighting", "overlap": "weighting",
    "ps_strata": "stratification/matching", "ps_match": "stratification/matching",
    "aipw": "outcome model", "standardization": "outcome model", "tlearner": "outcome model",
    "dml": "outcome model",
}

META_COLUMNS = """
    run_id VARCHAR, study VARCHAR, treatment VARCHAR, comparator VARCHAR, outcome VARCHAR,
    estimator VARCHAR, k_sources INTEGER, source_run_ids VARCHAR[], calibrated BOOLEAN,
    pooled_hr DOUBLE, ci_low DOUBLE, ci_high DOUBLE, se DOUBLE, p_value DOUBLE, tau2 DOUBLE,
    tau DOUBLE, i2 DOUBLE, q DOUBLE, q_p DOUBLE"""

_LATEST_RUNS = """
    SELECT arg_max(run_id, finished_at) AS run_id FROM runs
    WHERE status = 'completed' GROUP BY study, source_sha256"""

_FAMILY_CASE = "CASE e.estimator " + " ".join(
    f"WHEN '{estimator}' THEN '{family}'" for estimator, family in METHOD_FAMILY.items()
) + " END"

TRIANGULATION_VIEW = f"""
    WITH latest AS ({_LATEST_RUNS}),
    est AS (
        SELECT r.study, e.treatment, e.comparator, e.outcome, e.estimator, e.run_id,
               {_FAMILY_CASE} AS method_family,
               coalesce(e.calibrated_estimate, e.estimate) AS hr,
               coalesce(e.calibrated_ci_low, e.ci_low) AS lo,
               coalesce(e.calibrated_ci_high, e.ci_high) AS hi,
               coalesce(d.passed, false) AS passed,
               e.treatment_concept_ids, e.outcome_concept_ids, e.treatment_codes,
               e.treatment_names, e.treatment_atc, e.outcome_codes, e.outcome_names
        FROM estimates e JOIN runs r USING (run_id) JOIN latest USING (run_id)
        LEFT JOIN diagnostics d USING (run_id, comparison_id, outcome, estimator)
        WHERE e.role = 'outcome' AND e.status = 'ok' AND e.estimator <> 'crude'
    ), meta AS (
        SELECT study, treatment, outcome,
               arg_min(pooled_hr, estimator <> 'iptw') AS meta_hr,
               arg_min(ci_low, estimator <> 'iptw') AS meta_ci_low,
               arg_min(ci_high, estimator <> 'iptw') AS meta_ci_high,
               arg_min(i2, estimator <> 'iptw') AS meta_i2,
               arg_min(tau, estimator <> 'iptw') AS meta_tau,
               arg_min(k_sources, estimator <> 'iptw') AS meta_k_sources,
               arg_min(estimator, estimator <> 'iptw') AS meta_estimator
        FROM meta_analysis GROUP BY study, treatment, outcome
    )
    SELECT est.study, est.treatment, est.outcome,
           any_value(treatment_concept_ids) AS treatment_concept_ids,
           any_value(outcome_concept_ids) AS outcome_concept_ids,
           any_value(treatment_codes) AS treatment_codes,
           any_value(treatment_names) AS treatment_names,
           any_value(treatment_atc) AS treatment_atc,
           any_value(outcome_codes) AS outcome_codes,
           any_value(outcome_names) AS outcome_names,
           count(*) AS n_estimates, count(*) FILTER (WHERE passed) AS n_passing_diagnostics,
           list(DISTINCT method_family ORDER BY method_family) AS method_families,
           list(DISTINCT comparator ORDER BY comparator) AS comparators,
           count(DISTINCT run_id) AS n_sources,
           min(hr) AS min_hr, max(hr) AS max_hr,
           count(*) FILTER (WHERE hr < 1) AS n_protective_direction,
           count(*) FILTER (WHERE hr > 1) AS n_harmful_direction,
           count(*) FILTER (WHERE hi < 1) AS n_significant_protective,
           count(*) FILTER (WHERE lo > 1) AS n_significant_harmful,
           CASE WHEN bool_and(hi < 1) THEN 'agree: protective, all significant'
                WHEN bool_and(lo > 1) THEN 'agree: harmful, all significant'
                WHEN bool_and(hr < 1) AND NOT bool_or(lo > 1) THEN 'agree: protective direction'
                WHEN bool_and(hr > 1) AND NOT bool_or(hi < 1) THEN 'agree: harmful direction'
                WHEN bool_or(hi < 1) AND bool_or(lo > 1) THEN 'conflict: significant both ways'
                ELSE 'mixed directions, none significant' END AS agreement,
           any_value(meta.meta_estimator) AS meta_estimator,
           any_value(meta.meta_k_sources) AS meta_k_sources,
           any_value(meta.meta_hr) AS meta_hr, any_value(meta.meta_ci_low) AS meta_ci_low,
           any_value(meta.meta_ci_high) AS meta_ci_high, any_value(meta.meta_i2) AS meta_i2,
           any_value(meta.meta_tau) AS meta_tau
    FROM est LEFT JOIN meta USING (study, treatment, outcome)
    GROUP BY est.study, est.treatment, est.outcome"""


def refresh_meta_analysis(con: duckdb.DuckDBPyConnection, study: str, run_id: str) -> None:
    """Rebuild the study's meta_analysis rows from the latest run of each of its sources."""
    frame = con.execute(f"""
        SELECT e.run_id, e.treatment, e.comparator, e.outcome, e.estimator,
               e.estimate, e.se, e.calibrated_estimate, e.calibrated_se
        FROM estimates e JOIN runs r USING (run_id)
        WHERE r.study = ? AND e.run_id IN ({_LATEST_RUNS}) AND e.role = 'outcome'
          AND e.status = 'ok' AND e.se > 0
    """, [study]).df()
    con.execute("DELETE FROM meta_analysis WHERE study = ?", [study])
    rows = [_pool(group, keys, study, run_id)
            for keys, group in frame.groupby(["treatment", "comparator", "outcome", "estimator"])
            if group["run_id"].nunique() >= 2]
    if rows:
        con.register("incoming_meta", pd.DataFrame(rows))
        con.execute("INSERT INTO meta_analysis BY NAME SELECT * FROM incoming_meta")
        con.unregister("incoming_meta")


def _pool(group: pd.DataFrame, keys: tuple, study: str, run_id: str) -> dict:
    calibrated = bool(group["calibrated_estimate"].notna().all())
    estimate = group["calibrated_estimate"] if calibrated else group["estimate"]
    se = group["calibrated_se"] if calibrated else group["se"]
    pooled = random_effects(np.log(estimate.to_numpy(float)), se.to_numpy(float))
    treatment, comparator, outcome, estimator = keys
    return {
        "run_id": run_id, "study": study, "treatment": treatment, "comparator": comparator,
        "outcome": outcome, "estimator": estimator, "k_sources": pooled.k,
        "source_run_ids": sorted(group["run_id"]), "calibrated": calibrated,
        "pooled_hr": float(np.exp(pooled.estimate)), "ci_low": float(np.exp(pooled.ci_low)),
        "ci_high": float(np.exp(pooled.ci_high)), "se": pooled.se, "p_value": pooled.p_value,
        "tau2": pooled.tau2, "tau": pooled.tau, "i2": pooled.i2, "q": pooled.q,
        "q_p": pooled.q_p,
    }
