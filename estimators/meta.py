"""Inverse-variance meta-analysis of log-scale estimates: fixed effect and DerSimonian-Laird.

Used to pool one treatment-outcome estimate across data sources or designs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from estimators.errors import EstimationError


@dataclass(frozen=True)
class MetaResult:
    """Pooled estimate (log scale for ratios), its CI and test, and heterogeneity statistics."""

    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    tau2: float
    tau: float
    i2: float
    q: float
    q_p: float
    k: int
    n_dropped: int = 0
    method: str = "dl"


def usable_studies(log_estimates: ArrayLike, ses: ArrayLike) -> tuple[NDArray, NDArray, int]:
    """Finite (estimate, SE) pairs with SE > 0; raise EstimationError when none remain."""
    y = np.asarray(log_estimates, dtype=float).ravel()
    s = np.asarray(ses, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} estimates but {s.size} standard errors")
    keep = np.isfinite(y) & np.isfinite(s) & (s > 0)
    n_dropped = int(keep.size - keep.sum())
    if not keep.any():
        raise EstimationError(
            f"no study with a finite estimate and a finite positive standard error "
            f"({n_dropped} dropped)"
        )
    return y[keep], s[keep], n_dropped


def heterogeneity(y: NDArray, v: NDArray) -> tuple[float, float, float, float]:
    """Cochran's Q, its p-value, I^2 and the DerSimonian-Laird tau^2 from fixed-effect weights."""
    k = y.size
    w = 1.0 / v
    fe = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fe) ** 2))
    df = k - 1
    if df == 0:
        return q, float("nan"), float("nan"), 0.0
    q_p = float(stats.chi2.sf(q, df))
    i2 = max(0.0, (q - df) / q) if q > 0 else 0.0
    c = float(np.sum(w) - np.sum(w * w) / np.sum(w))
    tau2 = max(0.0, (q - df) / c) if c > 0 else 0.0
    return q, q_p, i2, tau2


def _pool(y: NDArray, v: NDArray, level: float) -> tuple[float, float, float, float, float]:
    """Inverse-variance weighted mean of y with variances v: estimate, se, CI, two-sided p."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    w = 1.0 / v
    est = float(np.sum(w * y) / np.sum(w))
    se = float(1.0 / np.sqrt(np.sum(w)))
    zq = float(stats.norm.ppf(0.5 + level / 2.0))
    p = float(2.0 * stats.norm.sf(abs(est / se)))
    return est, se, est - zq * se, est + zq * se, p


def fixed_effect(log_estimates: ArrayLike, ses: ArrayLike, level: float = 0.95) -> MetaResult:
    """Fixed-effect (inverse-variance) pooled estimate; heterogeneity statistics for reference."""
    y, s, n_dropped = usable_studies(log_estimates, ses)
    v = s * s
    q, q_p, i2, tau2 = heterogeneity(y, v)
    est, se, lo, hi, p = _pool(y, v, level)
    return MetaResult(est, se, lo, hi, p, tau2, float(np.sqrt(tau2)), i2, q, q_p, int(y.size),
                      n_dropped, "fixed")


def random_effects(log_estimates: ArrayLike, ses: ArrayLike, level: float = 0.95) -> MetaResult:
    """DerSimonian-Laird random-effects pooled estimate with a normal (z) CI and p-value.

    Studies with a non-finite estimate or SE, or SE <= 0, are dropped (counted in n_dropped).
    With one study tau^2 is 0 and Q's p-value and I^2 are NaN.
    """
    y, s, n_dropped = usable_studies(log_estimates, ses)
    v = s * s
    q, q_p, i2, tau2 = heterogeneity(y, v)
    est, se, lo, hi, p = _pool(y, v + tau2, level)
    return MetaResult(est, se, lo, hi, p, tau2, float(np.sqrt(tau2)), i2, q, q_p, int(y.size),
                      n_dropped, "dl")
