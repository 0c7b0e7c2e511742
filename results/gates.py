"""Diagnostic gates: an estimate is trusted only if its comparison passes every gate.

Each gate keeps its measured value, its threshold and pass/fail; `passed` is the conjunction
and `reasons` says in words why an estimate failed. A gate that cannot be assessed (no
propensity model for a crude estimate, no negative controls for EASE) is left NULL and does
not fail the estimate; the reason list says it was not assessed only where that matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Thresholds:
    """Gate thresholds (the study file's `diagnostics`); OHDSI-style defaults."""

    max_smd: float = 0.1
    min_equipoise: float = 0.2
    max_mdrr: float = 10.0
    max_ease: float = 0.25
    max_share_imbalanced: float | None = None
    """Largest share of covariates with |SMD| > 0.1 after adjustment (Zang et al. 2023: 0.02);
    None leaves the gate off."""


def evaluate_gates(diagnostics: pd.DataFrame, estimates: pd.DataFrame,
                   thresholds: Thresholds) -> pd.DataFrame:
    """Add threshold, pass/fail, `passed` and `reasons` columns to the diagnostics rows.

    `estimates` supplies each row's status and message (joined on comparison, outcome and
    estimator); a failed estimate fails its diagnostics row with the estimator's message.
    """
    keys = ["comparison_id", "outcome", "estimator"]
    status = estimates[[*keys, "status", "message"]].drop_duplicates(keys)
    frame = diagnostics.merge(status, on=keys, how="left")
    frame["max_smd_threshold"] = thresholds.max_smd
    frame["min_equipoise_threshold"] = thresholds.min_equipoise
    frame["max_mdrr_threshold"] = thresholds.max_mdrr
    frame["max_ease_threshold"] = thresholds.max_ease
    frame["smd_pass"] = _nullable(frame["max_abs_smd_after"], frame["max_abs_smd_after"]
                                  <= thresholds.max_smd)
    frame["equipoise_pass"] = _nullable(frame["equipoise"], frame["equipoise"]
                                        >= thresholds.min_equipoise)
    frame["mdrr_pass"] = frame["mdrr"] <= thresholds.max_mdrr
    ease = frame["ease"] if "ease" in frame else pd.Series(np.nan, index=frame.index)
    frame["ease_pass"] = _nullable(ease, ease <= thresholds.max_ease)
    share, share_limit = _share_gate(frame, thresholds.max_share_imbalanced)
    failed = frame["status"].fillna("failed") != "ok"
    reasons = pd.DataFrame({
        "estimate": np.where(failed, "not estimable: " + frame["message"].fillna("no estimate"),
                             None),
        "smd": np.where(
            ~failed & _fails(frame["smd_pass"]),
            "covariate imbalance: max |SMD| " + frame["max_abs_smd_after"].map("{:.3f}".format)
            + f" > {thresholds.max_smd:g}", None),
        "equipoise": np.where(
            _fails(frame["equipoise_pass"]),
            "low equipoise: " + frame["equipoise"].map("{:.2f}".format)
            + f" < {thresholds.min_equipoise:g} of persons with preference score in [0.3, 0.7]",
            None),
        "mdrr": np.where(
            ~frame["mdrr_pass"],
            "underpowered: MDRR " + frame["mdrr"].map("{:.2f}".format)
            + f" > {thresholds.max_mdrr:g}", None),
        "ease": np.where(
            _fails(frame["ease_pass"]),
            "systematic error: EASE " + ease.map("{:.3f}".format)
            + f" > {thresholds.max_ease:g}", None),
        "share": np.where(
            ~failed & _fails(frame["share_pass"]),
            "covariate imbalance: " + share.map("{:.1%}".format)
            + f" of covariates with |SMD| > 0.1, more than {share_limit:.1%}", None),
    })
    frame["reasons"] = reasons.apply(lambda r: "; ".join(x for x in r if x) or None, axis=1)
    frame["passed"] = frame["reasons"].isna()
    return frame.drop(columns=["status", "message"])


def _share_gate(frame: pd.DataFrame, limit: float | None) -> tuple[pd.Series, float]:
    """Add the share-imbalanced threshold and gate (NULL when off or not measured)."""
    unmeasured = pd.Series(np.nan, index=frame.index)
    share = frame.get("share_imbalanced", unmeasured)
    frame["max_share_imbalanced_threshold"] = math.nan if limit is None else limit
    if limit is None:
        frame["share_pass"] = _nullable(unmeasured, unmeasured > 0)
        return share, math.nan
    frame["share_pass"] = _nullable(share, share <= limit)
    return share, float(limit)


def _nullable(value: pd.Series, test: pd.Series) -> pd.Series:
    """A boolean gate that is NULL where its value could not be measured."""
    return test.astype("boolean").where(value.notna(), pd.NA)


def _fails(gate: pd.Series) -> np.ndarray:
    """True where a gate was assessed and failed (NULL = not assessed)."""
    return gate.eq(False).fillna(False).to_numpy(dtype=bool)
