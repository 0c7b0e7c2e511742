"""Tests for estimators.propensity: the CV-tuned L1 propensity model and the scores built on it."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from estimators.errors import EstimationError
from estimators.propensity import (
    INTERCEPT_SCALING,
    LIBLINEAR_MAX_ITER,
    LIBLINEAR_TOL,
    auc,
    effective_sample_size,
    equipoise,
    fit_propensity,
    iptw_weights,
    preference_score,
    ps_strata,
    stratification_weights,
)


def synthetic(n=6000, p=30, seed=1, intercept=-0.5):
    """Sparse binary covariates with 8 planted logistic coefficients; returns X, t, true ps."""
    rng = np.random.default_rng(seed)
    prevalence = rng.uniform(0.05, 0.5, size=p)
    X = (rng.random((n, p)) < prevalence).astype(np.float64)
    beta = np.zeros(p)
    beta[: min(p, 8)] = [1.2, -1.0, 0.8, -0.8, 0.6, -0.6, 0.5, 1.0][:p]
    true_ps = expit(intercept + X @ beta)
    t = (rng.random(n) < true_ps).astype(np.int8)
    return sp.csr_matrix(X), t, true_ps


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def fitted(data):
    X, t, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation (penalty=) or convergence warnings
        return fit_propensity(X, t, seed=0)


def test_fitted_ps_close_to_planted_model(data, fitted):
    _, t, true_ps = data
    assert np.corrcoef(logit(fitted.ps), logit(true_ps))[0, 1] > 0.97
    assert np.abs(fitted.ps - true_ps).mean() < 0.03
    # An (almost) unpenalised intercept solves the score equation: mean ps == share treated.
    assert abs(fitted.ps.mean() - t.mean()) < 1e-3
    assert 8 <= fitted.n_nonzero <= 30
    assert fitted.ps.min() > 0 and fitted.ps.max() < 1


def test_auc_field_equals_sklearn(data, fitted):
    _, t, _ = data
    assert fitted.auc == pytest.approx(roc_auc_score(t, fitted.ps), abs=1e-12)
    assert 0.7 < fitted.auc < 0.9


def test_auc_with_ties_equals_sklearn():
    rng = np.random.default_rng(3)
    t = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * t, 1)  # heavy ties
    assert auc(scores, t) == pytest.approx(roc_auc_score(t, scores), abs=1e-12)
    assert auc(np.array([0.1, 0.2, 0.2, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.875)


def test_same_seed_same_choice(data, fitted):
    X, t, _ = data
    again = fit_propensity(X, t, seed=0)
    assert again.C == fitted.C
    np.testing.assert_array_equal(again.lambdas_tried, fitted.lambdas_tried)
    np.testing.assert_array_equal(again.cv_log_loss, fitted.cv_log_loss)
    np.testing.assert_array_equal(again.ps, fitted.ps)


def test_final_model_is_plain_logistic_regression_at_chosen_c(data, fitted):
    X, t, _ = data
    assert fitted.n_fit_rows == X.shape[0]
    assert fitted.lambda_ * X.shape[0] * fitted.C == pytest.approx(1.0)
    plain = LogisticRegression(
        l1_ratio=1.0, solver="liblinear", C=fitted.C, intercept_scaling=INTERCEPT_SCALING,
        tol=LIBLINEAR_TOL, max_iter=LIBLINEAR_MAX_ITER, random_state=0,
    ).fit(X, t)
    np.testing.assert_allclose(fitted.coef, plain.coef_[0], rtol=0, atol=1e-12)
    assert fitted.intercept == pytest.approx(plain.intercept_[0], abs=1e-12)
    np.testing.assert_allclose(fitted.ps, plain.predict_proba(X)[:, 1], rtol=0, atol=1e-12)


def test_cv_walk_picks_minimum_and_stops_early(data):
    X, t, _ = data
    grid = np.logspace(-1, -7, 25)  # per-sample lambdas, far past the optimum
    fit = fit_propensity(X, t, grid=grid[::-1])  # order of the grid does not matter
    k = len(fit.lambdas_tried)
    np.testing.assert_array_equal(fit.lambdas_tried, grid[:k])  # strongest first
    best = int(np.argmin(fit.cv_log_loss))
    assert fit.lambda_ == fit.lambdas_tried[best]
    assert k < len(grid)  # stopped early...
    assert best == k - 3  # ...right after two points worse than the best
    assert (fit.cv_log_loss[-2:] > fit.cv_log_loss[best]).all()
    assert fit.cv_log_loss[0] > fit.cv_log_loss[best]  # the strongest penalty is not chosen


def test_cv_subsample_and_per_arm_cap_keep_ps_calibrated():
    X, t, true_ps = synthetic(n=8000, intercept=-1.5)  # ~30% treated
    n1 = int(t.sum())
    assert 1500 < n1 < 4000
    fit = fit_propensity(X, t, max_cv_rows=3000, max_fit_rows=1500)
    assert fit.n_cv_rows == pytest.approx(3000, abs=2)
    assert fit.n_fit_rows == 3000  # both arms capped at 1500
    # The fitting sample is 50% treated; the intercept correction restores the population share.
    assert abs(fit.ps.mean() - t.mean()) < 0.02
    assert fit.ps.shape == t.shape
    assert np.corrcoef(logit(fit.ps), logit(true_ps))[0, 1] > 0.95


def test_sparse_and_dense_inputs_give_same_ps():
    X, t, _ = synthetic(n=2000, p=15, seed=5)
    sparse_fit = fit_propensity(X, t)
    dense_fit = fit_propensity(X.toarray(), t)
    assert sparse_fit.lambda_ == pytest.approx(dense_fit.lambda_, rel=1e-12)
    np.testing.assert_allclose(sparse_fit.ps, dense_fit.ps, rtol=0, atol=1e-10)


def test_perfect_separation_raises():
    X, t, _ = synthetic(n=1000, p=10, seed=2)
    X = sp.hstack([X, sp.csr_matrix(t[:, None].astype(float))]).tocsr()
    with pytest.raises(EstimationError, match=r"separates the arms perfectly \(AUC 1.00\)"):
        fit_propensity(X, t)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda X, t: (X, np.zeros_like(t)), "the treated arm is empty"),
        (lambda X, t: (X, np.ones_like(t)), "the comparator arm is empty"),
        (lambda X, t: (X, np.r_[np.ones(5, np.int8), np.zeros(len(t) - 5, np.int8)]),
         "too few persons in the treated arm"),
        (lambda X, t: (X, t[:-1]), "rows but the treatment vector has"),
        (lambda X, t: (X, t * 2), "treatment must be binary"),
        (lambda X, t: (X, np.where(t == 1, np.nan, 0.0)), "treatment must be binary"),
    ],
)
def test_bad_inputs_raise(mutate, message):
    X, t, _ = synthetic(n=300, p=5)
    X, t = mutate(X, t)
    with pytest.raises(EstimationError, match=message):
        fit_propensity(X, t)


def test_nan_in_covariates_raises():
    X, t, _ = synthetic(n=300, p=5)
    dense = X.toarray()
    dense[3, 2] = np.nan
    for bad in (dense, sp.csr_matrix(dense)):
        with pytest.raises(EstimationError, match="NaN"):
            fit_propensity(bad, t)


def test_preference_score_hand_checked():
    # Share treated 1/4: logit(P) = log(1/3). ps = 0.5 -> odds 1 / (1/3) = 3 -> F = 3/4.
    t = np.array([1, 0, 0, 0])
    ps = np.array([0.5, 0.25, 0.1, 0.75])
    expected = [0.75, 0.5, (1 / 9 * 3) / (1 + 1 / 9 * 3), 9 / 10]
    np.testing.assert_allclose(preference_score(ps, t), expected, rtol=1e-12)


def test_equipoise_hand_computed():
    t = np.array([1, 0, 0, 0])
    ps = np.array([0.5, 0.25, 0.1, 0.75])  # preference scores 0.75, 0.5, 0.25, 0.9
    assert equipoise(ps, t) == pytest.approx(0.25)  # only 0.5 is in [0.3, 0.7]
    assert equipoise(ps, t, low=0.25, high=0.75) == pytest.approx(0.75)  # bounds inclusive


def test_iptw_weights_hand_computed():
    t = np.array([1, 1, 0, 0, 0])  # share treated 0.4
    ps = np.array([0.8, 0.5, 0.5, 0.2, 0.75])
    np.testing.assert_allclose(
        iptw_weights(ps, t, stabilized=False), [1.25, 2, 2, 1.25, 4])
    np.testing.assert_allclose(
        iptw_weights(ps, t), [0.4 * 1.25, 0.4 * 2, 0.6 * 2, 0.6 * 1.25, 0.6 * 4])
    np.testing.assert_allclose(
        iptw_weights(ps, t, estimand="ATT", stabilized=False), [1, 1, 1, 0.25, 3])
    np.testing.assert_allclose(
        iptw_weights(ps, t, estimand="ATT"), [1, 1, 1.5, 0.375, 4.5])
    np.testing.assert_allclose(
        iptw_weights(ps, t, estimand="ATO"), [0.2, 0.5, 0.5, 0.2, 0.75])
    with pytest.raises(EstimationError, match="strictly between 0 and 1"):
        iptw_weights(np.array([1.0, 0.5, 0.5, 0.2, 0.7]), t)


def test_ps_strata_quantiles_and_ties():
    ps = np.linspace(0.01, 0.99, 100)
    strata = ps_strata(ps, 5)
    np.testing.assert_array_equal(np.bincount(strata), [20] * 5)
    assert (np.diff(strata) >= 0).all()  # monotone in ps
    # Heavy ties: 60% share one score. Cut points collapse; labels stay 0..k-1, none empty.
    tied = np.r_[np.full(60, 0.3), np.linspace(0.4, 0.9, 40)]
    strata = ps_strata(tied, 5)
    counts = np.bincount(strata)
    assert (counts > 0).all() and len(counts) < 5
    assert len(np.unique(strata[:60])) == 1
    np.testing.assert_array_equal(ps_strata(np.full(10, 0.5), 5), np.zeros(10))


def test_stratification_weights_represent_each_stratum():
    rng = np.random.default_rng(0)
    strata = rng.integers(0, 4, 400)
    t = (rng.random(400) < 0.2 + 0.15 * strata).astype(int)
    w = stratification_weights(strata, t)
    for s in range(4):
        in_s = strata == s
        assert w[in_s & (t == 1)].sum() == pytest.approx(in_s.sum())
        assert w[in_s & (t == 0)].sum() == pytest.approx(in_s.sum())
    # A stratum lacking one arm cannot contribute: weight 0.
    w = stratification_weights(np.array([0, 0, 0, 1, 1]), np.array([1, 0, 0, 0, 0]))
    np.testing.assert_allclose(w, [3, 1.5, 1.5, 0, 0])


def test_effective_sample_size_hand_computed():
    assert effective_sample_size(np.array([1.0, 1.0, 2.0, 4.0])) == pytest.approx(64 / 22)
    assert effective_sample_size(np.ones(7)) == pytest.approx(7)
    assert effective_sample_size(np.zeros(3)) == 0.0


def test_fits_in_concurrent_threads_are_reproducible():
    """liblinear's RNG is process-global: concurrent fits must not perturb each other."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    data = []
    for _ in range(4):
        X = sp.random(3000, 200, density=0.05, format="csr", random_state=rng)
        X.data[:] = 1.0
        logit = X[:, :20] @ rng.normal(0, 1, 20) - 0.3
        data.append((X, (rng.random(3000) < 1 / (1 + np.exp(-logit))).astype(int)))
    alone = [fit_propensity(X, t, seed=i).ps for i, (X, t) in enumerate(data)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda i: fit_propensity(*data[i], seed=i).ps, range(4)))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)
