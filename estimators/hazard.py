"""Hazard-ratio estimators for a binary treatment: crude, IPTW, overlap-weighted, PS-stratified
and PS-matched Cox models.

Each takes per-person arrays and returns an EffectEstimate on the hazard-ratio scale, with the
standard error on the log scale. The propensity score (and the matched sets built on it) is
fitted once elsewhere and passed in, so one fit serves every outcome of a comparison.
"""

from __future__ import annotations

import numpy as np

from estimators.cox import fit_cox
from estimators.effect import EffectEstimate
from estimators.propensity import iptw_weights

MAX_IPTW_WEIGHT = 10.0  # CohortMethod's default truncation of stabilised weights


def _counts(treated: np.ndarray) -> dict[str, int]:
    n_treated = int(treated.sum())
    return {"n_treated": n_treated, "n_control": int(treated.shape[0] - n_treated)}


def crude_hr(time: np.ndarray, event: np.ndarray, treated: np.ndarray) -> EffectEstimate:
    """Unadjusted Cox hazard ratio with model-based standard error."""
    fit = fit_cox(time, event, treated)
    return fit.effect(estimand="unadjusted", **_counts(treated))


def iptw_hr(
    time: np.ndarray, event: np.ndarray, treated: np.ndarray, weights: np.ndarray
) -> EffectEstimate:
    """Cox hazard ratio weighted by (stabilised) inverse probability of treatment weights.

    Variance: robust sandwich (Lin-Wei), which treats the weights as known and is conservative
    for an estimated propensity score.
    """
    fit = fit_cox(time, event, treated, weights=weights, robust=True)
    return fit.effect(estimand="ATE", **_counts(treated))


def overlap_hr(
    time: np.ndarray, event: np.ndarray, treated: np.ndarray, weights: np.ndarray
) -> EffectEstimate:
    """Cox hazard ratio weighted by overlap weights (treated 1 - ps, comparators ps): the ATO.

    Overlap weights are bounded by 1, so no truncation is needed, and they down-weight the
    persons with extreme scores that destabilise IPTW. Variance: robust (Lin-Wei) sandwich with
    the weights treated as known, as for IPTW.
    """
    fit = fit_cox(time, event, treated, weights=weights, robust=True)
    return fit.effect(estimand="ATO", **_counts(treated))


def matched_hr(
    time: np.ndarray, event: np.ndarray, treated: np.ndarray, matched_set: np.ndarray
) -> EffectEstimate:
    """Cox hazard ratio stratified on matched sets, model-based SE (CohortMethod's outcome model
    for matched data, ``stratified = TRUE``): the ATT among the matched treated persons.

    Pass only matched persons; `matched_set` labels each one's set. A set lacking one arm adds
    nothing to the partial likelihood.
    """
    fit = fit_cox(time, event, treated, strata=matched_set)
    return fit.effect(estimand="ATT (matched)", **_counts(treated))


def stratified_hr(
    time: np.ndarray, event: np.ndarray, treated: np.ndarray, strata: np.ndarray
) -> EffectEstimate:
    """Cox hazard ratio stratified on propensity-score strata (one baseline hazard each)."""
    fit = fit_cox(time, event, treated, strata=strata)
    return fit.effect(estimand="ATE (PS strata)", **_counts(treated))


def overlap_weights(ps: np.ndarray, treated: np.ndarray) -> np.ndarray:
    """Overlap (ATO) weights: 1 - ps for the treated, ps for comparators (Li, Morgan & Zaslavsky
    2018). With a logistic PS fitted by maximum likelihood they balance every model covariate's
    mean exactly."""
    return iptw_weights(ps, treated, estimand="ATO", stabilized=False)


def truncated_iptw_weights(ps: np.ndarray, treated: np.ndarray) -> np.ndarray:
    """Stabilised ATE weights truncated at MAX_IPTW_WEIGHT, as CohortMethod does."""
    return np.minimum(iptw_weights(ps, treated, estimand="ATE", stabilized=True),
                      MAX_IPTW_WEIGHT)
