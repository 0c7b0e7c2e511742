"""Two-stage least squares for an endogenous binary treatment with one or more instruments.

y = b0 + X b + theta t + u, with t instrumented by z (excluded instruments) and X exogenous.
The second-stage SEs use the structural residuals y - [1, X, t] beta (not the residuals of the
naive OLS of y on the fitted t), matching statsmodels' IV2SLS: s^2 = u'u / (n - k). A
heteroskedasticity-robust HC0 sandwich is computed as well (cov_type="robust" reports it).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

from estimators.base import CausalEstimator, FitData
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.outcome_models import Covariates, require_outcome, wald_difference

MIN_FIRST_STAGE_F = 1.0
"""Below this first-stage F (about its expectation when z is irrelevant) no estimate is made."""

WEAK_INSTRUMENT_F = 10.0
"""Staiger-Stock rule of thumb: a first-stage F below this flags a weak instrument."""

MAX_CONDITION = 1e12
"""Condition number (of the scaled cross-product matrix) above which columns count as collinear."""

CovType = Literal["unadjusted", "robust"]


def _instruments(z: Any, n: int) -> np.ndarray:
    if z is None:
        raise EstimationError("2SLS needs an instrument: fit(X, t, y, z=instrument)")
    z = np.asarray(z, dtype=np.float64)
    z = z.reshape(-1, 1) if z.ndim == 1 else z
    if z.ndim != 2 or z.shape[0] != n or z.shape[1] == 0:
        raise EstimationError(f"instrument z must have {n} rows (one column per instrument)")
    if not np.isfinite(z).all():
        raise EstimationError("instrument z contains NaN or infinite values")
    if (np.ptp(z, axis=0) == 0).any():
        raise EstimationError("an instrument is constant: it cannot move the treatment")
    return z


def _exogenous(X: Covariates) -> Covariates:
    """An intercept plus the non-constant columns of X (constant columns would duplicate it)."""
    n = X.shape[0]
    if sp.issparse(X):
        spread = X.max(axis=0).toarray().ravel() - X.min(axis=0).toarray().ravel()
        return sp.hstack([np.ones((n, 1)), X[:, np.flatnonzero(spread > 0)]], format="csr")
    return np.hstack([np.ones((n, 1)), X[:, np.ptp(X, axis=0) > 0]])


def _hstack(a: Covariates, b: np.ndarray) -> Covariates:
    return sp.hstack([a, b], format="csr") if sp.issparse(a) else np.hstack([a, b])


def _cross(a: Covariates, b: Covariates) -> np.ndarray:
    out = a.T @ b
    return out.toarray() if sp.issparse(out) else np.asarray(out)


def _solve_psd(A: np.ndarray, B: np.ndarray, what: str) -> np.ndarray:
    """Solve A x = B for a symmetric positive definite A, refusing near-singular systems."""
    d = np.sqrt(np.diag(A))
    if np.linalg.cond(A / np.outer(d, d)) > MAX_CONDITION:
        raise EstimationError(f"{what} are collinear: the 2SLS estimate is not identified")
    return la.solve(A, B, assume_a="pos")


def _rss(target: np.ndarray, design: Covariates, coef: np.ndarray) -> float:
    resid = target - np.asarray(design @ coef).ravel()
    return float(resid @ resid)


class TwoStageLeastSquares(CausalEstimator):
    """2SLS effect of t on y: fit(X, t, y, z=instrument); X exogenous, an intercept is added.

    Attributes after fit: first_stage_f_ (F of the excluded instruments, homoskedastic),
    weak_instrument_ (F < 10), params_ ([intercept, X..., t]), se_unadjusted_, se_robust_ (HC0).
    """

    def __init__(self, cov_type: CovType = "unadjusted") -> None:
        self.cov_type = cov_type

    def _fit(self, data: FitData, *, z: Any = None) -> EffectEstimate:
        if self.cov_type not in ("unadjusted", "robust"):
            raise EstimationError(f"unknown cov_type {self.cov_type!r} (unadjusted or robust)")
        y = require_outcome(data, "2SLS")
        z = _instruments(z, data.n)
        t = data.t.astype(np.float64).reshape(-1, 1)
        exog = _exogenous(data.X)
        k_exog, q = exog.shape[1], z.shape[1]
        W, Z = _hstack(exog, t), _hstack(exog, z)   # regressors, instruments (exog + excluded)
        n, k = data.n, W.shape[1]
        if n <= Z.shape[1]:
            raise EstimationError(f"{n} persons are too few for {Z.shape[1]} instrument columns")

        ZZ, ZW, Zy = _cross(Z, Z), _cross(Z, W), _cross(Z, y.reshape(-1, 1)).ravel()
        A = _solve_psd(ZZ, ZW, "instruments and covariates")    # first-stage coefficients

        # First stage of t: F test of the excluded instruments.
        rss_full = _rss(t.ravel(), Z, A[:, -1])
        restricted = la.solve(ZZ[:k_exog, :k_exog], ZW[:k_exog, -1], assume_a="pos")
        rss_exog = _rss(t.ravel(), exog, restricted)
        df_first = n - Z.shape[1]
        f_stat = ((rss_exog - rss_full) / q) / (rss_full / df_first) if rss_full > 0 else math.inf
        self.first_stage_f_ = float(f_stat)
        self.first_stage_partial_r2_ = float((rss_exog - rss_full) / rss_exog)
        self.weak_instrument_ = bool(f_stat < WEAK_INSTRUMENT_F)
        if f_stat < MIN_FIRST_STAGE_F:
            raise EstimationError(
                f"the instrument has no first-stage relevance (F = {f_stat:.3g} < "
                f"{MIN_FIRST_STAGE_F:g}): the treatment effect is not identified"
            )

        XhX = ZW.T @ A                                           # W' P_Z W
        bread = _solve_psd(XhX, np.eye(k), "the instrumented regressors")
        bread = (bread + bread.T) / 2
        beta = bread @ (A.T @ Zy)
        u = y - np.asarray(W @ beta).ravel()

        cov_unadjusted = bread * float(u @ u) / (n - k)
        if sp.issparse(Z):
            meat_z = _cross(Z.multiply((u * u).reshape(-1, 1)).tocsr(), Z)
        else:
            meat_z = (Z * (u * u)[:, None]).T @ Z
        cov_robust = bread @ (A.T @ meat_z @ A) @ bread
        self.params_ = beta
        self.se_unadjusted_ = float(math.sqrt(cov_unadjusted[-1, -1]))
        self.se_robust_ = float(math.sqrt(cov_robust[-1, -1]))
        self.cov_ = cov_unadjusted if self.cov_type == "unadjusted" else cov_robust
        se = self.se_unadjusted_ if self.cov_type == "unadjusted" else self.se_robust_
        return wald_difference(float(beta[-1]), se, estimand="LATE (2SLS)", data=data)
