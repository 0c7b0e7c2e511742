"""Covariate balance: per-column standardised mean differences between the arms.

Follows OHDSI CohortMethod's computeCovariateBalance (R/Balance.R): SMD = (mean_t - mean_c) /
sqrt((sd_t^2 + sd_c^2) / 2). Unadjusted SDs are population SDs (divide by n); with weights,
means and SDs are weighted within each arm and the SD is the reliability-weighted one,
var = (sum w x^2 - mean^2) / (1 - sum w^2) with w normalised to sum to 1 in the arm. After
adjustment CohortMethod uses these adjusted (weighted) SDs, not the SDs before adjustment, and
so do we: the denominator describes the population the comparison is actually made in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from estimators.errors import EstimationError
from estimators.propensity import as_covariates, as_treated

_REL_TOL = 1e-10
"""Variances and mean differences this small relative to the data's scale count as zero."""


@dataclass(frozen=True, eq=False)
class Balance:
    """Per-column (weighted) means and SDs of each arm, and their standardised difference."""

    mean_treated: np.ndarray
    mean_comparator: np.ndarray
    sd_treated: np.ndarray
    sd_comparator: np.ndarray
    smd: np.ndarray
    """(mean_t - mean_c) / pooled SD; 0 for a constant column; +-inf when the pooled SD is 0 but
    the means differ (each arm constant at a different value)."""


def covariate_balance(X, treated: np.ndarray, weights: np.ndarray | None = None) -> Balance:
    """Standardised mean differences of every column of X between the arms (CohortMethod's SMD).

    Sparse X stays sparse: sums come from X.T @ W products. Weights are applied within each arm.
    """
    X = as_covariates(X)
    t = as_treated(treated, X.shape[0])

    if weights is None:
        w = np.ones(t.shape[0])
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != t.shape:
            raise EstimationError(
                f"weights have shape {w.shape} but there are {t.shape[0]} persons"
            )
        if not np.isfinite(w).all() or (w < 0).any():
            raise EstimationError("weights must be finite and non-negative")

    # One column of normalised weights per arm (comparator, treated): each column sums to 1.
    W = np.zeros((t.shape[0], 2))
    for arm, name in ((0, "comparator"), (1, "treated")):
        in_arm = t == arm
        total = w[in_arm].sum()
        if total <= 0:
            raise EstimationError(f"the {name} arm is empty (or has zero total weight)")
        W[in_arm, arm] = w[in_arm] / total
    sum_w2 = (W * W).sum(axis=0)

    if sp.issparse(X):
        binary = bool(np.all((X.data == 0) | (X.data == 1)))
        X2 = X if binary else X.multiply(X).tocsr()
        m = np.asarray(X.T @ W)
        m2 = np.asarray(X2.T @ W)
    else:
        m = X.T @ W
        m2 = (X * X).T @ W
    raw_var = m2 - m * m
    if weights is None:
        var = raw_var  # population variance, as CohortMethod's unweighted branch
    else:
        denom = 1.0 - sum_w2
        var = np.divide(raw_var, denom, out=np.zeros_like(raw_var), where=denom > 0)
    # Cancellation in m2 - m^2 can leave tiny (even negative) values for constant columns.
    var = np.where(var > _REL_TOL * np.maximum(m2, _REL_TOL), var, 0.0)
    sd = np.sqrt(var)

    diff = m[:, 1] - m[:, 0]
    pooled = np.sqrt((var[:, 0] + var[:, 1]) / 2.0)
    scale = np.maximum(np.abs(m).max(axis=1), 1.0)
    same = np.abs(diff) <= _REL_TOL * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        smd = np.where(pooled > 0, diff / pooled, np.where(same, 0.0, np.sign(diff) * np.inf))
    return Balance(
        mean_treated=m[:, 1], mean_comparator=m[:, 0],
        sd_treated=sd[:, 1], sd_comparator=sd[:, 0], smd=smd,
    )


def max_abs_smd(balance: Balance) -> float:
    """Largest |SMD| over columns; inf when a column is constant at different values in the two
    arms (it separates them outright, the worst imbalance there is). NaN if there are no columns.
    """
    a = np.abs(balance.smd)
    a = a[~np.isnan(a)]
    return float(a.max()) if a.size else math.nan


IMBALANCE_SMD = 0.1
"""|SMD| above this marks a covariate imbalanced (Austin 2009; Zang et al. 2023 count them)."""


def count_imbalanced(balance: Balance, threshold: float = IMBALANCE_SMD) -> int:
    """Covariates with |SMD| > threshold (an infinite SMD counts: it separates the arms)."""
    return int(np.count_nonzero(np.abs(balance.smd) > threshold))


def share_imbalanced(balance: Balance, threshold: float = IMBALANCE_SMD) -> float:
    """Share of covariates with |SMD| > threshold (Zang's trial gate: <= 2%); NaN without any."""
    n = balance.smd.shape[0]
    return count_imbalanced(balance, threshold) / n if n else math.nan
