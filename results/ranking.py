"""What a ranking needs, computed once per run: E-values, q-values and the evidence order.

Only outcomes of interest whose diagnostics pass are ranked. Within a run, outcome and
estimator, candidates get Benjamini-Hochberg q-values across treatments (from calibrated
p-values where calibration was possible) and are ordered by the CI bound nearest the null:
the most conservative reading of each candidate's effect.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from estimators.sensitivity import benjamini_hochberg, e_value_hr

RARE_OUTCOME = 0.15  # VanderWeele: an HR approximates an RR when the outcome stays below 15%


def best_available(estimates: pd.DataFrame) -> pd.DataFrame:
    """Estimate, CI and p-value to rank on: calibrated where available, else as estimated."""
    calibrated = estimates["calibrated_estimate"].notna()
    return pd.DataFrame({
        "hr": estimates["calibrated_estimate"].where(calibrated, estimates["estimate"]),
        "ci_low": estimates["calibrated_ci_low"].where(calibrated, estimates["ci_low"]),
        "ci_high": estimates["calibrated_ci_high"].where(calibrated, estimates["ci_high"]),
        "p": estimates["calibrated_p_value"].where(calibrated, estimates["p_value"]),
        "calibrated": calibrated,
    }, index=estimates.index)


def rank_estimates(estimates: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Add e_value, e_value_ci, q_value and rank columns (NULL where not ranked)."""
    keys = ["comparison_id", "outcome", "estimator"]
    passed = diagnostics.set_index(keys)["passed"]
    estimates = estimates.copy()
    in_ranking = (
        (estimates["role"] == "outcome") & (estimates["status"] == "ok")
        & estimates.set_index(keys).index.map(passed).fillna(False).to_numpy(dtype=bool)
    )
    best = best_available(estimates)
    events = estimates["events_treated"] + estimates["events_comparator"]
    persons = estimates["n_treated"] + estimates["n_comparator"]
    rare = (events / persons.where(persons > 0)) < RARE_OUTCOME
    values = [
        e_value_hr(h, lo, hi, rare=bool(r)) if ok else (math.nan, math.nan)
        for h, lo, hi, r, ok in zip(best["hr"], best["ci_low"], best["ci_high"], rare,
                                    estimates["status"] == "ok", strict=True)
    ]
    estimates["e_value"] = [v[0] for v in values]
    estimates["e_value_ci"] = [v[1] for v in values]
    nearest = np.where(best["hr"] < 1, best["ci_high"], best["ci_low"])
    excludes_null = (best["ci_high"] < 1) | (best["ci_low"] > 1)
    estimates["evidence"] = np.where(excludes_null, np.abs(np.log(nearest)), 0.0)
    estimates["q_value"] = np.nan
    estimates["rank"] = pd.array([pd.NA] * len(estimates), dtype="Int64")
    ranked = estimates[in_ranking]
    for _, rows in ranked.groupby(["outcome", "estimator"]).groups.items():
        estimates.loc[rows, "q_value"] = benjamini_hochberg(best.loc[rows, "p"])
        order = (estimates.loc[rows]
                 .assign(strength=np.abs(np.log(best.loc[rows, "hr"])))
                 .sort_values(["evidence", "strength"], ascending=False).index)
        estimates.loc[order, "rank"] = np.arange(1, len(order) + 1)
    return estimates.drop(columns=["evidence"])
