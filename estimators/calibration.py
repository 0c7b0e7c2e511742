"""Empirical calibration of p-values and confidence intervals with negative/positive controls.

Method of OHDSI's EmpiricalCalibration R package (Schuemie et al. 2014, 2018), written anew in
numpy/scipy. Fits are exact maximum likelihood; the R package stops Nelder-Mead/BFGS earlier, so
its printed fits can differ from ours in the 4th decimal (same likelihood to ~1e-5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, stats

from estimators.errors import EstimationError

SdModel = Literal["linear", "log_linear"]

MIN_CONTROLS = 5
_ROOT_BRACKET = 100.0  # calibrated bounds are searched in [-100, 100] (log scale), as the package
_LOG_2PI = float(np.log(2.0 * np.pi))


@dataclass(frozen=True)
class EmpiricalNull:
    """Normal distribution of systematic error fitted to negative controls (log scale)."""

    mean: float
    sd: float
    n_controls: int
    n_dropped: int = 0
    log_likelihood: float = float("nan")


@dataclass(frozen=True)
class SystematicErrorModel:
    """Systematic error ~ N(mean, sd) with mean and sd (or log sd) linear in the true log effect.

    sd_model "linear" (the package's current model): sd = sd_intercept + sd_slope * |true|;
    "log_linear" (its legacy model): sd = exp(sd_intercept + sd_slope * true).
    """

    mean_intercept: float
    mean_slope: float
    sd_intercept: float
    sd_slope: float
    sd_model: SdModel = "linear"
    n_controls: int = 0
    n_dropped: int = 0
    log_likelihood: float = float("nan")

    def error_mean(self, true_log_rr: ArrayLike) -> NDArray[np.float64]:
        """Mean of the estimate's distribution when the true log effect is true_log_rr."""
        return self.mean_intercept + self.mean_slope * np.asarray(true_log_rr, dtype=float)

    def error_sd(self, true_log_rr: ArrayLike) -> NDArray[np.float64]:
        """SD of the systematic error when the true log effect is true_log_rr."""
        t = np.asarray(true_log_rr, dtype=float)
        if self.sd_model == "log_linear":
            with np.errstate(over="ignore"):
                return np.exp(self.sd_intercept + self.sd_slope * t)
        return self.sd_intercept + self.sd_slope * np.abs(t)


class CalibratedCi(NamedTuple):
    """Calibrated log-scale point estimate, confidence limits and the implied standard error."""

    log_rr: NDArray[np.float64] | float
    ci_low: NDArray[np.float64] | float
    ci_high: NDArray[np.float64] | float
    se: NDArray[np.float64] | float


# --------------------------------------------------------------------------------------------
# helpers


def _as_pair(log_rr: ArrayLike, se_log_rr: ArrayLike) -> tuple[NDArray, NDArray]:
    """Float arrays of equal shape, or ValueError."""
    y = np.asarray(log_rr, dtype=float)
    s = np.asarray(se_log_rr, dtype=float)
    if y.shape != s.shape:
        raise ValueError(f"log_rr has shape {y.shape} but se_log_rr has shape {s.shape}")
    return y, s


def _scalar_or_array(x: NDArray, scalar: bool) -> NDArray | float:
    """Return a Python float for scalar input, the array otherwise."""
    return float(x) if scalar else x


def _usable_controls(
    y: NDArray, s: NDArray, t: NDArray, min_controls: int, what: str
) -> tuple[NDArray, NDArray, NDArray, int]:
    """Keep controls with finite estimate, SE > 0 and finite truth; raise if too few remain."""
    y, s, t = y.ravel(), s.ravel(), t.ravel()
    keep = np.isfinite(y) & np.isfinite(s) & (s > 0) & np.isfinite(t)
    n_dropped = int(keep.size - keep.sum())
    n = int(keep.sum())
    if n < min_controls:
        raise EstimationError(
            f"only {n} usable {what} (need at least {min_controls}); {n_dropped} dropped for a "
            "missing or infinite estimate or a missing, infinite or non-positive standard error"
        )
    return y[keep], s[keep], t[keep], n_dropped


def _profile_nll(
    y: NDArray, s: NDArray, x: NDArray, sd: NDArray
) -> tuple[float, NDArray, NDArray]:
    """Negative log likelihood of y_i ~ N(x_i'beta, sd_i^2 + s_i^2) at the WLS beta.

    Returns (nll, beta, d nll / d sd_i); by the envelope theorem beta may be held fixed.
    """
    v = sd * sd + s * s
    w = 1.0 / v
    xtw = x.T * w
    beta = np.linalg.solve(xtw @ x, xtw @ y)
    r = y - x @ beta
    wr2 = w * r * r
    nll = 0.5 * float(np.sum(_LOG_2PI + np.log(v) + wr2))
    grad_sd = (w - wr2 * w) * sd
    return nll, beta, grad_sd


def _fit_constant_sd(y: NDArray, s: NDArray) -> tuple[float, float, float]:
    """ML fit of y_i ~ N(mu, sd^2 + s_i^2): profile over sd (grid, then bounded Brent)."""
    x = np.ones((y.size, 1))

    def nll(sd: float) -> float:
        return _profile_nll(y, s, x, np.full(y.size, sd))[0]

    spread = float(np.ptp(y)) + float(np.max(s))
    grid = np.concatenate([[0.0], np.geomspace(1e-5, 2.0, 80) * spread])
    values = np.array([nll(g) for g in grid])
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    best_sd, best = float(grid[i]), float(values[i])
    if hi > lo:
        res = optimize.minimize_scalar(
            nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12, "maxiter": 500}
        )
        if res.fun <= best:
            best_sd, best = float(res.x), float(res.fun)
    _, beta, _ = _profile_nll(y, s, x, np.full(y.size, best_sd))
    return float(beta[0]), best_sd, best


# --------------------------------------------------------------------------------------------
# empirical null and p-value calibration


def fit_null(
    log_rr: ArrayLike, se_log_rr: ArrayLike, *, min_controls: int = MIN_CONTROLS
) -> EmpiricalNull:
    """Fit the empirical null N(mean, sd) to negative-control estimates (package's fitNull).

    Each control is modelled as log_rr_i ~ N(mean, sd^2 + se_i^2) and fitted by exact maximum
    likelihood; controls with a non-finite estimate or SE, or SE <= 0, are dropped and counted.
    """
    y, s = _as_pair(log_rr, se_log_rr)
    y, s, _, n_dropped = _usable_controls(y, s, np.zeros(y.size), min_controls,
                                          "negative controls")
    mean, sd, nll = _fit_constant_sd(y, s)
    return EmpiricalNull(mean=mean, sd=sd, n_controls=int(y.size), n_dropped=n_dropped,
                         log_likelihood=-nll)


def calibrate_p(
    null: EmpiricalNull,
    log_rr: ArrayLike,
    se_log_rr: ArrayLike,
    two_sided: bool = True,
    upper: bool = True,
) -> NDArray[np.float64] | float:
    """Calibrated p-value of each estimate against the empirical null (package's calibrateP).

    One-sided: upper=True tests for an effect above the null (small p when log_rr is large).
    Non-finite inputs give NaN. A scalar input gives a float.
    """
    y, s = _as_pair(log_rr, se_log_rr)
    scalar = y.ndim == 0
    with np.errstate(invalid="ignore"):
        z = (y - null.mean) / np.sqrt(null.sd**2 + s * s)
    if two_sided:
        p = 2.0 * stats.norm.sf(np.abs(z))
    elif upper:
        p = stats.norm.sf(z)
    else:
        p = stats.norm.cdf(z)
    p = np.where(np.isfinite(y) & np.isfinite(s), np.minimum(p, 1.0), np.nan)
    return _scalar_or_array(p, scalar)


def expected_absolute_systematic_error(null: EmpiricalNull) -> float:
    """EASE: E|X| for X ~ N(null.mean, null.sd), one number for bias and its spread."""
    mu, sigma = float(null.mean), float(null.sd)
    if sigma <= 0:
        return abs(mu)
    return float(
        sigma * np.sqrt(2.0 / np.pi) * np.exp(-mu * mu / (2.0 * sigma * sigma))
        + mu * (1.0 - 2.0 * stats.norm.cdf(-mu / sigma))
    )


# --------------------------------------------------------------------------------------------
# systematic error model and confidence-interval calibration


def error_model_from_null(
    null: EmpiricalNull, mean_slope: float = 1.0, sd_slope: float = 0.0
) -> SystematicErrorModel:
    """Error model from negative controls only, assuming how error changes with the true effect.

    The default (mean_slope 1, sd_slope 0) assumes the same error at every true effect size, as
    the package's convertNullToErrorModel.
    """
    return SystematicErrorModel(
        mean_intercept=null.mean, mean_slope=mean_slope, sd_intercept=null.sd,
        sd_slope=sd_slope, sd_model="linear", n_controls=null.n_controls,
        n_dropped=null.n_dropped, log_likelihood=null.log_likelihood,
    )


def _fit_sd_params(
    y: NDArray, s: NDArray, x: NDArray, sd_of: Callable[[NDArray], NDArray],
    d_sd_of: Callable[[NDArray, NDArray], NDArray], starts: list[tuple[float, float]],
    bounds: list[tuple[float | None, float | None]],
) -> tuple[NDArray, NDArray, float]:
    """Multi-start L-BFGS-B over the two SD parameters, mean parameters profiled out by WLS."""

    def fun(theta: NDArray) -> tuple[float, NDArray]:
        sd = sd_of(theta)
        nll, _, g_sd = _profile_nll(y, s, x, sd)
        return nll, d_sd_of(theta, sd).T @ g_sd

    best: optimize.OptimizeResult | None = None
    for start in starts:
        res = optimize.minimize(fun, np.array(start), jac=True, method="L-BFGS-B",
                                bounds=bounds, options={"ftol": 1e-15, "gtol": 1e-10,
                                                        "maxiter": 2000})
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None
    _, beta, _ = _profile_nll(y, s, x, sd_of(best.x))
    return best.x, beta, float(best.fun)


def fit_systematic_error_model(
    log_rr: ArrayLike,
    se_log_rr: ArrayLike,
    true_log_rr: ArrayLike | None = None,
    *,
    sd_model: SdModel = "linear",
    min_controls: int = MIN_CONTROLS,
) -> SystematicErrorModel:
    """Fit the systematic error model to controls by exact ML (package's fitSystematicErrorModel).

    log_rr_i ~ N(a + b true_i, sd(true_i)^2 + se_i^2). With truth None or constant (negative
    controls only) b = 1 and sd slope 0 are fixed: then equal to error_model_from_null(fit_null).
    """
    y, s = _as_pair(log_rr, se_log_rr)
    t = np.zeros(y.shape) if true_log_rr is None else np.asarray(true_log_rr, dtype=float)
    if t.shape != y.shape:
        raise ValueError(f"true_log_rr has shape {t.shape} but log_rr has shape {y.shape}")
    if sd_model not in ("linear", "log_linear"):
        raise ValueError(f"sd_model must be 'linear' or 'log_linear', not {sd_model!r}")
    y, s, t, n_dropped = _usable_controls(y, s, t, min_controls, "controls")
    n = int(y.size)

    if np.ptp(t) == 0:
        mean, sd, nll = _fit_constant_sd(y - t, s)
        if sd_model == "log_linear":
            sd_intercept = float(np.log(sd)) if sd > 0 else float("-inf")
        else:
            sd_intercept = sd
        return SystematicErrorModel(mean, 1.0, sd_intercept, 0.0, sd_model, n, n_dropped, -nll)

    x = np.column_stack([np.ones(n), t])
    null_sd = _fit_constant_sd(y - t, s)[1]
    if sd_model == "linear":
        a = np.abs(t)
        a_min, a_range = float(a.min()), float(np.ptp(a))
        # one magnitude of true effect with both signs leaves a single SD parameter
        lam = np.zeros(n) if a_range == 0 else (a - a_min) / a_range

        def sd_of(theta: NDArray) -> NDArray:
            # theta = (sd at smallest |true|, sd at largest |true|): a box keeps sd >= 0 everywhere
            return theta[0] * (1.0 - lam) + theta[1] * lam

        def d_sd_of(theta: NDArray, sd: NDArray) -> NDArray:
            return np.column_stack([1.0 - lam, lam])

        s0 = max(null_sd, 1e-3)
        starts = [(s0, s0), (0.05, 0.05), (0.5, 0.5), (0.05, 0.5), (0.5, 0.05)]
        theta, beta, nll = _fit_sd_params(y, s, x, sd_of, d_sd_of, starts,
                                          [(0.0, None), (0.0, None)])
        slope = 0.0 if a_range == 0 else (theta[1] - theta[0]) / a_range
        intercept = theta[0] - slope * a_min
    else:

        def sd_of(theta: NDArray) -> NDArray:
            return np.exp(theta[0] + theta[1] * t)

        def d_sd_of(theta: NDArray, sd: NDArray) -> NDArray:
            return np.column_stack([sd, sd * t])

        c0 = float(np.log(max(null_sd, 1e-3)))
        starts = [(c0, 0.0), (np.log(0.05), 0.0), (np.log(0.5), 0.0), (c0, -0.5), (c0, 0.5)]
        theta, beta, nll = _fit_sd_params(y, s, x, sd_of, d_sd_of, starts,
                                          [(-30.0, 5.0), (-20.0, 20.0)])
        intercept, slope = float(theta[0]), float(theta[1])
    return SystematicErrorModel(
        mean_intercept=float(beta[0]), mean_slope=float(beta[1]), sd_intercept=float(intercept),
        sd_slope=float(slope), sd_model=sd_model, n_controls=n, n_dropped=n_dropped,
        log_likelihood=-nll,
    )


def _solve_bound(model: SystematicErrorModel, y: NDArray, s: NDArray, z: float) -> NDArray:
    """Root in [-100, 100] of z + (mean(x) - y) / sqrt(sd(x)^2 + s^2), by vectorised bisection.

    NaN where the function does not change sign on the bracket (as the package's NA).
    """

    def f(x: NDArray) -> NDArray:
        num = model.error_mean(x) - y
        with np.errstate(over="ignore", invalid="ignore"):
            den = np.sqrt(model.error_sd(x) ** 2 + s * s)
            ratio = num / den
        ratio = np.where(np.isinf(den), np.sign(num) * 1e-10, ratio)
        return z + ratio

    lo = np.full(y.shape, -_ROOT_BRACKET)
    hi = np.full(y.shape, _ROOT_BRACKET)
    f_lo, f_hi = f(lo), f(hi)
    ok = np.isfinite(f_lo) & np.isfinite(f_hi) & (np.sign(f_lo) != np.sign(f_hi))
    ok |= (f_lo == 0) | (f_hi == 0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        f_mid = f(mid)
        left = np.sign(f_mid) == np.sign(f_lo)
        lo = np.where(left, mid, lo)
        f_lo = np.where(left, f_mid, f_lo)
        hi = np.where(left, hi, mid)
        if np.all(hi - lo <= 4 * np.finfo(float).eps * np.maximum(1.0, np.abs(lo))):
            break
    root = 0.5 * (lo + hi)
    return np.where(ok, root, np.nan)


def calibrate_ci(
    model: SystematicErrorModel,
    log_rr: ArrayLike,
    se_log_rr: ArrayLike,
    level: float = 0.95,
) -> CalibratedCi:
    """Calibrated log-scale estimate, CI and SE given the systematic error model.

    As the package's calibrateConfidenceInterval: each limit is the true effect at which the
    observed estimate sits at the matching quantile of N(mean(true), sd(true)^2 + se^2).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y, s = _as_pair(log_rr, se_log_rr)
    scalar = y.ndim == 0
    y1, s1 = np.atleast_1d(y), np.atleast_1d(s)
    good = np.isfinite(y1) & np.isfinite(s1) & (s1 >= 0)
    yy, ss = np.where(good, y1, 0.0), np.where(good, s1, 1.0)
    q = float(stats.norm.ppf(0.5 + level / 2.0))
    est = np.where(good, _solve_bound(model, yy, ss, 0.0), np.nan)
    low = np.where(good, _solve_bound(model, yy, ss, q), np.nan)
    high = np.where(good, _solve_bound(model, yy, ss, -q), np.nan)
    se = (high - low) / (2.0 * q)
    if scalar:
        return CalibratedCi(float(est[0]), float(low[0]), float(high[0]), float(se[0]))
    shape = y.shape
    return CalibratedCi(est.reshape(shape), low.reshape(shape), high.reshape(shape),
                        se.reshape(shape))
