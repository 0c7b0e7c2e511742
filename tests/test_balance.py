"""Tests for estimators.balance: CohortMethod-style standardised mean differences."""

import math
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import expit

from estimators.balance import Balance, covariate_balance, max_abs_smd
from estimators.errors import EstimationError
from estimators.propensity import fit_propensity, iptw_weights


def mixed_data(n=400, seed=0):
    """Dense covariates of several kinds (binary, counts, continuous) and a treatment vector."""
    rng = np.random.default_rng(seed)
    t = (rng.random(n) < 0.4).astype(int)
    X = np.column_stack([
        rng.random(n) < 0.2 + 0.3 * t,
        rng.poisson(1 + t, n),
        rng.normal(0.5 * t, 1 + t, n),
        np.where(rng.random(n) < 0.7, 0.0, rng.gamma(2.0, 3.0, n)),
    ]).astype(float)
    return X, t


def test_unweighted_smd_matches_hand_computation():
    X, t = mixed_data()
    b = covariate_balance(X, t)
    xt, xc = X[t == 1], X[t == 0]
    # CohortMethod's unweighted SD is the population SD (divide by n).
    sd_t, sd_c = xt.std(axis=0, ddof=0), xc.std(axis=0, ddof=0)
    np.testing.assert_allclose(b.mean_treated, xt.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(b.mean_comparator, xc.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(b.sd_treated, sd_t, rtol=1e-10)
    np.testing.assert_allclose(b.sd_comparator, sd_c, rtol=1e-10)
    expected = (xt.mean(axis=0) - xc.mean(axis=0)) / np.sqrt((sd_t**2 + sd_c**2) / 2)
    np.testing.assert_allclose(b.smd, expected, rtol=1e-10)


def test_weighted_smd_matches_hand_computation():
    X, t = mixed_data(seed=1)
    w = np.random.default_rng(2).gamma(2.0, 1.0, len(t))
    b = covariate_balance(X, t, w)
    means, sds = {}, {}
    for arm in (0, 1):
        x, wa = X[t == arm], w[t == arm] / w[t == arm].sum()
        means[arm] = wa @ x
        # Reliability-weighted variance, centred form: sum w (x - m)^2 / (1 - sum w^2).
        sds[arm] = np.sqrt((wa @ (x - means[arm]) ** 2) / (1 - (wa**2).sum()))
    np.testing.assert_allclose(b.mean_treated, means[1], rtol=1e-12)
    np.testing.assert_allclose(b.mean_comparator, means[0], rtol=1e-12)
    np.testing.assert_allclose(b.sd_treated, sds[1], rtol=1e-9)
    np.testing.assert_allclose(b.sd_comparator, sds[0], rtol=1e-9)
    expected = (means[1] - means[0]) / np.sqrt((sds[1] ** 2 + sds[0] ** 2) / 2)
    np.testing.assert_allclose(b.smd, expected, rtol=1e-9)


def test_equal_weights_give_sample_sd():
    X, t = mixed_data(seed=3)
    b = covariate_balance(X, t, np.full(len(t), 2.5))
    np.testing.assert_allclose(b.sd_treated, X[t == 1].std(axis=0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(b.mean_treated, X[t == 1].mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_equals_dense(weighted):
    X, t = mixed_data(seed=4)
    w = np.random.default_rng(5).uniform(0.2, 3.0, len(t)) if weighted else None
    dense = covariate_balance(X, t, w)
    for S in (sp.csr_matrix(X), sp.csc_matrix(X), sp.csr_array(X)):
        sparse = covariate_balance(S, t, w)
        for field in ("mean_treated", "mean_comparator", "sd_treated", "sd_comparator", "smd"):
            np.testing.assert_allclose(getattr(sparse, field), getattr(dense, field), rtol=1e-10)


def test_sparse_input_is_never_densified():
    # Dense, X would take 8 GB; sparse products keep the peak allocation to a few MB.
    rng = np.random.default_rng(0)
    n, p = 200_000, 5_000
    rows = np.repeat(np.arange(n), 3)
    X = sp.csr_matrix((np.ones(rows.size), (rows, rng.integers(0, p, rows.size))), shape=(n, p))
    X.data[:] = 1.0
    t = rng.integers(0, 2, n)
    w = rng.uniform(0.5, 2, n)
    tracemalloc.start()
    try:
        b = covariate_balance(X, t, w)
        X.data[:] = 2.0  # non-binary values take the squared-matrix path
        b2 = covariate_balance(X, t, w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    assert b.smd.shape == (p,)
    assert np.nanmax(np.abs(b.smd)) < 0.2
    np.testing.assert_allclose(b2.smd, b.smd, rtol=1e-9)  # SMD is scale-free


def test_constant_and_separating_columns():
    t = np.array([1, 1, 1, 0, 0, 0, 0])
    X = np.column_stack([
        np.full(7, 3.0),                  # constant everywhere -> SMD 0
        np.zeros(7),                      # all zero (absent from a sparse matrix) -> SMD 0
        np.array([1, 1, 1, 0, 0, 0, 0]),  # constant within arms at different values -> +inf
        np.array([1, 0, 1, 0, 1, 0, 0]),  # an ordinary column
    ]).astype(float)
    for M in (X, sp.csr_matrix(X)):
        for w in (None, np.array([0.3, 2.0, 1.1, 0.7, 1.0, 5.0, 0.2])):
            b = covariate_balance(M, t, w)
            assert b.smd[0] == 0.0 and b.smd[1] == 0.0
            assert b.sd_treated[0] == 0.0 and b.sd_comparator[0] == 0.0
            assert b.smd[2] == math.inf
            assert np.isfinite(b.smd[3]) and b.smd[3] != 0
            assert max_abs_smd(b) == math.inf
            assert max_abs_smd(covariate_balance(M[:, [0, 1, 3]], t, w)) == pytest.approx(
                abs(b.smd[3]))


def test_max_abs_smd():
    nan = math.nan
    b = Balance(*(np.zeros(4) for _ in range(4)), smd=np.array([0.05, -0.3, nan, 0.2]))
    assert max_abs_smd(b) == pytest.approx(0.3)
    assert math.isnan(max_abs_smd(Balance(*(np.zeros(1) for _ in range(4)), smd=np.array([nan]))))


def test_iptw_restores_balance_on_confounded_data():
    rng = np.random.default_rng(11)
    n, p = 5000, 12
    X = (rng.random((n, p)) < rng.uniform(0.1, 0.5, p)).astype(float)
    beta = np.r_[[1.0, -1.0, 0.8, 0.7, -0.6, 0.5], np.zeros(p - 6)]
    t = (rng.random(n) < expit(-0.3 + X @ beta)).astype(int)
    Xs = sp.csr_matrix(X)
    before = max_abs_smd(covariate_balance(Xs, t))
    fit = fit_propensity(Xs, t)
    after = max_abs_smd(covariate_balance(Xs, t, iptw_weights(fit.ps, t)))
    assert before > 0.2
    assert after < 0.1


def test_bad_inputs_raise():
    X, t = mixed_data(n=50)
    with pytest.raises(EstimationError, match="comparator arm is empty"):
        covariate_balance(X, np.ones_like(t))
    with pytest.raises(EstimationError, match="zero total weight"):
        covariate_balance(X, t, np.where(t == 1, 0.0, 1.0))
    with pytest.raises(EstimationError, match="non-negative"):
        covariate_balance(X, t, np.where(t == 1, -1.0, 1.0))
    with pytest.raises(EstimationError, match="rows but the treatment vector has"):
        covariate_balance(X, t[:-1])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(EstimationError, match="NaN"):
        covariate_balance(sp.csr_matrix(bad), t)
