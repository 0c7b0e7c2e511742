"""Tests for estimators.iv: 2SLS against statsmodels' IV2SLS, hand sandwiches, simulated truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import statsmodels.api as sm
from statsmodels.sandbox.regression.gmm import IV2SLS

from estimators.errors import EstimationError
from estimators.iv import TwoStageLeastSquares


def _iv_data(n: int = 3000, seed: int = 0, effect: float = 1.5, n_instruments: int = 1,
             strength: float = 0.8, heteroskedastic: bool = False):
    """Binary treatment confounded by an unobserved u; instruments shift treatment only."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    z = rng.normal(size=(n, n_instruments))
    u = rng.normal(size=n)
    t = (strength * z.sum(axis=1) + 0.5 * X[:, 0] + u + rng.normal(size=n) > 0).astype(int)
    noise = rng.normal(size=n) * (1 + 2 * np.abs(z[:, 0]) if heteroskedastic else 1.0)
    y = effect * t + X @ np.array([1.0, -0.5, 0.3]) + 2.0 * u + noise
    return X, t, y, z


def _statsmodels(X, t, y, z):
    exog = np.column_stack([np.ones(len(y)), X, t])
    instruments = np.column_stack([np.ones(len(y)), X, z])
    return IV2SLS(y, exog, instruments).fit()


@pytest.mark.parametrize("n_instruments", [1, 2])
def test_matches_statsmodels_iv2sls(n_instruments):
    X, t, y, z = _iv_data(n_instruments=n_instruments)
    ref = _statsmodels(X, t, y, z)
    est = TwoStageLeastSquares().fit(X, t, y, z=z if n_instruments > 1 else z[:, 0])
    res = est.effect()
    assert res.estimate == pytest.approx(ref.params[-1], rel=1e-8, abs=1e-10)
    assert res.se == pytest.approx(ref.bse[-1], rel=1e-8)
    np.testing.assert_allclose(est.params_, ref.params, rtol=1e-8, atol=1e-10)
    assert res.measure == "difference"
    assert res.n_treated == t.sum() and res.n_control == (1 - t).sum()


def test_intercept_in_X_sparse_and_dataframe_give_the_same_fit():
    X, t, y, z = _iv_data(n=800, seed=3)
    ref = _statsmodels(X, t, y, z).params[-1]
    with_const = np.column_stack([np.ones(len(y)), X])      # user-supplied intercept is kept once
    for covariates in (with_const, sp.csr_matrix(X), pd.DataFrame(X, columns=list("abc"))):
        res = TwoStageLeastSquares().fit(covariates, t, y, z=z).effect()
        assert res.estimate == pytest.approx(ref, rel=1e-8)


def test_robust_se_is_the_hc0_sandwich_on_projected_regressors():
    X, t, y, z = _iv_data(heteroskedastic=True, seed=5)
    est = TwoStageLeastSquares(cov_type="robust").fit(X, t, y, z=z)
    W = np.column_stack([np.ones(len(y)), X, t])
    Z = np.column_stack([np.ones(len(y)), X, z])
    W_hat = Z @ np.linalg.lstsq(Z, W, rcond=None)[0]
    beta = np.linalg.solve(W_hat.T @ W_hat, W_hat.T @ y)
    u = y - W @ beta
    bread = np.linalg.inv(W_hat.T @ W_hat)
    cov = bread @ (W_hat.T * u**2) @ W_hat @ bread
    assert est.effect().se == pytest.approx(np.sqrt(cov[-1, -1]), rel=1e-8)
    assert est.se_robust_ == est.effect().se
    # The unadjusted SE is still available and differs under heteroskedasticity.
    assert abs(est.se_unadjusted_ / est.se_robust_ - 1) > 0.02


def test_se_is_not_the_naive_second_stage_ols_se():
    X, t, y, z = _iv_data(seed=7)
    Z = np.column_stack([np.ones(len(y)), X, z])
    t_hat = Z @ np.linalg.lstsq(Z, t, rcond=None)[0]
    naive = sm.OLS(y, np.column_stack([np.ones(len(y)), X, t_hat])).fit()
    res = TwoStageLeastSquares().fit(X, t, y, z=z).effect()
    assert res.estimate == pytest.approx(naive.params[-1], rel=1e-8)   # same point estimate
    assert abs(res.se / naive.bse[-1] - 1) > 0.05                      # but not the naive SE


def test_first_stage_f_matches_the_ols_f_test_of_the_instruments():
    X, t, y, z = _iv_data(n_instruments=2, strength=0.1, seed=11)
    est = TwoStageLeastSquares().fit(X, t, y, z=z)
    full = sm.OLS(t, np.column_stack([np.ones(len(t)), X, z])).fit()
    ref = full.f_test(np.eye(6)[4:]).fvalue
    assert est.first_stage_f_ == pytest.approx(float(np.squeeze(ref)), rel=1e-8)
    assert est.weak_instrument_ == (est.first_stage_f_ < 10)


def test_recovers_the_effect_where_ols_is_biased():
    X, t, y, z = _iv_data(n=6000, seed=2, effect=1.5)
    res = TwoStageLeastSquares().fit(X, t, y, z=z).effect()
    ols = sm.OLS(y, np.column_stack([np.ones(len(y)), X, t])).fit()
    assert res.ci_low < 1.5 < res.ci_high
    assert ols.conf_int()[-1, 0] > 1.5 + 0.5      # confounding by u pushes OLS far up


def test_effect_by_recovers_subgroup_effects():
    rng = np.random.default_rng(4)
    n = 8000
    X = rng.normal(size=(n, 2))
    z = rng.normal(size=n)
    u = rng.normal(size=n)
    group = rng.integers(0, 2, n)
    t = (z + u + rng.normal(size=n) > 0).astype(int)
    y = np.where(group == 1, 3.0, 0.5) * t + X[:, 0] + u + rng.normal(size=n)
    by = TwoStageLeastSquares().fit(X, t, y, z=z).effect_by(group)
    for g, truth in ((0, 0.5), (1, 3.0)):
        assert abs(by[g].estimate - truth) < 4 * by[g].se


def test_effect_by_subsets_several_instruments():
    X, t, y, z = _iv_data(n=6000, n_instruments=2)
    group = np.arange(y.shape[0]) % 2
    by = TwoStageLeastSquares().fit(X, t, y, z=z).effect_by(group)
    for g in (0, 1):
        rows = group == g
        alone = TwoStageLeastSquares().fit(X[rows], t[rows], y[rows], z=z[rows]).effect()
        assert by[g].estimate == pytest.approx(alone.estimate, rel=1e-12)


def test_errors():
    X, t, y, z = _iv_data(n=500, seed=1)
    with pytest.raises(EstimationError, match="needs an instrument"):
        TwoStageLeastSquares().fit(X, t, y)
    with pytest.raises(EstimationError, match="instrument is constant"):
        TwoStageLeastSquares().fit(X, t, y, z=np.ones(500))
    with pytest.raises(EstimationError, match="rows"):
        TwoStageLeastSquares().fit(X, t, y, z=z[:10])
    with pytest.raises(EstimationError, match="NaN"):
        TwoStageLeastSquares().fit(X, t, y, z=np.where(np.arange(500) == 3, np.nan, z[:, 0]))
    # An instrument orthogonal to treatment given X: first-stage F is zero.
    exog = np.column_stack([np.ones(500), X, t])
    w = np.random.default_rng(0).normal(size=500)
    irrelevant = w - exog @ np.linalg.lstsq(exog, w, rcond=None)[0]
    with pytest.raises(EstimationError, match="no first-stage relevance"):
        TwoStageLeastSquares().fit(X, t, y, z=irrelevant)
    with pytest.raises(EstimationError, match="collinear"):
        TwoStageLeastSquares().fit(X, t, y, z=X[:, 0] + 2 * X[:, 1])
    with pytest.raises(EstimationError, match="constant"):
        TwoStageLeastSquares().fit(X, t, np.full(500, 2.0), z=z)
    with pytest.raises(EstimationError, match="cov_type"):
        TwoStageLeastSquares(cov_type="HC9").fit(X, t, y, z=z)
    with pytest.raises(EstimationError, match="needs an outcome y"):
        TwoStageLeastSquares().fit(X, t, time=np.ones(500), event=np.zeros(500), z=z)
