"""Tests for estimators.weighting: Crude, IPW, OverlapWeights against statsmodels and lifelines,
the propensity-score correction against a stacked M-estimation, and coverage by simulation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.special import expit
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from estimators.errors import EstimationError
from estimators.propensity import iptw_weights
from estimators.survival import risk_at, weighted_km
from estimators.weighting import IPW, Crude, OverlapWeights, km_arm_risks

BETA_PS = np.array([0.8, -0.6, 0.5])


def _data(n: int, seed: int, effect: float = 1.0):
    """Three normal confounders, a logistic treatment and a linear continuous outcome."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    ps = expit(-0.3 + X @ BETA_PS)
    t = (rng.random(n) < ps).astype(np.int64)
    y = effect * t + X @ np.array([1.0, -1.0, 0.8]) + rng.normal(size=n)
    return X, t, y, ps


def _survival(X, t, seed: int, *, tied: bool):
    rng = np.random.default_rng(seed)
    rate = 0.01 * np.exp(math.log(0.7) * t + 0.6 * X[:, 0] - 0.4 * X[:, 1])
    te = rng.exponential(1 / rate)
    tc = rng.uniform(5, 200, len(t))
    time = np.minimum(te, tc)
    return (np.floor(time) if tied else time), (te <= tc).astype(np.int64)


def _unpenalised() -> LogisticRegression:
    return LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=1000)


# --- differences vs statsmodels -------------------------------------------------------------

@pytest.mark.parametrize("estimand", ["ATE", "ATT"])
@pytest.mark.parametrize("stabilized", [True, False])
def test_ipw_difference_is_wls_with_hc0_sandwich(estimand, stabilized):
    X, t, y, ps = _data(700, 1)
    res = IPW(estimand=estimand, stabilized=stabilized).fit(X, t, y, ps=ps).effect()
    w = iptw_weights(ps, t, estimand=estimand, stabilized=stabilized)
    ref = sm.WLS(y, sm.add_constant(t), weights=w).fit(cov_type="HC0")
    assert res.estimate == pytest.approx(ref.params[1], abs=1e-12)
    assert res.se == pytest.approx(ref.bse[1], rel=1e-10)
    assert res.measure == "difference" and res.estimand == estimand
    assert res.ci_low == pytest.approx(res.estimate - 1.959963984540054 * res.se)


def test_trim_and_truncate_match_wls_on_the_same_weights():
    X, t, y, ps = _data(700, 2)
    res = IPW(trim=(0.1, 0.9), truncate=0.95).fit(X, t, y, ps=ps).effect()
    keep = (ps >= 0.1) & (ps <= 0.9)
    w = iptw_weights(ps[keep], t[keep])
    w = np.minimum(w, np.quantile(w, 0.95))
    ref = sm.WLS(y[keep], sm.add_constant(t[keep]), weights=w).fit(cov_type="HC0")
    assert res.estimate == pytest.approx(ref.params[1], abs=1e-12)
    assert res.se == pytest.approx(ref.bse[1], rel=1e-10)
    assert res.n_treated + res.n_control == keep.sum() < len(t)


def test_ipw_risk_ratio_is_poisson_glm_with_hc0():
    X, t, _, ps = _data(900, 3)
    rng = np.random.default_rng(3)
    yb = (rng.random(len(t)) < expit(-1 + 0.5 * t + X[:, 0])).astype(float)
    res = IPW(measure="ratio").fit(X, t, yb, ps=ps).effect()
    ref = sm.GLM(yb, sm.add_constant(t), family=sm.families.Poisson(),
                 var_weights=iptw_weights(ps, t)).fit(cov_type="HC0")
    assert math.log(res.estimate) == pytest.approx(ref.params[1], abs=1e-12)
    assert res.se == pytest.approx(ref.bse[1], rel=1e-10)
    assert res.measure == "ratio"


def test_crude_difference_is_welch_and_ratio_is_delta_method():
    X, t, y, _ = _data(500, 4)
    res = Crude().fit(X, t, y).effect()
    ref = sm.OLS(y, sm.add_constant(t)).fit(cov_type="HC2")  # HC2 = Welch for two groups
    assert res.estimate == pytest.approx(ref.params[1], abs=1e-12)
    assert res.se == pytest.approx(ref.bse[1], rel=1e-10)
    yb = (y > 0).astype(float)
    rr = Crude(measure="ratio").fit(X, t, yb).effect()
    r1, r0 = yb[t == 1].mean(), yb[t == 0].mean()
    n1, n0 = (t == 1).sum(), (t == 0).sum()
    v = r1 * (1 - r1) / (n1 - 1) / r1**2 + r0 * (1 - r0) / (n0 - 1) / r0**2
    assert rr.estimate == pytest.approx(r1 / r0, rel=1e-12)
    assert rr.se == pytest.approx(math.sqrt(v), rel=1e-12)


# --- the propensity-score correction vs a stacked M-estimation --------------------------------

def _stacked_se(X, t, weights_of, outcome, beta, *, penalty=None):
    """SE of mu1 - mu0 from the stacked equations (logistic score, two weighted means) with a
    numerical Jacobian: an independent reference for the Lunceford-Davidian correction."""
    n = len(t)
    D = np.column_stack([np.ones(n), X])
    pen = np.zeros(D.shape[1]) if penalty is None else penalty
    e_hat = expit(D @ beta)
    const = D.T @ (t - e_hat) - pen * beta  # subgradient left by any L1 penalty (zero if none)

    def psi(theta):
        b, m1, m0 = theta[:-2], theta[-2], theta[-1]
        e = expit(D @ b)
        w = weights_of(e)
        score = D * (t - e)[:, None] - (pen * b + const) / n
        return np.column_stack([score, t * w * (outcome - m1), (1 - t) * w * (outcome - m0)])

    w = weights_of(e_hat)
    m1 = np.sum(t * w * outcome) / np.sum(t * w)
    m0 = np.sum((1 - t) * w * outcome) / np.sum((1 - t) * w)
    theta = np.r_[beta, m1, m0]
    k = theta.size
    A = np.empty((k, k))
    for j in range(k):
        step = np.zeros(k)
        step[j] = 1e-6
        A[:, j] = (psi(theta + step).mean(0) - psi(theta - step).mean(0)) / 2e-6
    P = psi(theta)
    Ainv = np.linalg.inv(A)
    V = Ainv @ (P.T @ P / n) @ Ainv.T / n
    c = np.zeros(k)
    c[-2:] = [1, -1]
    return m1 - m0, math.sqrt(c @ V @ c)


def _weights_of(estimand, t):
    if estimand == "ATE":
        return lambda e: np.where(t == 1, 1 / e, 1 / (1 - e))
    if estimand == "ATT":
        return lambda e: np.where(t == 1, 1.0, e / (1 - e))
    return lambda e: np.where(t == 1, 1 - e, e)


@pytest.mark.parametrize("estimand", ["ATE", "ATT", "ATO"])
def test_sandwich_with_estimated_ps_matches_stacked_equations(estimand):
    X, t, y, _ = _data(800, 5)
    model = _unpenalised()
    est = IPW(propensity_model=model, estimand=estimand, stabilized=False).fit(X, t, y)
    res = est.effect()
    fit = _unpenalised().fit(X, t)
    beta = np.r_[fit.intercept_, fit.coef_[0]]
    value, se = _stacked_se(X, t, _weights_of(estimand, t), y, beta)
    assert res.estimate == pytest.approx(value, abs=1e-12)
    assert res.se == pytest.approx(se, rel=1e-6)
    assert "corrected" in est.variance_method_
    known = IPW(estimand=estimand, stabilized=False).fit(
        X, t, y, ps=fit.predict_proba(X)[:, 1]).effect()
    assert known.estimate == pytest.approx(res.estimate, abs=1e-12)
    assert abs(known.se - res.se) > 0.05 * res.se  # the correction changes the SE visibly
    if estimand == "ATE":
        assert res.se < known.se  # Lunceford-Davidian: estimating the PS helps for the ATE


def test_correction_for_ridge_and_lasso_models():
    X, t, y, _ = _data(800, 6)
    ridge = LogisticRegression(C=0.05, solver="lbfgs", tol=1e-12, max_iter=1000)
    res = IPW(propensity_model=ridge, stabilized=False).fit(X, t, y).effect()
    fit = ridge.fit(X, t)
    beta = np.r_[fit.intercept_, fit.coef_[0]]
    pen = np.r_[0.0, np.full(3, 1 / 0.05)]
    _, se = _stacked_se(X, t, _weights_of("ATE", t), y, beta, penalty=pen)
    assert res.se == pytest.approx(se, rel=1e-6)
    # L1 (liblinear): corrected on the active set, the selection treated as fixed
    Xn = np.column_stack([X, np.random.default_rng(6).normal(size=(len(t), 2))])
    lasso = LogisticRegression(l1_ratio=1.0, C=0.02, solver="liblinear", tol=1e-10,
                               intercept_scaling=1000.0, max_iter=10000)
    fit = lasso.fit(Xn, t)
    active = np.flatnonzero(fit.coef_[0])
    assert 0 < active.size < Xn.shape[1]
    res = IPW(propensity_model=lasso, stabilized=False).fit(Xn, t, y).effect()
    beta = np.r_[fit.intercept_, fit.coef_[0][active]]
    _, se = _stacked_se(Xn[:, active], t, _weights_of("ATE", t), y, beta)
    assert res.se == pytest.approx(se, rel=1e-6)


def test_default_l1_model_and_non_logistic_models():
    X, t, y, _ = _data(600, 7)
    est = IPW().fit(X, t, y)
    assert "L1 logistic" in est.variance_method_
    forest = RandomForestClassifier(n_estimators=20, min_samples_leaf=50, random_state=0)
    est = IPW(propensity_model=forest).fit(X, t, y)
    assert "known" in est.variance_method_
    assert IPW().fit(X, t, y, ps=np.full(len(t), 0.4)).variance_method_.endswith("known")


def test_horizon_risk_difference_correction_matches_numerical_derivative():
    X, t, _, _ = _data(600, 8)
    time, event = _survival(X, t, 8, tied=True)
    horizon = 60.0
    model = _unpenalised()
    res = IPW(propensity_model=model, horizon=horizon, stabilized=False).fit(
        X, t, time=time, event=event).effect()
    fit = _unpenalised().fit(X, t)
    D = np.column_stack([np.ones(len(t)), X])
    beta = np.r_[fit.intercept_, fit.coef_[0]]

    def rd(b):
        w = _weights_of("ATE", t)(expit(D @ b))
        return (risk_at(weighted_km(time[t == 1], event[t == 1], w[t == 1]), horizon)[0]
                - risk_at(weighted_km(time[t == 0], event[t == 0], w[t == 0]), horizon)[0])

    assert res.estimate == pytest.approx(rd(beta), abs=1e-12)
    g = np.array([(rd(beta + s) - rd(beta - s)) / 2e-6 for s in 1e-6 * np.eye(4)])
    e = expit(D @ beta)
    known = IPW(horizon=horizon, stabilized=False).fit(X, t, time=time, event=event, ps=e)
    # influence values treating the weights as known, plus g' H^-1 x_i (t_i - e_i)
    _, _, if1, if0 = km_arm_risks(time, event, t, _weights_of("ATE", t)(e), horizon)
    H = D.T @ (D * (e * (1 - e))[:, None])
    corrected = (if1 - if0) + (D @ np.linalg.solve(H, g)) * (t - e)
    assert known.effect().se == pytest.approx(math.sqrt(np.sum((if1 - if0) ** 2)), rel=1e-12)
    assert res.se == pytest.approx(math.sqrt(np.sum(corrected**2)), rel=1e-6)


# --- time to event vs lifelines -----------------------------------------------------------------

def _lifelines_cox(time, event, t, w):
    from lifelines import CoxPHFitter

    df = pd.DataFrame({"t": time, "e": event, "x": t, "w": w})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter().fit(df, "t", "e", weights_col="w", robust=True,
                                 fit_options={"precision": 1e-14, "r_precision": 1e-15})


@pytest.mark.parametrize("cls", [IPW, OverlapWeights])
def test_weighted_cox_matches_lifelines_robust_on_untied_times(cls):
    X, t, _, ps = _data(1500, 9)
    time, event = _survival(X, t, 9, tied=False)
    est = cls().fit(X, t, time=time, event=event, ps=ps)
    res = est.effect()
    estimand = "ATE" if cls is IPW else "ATO"
    ref = _lifelines_cox(time, event, t, iptw_weights(ps, t, estimand=estimand))
    assert res.measure == "hazard_ratio" and res.estimand == estimand
    assert math.log(res.estimate) == pytest.approx(ref.params_["x"], abs=1e-7)
    assert res.se == pytest.approx(ref.standard_errors_["x"], rel=1e-6)


def test_ipw_horizon_risks_match_lifelines_weighted_km():
    from lifelines import KaplanMeierFitter

    X, t, _, ps = _data(1000, 10)
    time, event = _survival(X, t, 10, tied=True)
    w = iptw_weights(ps, t)
    res = IPW(horizon=90).fit(X, t, time=time, event=event, ps=ps).effect()
    risks = []
    for arm in (1, 0):
        m = t == arm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kmf = KaplanMeierFitter().fit(time[m], event[m], weights=w[m])
        risks.append(1 - float(kmf.survival_function_at_times(90).iloc[0]))
    assert res.estimate == pytest.approx(risks[0] - risks[1], abs=1e-10)
    rr = IPW(horizon=90, measure="ratio").fit(X, t, time=time, event=event, ps=ps).effect()
    assert rr.estimate == pytest.approx(risks[0] / risks[1], rel=1e-10)


def test_crude_time_to_event():
    X, t, _, _ = _data(800, 11)
    time, event = _survival(X, t, 11, tied=True)
    hr = Crude().fit(X, t, time=time, event=event).effect()
    assert hr.measure == "hazard_ratio" and hr.estimand == "unadjusted"
    rd = Crude(horizon=60).fit(X, t, time=time, event=event).effect()
    r1, v1 = risk_at(weighted_km(time[t == 1], event[t == 1]), 60)
    r0, v0 = risk_at(weighted_km(time[t == 0], event[t == 0]), 60)
    assert rd.estimate == pytest.approx(r1 - r0, abs=1e-14)
    assert rd.se == pytest.approx(math.sqrt(v1 + v0), rel=1e-10)  # Greenwood per arm


# --- overlap weights, bootstrap, errors -----------------------------------------------------------

def test_overlap_weights_balance_exactly_with_a_logistic_ps():
    # Overlap weights from an unpenalised logistic PS balance every model covariate exactly, so a
    # noise-free outcome linear in those covariates returns the effect exactly.
    X, t, _, _ = _data(500, 12)
    y = 2.0 * t + X @ np.array([3.0, -2.0, 1.0])
    res = OverlapWeights(propensity_model=_unpenalised()).fit(X, t, y).effect()
    assert res.estimate == pytest.approx(2.0, abs=1e-8)
    assert res.estimand == "ATO"


def test_bootstrap_is_seeded_and_close_to_the_sandwich():
    X, t, y, ps = _data(600, 13)
    a = IPW(variance="bootstrap", n_bootstrap=60, seed=1).fit(X, t, y, ps=ps).effect()
    b = IPW(variance="bootstrap", n_bootstrap=60, seed=1).fit(X, t, y, ps=ps).effect()
    c = IPW(variance="bootstrap", n_bootstrap=60, seed=2).fit(X, t, y, ps=ps).effect()
    assert a == b
    assert a.se != c.se
    sandwich = IPW().fit(X, t, y, ps=ps).effect()
    assert a.estimate == sandwich.estimate
    assert a.se == pytest.approx(sandwich.se, rel=0.3)
    refit = IPW(propensity_model=_unpenalised(), variance="bootstrap", n_bootstrap=60,
                stabilized=False).fit(X, t, y)
    corrected = IPW(propensity_model=_unpenalised(), stabilized=False).fit(X, t, y).effect()
    assert refit.effect().se == pytest.approx(corrected.se, rel=0.3)
    assert "refitted" in refit.variance_method_


def test_effect_by_refits_within_groups():
    X, t, y, ps = _data(800, 14)
    groups = (X[:, 2] > 0).astype(int)
    by = IPW().fit(X, t, y, ps=ps).effect_by(groups)
    for g in (0, 1):
        m = groups == g
        assert by[g] == IPW().fit(X[m], t[m], y[m], ps=ps[m]).effect()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: IPW(trim=(0.45, 0.5)), "leaves no"),
        (lambda: IPW(measure="ratio"), "binary outcome"),
        (lambda: IPW(horizon=30), "time-to-event"),
        (lambda: IPW(estimand="ATX"), "estimand"),
        (lambda: IPW(variance="jackknife"), "variance"),
        (lambda: IPW(truncate=1.5), "truncate"),
        (lambda: Crude(measure="odds"), "measure"),
    ],
)
def test_configuration_errors(make, message):
    X, t, y, ps = _data(200, 15)
    ps = np.where(t == 1, np.maximum(ps, 0.51), np.minimum(ps, 0.44))  # trim leaves no treated
    with pytest.raises(EstimationError, match=message):
        make().fit(X, t, y, ps=ps)


def test_data_errors():
    X, t, y, ps = _data(200, 16)
    with pytest.raises(EstimationError, match="empty"):
        IPW().fit(X, np.zeros_like(t), y, ps=ps)
    with pytest.raises(EstimationError, match="no outcomes among the treated"):
        IPW(measure="ratio").fit(X, t, np.where(t == 1, 0.0, 1.0), ps=ps)
    time = np.full(len(t), 10.0)
    with pytest.raises(EstimationError, match="no outcome events"):
        IPW().fit(X, t, time=time, event=np.zeros(len(t)), ps=ps)
    with pytest.raises(EstimationError, match="no events up to the horizon"):
        IPW(horizon=5).fit(X, t, time=time, event=np.r_[1, np.zeros(len(t) - 1)], ps=ps)


# --- simulation: coverage with a known truth ---------------------------------------------------

def test_ipw_coverage_and_crude_bias_by_simulation():
    """300 confounded data sets with a constant effect 1: IPW 95% CIs (known PS, and a fitted
    logistic PS with the stacked-equation SE) cover in 90-99%; the crude estimate is far off."""
    reps, n, truth = 300, 1000, 1.0
    cover_known = cover_fitted = 0
    crude_err, crude_se = [], []
    for r in range(reps):
        X, t, y, ps = _data(n, 1000 + r, effect=truth)
        known = IPW().fit(X, t, y, ps=ps).effect()
        fitted = IPW(propensity_model=_unpenalised()).fit(X, t, y).effect()
        crude = Crude().fit(X, t, y).effect()
        cover_known += known.ci_low <= truth <= known.ci_high
        cover_fitted += fitted.ci_low <= truth <= fitted.ci_high
        crude_err.append(crude.estimate - truth)
        crude_se.append(crude.se)
    assert 0.90 <= cover_known / reps <= 0.99
    assert 0.90 <= cover_fitted / reps <= 0.99
    assert abs(np.mean(crude_err)) > 5 * np.mean(crude_se)
