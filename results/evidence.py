"""A run's evidence, assembled at the end of the run: calibrate, judge the gates, rank."""

from __future__ import annotations

import numpy as np
import pandas as pd

from results.calibration import calibrate_estimates
from results.candidates import candidate_evidence, identified
from results.gates import Thresholds, evaluate_gates
from results.ranking import rank_estimates


def assemble_evidence(estimates: pd.DataFrame, diagnostics: pd.DataFrame,
                      thresholds: Thresholds) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Calibrated estimates with E-values, q-values and ranks; diagnostics with every gate."""
    if not len(estimates):
        return estimates, diagnostics
    effect_columns = ["estimand", "estimate", "ci_low", "ci_high", "se", "p_value"]
    estimates = estimates.reindex(  # a run whose every estimate failed has none of them
        columns=[*estimates.columns, *(c for c in effect_columns if c not in estimates)])
    estimates, nulls = calibrate_estimates(estimates)
    diagnostics = evaluate_gates(
        diagnostics.merge(nulls, on=["comparison_id", "estimator"], how="left"),
        estimates, thresholds)
    return rank_estimates(estimates, diagnostics), diagnostics


def screen_evidence(estimates: pd.DataFrame, diagnostics: pd.DataFrame,
                    min_balanced_rate: float) -> pd.DataFrame:
    """A screen's candidate rows: each candidate's trials pooled per outcome, comparator
    strategy and estimator, ranked, with IBM's "identified" (beneficial under every strategy)."""
    rows = candidate_evidence(estimates, diagnostics, min_balanced_rate=min_balanced_rate)
    if not len(rows):
        return rows
    keys = ["treatment", "outcome", "estimator"]
    verdict = identified(rows)[[*keys, "identified"]]
    return rows.drop(columns=["identified"], errors="ignore").merge(verdict, on=keys,
                                                                    how="left")


def with_cohort_notes(diagnostics: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """Diagnostics whose comparison lost most of an arm to a design rule say so in `reasons`."""
    if not len(diagnostics) or "cohort_note" not in comparisons:
        return diagnostics
    notes = diagnostics["comparison_id"].map(comparisons["cohort_note"])
    reasons = diagnostics["reasons"].fillna("").astype(str) if "reasons" in diagnostics else ""
    joined = np.where(reasons == "", "cohort: " + notes.astype(str),
                      reasons + "; cohort: " + notes.astype(str))
    return diagnostics.assign(reasons=np.where(notes.notna(), joined, diagnostics.get("reasons")))
