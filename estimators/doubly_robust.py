"""Doubly robust estimators with cross-fitted nuisances: AIPW and double machine learning (PLR).

Both split persons into folds stratified by arm; each fold's nuisances (propensity score,
outcome regressions) come from models fitted on the other folds, so flexible learners do not
overfit their own residuals. Standard errors come from the empirical variance of the
(orthogonal) score: mean(psi^2) / n, as in Chernozhukov et al. (2018).

Default propensity/treatment model: the L1 logistic of estimators.propensity. Its penalty is
chosen once by fit_propensity's CV on all rows (as DoubleML's tune_on_folds=False), then the
model is refitted per fold at that per-sample penalty: one CV instead of one per fold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.special import expit
from sklearn.base import clone, is_classifier
from sklearn.model_selection import StratifiedKFold

from estimators.base import CausalEstimator, FitData, propensity_scores
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.outcome_models import (
    Covariates,
    as_new_covariates,
    default_regressor,
    fit_outcome,
    nonempty,
    outcome_model_for,
    predict_outcome,
    require_outcome,
    wald_difference,
)
from estimators.propensity import PS_EPS, fit_l1_logistic, fit_propensity

Fold = tuple[np.ndarray, np.ndarray]


def crossfit_folds(t: np.ndarray, n_folds: int, seed: int) -> list[Fold]:
    """(train, test) row indices of K folds stratified by arm, shuffled with `seed`."""
    if n_folds < 2:
        raise EstimationError(f"n_folds must be at least 2 for cross-fitting, got {n_folds}")
    smaller = int(min(t.sum(), t.shape[0] - t.sum()))
    if smaller < n_folds:
        raise EstimationError(
            f"too few persons in the smaller arm for {n_folds}-fold cross-fitting"
        )
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((t.shape[0], 1)), t))


def crossfit_propensity(
    X: Covariates, t: np.ndarray, folds: Sequence[Fold], model: Any, seed: int
) -> np.ndarray:
    """Out-of-fold P(t=1 | X) from `model` (a classifier) or the default L1 logistic."""
    ps = np.empty(t.shape[0])
    lambda_ = math.nan
    if model is None:
        lambda_ = fit_propensity(X, t, seed=seed).lambda_
    for train, test in folds:
        if model is not None:
            fitted = clone(model).fit(X[train], t[train])
            ps[test] = np.asarray(fitted.predict_proba(X[test]))[:, 1]
        elif math.isfinite(lambda_):
            # The default model's own fit (same configuration, same liblinear lock).
            fitted = fit_l1_logistic(1.0 / (train.size * lambda_), seed, X[train], t[train])
            ps[test] = expit(np.asarray(X[test] @ fitted.coef_[0]).ravel() + fitted.intercept_[0])
        else:  # no covariates: intercept-only model
            ps[test] = t[train].mean()
    return check_separation(ps, t)


def check_separation(ps: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Reject scores that order the arms perfectly (no overlap); clip to (0, 1) otherwise."""
    if not np.isfinite(ps).all():
        raise EstimationError("the propensity model returned NaN or infinite scores")
    if ps[t == 0].max() < ps[t == 1].min():
        raise EstimationError(
            "propensity model separates the arms perfectly (AUC 1.00): no overlap to compare"
        )
    return np.clip(ps, PS_EPS, 1.0 - PS_EPS)


def crossfit_outcome(
    X: Covariates, y: np.ndarray, folds: Sequence[Fold], model: Any,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Out-of-fold E[y | X], fitting only on training rows that are in `rows` (if given)."""
    pred = np.empty(y.shape[0])
    for train, test in folds:
        fit_rows = train if rows is None else train[rows[train]]
        pred[test] = predict_outcome(fit_outcome(model, X[fit_rows], y[fit_rows]), X[test])
    return pred


def _vector(value: Any, name: str, n: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (n,) or not np.isfinite(array).all():
        raise EstimationError(f"{name} must be a finite vector of length {n}")
    return array


class AIPW(CausalEstimator):
    """Augmented IPW (doubly robust) ATE with cross-fitted nuisances and influence-function SE.

    Scores: phi = mu1 - mu0 + t (y - mu1) / e - (1 - t) (y - mu0) / (1 - e), ATE = mean(phi),
    SE = sd(phi) / sqrt(n). `trim` clips (does not drop) e to [low, high] so a few extreme
    scores cannot dominate: the target stays the whole-population ATE, at a small bias where
    scores were clipped (`n_trimmed_` counts them); trim=None disables it. Outcome models are
    fitted per arm. Known nuisances can be passed to fit() as `ps`, `mu0`, `mu1` (per row).
    """

    def __init__(self, propensity_model: Any = None, outcome_model: Any = None,
                 cross_fit: bool = True, n_folds: int = 5,
                 trim: tuple[float, float] | None = (0.01, 0.99), seed: int = 0) -> None:
        self.propensity_model = propensity_model
        self.outcome_model = outcome_model
        self.cross_fit = cross_fit
        self.n_folds = n_folds
        self.trim = trim
        self.seed = seed

    def _fit(self, data: FitData, *, ps: Any = None, mu0: Any = None,
             mu1: Any = None) -> EffectEstimate:
        y = require_outcome(data, "AIPW")
        low, high = self.trim if self.trim is not None else (0.0, 1.0)
        if not 0.0 <= low < high <= 1.0:
            raise EstimationError(f"trim must be (low, high), 0 <= low < high <= 1: {self.trim}")
        if (mu0 is None) != (mu1 is None):
            raise EstimationError("give both mu0 and mu1 (known outcome regressions) or neither")
        X, t = nonempty(data.X), data.t
        everyone = np.arange(data.n)
        folds = [(everyone, everyone)]
        if self.cross_fit and (ps is None or mu0 is None):
            folds = crossfit_folds(t, self.n_folds, self.seed)
        if ps is not None:
            e = propensity_scores(data, ps=ps)
        elif self.cross_fit:
            e = crossfit_propensity(X, t, folds, self.propensity_model, self.seed)
        else:
            e = check_separation(propensity_scores(data, self.propensity_model, seed=self.seed), t)
        if mu0 is None:
            model = outcome_model_for(self.outcome_model, data)
            mu0 = crossfit_outcome(X, y, folds, model, rows=t == 0)
            mu1 = crossfit_outcome(X, y, folds, model, rows=t == 1)
        else:
            mu0, mu1 = _vector(mu0, "mu0", data.n), _vector(mu1, "mu1", data.n)
        clipped = np.clip(e, low, high)
        self.n_trimmed_ = int(np.count_nonzero(clipped != e))
        self.ps_, self.mu0_, self.mu1_ = e, mu0, mu1
        phi = mu1 - mu0 + t * (y - mu1) / clipped - (1 - t) * (y - mu0) / (1.0 - clipped)
        self.scores_ = phi
        self.ite_model_ = None
        ate = float(phi.mean())
        return wald_difference(ate, float(phi.std() / math.sqrt(data.n)), estimand="ATE",
                               data=data)

    def predict_ite(self, X: Any) -> np.ndarray:
        """DR-learner CATEs: the per-person scores `scores_` regressed on X, predicted at X.

        The regressor is `outcome_model` if it is a regressor, else the default linear model;
        with OLS (intercept) the mean of the in-sample predictions equals the ATE exactly.
        """
        if self._data is None:
            raise EstimationError("AIPW is not fitted yet: call fit() first")
        X = nonempty(as_new_covariates(X, self._data.X.shape[1]))
        if self.ite_model_ is None:
            model = self.outcome_model
            if model is None or is_classifier(model):
                model = default_regressor(sparse=sp.issparse(self._data.X))
            self.ite_model_ = clone(model).fit(nonempty(self._data.X), self.scores_)
        return np.asarray(self.ite_model_.predict(X), dtype=np.float64).ravel()


class DoubleML(CausalEstimator):
    """Double machine learning for the partially linear model y = theta t + g(X) + e.

    Cross-fitted l(X) = E[y|X] and m(X) = E[t|X]; theta solves the orthogonal (partialling-out)
    score psi = (y - l - theta (t - m)) (t - m) pooled over folds (DML2); SE from mean(psi^2)
    / J^2 / n with J = mean((t - m)^2). With heterogeneous effects theta is the overlap-
    weighted average E[m(1-m) tau(X)] / E[m(1-m)] (hence estimand "ATO"); = ATE if constant.
    treatment_model: a classifier (predict_proba) or a regressor (linear probability model).
    """

    def __init__(self, outcome_model: Any = None, treatment_model: Any = None,
                 n_folds: int = 5, seed: int = 0) -> None:
        self.outcome_model = outcome_model
        self.treatment_model = treatment_model
        self.n_folds = n_folds
        self.seed = seed

    def _fit(self, data: FitData) -> EffectEstimate:
        y = require_outcome(data, "DoubleML")
        X, t = nonempty(data.X), data.t
        folds = crossfit_folds(t, self.n_folds, self.seed)
        model = outcome_model_for(self.outcome_model, data)
        ell = crossfit_outcome(X, y, folds, model)
        if self.treatment_model is not None and not is_classifier(self.treatment_model):
            m = crossfit_outcome(X, t.astype(np.float64), folds, self.treatment_model)
        else:
            m = crossfit_propensity(X, t, folds, self.treatment_model, self.seed)
        v, r = t - m, y - ell
        J = float(np.mean(v * v))
        if J < 1e-8:
            raise EstimationError(
                "the covariates explain the treatment almost perfectly: no residual variation "
                "in treatment left to estimate the effect from"
            )
        theta = float(np.mean(v * r) / J)
        psi = (r - theta * v) * v
        self.ps_, self.outcome_pred_ = m, ell
        self.scores_ = psi
        se = math.sqrt(float(np.mean(psi * psi)) / J**2 / data.n)
        return wald_difference(theta, se, estimand="ATO", data=data)
