"""Empirical calibration of a run's estimates, per comparison and estimator.

The negative controls of a comparison (true HR 1) give the empirical null: the systematic
error the design leaves. Synthetic positive controls (true HR > 1), when present, let the error
model vary with the true effect size. Every estimate of that comparison and estimator then gets
a calibrated p-value (against the null), a calibrated estimate and 95% CI (from the error
model), as OHDSI's EmpiricalCalibration does; the null's EASE feeds the diagnostic gates.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from estimators.calibration import (
    MIN_CONTROLS,
    calibrate_ci,
    calibrate_p,
    error_model_from_null,
    expected_absolute_systematic_error,
    fit_null,
    fit_systematic_error_model,
)

CALIBRATED = ["calibrated_estimate", "calibrated_ci_low", "calibrated_ci_high",
              "calibrated_p_value", "calibrated_se"]
NULL_COLUMNS = ["null_mean", "null_sd", "ease", "n_negative_controls", "n_positive_controls",
                "calibration_note"]


def calibrate_estimates(estimates: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return estimates with calibrated_* columns and one null per (comparison, estimator)."""
    estimates = estimates.copy()
    for column in CALIBRATED:
        estimates[column] = np.nan
    nulls = []
    if not len(estimates):
        return estimates, pd.DataFrame(columns=["comparison_id", "estimator", *NULL_COLUMNS])
    usable = (estimates["status"] == "ok") & np.isfinite(estimates["se"]) & (
        estimates["se"] > 0) & (estimates["estimate"] > 0)
    log_rr = np.log(estimates["estimate"].where(usable))
    true_effect = estimates.get("true_effect_size", pd.Series(np.nan, index=estimates.index))
    groups = estimates.groupby(["comparison_id", "estimator"]).groups
    for (comparison_id, estimator), rows in groups.items():
        rows = pd.Index(rows)
        ok = rows[usable[rows]]
        negative = ok[estimates.loc[ok, "role"] == "negative_control"]
        positive = ok[estimates.loc[ok, "role"] == "positive_control"]
        entry = {"comparison_id": comparison_id, "estimator": estimator,
                 "n_negative_controls": len(negative), "n_positive_controls": len(positive),
                 "null_mean": math.nan, "null_sd": math.nan, "ease": math.nan}
        if len(negative) < MIN_CONTROLS:
            entry["calibration_note"] = (
                f"not calibrated: {len(negative)} usable negative control(s), at least "
                f"{MIN_CONTROLS} needed")
            nulls.append(entry)
            continue
        null = fit_null(log_rr[negative], estimates.loc[negative, "se"])
        entry.update(null_mean=null.mean, null_sd=null.sd,
                     ease=expected_absolute_systematic_error(null))
        if len(positive) >= 1:
            controls = negative.append(positive)
            truth = np.where(estimates.loc[controls, "role"] == "negative_control", 0.0,
                             np.log(true_effect[controls].astype(float)))
            model = fit_systematic_error_model(log_rr[controls], estimates.loc[controls, "se"],
                                               truth)
            entry["calibration_note"] = (
                f"null from {len(negative)} negative controls; CI error model from them and "
                f"{len(positive)} positive controls")
        else:
            model = error_model_from_null(null)
            entry["calibration_note"] = (
                f"null from {len(negative)} negative controls; CI error model assumes the "
                "same systematic error at every effect size")
        se = estimates.loc[ok, "se"].to_numpy()
        calibrated = calibrate_ci(model, log_rr[ok].to_numpy(), se)
        estimates.loc[ok, "calibrated_estimate"] = np.exp(calibrated.log_rr)
        estimates.loc[ok, "calibrated_ci_low"] = np.exp(calibrated.ci_low)
        estimates.loc[ok, "calibrated_ci_high"] = np.exp(calibrated.ci_high)
        estimates.loc[ok, "calibrated_se"] = calibrated.se
        estimates.loc[ok, "calibrated_p_value"] = calibrate_p(null, log_rr[ok].to_numpy(), se)
        nulls.append(entry)
    return estimates, pd.DataFrame(nulls)
