"""Refutation checks in the spirit of DoWhy: refit an estimator on altered data, many times.

`placebo_treatment` permutes the treatment (any real effect must vanish); `random_common_cause`
adds an independent random covariate (the estimate must not move). Both return the
distribution of refitted estimates next to the original and an empirical p-value. Ratios
(hazard ratio, risk ratio) are compared on the log scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from estimators.base import CausalEstimator
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError


@dataclass(frozen=True, eq=False)
class RefutationResult:
    """Original estimate, the estimates under the refuter, and how the original compares.

    placebo_treatment: p_value = share of placebo effects at least as far from the null as the
    original (small = the effect stands out from placebo noise). random_common_cause: p_value =
    two-sided position of the original within the new estimates (small = the estimate moved).
    """

    refuter: str
    original: EffectEstimate
    distribution: np.ndarray = field(repr=False)
    """One estimate per refit (on the estimate's scale); NaN where a refit raised."""
    expected: float = 0.0
    """Where the new estimates should centre: the null value (placebo) or the original."""
    p_value: float = 1.0
    n_failed: int = 0

    @property
    def mean(self) -> float:
        return float(np.nanmean(self.distribution))

    @property
    def sd(self) -> float:
        return float(np.nanstd(self.distribution, ddof=1))


def _scale(estimate: EffectEstimate) -> tuple[Any, float]:
    """The analysis scale (identity or log) and the null value of the effect measure."""
    if estimate.measure == "difference":
        return (lambda v: np.asarray(v, dtype=np.float64)), 0.0
    return np.log, 1.0


def _fresh(estimator: CausalEstimator) -> CausalEstimator:
    return type(estimator)(**estimator.get_params())


def _as_matrix(X: Any) -> Any:
    return X.to_numpy() if hasattr(X, "to_numpy") and not sp.issparse(X) else X


def _refits(estimator: CausalEstimator, n: int, make: Any) -> tuple[np.ndarray, int]:
    """Estimates of n refits on data from make(i) -> (X, t, fit keyword arguments)."""
    if n < 1:
        raise EstimationError(f"n (number of refits) must be at least 1, got {n}")
    values = np.full(n, np.nan)
    for i in range(n):
        X, t, kwargs = make(i)
        try:
            values[i] = _fresh(estimator).fit(X, t, **kwargs).effect().estimate
        except EstimationError:
            continue
    failed = int(np.isnan(values).sum())
    if failed == n:
        raise EstimationError(f"all {n} refits of {type(estimator).__name__} failed")
    return values, failed


def placebo_treatment(
    estimator: CausalEstimator, X: Any, t: Any, y: Any = None, *, time: Any = None,
    event: Any = None, n: int = 100, seed: int = 0, **fit_kwargs: Any,
) -> RefutationResult:
    """Refit with the treatment randomly permuted n times: the effects should centre on the null.

    Extra fit arguments are passed unchanged (do not pass a precomputed ps: it belongs to the
    real treatment).
    """
    outcome = {"y": y, "time": time, "event": event, **fit_kwargs}
    original = _fresh(estimator).fit(X, t, **outcome).effect()
    rng = np.random.default_rng(seed)
    t = np.asarray(t)
    values, failed = _refits(estimator, n, lambda _: (X, rng.permutation(t), outcome))
    scale, null = _scale(original)
    ok = values[~np.isnan(values)]
    distance = np.abs(scale(ok) - scale(null))
    extreme = int(np.count_nonzero(distance >= abs(scale(original.estimate) - scale(null))))
    return RefutationResult(
        refuter="placebo_treatment", original=original, distribution=values, expected=null,
        p_value=(1 + extreme) / (1 + ok.size), n_failed=failed,
    )


def random_common_cause(
    estimator: CausalEstimator, X: Any, t: Any, y: Any = None, *, time: Any = None,
    event: Any = None, n: int = 100, seed: int = 0, **fit_kwargs: Any,
) -> RefutationResult:
    """Refit n times with an added N(0, 1) covariate unrelated to anything: nothing should move."""
    outcome = {"y": y, "time": time, "event": event, **fit_kwargs}
    original = _fresh(estimator).fit(X, t, **outcome).effect()
    rng = np.random.default_rng(seed)
    X = _as_matrix(X)

    def augmented(_: int) -> tuple[Any, Any, dict[str, Any]]:
        column = rng.standard_normal((X.shape[0], 1))
        if sp.issparse(X):
            return sp.hstack([X, sp.csr_matrix(column)], format="csr"), t, outcome
        return np.hstack([np.asarray(X, dtype=np.float64), column]), t, outcome

    values, failed = _refits(estimator, n, augmented)
    scale, _ = _scale(original)
    ok = scale(values[~np.isnan(values)])
    at = float(scale(original.estimate))
    position = 2 * min(np.mean(ok <= at), np.mean(ok >= at))
    return RefutationResult(
        refuter="random_common_cause", original=original, distribution=values,
        expected=original.estimate, p_value=float(min(1.0, position)), n_failed=failed,
    )

