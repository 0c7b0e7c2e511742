"""Kaplan-Meier curves (optionally weighted) with variances, and risks at a horizon.

Unweighted curves carry Greenwood's variance. Weighted curves carry the infinitesimal-jackknife
(influence-function) variance sum_i (w_i dS/dw_i)^2, which treats the weights as known: the
analogue of R's ``survfit(..., robust=TRUE)``; with unit weights it equals Greenwood exactly.
Per-person influence values at a horizon (`km_influence`) let estimators combine arms, cluster
on matched sets or add a propensity-score correction. Everything is vectorised: a curve
over 1M rows is one sort plus a few bincounts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from estimators.errors import EstimationError

VarianceMethod = Literal["greenwood", "influence", "none"]


@dataclass(frozen=True, eq=False)
class KMCurve:
    """A Kaplan-Meier step function: S(t) just after each distinct event time, with Var S(t)."""

    time: np.ndarray
    """Distinct event times (positive event weight), ascending."""
    at_risk: np.ndarray
    """(Weighted) number at risk at each event time (time >= t)."""
    events: np.ndarray
    """(Weighted) number of events at each event time."""
    survival: np.ndarray
    variance: np.ndarray
    variance_method: VarianceMethod
    last_time: float
    """Largest observed time (event or censoring) among persons with positive weight."""
    n: int
    """Persons with positive weight."""



def _arrays(time, event, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Checked float time, 0/1 event and optional non-negative weights (zero weights dropped)."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event)
    if t.ndim != 1 or e.shape != t.shape:
        raise EstimationError("time and event must be vectors of the same length")
    if t.size == 0:
        raise EstimationError("no persons to estimate a survival curve from")
    if not np.isfinite(t).all() or (t < 0).any():
        raise EstimationError("time must be finite and non-negative")
    if not ((e == 0) | (e == 1)).all():
        raise EstimationError("event must be binary (1 = event, 0 = censored)")
    e = e.astype(bool)
    if weights is None:
        return t, e, None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != t.shape or not np.isfinite(w).all() or (w < 0).any():
        raise EstimationError("weights must be finite, non-negative and one per person")
    keep = w > 0
    if not keep.any():
        raise EstimationError("all weights are zero: no persons")
    return t[keep], e[keep], w[keep]


def weighted_km(time, event, weights=None, *, variance: bool = True) -> KMCurve:
    """Kaplan-Meier curve; with weights, counts are weighted and the variance is robust.

    Without weights the variance is Greenwood's: S^2 sum d / (R (R - d)). With
    variance=False the variance is left NaN (method "none"): curves drawn, not tested.
    """
    t, e, w = _arrays(time, event, weights)
    ones = np.ones_like(t) if w is None else w
    uniq, code = np.unique(t, return_inverse=True)
    leave = np.bincount(code, ones, minlength=uniq.size)
    dead = np.bincount(code, np.where(e, ones, 0.0), minlength=uniq.size)
    risk = np.cumsum(leave[::-1])[::-1]
    at = dead > 0
    times, R, d = uniq[at], risk[at], dead[at]
    h = d / R
    surv = np.cumprod(1.0 - h)
    surv[surv < 1e-15] = 0.0
    left = R - d
    if not variance:
        var = np.full(surv.shape, np.nan)
        method: VarianceMethod = "none"
    elif w is None:
        terms = np.divide(d, R * left, out=np.zeros_like(d), where=left > 0)
        var = surv**2 * np.cumsum(terms)
        method = "greenwood"
    else:
        var = _influence_variance(t, e, w, times, R, d, surv)
        method = "influence"
    return KMCurve(
        time=times, at_risk=R, events=d, survival=surv, variance=var, variance_method=method,
        last_time=float(t.max()), n=int(t.size),
    )


def _q(R: np.ndarray, d: np.ndarray) -> np.ndarray:
    """1 / (R - d) per event time, 0 where everyone at risk has the event (S drops to 0)."""
    left = R - d
    return np.divide(1.0, left, out=np.zeros_like(left), where=left > 0)


def _influence_variance(
    t: np.ndarray, e: np.ndarray, w: np.ndarray, times: np.ndarray, R: np.ndarray,
    d: np.ndarray, surv: np.ndarray,
) -> np.ndarray:
    """Var S(t_j) = S_j^2 sum_i w_i^2 a_ij^2 for every event time j at once, via cumulative sums.

    a_ij = delta_i 1(T_i <= t_j) q(T_i) - C(min(T_i, t_j)), q = 1/(R - d), C = cumsum(h q).
    """
    J = times.size
    if J == 0:
        return np.zeros(0)
    q = _q(R, d)
    C = np.cumsum(d / R * q)
    pos = np.searchsorted(times, t, side="left")  # event times < T_i; T_i <= t_j <=> pos <= j
    last = np.searchsorted(times, t, side="right") - 1  # last event time <= T_i
    c_own = np.where(last >= 0, C[np.maximum(last, 0)], 0.0)
    q_own = np.where(e, q[np.minimum(pos, J - 1)], 0.0)
    w2 = w * w
    a_done = q_own - c_own  # the value once t_j >= T_i
    done = np.cumsum(np.bincount(pos, w2 * a_done**2, minlength=J + 1))[:J]
    w2_done = np.cumsum(np.bincount(pos, w2, minlength=J + 1))[:J]
    still = (w2.sum() - w2_done) * C**2
    return surv**2 * (done + still)


def _index_at(curve: KMCurve, horizon: float) -> int:
    """Index of the last event time <= horizon (-1 if none); raise when S(horizon) is unknown."""
    if not np.isfinite(horizon) or horizon < 0:
        raise EstimationError(f"horizon must be a non-negative number, got {horizon!r}")
    j = int(np.searchsorted(curve.time, horizon, side="right")) - 1
    s = curve.survival[j] if j >= 0 else 1.0
    if horizon > curve.last_time and s > 0:
        raise EstimationError(
            f"follow-up ends at {curve.last_time:g}, before the horizon {horizon:g}: "
            "the risk at the horizon is not identified"
        )
    return j


def survival_at(curve: KMCurve, horizon: float) -> tuple[float, float]:
    """S(horizon) (events at the horizon count) and its variance."""
    j = _index_at(curve, horizon)
    if j < 0:
        return 1.0, 0.0
    return float(curve.survival[j]), float(curve.variance[j])


def risk_at(curve: KMCurve, horizon: float) -> tuple[float, float]:
    """Cumulative risk 1 - S(horizon) and its variance."""
    s, v = survival_at(curve, horizon)
    return 1.0 - s, v


def km_influence(curve: KMCurve, time, event, weights, horizon: float) -> np.ndarray:
    """Per-person influence w_i d(risk at horizon)/dw_i of the curve fitted on these rows.

    Its sum of squares is the robust variance of the risk; rows with zero weight get 0. Pass the
    same rows and weights the curve was fitted on (weights None = unit weights).
    """
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    w = np.ones_like(t) if weights is None else np.asarray(weights, dtype=np.float64)
    j = _index_at(curve, horizon)
    if j < 0 or curve.survival[j] == 0.0:
        return np.zeros_like(t)
    times = curve.time[: j + 1]
    R, d = curve.at_risk[: j + 1], curve.events[: j + 1]
    q = _q(R, d)
    C = np.cumsum(d / R * q)
    pos = np.searchsorted(times, t, side="left")
    last = np.minimum(np.searchsorted(times, t, side="right") - 1, j)
    own = e & (pos <= j)
    a = np.where(own, q[np.minimum(pos, j)], 0.0) - np.where(last >= 0, C[np.maximum(last, 0)], 0.0)
    return curve.survival[j] * w * a
