"""Tests for estimators.stratification: a hand-worked stratified difference, Cox and KM
references, errors, and coverage of the PS-stratified hazard ratio by simulation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from estimators.cox import fit_cox
from estimators.errors import EstimationError
from estimators.propensity import ps_strata
from estimators.stratification import PSStratification
from estimators.survival import risk_at, weighted_km
from estimators.weighting import Crude

# Two strata of five (median cut 0.5).
#   stratum 0: treated y 3, 5 (mean 4, var of mean 2/2 = 1); comparators 1, 2, 2 (5/3, 1/9)
#   stratum 1: treated y 6, 8, 7 (7, 1/3); comparators 4, 3 (3.5, 1/4)
# Differences 7/3 and 7/2, weights 1/2 each: 35/12; variance 1/4 (10/9 + 7/12) = 61/144.
PS = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.65, 0.7, 0.8, 0.9])
T = np.array([1, 0, 0, 1, 0, 1, 0, 1, 1, 0])
Y = np.array([3.0, 1.0, 2.0, 5.0, 2.0, 6.0, 4.0, 8.0, 7.0, 3.0])
X0 = np.zeros((10, 1))


def test_hand_worked_stratified_difference():
    est = PSStratification(n_strata=2).fit(X0, T, Y, ps=PS)
    res = est.effect()
    np.testing.assert_array_equal(est.strata_, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert res.estimate == pytest.approx(35 / 12)
    assert res.se == pytest.approx(math.sqrt(61) / 12)
    assert (res.n_treated, res.n_control, res.estimand) == (5, 5, "ATE")


def test_stratum_without_both_arms_is_dropped():
    t = T.copy()
    t[5:] = 1  # stratum 1 has only treated persons
    res = PSStratification(n_strata=2).fit(X0, t, Y, ps=PS).effect()
    assert res.estimate == pytest.approx(7 / 3)
    assert res.se == pytest.approx(math.sqrt(10 / 9))
    assert (res.n_treated, res.n_control) == (2, 3)


def test_single_person_cell_borrows_its_arms_variance():
    t = np.array([1, 0, 0, 0, 0, 1, 0, 1, 1, 0])  # one treated person in stratum 0
    res = PSStratification(n_strata=2).fit(X0, t, Y, ps=PS).effect()
    y1 = Y[t == 1]
    var_lone = y1.var(ddof=1) / 1  # the treated arm's variance over usable strata, n = 1
    c0 = Y[(t == 0) & (PS < 0.5)]
    v0 = var_lone + c0.var(ddof=1) / c0.size
    v1 = 1 / 3 + 1 / 4
    assert res.estimate == pytest.approx(0.5 * (3 - c0.mean()) + 0.5 * 3.5)
    assert res.se == pytest.approx(math.sqrt(0.25 * (v0 + v1)))


def test_risk_ratio_of_standardised_risks():
    y = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0, 1], dtype=float)
    res = PSStratification(n_strata=2, measure="ratio").fit(X0, T, y, ps=PS).effect()
    # stratum 0: treated 1, 1 (risk 1, var 0); comparators 0, 0, 1 (1/3, var 1/3 / 3)
    # stratum 1: treated 1, 1, 0 (2/3, var 1/3 / 3); comparators 0, 1 (1/2, var 1/2 / 2)
    r1, r0 = 0.5 * (1 + 2 / 3), 0.5 * (1 / 3 + 1 / 2)
    v1 = 0.25 * (0 + 1 / 9)
    v0 = 0.25 * (1 / 9 + 1 / 4)
    assert res.estimate == pytest.approx(r1 / r0)
    assert res.se == pytest.approx(math.sqrt(v1 / r1**2 + v0 / r0**2))
    assert res.measure == "ratio"


def _survival(n, seed, *, tied):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    ps = expit(0.9 * z - 0.3)
    t = (rng.random(n) < ps).astype(int)
    te = rng.exponential(1 / (0.01 * np.exp(math.log(0.7) * t + 0.6 * z)))
    tc = rng.uniform(5, 200, n)
    tt = np.minimum(te, tc)
    return ps, t, (np.floor(tt) if tied else tt), (te <= tc).astype(int)


def test_stratified_cox_matches_fit_cox_and_lifelines():
    from lifelines import CoxPHFitter

    ps, t, tt, e = _survival(1200, 1, tied=False)
    res = PSStratification(n_strata=5).fit(np.zeros((1200, 1)), t, time=tt, event=e,
                                           ps=ps).effect()
    strata = ps_strata(ps, 5)
    ours = fit_cox(tt, e, t, strata=strata)
    assert math.log(res.estimate) == pytest.approx(ours.log_hr, abs=1e-14)
    assert res.se == pytest.approx(ours.se_model, rel=1e-14)
    df = pd.DataFrame({"t": tt, "e": e, "x": t, "s": strata})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CoxPHFitter().fit(df, "t", "e", strata=["s"],
                                fit_options={"precision": 1e-14, "r_precision": 1e-15})
    assert math.log(res.estimate) == pytest.approx(ref.params_["x"], abs=1e-7)
    assert res.se == pytest.approx(ref.standard_errors_["x"], rel=1e-6)


def test_horizon_risk_difference_per_stratum():
    from lifelines import KaplanMeierFitter

    ps, t, tt, e = _survival(1500, 2, tied=True)
    horizon = 50.0
    res = PSStratification(n_strata=5, horizon=horizon).fit(
        np.zeros((1500, 1)), t, time=tt, event=e, ps=ps).effect()
    strata = ps_strata(ps, 5)
    est = var = 0.0
    for s in range(5):
        parts = []
        for arm in (1, 0):
            m = (strata == s) & (t == arm)
            kmf = KaplanMeierFitter().fit(tt[m], e[m])
            risk = 1 - float(kmf.survival_function_at_times(horizon).iloc[0])
            parts.append((risk, risk_at(weighted_km(tt[m], e[m]), horizon)[1]))
        w = (strata == s).mean()
        est += w * (parts[0][0] - parts[1][0])
        var += w**2 * (parts[0][1] + parts[1][1])
    assert res.estimate == pytest.approx(est, abs=1e-10)
    assert res.se == pytest.approx(math.sqrt(var), rel=1e-10)


def test_errors():
    t = np.r_[np.zeros(5), np.ones(5)].astype(int)  # the PS separates the arms completely
    with pytest.raises(EstimationError, match="no propensity-score stratum"):
        PSStratification(n_strata=2).fit(X0, t, Y, ps=PS)
    with pytest.raises(EstimationError, match="no outcome events"):
        PSStratification(n_strata=2).fit(X0, T, time=np.ones(10), event=np.zeros(10), ps=PS)
    with pytest.raises(EstimationError, match="n_strata"):
        PSStratification(n_strata=0).fit(X0, T, Y, ps=PS)
    with pytest.raises(EstimationError, match="no outcomes among"):
        PSStratification(n_strata=2, measure="ratio").fit(X0, T, np.where(T == 1, 0.0, 1.0),
                                                          ps=PS)


def _levels_data(seed: int, per_level: int = 200, log_hr: float = math.log(0.6)):
    """A 5-level confounder with exactly `per_level` persons per level, so PS quintiles are
    the levels; the hazard ratio is the same within every level (stratified Cox's target)."""
    rng = np.random.default_rng(seed)
    z = rng.permutation(np.repeat(np.arange(5), per_level))
    ps = expit(-1.0 + 0.5 * z)
    t = (rng.random(z.size) < ps).astype(int)
    te = rng.exponential(1 / (0.004 * np.exp(log_hr * t + 0.5 * z)))
    tc = rng.uniform(30, 365, z.size)
    return z, ps, t, np.floor(np.minimum(te, tc)), (te <= tc).astype(int)


def test_stratified_hr_coverage_and_crude_bias_by_simulation():
    """200 replicates: 95% CIs of the PS-stratified Cox HR cover the true conditional HR in
    90-99%; the crude HR's mean log error is several standard errors."""
    reps, truth = 200, math.log(0.6)
    z, ps, *_ = _levels_data(0)
    np.testing.assert_array_equal(ps_strata(ps, 5), z)  # quintiles are the confounder levels
    cover = 0
    crude_err, crude_se = [], []
    X = np.zeros((1000, 1))
    for r in range(reps):
        _, ps, t, tt, e = _levels_data(100 + r)
        res = PSStratification(n_strata=5).fit(X, t, time=tt, event=e, ps=ps).effect()
        cover += res.ci_low <= 0.6 <= res.ci_high
        crude = Crude().fit(X, t, time=tt, event=e).effect()
        crude_err.append(crude.log_estimate - truth)
        crude_se.append(crude.se)
    assert 0.90 <= cover / reps <= 0.99
    assert np.mean(crude_err) > 4 * np.mean(crude_se)
