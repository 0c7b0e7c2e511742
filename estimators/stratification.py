"""Propensity-score stratification: quantile strata over all persons (CohortMethod stratifyByPs).

Differences (and horizon risk differences): stratum-specific contrasts averaged with stratum-size
weights w_s = n_s / n (ATE), variance sum w_s^2 var_s, where var_s uses unpooled arm variances
(ddof=1; an arm of one person borrows its arm's variance over all usable strata) or, at a
horizon, Greenwood variances of each arm's Kaplan-Meier risk. Risk ratios: ratio of the
standardised risks sum w_s r_as, delta-method variance. Hazard ratios: Cox stratified on the PS
strata (model-based SE). Strata lacking an arm are dropped (and their persons uncounted).
The PS is treated as known.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from estimators.base import CausalEstimator, FitData, propensity_scores
from estimators.cox import fit_cox
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.propensity import ps_strata
from estimators.survival import risk_at, weighted_km
from estimators.weighting import Contrast, check_measure, make_effect


def stratum_arm_moments(
    y: np.ndarray, t: np.ndarray, strata: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per (stratum, arm): count, mean and variance of the mean (columns: comparator, treated).

    Also returns a mask of strata holding both arms. Variances use ddof=1.
    """
    k = int(strata.max()) + 1
    cell = strata * 2 + t
    n = np.bincount(cell, minlength=2 * k).reshape(k, 2).astype(np.float64)
    s1 = np.bincount(cell, y, minlength=2 * k).reshape(k, 2)
    both = (n > 0).all(axis=1)
    mean = np.divide(s1, n, out=np.zeros_like(s1), where=n > 0)
    dev = y - mean.ravel()[cell]
    ss = np.bincount(cell, dev * dev, minlength=2 * k).reshape(k, 2)
    var = np.divide(ss, n - 1, out=np.full_like(ss, np.nan), where=n > 1)
    for arm in (0, 1):  # single-person cells borrow their arm's variance over usable strata
        lone = both & (n[:, arm] == 1)
        if lone.any():
            ya = y[(t == arm) & both[strata]]
            var[lone, arm] = ya.var(ddof=1) if ya.size > 1 else 0.0
    var_mean = np.divide(var, n, out=np.zeros_like(var), where=n > 0)
    return n, mean, var_mean, both


def combine(
    n_s: np.ndarray, est1: np.ndarray, est0: np.ndarray, var1: np.ndarray, var0: np.ndarray,
    measure: Contrast,
) -> tuple[float, float]:
    """Stratum-size-weighted difference (or log ratio of standardised risks) and its SE."""
    w = n_s / n_s.sum()
    if measure == "difference":
        return float(w @ (est1 - est0)), math.sqrt(float(w**2 @ (var1 + var0)))
    r1, r0 = float(w @ est1), float(w @ est0)
    if r1 <= 0 or r0 <= 0:
        arm = "treated" if r1 <= 0 else "comparator"
        raise EstimationError(f"no outcomes among the {arm}: the risk ratio is not estimable")
    v = float(w**2 @ var1) / r1**2 + float(w**2 @ var0) / r0**2
    return math.log(r1 / r0), math.sqrt(v)


class PSStratification(CausalEstimator):
    """Stratification on propensity-score quantiles (see the module notes); estimand ATE."""

    def __init__(
        self, propensity_model: Any = None, n_strata: int = 5, horizon: float | None = None,
        seed: int = 0, measure: Contrast = "difference",
    ) -> None:
        self.propensity_model = propensity_model
        self.n_strata = n_strata
        self.horizon = horizon
        self.seed = seed
        self.measure = measure

    def _fit(self, data: FitData, ps: Any = None) -> EffectEstimate:
        check_measure(self.measure, data, self.horizon)
        scores = propensity_scores(data, self.propensity_model, ps, seed=self.seed)
        strata = ps_strata(scores, self.n_strata)
        self.strata_ = strata
        t = data.t.astype(np.int64)
        k = int(strata.max()) + 1
        n = np.bincount(strata * 2 + t, minlength=2 * k).reshape(k, 2)
        both = (n > 0).all(axis=1)
        if not both.any():
            raise EstimationError("no propensity-score stratum contains both treated and "
                                  "comparator persons")
        usable = both[strata]
        counts = {"n_treated": int((usable & (t == 1)).sum()),
                  "n_control": int((usable & (t == 0)).sum())}
        if data.kind == "survival" and self.horizon is None:
            fit = fit_cox(data.time, data.event, t, strata=strata)
            return fit.effect(estimand="ATE", **counts)
        if data.kind == "survival":
            est, var = self._horizon_risks(data, t, strata, np.flatnonzero(both))
        else:
            _, mean, var, _ = stratum_arm_moments(data.y, t, strata)
            est, var = mean[both], var[both]
        value, se = combine(n[both].sum(axis=1).astype(np.float64), est[:, 1], est[:, 0],
                            var[:, 1], var[:, 0], self.measure)
        return make_effect(value, se, measure=self.measure, estimand="ATE", **counts)

    def _horizon_risks(
        self, data: FitData, t: np.ndarray, strata: np.ndarray, usable: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Kaplan-Meier risk at the horizon and its Greenwood variance per usable stratum, arm."""
        est = np.zeros((usable.size, 2))
        var = np.zeros((usable.size, 2))
        order = np.argsort(strata, kind="stable")
        bounds = np.searchsorted(strata[order], np.arange(int(strata.max()) + 2))
        for i, s in enumerate(usable):
            rows = order[bounds[s]:bounds[s + 1]]
            for arm in (0, 1):
                r = rows[t[rows] == arm]
                est[i, arm], var[i, arm] = risk_at(
                    weighted_km(data.time[r], data.event[r]), self.horizon)
        if not est.any():
            raise EstimationError(f"no events up to the horizon {self.horizon:g}")
        return est, var
