"""What every estimator in the library shares: input checks, the propensity step, the result.

An estimator is used like a scikit-learn model:

    est = IPW(stabilized=True).fit(X, t, y)                 # continuous or binary y
    est = IPW().fit(X, t, time=days, event=flags)           # time to event -> hazard ratio
    res = est.effect()                                      # EffectEstimate

`X` may be a numpy array, a pandas DataFrame or a scipy sparse matrix; `t` is binary. Inputs are
checked once here so every estimator raises the same specific EstimationError for bad data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from sklearn.base import clone

from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.propensity import (
    PS_EPS,
    PropensityFit,
    as_covariates,
    as_treated,
    check_ps,
    fit_propensity,
)

OutcomeKind = Literal["continuous", "binary", "survival"]


@dataclass(frozen=True, eq=False)
class FitData:
    """Checked inputs: covariates, treatment and one kind of outcome."""

    X: np.ndarray | sp.csr_matrix
    t: np.ndarray                  # int8 0/1
    kind: OutcomeKind
    y: np.ndarray | None = None    # float64, for continuous/binary outcomes
    time: np.ndarray | None = None
    event: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.t.shape[0])

    @property
    def n_treated(self) -> int:
        return int(self.t.sum())

    @property
    def n_control(self) -> int:
        return self.n - self.n_treated


def check_inputs(
    X: Any, t: Any, y: Any = None, *, time: Any = None, event: Any = None
) -> FitData:
    """Validate and convert inputs; exactly one of y or (time, event) must be given."""
    if hasattr(X, "to_numpy") and not sp.issparse(X):
        X = X.to_numpy()
    X = as_covariates(X)
    treated = as_treated(np.asarray(t), X.shape[0])
    if treated.sum() == 0 or treated.sum() == treated.shape[0]:
        arm = "treated" if treated.sum() == 0 else "comparator"
        raise EstimationError(f"the {arm} arm is empty")
    if (y is None) == (time is None):
        raise EstimationError("give either y, or time and event (time to event), not both")
    if y is not None:
        y = _vector(y, "outcome y", X.shape[0])
        kind: OutcomeKind = "binary" if np.isin(y, (0.0, 1.0)).all() else "continuous"
        return FitData(X, treated, kind, y=y)
    if event is None:
        raise EstimationError("time-to-event outcomes need both time and event")
    time = _vector(time, "time", X.shape[0])
    if (time < 0).any():
        raise EstimationError("time must be non-negative")
    event = _vector(event, "event", X.shape[0])
    if not np.isin(event, (0.0, 1.0)).all():
        raise EstimationError("event must be binary (1 = event, 0 = censored)")
    return FitData(X, treated, "survival", time=time, event=event.astype(np.int8))


def _vector(values: Any, name: str, n: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.shape[0] != n:
        raise EstimationError(f"{name} must be a vector of length {n}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise EstimationError(f"{name} contains NaN or infinite values")
    return array


@dataclass(frozen=True, eq=False)
class FittedPropensity:
    """Propensity scores and what produced them (for variance corrections that need the model)."""

    ps: np.ndarray
    default_fit: PropensityFit | None = None   # our cross-validated L1 logistic model
    model: Any = None                          # a fitted scikit-learn classifier


def fit_propensity_model(
    data: FitData, propensity_model: Any = None, ps: Any = None, *, seed: int = 0
) -> FittedPropensity:
    """P(treated | X): given (`ps`), from a scikit-learn classifier, or the default L1 model."""
    if ps is not None:
        return FittedPropensity(check_ps(ps, data.n, open_interval=True))
    if propensity_model is None:
        fit = fit_propensity(data.X, data.t, seed=seed)
        return FittedPropensity(fit.ps, default_fit=fit)
    model = clone(propensity_model).fit(data.X, data.t)
    scores = np.clip(np.asarray(model.predict_proba(data.X))[:, 1], PS_EPS, 1 - PS_EPS)
    return FittedPropensity(check_ps(scores, data.n, open_interval=True), model=model)


def propensity_scores(
    data: FitData, propensity_model: Any = None, ps: Any = None, *, seed: int = 0
) -> np.ndarray:
    """The scores alone (see fit_propensity_model)."""
    return fit_propensity_model(data, propensity_model, ps, seed=seed).ps


class CausalEstimator:
    """Base class: `fit` checks inputs and calls `_fit`; `effect` returns the estimate.

    Subclasses implement `_fit(data, **kwargs) -> EffectEstimate` and keep their constructor
    arguments as attributes of the same name (so `clone`-style refits work).
    """

    _effect: EffectEstimate | None = None
    _data: FitData | None = None
    _fit_kwargs: dict[str, Any] | None = None

    def fit(self, X: Any, t: Any, y: Any = None, *, time: Any = None, event: Any = None,
            **kwargs: Any) -> CausalEstimator:
        data = check_inputs(X, t, y, time=time, event=event)
        self._effect = self._fit(data, **kwargs)
        self._data, self._fit_kwargs = data, kwargs
        return self

    def _fit(self, data: FitData, **kwargs: Any) -> EffectEstimate:
        raise NotImplementedError

    def effect(self) -> EffectEstimate:
        if self._effect is None:
            raise EstimationError(f"{type(self).__name__} is not fitted yet: call fit() first")
        return self._effect

    def effect_by(self, groups: Any) -> dict[Any, EffectEstimate]:
        """Subgroup effects (CATEs): the same estimator refitted within each group's rows.

        Row-aligned extra fit arguments (a precomputed `ps`, instruments `z`: any array whose
        first dimension is the number of rows) are subset with the rows.
        """
        data = self._data
        if data is None:
            raise EstimationError(f"{type(self).__name__} is not fitted yet: call fit() first")
        groups = np.asarray(groups)
        if groups.shape != (data.n,):
            raise EstimationError(f"groups must be a vector of length {data.n}")
        results = {}
        for group in np.unique(groups):
            rows = np.flatnonzero(groups == group)
            kwargs = {
                key: np.asarray(value)[rows]
                if np.ndim(value) >= 1 and np.shape(value)[0] == data.n else value
                for key, value in (self._fit_kwargs or {}).items()
            }
            part = FitData(
                data.X[rows], data.t[rows], data.kind,
                y=None if data.y is None else data.y[rows],
                time=None if data.time is None else data.time[rows],
                event=None if data.event is None else data.event[rows],
            )
            if part.n_treated == 0 or part.n_control == 0:
                raise EstimationError(f"subgroup {group!r} has an empty arm")
            results[group.item() if hasattr(group, "item") else group] = type(self)(
                **self.get_params())._fit(part, **kwargs)
        return results

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, read back from attributes of the same name."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}
