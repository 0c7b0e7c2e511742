"""Tests for choosing the propensity model's L1 penalty by covariate balance (Zang et al. 2023)."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import expit

from estimators.balance import count_imbalanced, covariate_balance
from estimators.hazard import truncated_iptw_weights
from estimators.propensity import balance_walk_done, choose_by_balance, fit_propensity


def confounded(n=4000, p=300, seed=2):
    """30 common and p rare binary covariates, 80 of them confounders of treatment."""
    rng = np.random.default_rng(seed)
    common = (rng.random((n, 30)) < rng.uniform(0.1, 0.5, 30)).astype(float)
    rare = sp.random(n, p, density=0.02, random_state=seed, data_rvs=np.ones, format="csr")
    X = sp.hstack([sp.csr_matrix(common), rare]).tocsr()
    beta = np.zeros(X.shape[1])
    beta[:30] = rng.normal(0, 0.8, 30)
    beta[30:80] = rng.normal(0, 1.0, 50)
    t = (rng.random(n) < expit(-1 + X @ beta)).astype(np.int8)
    return X, t


def imbalanced_after_iptw(X, t, ps):
    return count_imbalanced(covariate_balance(X, t, truncated_iptw_weights(ps, t)))


@pytest.fixture(scope="module")
def data():
    return confounded()


@pytest.fixture(scope="module")
def by_balance(data):
    X, t = data
    return fit_propensity(X, t, seed=0, selection="balance")


def test_fewest_imbalanced_wins():
    assert choose_by_balance([5, 3, 4, 7], [0.6, 0.7, 0.9, 0.95]) == 1


def test_ties_go_to_the_higher_auc():
    assert choose_by_balance([5, 3, 3, 3], [0.6, 0.7, 0.74, 0.72]) == 2


def test_exact_ties_go_to_the_stronger_penalty():
    assert choose_by_balance([2, 2, 2], [0.7, 0.7, 0.7]) == 0


def test_aucs_within_the_tie_margin_go_to_the_stronger_penalty():
    # 0.678 is within AUC_TIE (0.005) of the best, 0.679: the stronger penalty (index 2) wins
    assert choose_by_balance([1, 0, 0, 0, 0], [0.6, 0.669, 0.678, 0.679, 0.679]) == 2


def test_the_walk_stops_once_balanced_and_the_auc_stops_rising():
    # every covariate balances from index 3; the AUC still rose there (0.669 -> 0.675)...
    assert not balance_walk_done([9, 5, 0, 0, 0], [0.5, 0.58, 0.648, 0.669, 0.675])
    # ...then gained less than AUC_TIE over two more penalties: done
    assert balance_walk_done([9, 5, 0, 0, 0, 0, 0], [0.5, 0.58, 0.648, 0.669, 0.675, 0.678,
                                                     0.678])
    # imbalance left: keep walking, the count need not be monotone
    assert not balance_walk_done([18, 16, 15, 17, 9, 9, 9], [0.5, 0.8, 0.83, 0.83, 0.9, 0.9,
                                                              0.9])


def test_selection_rule_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        choose_by_balance([1, 2], [0.5])
    with pytest.raises(ValueError):
        choose_by_balance([], [])


def test_balance_selection_leaves_fewer_covariates_imbalanced(data, by_balance):
    X, t = data
    by_likelihood = fit_propensity(X, t, seed=0)
    n_likelihood = imbalanced_after_iptw(X, t, by_likelihood.ps)
    n_balance = imbalanced_after_iptw(X, t, by_balance.ps)
    assert n_likelihood >= 10  # the likelihood choice leaves several imbalanced ...
    assert n_balance <= n_likelihood - 5  # ... the balance choice clearly fewer
    assert n_balance == by_balance.n_imbalanced.min()


def test_balance_fit_records_the_path(data, by_balance):
    X, t = data
    fit = by_balance
    assert fit.selection == "balance"
    assert fit.n_imbalanced.shape == fit.lambdas_tried.shape == fit.path_auc.shape
    assert fit.lambdas_tried.size == 13  # the whole default grid, strongest first
    assert np.all(np.diff(fit.lambdas_tried) < 0)
    assert fit.cv_log_loss.size == 0 and fit.n_cv_rows == 0
    chosen = int(np.flatnonzero(fit.lambdas_tried == fit.lambda_)[0])
    assert chosen == choose_by_balance(fit.n_imbalanced, fit.path_auc)
    assert fit.path_auc[chosen] == pytest.approx(fit.auc)
    # The strongest penalty is intercept-only: constant weights per arm leave the crude SMDs.
    assert fit.n_imbalanced[0] == count_imbalanced(covariate_balance(X, t))
    assert fit.path_auc[0] == 0.5


def test_default_selection_is_likelihood(data):
    X, t = data
    fit = fit_propensity(X[:1500], t[:1500], seed=0)
    assert fit.selection == "likelihood"
    assert fit.n_imbalanced.size == 0 and fit.cv_log_loss.size == fit.lambdas_tried.size


def test_balance_selection_with_arms_capped(data):
    X, t = data
    fit = fit_propensity(X, t, seed=0, selection="balance", max_fit_rows=800)
    assert fit.n_fit_rows == 1600
    assert fit.ps.shape == t.shape
    # The intercept is corrected for the sampling: mean score stays near the share treated.
    assert abs(fit.ps.mean() - t.mean()) < 0.03


def test_the_walk_fits_on_a_subsample_and_keeps_the_model_it_measured(data, monkeypatch):
    """With the walk capped at 600 persons per arm, every model is fitted on 1,200 persons and
    balanced on all of them; the chosen one is kept as it is, so its balance on every person is
    the count the walk recorded, and the fewest of the walk."""
    from estimators import propensity

    X, t = data
    monkeypatch.setattr(propensity, "BALANCE_WALK_PER_ARM", 600)
    fit = fit_propensity(X, t, seed=0, selection="balance")
    assert fit.n_fit_rows == 1200 and fit.ps.shape == t.shape
    chosen = int(np.flatnonzero(np.isclose(fit.lambdas_tried, fit.lambda_))[0])
    assert imbalanced_after_iptw(X, t, fit.ps) == fit.n_imbalanced[chosen]
    assert fit.n_imbalanced[chosen] == fit.n_imbalanced.min()


def test_unknown_selection_raises(data):
    X, t = data
    with pytest.raises(ValueError, match="selection"):
        fit_propensity(X, t, selection="auc")
