"""Outcome-model (g-formula) estimators of a risk or mean difference: S-learner and T-learner.

`Standardization` models y ~ [X, t] once and averages the predictions with everybody treated
minus everybody untreated; `TLearner` fits one model per arm. Both give percentile bootstrap
intervals (persons resampled within arm, seeded) with the bootstrap SD as `se`. The helpers
here (default models, fitting with a binary-aware predict, Wald estimates) serve the
doubly robust and IV estimators too.

Default outcome models: dense X -> unpenalised least squares (continuous y; LeastSquares, the
OLS solution as LinearRegression's, by Cholesky of the normal equations) or
LogisticRegression (binary y); sparse X -> Ridge(alpha=1) or L2 LogisticRegression(C=1): a
light penalty (on the summed loss, so it fades as n grows) that keeps wide, collinear sparse
designs solvable and quasi-separated rare covariates finite.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp
from sklearn.base import BaseEstimator, RegressorMixin, clone, is_classifier
from sklearn.linear_model import LogisticRegression, Ridge

from estimators.base import CausalEstimator, FitData
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.propensity import as_covariates

Covariates = np.ndarray | sp.csr_matrix
OutcomeEstimand = Literal["ATE", "ATT"]
LOGISTIC_MAX_ITER = 1000
MAX_GRAM_CONDITION = 1e12
"""Above this (estimated) condition number LeastSquares uses the pseudo-inverse."""


# --------------------------------------------------------------------------------------------
# Shared helpers (also used by doubly_robust.py and iv.py)
# --------------------------------------------------------------------------------------------


class LeastSquares(RegressorMixin, BaseEstimator):
    """OLS with an intercept from the centred normal equations (Cholesky): ~10x faster than
    LinearRegression's SVD on tall dense X; min-norm (pseudo-inverse) solution if singular."""

    def fit(self, X: Covariates, y: np.ndarray) -> LeastSquares:
        y = np.asarray(y, dtype=np.float64)
        n = X.shape[0]
        mean_x = np.asarray(X.mean(axis=0)).ravel()
        gram = X.T @ X
        gram = (gram.toarray() if sp.issparse(gram) else gram) - n * np.outer(mean_x, mean_x)
        rhs = np.asarray(X.T @ y).ravel() - n * mean_x * y.mean()
        try:
            factor = la.cho_factor(gram)
            diag = np.abs(np.diag(factor[0]))
            if diag.min() <= 0 or (diag.max() / diag.min()) ** 2 > MAX_GRAM_CONDITION:
                raise la.LinAlgError("ill-conditioned")
            coef = la.cho_solve(factor, rhs)
        except la.LinAlgError:   # collinear columns: the minimum-norm least-squares solution
            values, vectors = la.eigh(gram)
            keep = values > values.max() * np.finfo(float).eps * max(gram.shape)
            coef = vectors[:, keep] @ ((vectors[:, keep].T @ rhs) / values[keep])
        self.coef_ = coef
        self.intercept_ = float(y.mean() - mean_x @ coef)
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: Covariates) -> np.ndarray:
        return np.asarray(X @ self.coef_).ravel() + self.intercept_


def default_regressor(sparse: bool) -> BaseEstimator:
    """Least squares for dense X; lightly penalised ridge for sparse (wide, collinear) X."""
    return Ridge(alpha=1.0) if sparse else LeastSquares()


def default_outcome_model(binary: bool, sparse: bool) -> BaseEstimator:
    """The outcome model used when none is given: logistic for binary y, else linear.

    Unpenalised for dense X; a light L2 penalty (C=1) for sparse, wide X.
    """
    if binary:
        return LogisticRegression(C=1.0 if sparse else np.inf, max_iter=LOGISTIC_MAX_ITER)
    return default_regressor(sparse)


class _Constant:
    """Stands in for a classifier whose training labels hold one class (e.g. no events)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict(self, X: Covariates) -> np.ndarray:
        return np.full(X.shape[0], self.value)


def fit_outcome(model: Any, X: Covariates, y: np.ndarray) -> Any:
    """Fit a clone of `model`; a classifier given one class only predicts that class."""
    if is_classifier(model) and np.unique(y).size == 1:
        return _Constant(float(y[0]))
    return clone(model).fit(X, y)


def predict_outcome(model: Any, X: Covariates) -> np.ndarray:
    """E[y | X]: P(y = 1) via predict_proba for classifiers, predict otherwise."""
    if hasattr(model, "predict_proba") and not isinstance(model, _Constant):
        return np.asarray(model.predict_proba(X))[:, 1]
    return np.asarray(model.predict(X), dtype=np.float64).ravel()


def outcome_model_for(model: Any, data: FitData) -> Any:
    """The given outcome model, or the default for this kind of outcome and X."""
    if model is not None:
        return model
    return default_outcome_model(data.kind == "binary", sp.issparse(data.X))


def require_outcome(data: FitData, name: str) -> np.ndarray:
    """The outcome vector y, refusing time-to-event data and outcomes without variation."""
    if data.y is None:
        raise EstimationError(f"{name} needs an outcome y (continuous or binary), not time/event")
    if np.ptp(data.y) == 0:
        raise EstimationError(
            f"the outcome is constant (every y = {data.y[0]:g}): no variation to estimate from"
        )
    return data.y


def with_column(X: Covariates, column: np.ndarray) -> Covariates:
    """X with `column` appended on the right (sparse stays CSR)."""
    column = np.asarray(column, dtype=np.float64).reshape(-1, 1)
    if sp.issparse(X):
        return sp.hstack([X, sp.csr_matrix(column)], format="csr")
    return np.hstack([X, column])


def nonempty(X: Covariates) -> Covariates:
    """X, or a single zero column when X has none (scikit-learn models need a feature)."""
    if X.shape[1] > 0:
        return X
    return sp.csr_matrix((X.shape[0], 1)) if sp.issparse(X) else np.zeros((X.shape[0], 1))


def as_new_covariates(X: Any, n_features: int) -> Covariates:
    """Covariates for prediction, checked like the training X (same number of columns)."""
    if hasattr(X, "to_numpy") and not sp.issparse(X):
        X = X.to_numpy()
    X = as_covariates(X)
    if X.shape[1] != n_features:
        raise EstimationError(f"X has {X.shape[1]} columns, the model was fitted on {n_features}")
    return X


def wald_difference(
    estimate: float, se: float, *, estimand: str, data: FitData, level: float = 0.95,
    ci: tuple[float, float] | None = None,
) -> EffectEstimate:
    """An EffectEstimate on the difference scale: Wald interval unless `ci` is given."""
    return EffectEstimate.from_difference(
        estimate, se, estimand=estimand, n_treated=data.n_treated, n_control=data.n_control,
        level=level, ci=ci)


def stratified_bootstrap(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one bootstrap sample drawn with replacement within each arm."""
    arms = [np.flatnonzero(t == arm) for arm in (0, 1)]
    return np.concatenate([rng.choice(idx, size=idx.size, replace=True) for idx in arms])


def _check_estimand(estimand: str) -> None:
    if estimand not in ("ATE", "ATT"):
        raise EstimationError(f"unknown estimand {estimand!r} (ATE or ATT)")


def _check_bootstrap(n_bootstrap: int) -> None:
    if n_bootstrap < 0 or n_bootstrap == 1:
        raise EstimationError(f"n_bootstrap must be 0 (no interval) or >= 2, got {n_bootstrap}")


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------


class _BootstrappedOutcomeModel(CausalEstimator):
    """Shared fit: point estimate on all rows, then a seeded stratified bootstrap of it."""

    def __init__(self, outcome_model: Any = None, estimand: OutcomeEstimand = "ATE",
                 n_bootstrap: int = 200, seed: int = 0) -> None:
        self.outcome_model = outcome_model
        self.estimand = estimand
        self.n_bootstrap = n_bootstrap
        self.seed = seed

    outcome_model: Any
    estimand: OutcomeEstimand
    n_bootstrap: int
    seed: int
    bootstrap_: np.ndarray

    def _point(self, X: Covariates, t: np.ndarray, y: np.ndarray, keep: bool) -> float:
        raise NotImplementedError

    def _fit(self, data: FitData) -> EffectEstimate:
        _check_estimand(self.estimand)
        _check_bootstrap(self.n_bootstrap)
        y = require_outcome(data, type(self).__name__)
        self._model = outcome_model_for(self.outcome_model, data)
        X = nonempty(data.X)
        estimate = self._point(X, data.t, y, keep=True)
        rng = np.random.default_rng(self.seed)
        draws = np.empty(self.n_bootstrap)
        for b in range(self.n_bootstrap):
            rows = stratified_bootstrap(data.t, rng)
            draws[b] = self._point(X[rows], data.t[rows], y[rows], keep=False)
        self.bootstrap_ = draws
        if self.n_bootstrap == 0:
            return wald_difference(estimate, math.nan, estimand=self.estimand, data=data,
                                   ci=(math.nan, math.nan))
        low, high = np.percentile(draws, [2.5, 97.5])
        return wald_difference(estimate, float(draws.std(ddof=1)), estimand=self.estimand,
                               data=data, ci=(float(low), float(high)))

    def _average(self, ite: np.ndarray, t: np.ndarray) -> float:
        return float(ite.mean() if self.estimand == "ATE" else ite[t == 1].mean())

    def predict_ite(self, X: Any) -> np.ndarray:
        """Individual effects E[y | X, t=1] - E[y | X, t=0] from the models fitted on all rows."""
        if self._data is None:
            raise EstimationError(f"{type(self).__name__} is not fitted yet: call fit() first")
        X = nonempty(as_new_covariates(X, self._data.X.shape[1]))
        return self._ite(X)

    def _ite(self, X: Covariates) -> np.ndarray:
        raise NotImplementedError


class Standardization(_BootstrappedOutcomeModel):
    """G-formula (S-learner): one model y ~ [X, t], predicted for all with t=1 and with t=0.

    With a linear model and no interactions the ATE equals the OLS coefficient of t.
    """

    def _point(self, X: Covariates, t: np.ndarray, y: np.ndarray, keep: bool) -> float:
        model = fit_outcome(self._model, with_column(X, t), y)
        if keep:
            self.model_ = model
        return self._average(self._ite_with(model, X), t)

    @staticmethod
    def _ite_with(model: Any, X: Covariates) -> np.ndarray:
        ones, zeros = np.ones(X.shape[0]), np.zeros(X.shape[0])
        return predict_outcome(model, with_column(X, ones)) - predict_outcome(
            model, with_column(X, zeros))

    def _ite(self, X: Covariates) -> np.ndarray:
        return self._ite_with(self.model_, X)


class TLearner(_BootstrappedOutcomeModel):
    """Separate outcome models per arm; effects are the differences of their predictions."""

    def _point(self, X: Covariates, t: np.ndarray, y: np.ndarray, keep: bool) -> float:
        arms = [np.flatnonzero(t == arm) for arm in (0, 1)]
        models = (fit_outcome(self._model, X[arms[0]], y[arms[0]]),
                  fit_outcome(self._model, X[arms[1]], y[arms[1]]))
        if keep:
            self.models_ = models
        return self._average(self._ite_with(models, X), t)

    @staticmethod
    def _ite_with(models: tuple[Any, Any], X: Covariates) -> np.ndarray:
        return predict_outcome(models[1], X) - predict_outcome(models[0], X)

    def _ite(self, X: Covariates) -> np.ndarray:
        return self._ite_with(self.models_, X)
