"""Tests for estimators.doubly_robust: AIPW and DoubleML against hand formulas and known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import expit
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from threadpoolctl import threadpool_limits

from estimators.doubly_robust import AIPW, DoubleML, crossfit_folds
from estimators.errors import EstimationError

PS_COEF = np.array([0.8, -0.6, 0.4, 0.0])
Y_COEF = np.array([1.0, 0.5, 0.5, 1.0])


def _data(n: int = 1000, seed: int = 0, effect: float = 1.0):
    """Confounded data with a logistic treatment model and a linear outcome (both correct)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    e = expit(0.2 + X @ PS_COEF)
    t = (rng.random(n) < e).astype(int)
    y = effect * t + X @ Y_COEF + rng.normal(size=n)
    return X, t, y, e


def _nuisances():
    return dict(propensity_model=LogisticRegression(), outcome_model=LinearRegression())


# --- AIPW: hand formulas ------------------------------------------------------------------

def test_aipw_with_known_nuisances_matches_the_hand_formula():
    t = [1, 0, 1, 0, 1, 0, 1, 0]
    y = [3.0, 1.0, 2.5, 0.5, 4.0, 2.0, 1.5, 1.0]
    ps = [0.7, 0.4, 0.5, 0.2, 0.8, 0.6, 0.3, 0.5]
    mu0 = [1.2, 0.9, 0.8, 0.6, 2.1, 1.5, 0.4, 1.1]
    mu1 = [2.9, 2.2, 2.4, 1.8, 3.6, 3.0, 1.9, 2.5]
    phi = []
    for ti, yi, e, m0, m1 in zip(t, y, ps, mu0, mu1, strict=True):
        phi.append(m1 - m0 + ti * (yi - m1) / e - (1 - ti) * (yi - m0) / (1 - e))
    ate = sum(phi) / 8
    se = math.sqrt(sum((p - ate) ** 2 for p in phi) / 8) / math.sqrt(8)
    X = np.zeros((8, 1))
    est = AIPW(trim=None).fit(X, t, y, ps=ps, mu0=mu0, mu1=mu1)
    assert est.effect().estimate == pytest.approx(ate, rel=1e-12)
    assert est.effect().se == pytest.approx(se, rel=1e-12)
    np.testing.assert_allclose(est.scores_, phi, rtol=1e-12)
    # Trimming clips the scores at (0.35, 0.65) before they enter the formula.
    clipped = np.clip(ps, 0.35, 0.65)
    trimmed = AIPW(trim=(0.35, 0.65)).fit(X, t, y, ps=ps, mu0=mu0, mu1=mu1)
    t_, y_, m0, m1 = (np.asarray(a, dtype=float) for a in (t, y, mu0, mu1))
    by_hand = np.mean(m1 - m0 + t_ * (y_ - m1) / clipped - (1 - t_) * (y_ - m0) / (1 - clipped))
    assert trimmed.effect().estimate == pytest.approx(by_hand, rel=1e-12)
    assert trimmed.n_trimmed_ == 4


def test_aipw_with_true_nuisances_is_close_to_truth():
    X, t, y, e = _data(n=4000, seed=1, effect=1.0)
    mu0 = X @ Y_COEF
    res = AIPW().fit(X, t, y, ps=e, mu0=mu0, mu1=mu0 + 1.0).effect()
    assert res.ci_low < 1.0 < res.ci_high


def test_aipw_cross_fitting_uses_out_of_fold_nuisances():
    X, t, y, _ = _data(n=500, seed=2)
    est = AIPW(**_nuisances(), n_folds=3, seed=4).fit(X, t, y)
    ps, mu0, mu1 = np.empty(500), np.empty(500), np.empty(500)
    for train, test in crossfit_folds(t, 3, seed=4):
        ps[test] = LogisticRegression().fit(X[train], t[train]).predict_proba(X[test])[:, 1]
        for arm, out in ((0, mu0), (1, mu1)):
            rows = train[t[train] == arm]
            out[test] = LinearRegression().fit(X[rows], y[rows]).predict(X[test])
    phi = mu1 - mu0 + t * (y - mu1) / ps - (1 - t) * (y - mu0) / (1 - ps)
    assert est.effect().estimate == pytest.approx(phi.mean(), rel=1e-10)
    assert est.effect().se == pytest.approx(phi.std() / math.sqrt(500), rel=1e-10)
    np.testing.assert_allclose(est.ps_, ps, rtol=1e-10)
    # Without cross-fitting the nuisances are in-sample predictions from models fitted on all.
    insample = AIPW(**_nuisances(), cross_fit=False).fit(X, t, y)
    ps_all = LogisticRegression().fit(X, t).predict_proba(X)[:, 1]
    np.testing.assert_allclose(insample.ps_, ps_all, rtol=1e-10)


def test_aipw_is_doubly_robust_when_one_nuisance_model_is_wrong():
    X, t, y, _ = _data(n=20_000, seed=3, effect=1.0)
    naive = y[t == 1].mean() - y[t == 0].mean()
    assert naive - 1.0 > 0.5                                  # confounding is strong
    wrong_outcome = AIPW(LogisticRegression(), DummyRegressor(), n_folds=2).fit(X, t, y)
    wrong_ps = AIPW(DummyClassifier(), LinearRegression(), n_folds=2).fit(X, t, y)
    for est in (wrong_outcome, wrong_ps):
        res = est.effect()
        assert abs(res.estimate - 1.0) < 3 * res.se
    both_wrong = AIPW(DummyClassifier(), DummyRegressor(), n_folds=2).fit(X, t, y).effect()
    assert both_wrong.estimate == pytest.approx(naive, abs=0.05)


# --- DoubleML --------------------------------------------------------------------------------

def test_doubleml_matches_the_hand_cross_fitted_partialling_out():
    X, t, y, _ = _data(n=600, seed=5)
    est = DoubleML(LinearRegression(), LogisticRegression(), n_folds=3, seed=2).fit(X, t, y)
    ell, m = np.empty(600), np.empty(600)
    for train, test in crossfit_folds(t, 3, seed=2):
        ell[test] = LinearRegression().fit(X[train], y[train]).predict(X[test])
        m[test] = LogisticRegression().fit(X[train], t[train]).predict_proba(X[test])[:, 1]
    v, r = t - m, y - ell
    theta = np.sum(v * r) / np.sum(v * v)
    psi = (r - theta * v) * v
    se = np.sqrt(np.mean(psi**2) / np.mean(v * v) ** 2 / 600)
    assert est.effect().estimate == pytest.approx(theta, rel=1e-10)
    assert est.effect().se == pytest.approx(se, rel=1e-10)


def test_doubleml_on_a_partially_linear_model_is_close_to_truth():
    rng = np.random.default_rng(6)
    n = 5000
    X = rng.normal(size=(n, 5))
    t = (rng.random(n) < expit(X[:, :3] @ [0.7, -0.5, 0.5])).astype(int)
    y = 1.5 * t + X @ [1.0, 1.0, -0.5, 0.5, 0.0] + rng.normal(size=n)
    res = DoubleML(LinearRegression(), LogisticRegression(), n_folds=3).fit(X, t, y).effect()
    assert abs(res.estimate - 1.5) < 0.1
    assert res.ci_low < 1.5 < res.ci_high
    assert res.estimand == "ATO"


# --- coverage over replicates --------------------------------------------------------------

def _replicate(seed: int, truth: float):
    X, t, y, _ = _data(n=1000, seed=100 + seed, effect=truth)
    a = AIPW(**_nuisances(), n_folds=2, seed=seed).fit(X, t, y).effect()
    d = DoubleML(LinearRegression(), LogisticRegression(), n_folds=2, seed=seed).fit(
        X, t, y).effect()
    diff = y[t == 1].mean() - y[t == 0].mean()
    se = math.sqrt(y[t == 1].var(ddof=1) / t.sum() + y[t == 0].var(ddof=1) / (1 - t).sum())
    return a, d, (diff, se)


def test_coverage_of_aipw_and_doubleml_and_bias_of_the_naive_difference():
    reps, truth = 200, 1.0
    cover = {"aipw": 0, "dml": 0, "naive": 0}
    naive_bias = []
    with threadpool_limits(1):               # tiny BLAS problems: threads only add contention
        results = [_replicate(seed, truth) for seed in range(reps)]
    for a, d, (diff, se) in results:
        cover["aipw"] += a.ci_low <= truth <= a.ci_high
        cover["dml"] += d.ci_low <= truth <= d.ci_high
        cover["naive"] += abs(diff - truth) <= 1.96 * se
        naive_bias.append(diff - truth)
    rates = {k: v / reps for k, v in cover.items()}
    assert 0.90 <= rates["aipw"] <= 0.99, rates
    assert 0.90 <= rates["dml"] <= 0.99, rates
    assert np.mean(naive_bias) > 0.5 and rates["naive"] < 0.05, (np.mean(naive_bias), rates)


# --- CATEs and subgroups -------------------------------------------------------------------

def test_predict_ite_shape_mean_and_heterogeneity():
    rng = np.random.default_rng(7)
    n = 4000
    X = rng.normal(size=(n, 3))
    t = (rng.random(n) < expit(0.5 * X[:, 0])).astype(int)
    tau = 1.0 + X[:, 1]                                   # effect varies with X1
    y = tau * t + X[:, 0] + rng.normal(size=n)
    est = AIPW(**_nuisances(), n_folds=3).fit(X, t, y)
    ite = est.predict_ite(X)
    assert ite.shape == (n,)
    assert ite.mean() == pytest.approx(est.effect().estimate, rel=1e-9)
    assert est.predict_ite(X[:10]).shape == (10,)
    slope = np.polyfit(X[:, 1], ite, 1)[0]
    assert abs(slope - 1.0) < 0.15


def test_effect_by_recovers_planted_subgroup_effects():
    rng = np.random.default_rng(8)
    n = 6000
    X = rng.normal(size=(n, 3))
    group = rng.integers(0, 2, n)
    t = (rng.random(n) < expit(X[:, 0] - 0.5 * X[:, 1])).astype(int)
    truth = np.array([0.0, 2.0])
    y = truth[group] * t + X @ [1.0, 1.0, 0.5] + rng.normal(size=n)
    for est in (AIPW(**_nuisances(), n_folds=3), DoubleML(LinearRegression(), n_folds=3)):
        by = est.fit(X, t, y).effect_by(group)
        for g in (0, 1):
            assert abs(by[g].estimate - truth[g]) < 4 * by[g].se, (type(est).__name__, g)
        assert abs(by[1].estimate - by[0].estimate - 2.0) < 0.3


# --- defaults and errors ---------------------------------------------------------------------

def test_default_models_on_sparse_covariates():
    rng = np.random.default_rng(9)
    n, p = 4000, 30
    X = (rng.random((n, p)) < 0.2).astype(float)
    t = (rng.random(n) < expit(-0.3 + X[:, :5] @ [1.0, -1.0, 0.8, 0.5, -0.5])).astype(int)
    y = 0.5 * t + X[:, :5] @ [1.0, 1.0, -1.0, 0.5, 0.5] + rng.normal(size=n)
    Xs = sp.csr_matrix(X)
    for est in (AIPW(n_folds=3), DoubleML(n_folds=3)):
        res = est.fit(Xs, t, y).effect()
        assert abs(res.estimate - 0.5) < 4 * res.se, type(est).__name__
    yb = (rng.random(n) < expit(-1 + 0.7 * t + X[:, 0])).astype(int)   # binary outcome
    assert 0 < AIPW(n_folds=2).fit(Xs, t, yb).effect().estimate < 0.3


def test_errors():
    X, t, y, _ = _data(n=300, seed=10)
    separating = np.column_stack([X, t])
    with pytest.raises(EstimationError, match="separates the arms"):
        AIPW(**_nuisances(), n_folds=2).fit(separating, t, y)
    with pytest.raises(EstimationError, match="separates the arms"):
        AIPW(n_folds=2).fit(separating, t, y)                 # default L1 propensity model
    with pytest.raises(EstimationError, match="separates the arms"):
        DoubleML(treatment_model=LogisticRegression(), n_folds=2).fit(separating, t, y)
    with pytest.raises(EstimationError, match="constant"):
        AIPW().fit(X, t, np.zeros(300))
    with pytest.raises(EstimationError, match="constant"):
        DoubleML().fit(X, t, np.ones(300))
    with pytest.raises(EstimationError, match="arm is empty"):
        DoubleML().fit(X, np.zeros(300), y)
    few = np.zeros(300, dtype=int)
    few[:3] = 1
    with pytest.raises(EstimationError, match="too few persons in the smaller arm for 5-fold"):
        AIPW(**_nuisances()).fit(X, few, y)
    with pytest.raises(EstimationError, match="n_folds"):
        DoubleML(n_folds=1).fit(X, t, y)
    with pytest.raises(EstimationError, match="trim"):
        AIPW(trim=(0.6, 0.4)).fit(X, t, y)
    with pytest.raises(EstimationError, match="mu0 and mu1"):
        AIPW().fit(X, t, y, mu0=np.zeros(300))
    with pytest.raises(EstimationError, match="needs an outcome y"):
        AIPW().fit(X, t, time=np.ones(300), event=np.zeros(300))
    with pytest.raises(EstimationError, match="not fitted"):
        AIPW().predict_ite(X)
