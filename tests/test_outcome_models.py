"""Tests for estimators.outcome_models: g-formula and T-learner against OLS/hand references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import statsmodels.api as sm
from scipy.special import expit
from sklearn.linear_model import LinearRegression, LogisticRegression

from estimators.errors import EstimationError
from estimators.outcome_models import LeastSquares, Standardization, TLearner


def _data(n: int = 1000, seed: int = 0, effect: float = 2.0, binary: bool = False):
    """Confounded data: X drives both treatment and outcome; a constant planted effect."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    t = (rng.random(n) < expit(X @ np.array([0.8, -0.6, 0.4, 0.0]))).astype(int)
    lin = effect * t + X @ np.array([1.0, 0.5, 0.5, 1.0])
    if binary:
        return X, t, (rng.random(n) < expit(lin - 1.0)).astype(int)
    return X, t, lin + rng.normal(size=n)


def _ols(X, y):
    design = np.column_stack([np.ones(len(y)), X])
    return np.linalg.lstsq(design, y, rcond=None)[0]


def test_standardization_with_linear_model_equals_the_ols_coefficient():
    X, t, y = _data()
    ref = sm.OLS(y, sm.add_constant(np.column_stack([X, t]))).fit().params[-1]
    for estimand in ("ATE", "ATT"):
        res = Standardization(estimand=estimand, n_bootstrap=0).fit(X, t, y).effect()
        assert res.estimate == pytest.approx(ref, rel=1e-10)
        assert res.estimand == estimand and res.measure == "difference"
    # DataFrame input and an explicitly passed model give the same number.
    res = Standardization(LinearRegression(), n_bootstrap=0).fit(pd.DataFrame(X), t, y).effect()
    assert res.estimate == pytest.approx(ref, rel=1e-10)


def test_tlearner_equals_difference_of_predicted_means_by_hand():
    X, t, y = _data(seed=1)
    b0, b1 = _ols(X[t == 0], y[t == 0]), _ols(X[t == 1], y[t == 1])
    design = np.column_stack([np.ones(len(y)), X])
    ite = design @ b1 - design @ b0
    est = TLearner(n_bootstrap=0).fit(X, t, y)
    assert est.effect().estimate == pytest.approx(ite.mean(), rel=1e-10)
    np.testing.assert_allclose(est.predict_ite(X), ite, rtol=1e-9, atol=1e-9)
    att = TLearner(estimand="ATT", n_bootstrap=0).fit(X, t, y).effect().estimate
    assert att == pytest.approx(ite[t == 1].mean(), rel=1e-10)


def test_binary_outcome_gformula_matches_statsmodels_logit_by_hand():
    X, t, y = _data(n=3000, binary=True, seed=2)
    fit = sm.Logit(y, sm.add_constant(np.column_stack([X, t]))).fit(disp=0, tol=1e-12)
    ones = sm.add_constant(np.column_stack([X, np.ones(len(y))]), has_constant="add")
    zeros = sm.add_constant(np.column_stack([X, np.zeros(len(y))]), has_constant="add")
    ref = (fit.predict(ones) - fit.predict(zeros)).mean()
    model = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000)
    res = Standardization(model, n_bootstrap=0).fit(X, t, y).effect()
    assert res.estimate == pytest.approx(ref, abs=1e-7)
    # The default (unpenalised logistic for dense X) agrees too.
    assert Standardization(n_bootstrap=0).fit(X, t, y).effect().estimate == pytest.approx(
        ref, abs=1e-5)


def test_bootstrap_is_reproducible_and_summarised_by_percentiles_and_sd():
    X, t, y = _data(n=400, seed=3)
    a = Standardization(n_bootstrap=50, seed=7).fit(X, t, y)
    b = Standardization(n_bootstrap=50, seed=7).fit(X, t, y)
    c = Standardization(n_bootstrap=50, seed=8).fit(X, t, y)
    np.testing.assert_array_equal(a.bootstrap_, b.bootstrap_)
    assert a.effect() == b.effect()
    assert not np.array_equal(a.bootstrap_, c.bootstrap_)
    res = a.effect()
    assert res.se == pytest.approx(a.bootstrap_.std(ddof=1))
    percentiles = tuple(np.percentile(a.bootstrap_, [2.5, 97.5]))
    assert (res.ci_low, res.ci_high) == pytest.approx(percentiles)
    assert res.ci_low < res.estimate < res.ci_high


def test_bootstrap_se_agrees_with_the_robust_ols_se():
    X, t, y = _data(n=1000, seed=4)
    ols = sm.OLS(y, sm.add_constant(np.column_stack([X, t]))).fit(cov_type="HC1")
    se = Standardization(n_bootstrap=200, seed=1).fit(X, t, y).effect().se
    assert se == pytest.approx(ols.bse[-1], rel=0.2)


def test_predict_ite_shape_and_mean_equal_the_ate():
    X, t, y = _data(n=600, seed=5)
    for cls in (Standardization, TLearner):
        est = cls(n_bootstrap=0).fit(X, t, y)
        ite = est.predict_ite(X[:50])
        assert ite.shape == (50,)
        assert est.predict_ite(X).mean() == pytest.approx(est.effect().estimate, rel=1e-10)
    with pytest.raises(EstimationError, match="columns"):
        est.predict_ite(X[:, :2])
    with pytest.raises(EstimationError, match="not fitted"):
        TLearner().predict_ite(X)


def test_effect_by_recovers_planted_subgroup_effects():
    rng = np.random.default_rng(6)
    n = 3000
    X = rng.normal(size=(n, 3))
    group = rng.integers(0, 3, n)
    t = (rng.random(n) < expit(X[:, 0])).astype(int)
    truth = np.array([-1.0, 0.5, 3.0])
    y = truth[group] * t + X @ np.array([1.0, 1.0, 0.5]) + rng.normal(size=n)
    for cls in (Standardization, TLearner):
        by = cls(n_bootstrap=30).fit(X, t, y).effect_by(group)
        assert sorted(by) == [0, 1, 2]
        for g in range(3):
            assert abs(by[g].estimate - truth[g]) < 0.2
            assert by[g].ci_low < truth[g] < by[g].ci_high


def test_sparse_covariates_and_binary_outcome_without_events_in_one_arm():
    X, t, y = _data(n=800, seed=8)
    Xs = sp.csr_matrix(np.where(X > 0.5, 1.0, 0.0))
    assert np.isfinite(Standardization(n_bootstrap=5).fit(Xs, t, y).effect().se)
    yb = np.zeros(len(t))
    yb[(t == 1) & (np.arange(len(t)) % 4 == 0)] = 1.0    # events among the treated only
    res = TLearner(n_bootstrap=5).fit(X, t, yb).effect()
    # The control model predicts no events for anyone.
    assert 0 < res.estimate < 1


def test_errors():
    X, t, y = _data(n=200, seed=9)
    with pytest.raises(EstimationError, match="constant"):
        Standardization().fit(X, t, np.full(200, 3.0))
    with pytest.raises(EstimationError, match="arm is empty"):
        TLearner().fit(X, np.ones(200), y)
    with pytest.raises(EstimationError, match="needs an outcome y"):
        TLearner().fit(X, t, time=np.ones(200), event=np.zeros(200))
    with pytest.raises(EstimationError, match="estimand"):
        TLearner(estimand="ATO").fit(X, t, y)
    with pytest.raises(EstimationError, match="n_bootstrap"):
        Standardization(n_bootstrap=1).fit(X, t, y)
    with pytest.raises(EstimationError, match="NaN"):
        Standardization().fit(np.where(X > 2, np.nan, X), t, y)


def test_least_squares_default_equals_linear_regression():
    rng = np.random.default_rng(10)
    X = rng.normal(loc=5.0, size=(500, 6))
    y = X @ rng.normal(size=6) + rng.normal(size=500)
    ref = LinearRegression().fit(X, y)
    for covariates in (X, sp.csr_matrix(X)):
        fit = LeastSquares().fit(covariates, y)
        np.testing.assert_allclose(fit.coef_, ref.coef_, rtol=1e-9)
        assert fit.intercept_ == pytest.approx(ref.intercept_, rel=1e-9)
    # Collinear (duplicated and constant) columns: the same fitted values as lstsq's solution.
    wide = np.column_stack([X, X[:, 0], np.ones(500)])
    np.testing.assert_allclose(LeastSquares().fit(wide, y).predict(wide),
                               LinearRegression().fit(wide, y).predict(wide), rtol=1e-8)
