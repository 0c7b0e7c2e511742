"""Candidate rows of a screen: each candidate's battery of trials rolled up per outcome,
comparator strategy and estimator, and IBM's rule for calling a candidate identified.

Zang et al. (2023): a trial counts when it is balanced (here: its diagnostics row passed every
gate of the run, e.g. Thresholds(max_share_imbalanced=0.02)); a candidate is reported only when
at least min_balanced_rate of its trials are balanced, with an effect pooled over the balanced
trials (estimators.pooling: honest although the trials share the treated arm). Ozery-Flato et
al. (2020): a candidate is identified only if beneficial at the FDR under every comparator
strategy. Rows carry trial counts, never person counts.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from estimators.errors import EstimationError
from estimators.pooling import pool_trials
from estimators.sensitivity import benjamini_hochberg

CANDIDATE_KEYS = ["treatment", "outcome", "role", "strategy", "estimator"]
FAMILY_KEYS = ["outcome", "strategy", "estimator"]
"""q-values and ranks are computed across candidates within one of these."""
SIGNIFICANCE = 0.05
"""A balanced trial counts as protective or harmful when its p-value is below this."""
POOLED = ["estimate", "ci_low", "ci_high", "se", "p_value"]


def candidate_evidence(estimates: pd.DataFrame, diagnostics: pd.DataFrame, *,
                       min_balanced_rate: float = 0.1, fdr: float = 0.05) -> pd.DataFrame:
    """One row per treatment x outcome x role x strategy x estimator (columns: see _candidate),
    with q_value, significant (q < fdr) and rank among the reported outcome rows."""
    trials = _trials(estimates, diagnostics)
    rows = [{**dict(zip(CANDIDATE_KEYS, key, strict=True)),
             **_candidate(group, min_balanced_rate)}
            for key, group in trials.groupby(CANDIDATE_KEYS, sort=True, dropna=False)]
    columns = [*CANDIDATE_KEYS, "trials_run", "trials_estimable", "trials_balanced",
               "balanced_rate", *POOLED, "calibrated", "share_protective", "share_harmful",
               "reported", "reason"]
    return _rank(pd.DataFrame(rows, columns=columns), fdr)


def _trials(estimates: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Hazard-ratio estimate rows with `balanced`: estimated and its diagnostics row passed."""
    keys = ["comparison_id", "outcome", "estimator"]
    missing = sorted({*keys, *CANDIDATE_KEYS, "status", "estimate", "se", "p_value"}
                     - set(estimates)) + sorted({*keys, "passed"} - set(diagnostics))
    if missing:
        raise ValueError(f"trial rows lack column(s) {', '.join(missing)}")
    if "run_id" in estimates and "run_id" in diagnostics:
        keys.insert(0, "run_id")
    if "measure" in estimates:
        estimates = estimates[estimates["measure"].fillna("hr") == "hr"]
    passed = diagnostics[[*keys, "passed"]].drop_duplicates(keys)
    trials = estimates.merge(passed, on=keys, how="left")
    trials["estimable"] = trials["status"] == "ok"
    trials["balanced"] = trials["estimable"] & trials["passed"].eq(True).fillna(False).astype(bool)
    return trials


def _candidate(trials: pd.DataFrame, min_balanced_rate: float) -> dict:
    """Counts, balanced rate, the effect pooled over balanced trials and why it is not reported.

    The pool uses calibrated log HRs and SEs when every balanced trial has them (calibrated
    True), else the raw ones for all: one pool never mixes the two scales of error.
    """
    run, estimable = len(trials), int(trials["estimable"].sum())
    balanced = trials[trials["balanced"]]
    hr, se, p, calibrated = _trial_values(balanced)
    row = {"trials_run": run, "trials_estimable": estimable, "trials_balanced": len(balanced),
           "balanced_rate": len(balanced) / run if run else math.nan,
           **dict.fromkeys(POOLED, math.nan), "calibrated": calibrated,
           "share_protective": _share(p, hr < 1), "share_harmful": _share(p, hr > 1)}
    if len(balanced):
        try:
            pooled = pool_trials(np.log(hr), se)
            row.update(estimate=pooled.estimate, ci_low=pooled.ci_low, ci_high=pooled.ci_high,
                       se=pooled.se, p_value=pooled.p_value)
        except EstimationError:
            pass
    row["reason"] = _reason(row, min_balanced_rate)
    row["reported"] = row["reason"] is None
    return row


def _trial_values(balanced: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """HR, log-scale SE and p-value of each balanced trial: calibrated when all have them."""
    columns = ["calibrated_estimate", "calibrated_se", "calibrated_p_value"]
    calibrated = (len(balanced) > 0 and set(columns) <= set(balanced)
                  and bool(balanced[columns].notna().all(axis=None)))
    prefix = "calibrated_" if calibrated else ""
    columns = [f"{prefix}estimate", f"{prefix}se", f"{prefix}p_value"]
    hr, se, p = (balanced[c].to_numpy(dtype=float) for c in columns)
    return hr, se, p, calibrated


def _share(p: np.ndarray, direction: np.ndarray) -> float:
    """Share of the balanced trials significant at SIGNIFICANCE in one direction."""
    return float(np.mean((p < SIGNIFICANCE) & direction)) if p.size else math.nan


def _reason(row: dict, min_balanced_rate: float) -> str | None:
    """Why a candidate row has no reported effect, in words (trial counts only); None if it has."""
    if row["trials_estimable"] == 0:
        return "no trial estimable"
    if row["trials_balanced"] == 0:
        return "no balanced trial"
    if row["balanced_rate"] < min_balanced_rate:
        return (f"{row['trials_balanced']} of {row['trials_run']} trials balanced "
                f"({row['balanced_rate']:.0%}) < {min_balanced_rate:.0%}")
    if math.isnan(row["estimate"]):
        return "no balanced trial with a usable estimate"
    return None


def _rank(frame: pd.DataFrame, fdr: float) -> pd.DataFrame:
    """BH q-values and ranks across the reported candidates of each outcome, strategy and
    estimator (role 'outcome' only): smallest pooled p-value first, ties by the larger effect."""
    frame["q_value"] = np.nan
    frame["rank"] = pd.array([pd.NA] * len(frame), dtype="Int64")
    ranked = frame[(frame["role"] == "outcome") & frame["reported"]]
    for _, rows in ranked.groupby(FAMILY_KEYS, dropna=False).groups.items():
        frame.loc[rows, "q_value"] = benjamini_hochberg(frame.loc[rows, "p_value"])
        order = (frame.loc[rows]
                 .assign(strength=-np.abs(np.log(frame.loc[rows, "estimate"])))
                 .sort_values(["p_value", "strength"], kind="stable").index)
        frame.loc[order, "rank"] = np.arange(1, len(order) + 1)
    frame["significant"] = frame["q_value"] < fdr
    return frame


def identified(candidate_rows: pd.DataFrame, *, fdr: float = 0.05) -> pd.DataFrame:
    """Per treatment x outcome x estimator: identified when beneficial (pooled HR < 1, q < fdr,
    reported) under every comparator strategy present (Ozery-Flato et al. 2020)."""
    rows = candidate_rows[candidate_rows["role"] == "outcome"].assign(
        beneficial=lambda f: f["reported"] & (f["estimate"] < 1) & (f["q_value"] < fdr))
    keys = ["treatment", "outcome", "estimator"]
    out = rows.groupby(keys, sort=True).agg(
        strategies=("strategy", lambda s: ", ".join(sorted(s.astype(str).unique()))),
        n_strategies=("strategy", "nunique"),
        n_beneficial=("beneficial", "sum"),
    ).reset_index()
    out["identified"] = out["n_beneficial"] == out["n_strategies"]
    return out
