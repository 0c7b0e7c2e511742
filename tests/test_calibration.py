"""Empirical calibration: the EmpiricalCalibration vignettes' published numbers on the package's
own example data, plus seeded simulations with a known systematic error.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, optimize, stats

from estimators.calibration import (
    EmpiricalNull,
    SystematicErrorModel,
    calibrate_ci,
    calibrate_p,
    error_model_from_null,
    expected_absolute_systematic_error,
    fit_null,
    fit_systematic_error_model,
)
from estimators.errors import EstimationError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "empirical_calibration"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"{DATA} is absent (shared team data not here)"
)


def _simulate(rng: np.random.Generator, n: int, true_log_rr: np.ndarray | float,
              bias_mean: float = 0.2, bias_sd: float = 0.15, mean_slope: float = 1.0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimates = slope * truth + bias ~ N(bias_mean, bias_sd) + sampling error with known SE."""
    t = np.broadcast_to(np.asarray(true_log_rr, dtype=float), (n,)).copy()
    se = rng.uniform(0.05, 0.3, n)
    y = mean_slope * t + rng.normal(bias_mean, bias_sd, n) + rng.normal(0.0, se)
    return y, se, t


# ------------------------------------------------------------------ published reference values


@pytest.fixture(scope="module")
def sccs() -> pd.DataFrame:
    return pd.read_csv(DATA / "sccs.csv")


@pytest.fixture(scope="module")
def southworth() -> pd.DataFrame:
    return pd.read_csv(DATA / "southworthReplication.csv")


@pytest.mark.shared_data
@needs_data
def test_sccs_null_and_sertraline_p(sccs: pd.DataFrame) -> None:
    neg = sccs[sccs.groundTruth == 0]
    null = fit_null(neg.logRr, neg.seLogRr)
    assert null.n_controls == 45 and null.n_dropped == 0
    # Published (README / vignette): mean 0.7922, SD 0.2834. Our exact MLE is 0.792116, 0.283423:
    # SD to all 4 digits; the mean 0.8e-4 from the published value (the package's optimiser
    # stops before the optimum; its pkgdown renderings print 0.7921/0.2834 and 0.7920/0.2835).
    assert round(null.sd, 4) == 0.2834
    assert null.mean == pytest.approx(0.7922, abs=1e-4)
    assert round(null.mean, 3) == 0.792
    drug = sccs[sccs.groundTruth == 1]
    assert list(drug.drugName) == ["Sertraline"]
    assert math.exp(float(drug.logRr.iloc[0])) == pytest.approx(2.08, abs=0.005)
    p = calibrate_p(null, drug.logRr.to_numpy(), drug.seLogRr.to_numpy())
    assert p.shape == (1,)
    assert round(float(p[0]), 3) == 0.839  # vignette: 0.839 (renderings 0.8390598, 0.839405)
    assert float(p[0]) == pytest.approx(0.839405, abs=5e-4)
    # traditional p is ~0
    z = float(drug.logRr.iloc[0] / drug.seLogRr.iloc[0])
    assert 2 * stats.norm.sf(z) < 1e-20
    # EASE: package example prints 0.7924259 for this null
    assert expected_absolute_systematic_error(null) == pytest.approx(0.7924259, abs=2e-4)


@pytest.mark.shared_data
@needs_data
def test_southworth_calibrated_ci(southworth: pd.DataFrame) -> None:
    controls = southworth[southworth.trueLogRr.notna()]
    target = southworth[southworth.trueLogRr.isna()]
    assert len(target) == 1 and len(controls) == 172
    y, se = float(target.logRr.iloc[0]), float(target.seLogRr.iloc[0])
    lo, hi = math.exp(y - 1.959964 * se), math.exp(y + 1.959964 * se)
    assert (round(math.exp(y), 2), round(lo, 2), round(hi, 2)) == (0.70, 0.61, 0.80)

    model = fit_systematic_error_model(controls.logRr, controls.seLogRr, controls.trueLogRr)
    # vignette's printed model: -0.066550795 0.933292141 0.187468405 0.002979502
    assert model.mean_intercept == pytest.approx(-0.066550795, abs=1e-5)
    assert model.mean_slope == pytest.approx(0.933292141, abs=1e-5)
    assert model.sd_intercept == pytest.approx(0.187468405, abs=1e-5)
    assert model.sd_slope == pytest.approx(0.002979502, abs=1e-5)

    ci = calibrate_ci(model, y, se)
    # published: HR 0.73 (0.48-1.11)
    assert (round(math.exp(ci.log_rr), 2), round(math.exp(ci.ci_low), 2),
            round(math.exp(ci.ci_high), 2)) == (0.73, 0.48, 1.11)
    # vignette's full print (uniroot's default tolerance is ~1.2e-4, so compare to 2e-5):
    # logRr -0.3117702, logLb95Rr -0.733957, logUb95Rr 0.1067054, seLogRr 0.2144587
    assert ci.log_rr == pytest.approx(-0.3117702, abs=2e-5)
    assert ci.ci_low == pytest.approx(-0.733957, abs=2e-5)
    assert ci.ci_high == pytest.approx(0.1067054, abs=2e-5)
    assert ci.se == pytest.approx(0.2144587, abs=2e-5)


@pytest.mark.shared_data
@needs_data
def test_negative_controls_only_model_equals_converted_null(southworth: pd.DataFrame) -> None:
    neg = southworth[southworth.trueLogRr == 0]
    from_null = error_model_from_null(fit_null(neg.logRr, neg.seLogRr))
    direct = fit_systematic_error_model(neg.logRr, neg.seLogRr)  # truth defaults to 0
    for field in ("mean_intercept", "mean_slope", "sd_intercept", "sd_slope"):
        assert getattr(direct, field) == pytest.approx(getattr(from_null, field), abs=1e-9)
    assert (direct.mean_slope, direct.sd_slope) == (1.0, 0.0)


# ------------------------------------------------------------------ properties of the fits


def _joint_nll(theta: np.ndarray, y: np.ndarray, s: np.ndarray) -> float:
    v = np.exp(2 * theta[1]) + s * s
    return float(0.5 * np.sum(np.log(2 * np.pi * v) + (y - theta[0]) ** 2 / v))


def test_fit_null_is_the_maximum_likelihood() -> None:
    rng = np.random.default_rng(3)
    y, se, _ = _simulate(rng, 40, 0.0)
    null = fit_null(y, se)
    ours = _joint_nll(np.array([null.mean, math.log(null.sd)]), y, se)
    assert -ours == pytest.approx(null.log_likelihood, abs=1e-9)
    for start in ([0.0, 0.0], [1.0, -3.0], [-1.0, 1.0]):
        other = optimize.minimize(_joint_nll, start, args=(y, se), method="Nelder-Mead",
                                  options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 5000})
        assert ours <= other.fun + 1e-9


def test_fit_null_sd_zero_when_no_systematic_error() -> None:
    # estimates tighter than their SEs: the ML systematic-error SD is 0
    y = np.array([0.01, -0.01, 0.0, 0.02, -0.02, 0.005])
    null = fit_null(y, np.full(6, 0.5))
    assert null.sd == pytest.approx(0.0, abs=1e-6)
    assert null.mean == pytest.approx(np.mean(y), abs=1e-9)
    assert expected_absolute_systematic_error(EmpiricalNull(-0.3, 0.0, 6)) == pytest.approx(0.3)


def test_fit_null_drops_non_finite_and_needs_five_controls() -> None:
    rng = np.random.default_rng(1)
    y, se, _ = _simulate(rng, 8, 0.0)
    y[0], se[1], se[2] = np.nan, np.inf, 0.0
    null = fit_null(y, se)
    assert (null.n_controls, null.n_dropped) == (5, 3)
    clean = fit_null(y[3:], se[3:])
    assert (clean.mean, clean.sd) == pytest.approx((null.mean, null.sd), abs=1e-12)
    with pytest.raises(EstimationError, match=r"only 4 usable negative controls.*3 dropped"):
        fit_null(y[:7], se[:7])
    with pytest.raises(ValueError, match="shape"):
        fit_null([0.1, 0.2], [0.1])


def test_calibrate_p_vectorised_one_sided_and_nan() -> None:
    null = EmpiricalNull(mean=0.2, sd=0.3, n_controls=50)
    y = np.array([0.2, 1.0, -0.5, np.nan])
    se = np.array([0.1, 0.2, 0.1, 0.1])
    p = calibrate_p(null, y, se)
    z = (y - 0.2) / np.sqrt(0.09 + se**2)
    np.testing.assert_allclose(p[:3], 2 * stats.norm.sf(np.abs(z[:3])), rtol=1e-12)
    assert p[0] == 1.0 and np.isnan(p[3])
    upper = calibrate_p(null, y, se, two_sided=False, upper=True)
    lower = calibrate_p(null, y, se, two_sided=False, upper=False)
    np.testing.assert_allclose(upper[:3] + lower[:3], 1.0)
    assert upper[1] < 0.05 < lower[1]
    assert isinstance(calibrate_p(null, 1.0, 0.2), float)
    # with a null of N(0, 0) calibration reduces to the traditional p-value
    assert calibrate_p(EmpiricalNull(0.0, 0.0, 5), 0.5, 0.25) == pytest.approx(
        2 * stats.norm.sf(2.0), rel=1e-12)


def test_ease_closed_form_matches_numeric_integral() -> None:
    for mu, sigma in [(0.79, 0.28), (-0.1, 0.5), (0.0, 0.2)]:
        numeric = sum(
            integrate.quad(lambda x, m=mu, s=sigma: abs(x) * stats.norm.pdf(x, m, s), a, b)[0]
            for a, b in [(-np.inf, 0.0), (0.0, np.inf)]
        )
        got = expected_absolute_systematic_error(EmpiricalNull(mu, sigma, 10))
        assert got == pytest.approx(numeric, abs=1e-8)


def test_calibrate_ci_without_systematic_error_is_traditional() -> None:
    model = SystematicErrorModel(0.0, 1.0, 0.0, 0.0)
    y, se = np.array([-0.4, 0.0, 1.2]), np.array([0.1, 0.3, 0.25])
    ci = calibrate_ci(model, y, se, level=0.9)
    q = stats.norm.ppf(0.95)
    np.testing.assert_allclose(ci.log_rr, y, atol=1e-12)
    np.testing.assert_allclose(ci.ci_low, y - q * se, atol=1e-12)
    np.testing.assert_allclose(ci.ci_high, y + q * se, atol=1e-12)
    np.testing.assert_allclose(ci.se, se, atol=1e-12)
    nan_ci = calibrate_ci(model, np.array([np.nan, 0.1]), np.array([0.1, np.inf]))
    assert np.isnan(nan_ci.log_rr).all() and np.isnan(nan_ci.ci_low).all()


# ------------------------------------------------------------------ seeded simulations


def test_synthetic_null_recovered_and_calibrated_ci_covers() -> None:
    rng = np.random.default_rng(20240601)
    y, se, _ = _simulate(rng, 200, 0.0)
    null = fit_null(y, se)
    assert null.mean == pytest.approx(0.2, abs=0.05)
    assert null.sd == pytest.approx(0.15, abs=0.05)

    # fresh controls, null and positive, with the same systematic error
    truth = rng.choice(np.log([1.0, 1.5, 2.0, 4.0]), 2000)
    fy, fse, _ = _simulate(rng, 2000, truth)
    ci = calibrate_ci(error_model_from_null(null), fy, fse)
    covered = np.mean((ci.ci_low <= truth) & (truth <= ci.ci_high))
    naive = np.mean((fy - 1.96 * fse <= truth) & (truth <= fy + 1.96 * fse))
    # 0.93 here: with 200 controls the fitted SD (0.12 for this seed) is itself uncertain
    assert 0.90 <= covered <= 0.98
    assert naive < 0.75  # ~0.65 here: the bias (0.2 +- 0.15) is ignored

    # calibrated p-values of fresh negative controls are ~uniform: ~5% below 0.05
    ny, nse, _ = _simulate(rng, 2000, 0.0)
    assert 0.02 <= np.mean(calibrate_p(null, ny, nse) < 0.05) <= 0.10
    assert np.mean(2 * stats.norm.sf(np.abs(ny / nse)) < 0.05) > 0.3


def test_synthetic_error_model_with_positive_controls() -> None:
    rng = np.random.default_rng(7)
    truth = np.repeat(np.log([1.0, 1.5, 2.0, 4.0]), 60)
    y, se, t = _simulate(rng, truth.size, truth, bias_mean=0.1, bias_sd=0.15, mean_slope=0.85)
    model = fit_systematic_error_model(y, se, t)
    assert model.mean_slope == pytest.approx(0.85, abs=0.06)
    assert model.mean_intercept == pytest.approx(0.1, abs=0.05)
    assert model.error_sd(0.0) == pytest.approx(0.15, abs=0.05)
    legacy = fit_systematic_error_model(y, se, t, sd_model="log_linear")
    assert legacy.mean_slope == pytest.approx(model.mean_slope, abs=0.02)
    assert float(legacy.error_sd(0.0)) == pytest.approx(float(model.error_sd(0.0)), abs=0.03)
    assert legacy.log_likelihood == pytest.approx(model.log_likelihood, abs=2.0)

    fresh_truth = rng.choice(np.log([1.0, 1.5, 2.0, 4.0]), 1000)
    fy, fse, _ = _simulate(rng, 1000, fresh_truth, bias_mean=0.1, bias_sd=0.15, mean_slope=0.85)
    ci = calibrate_ci(model, fy, fse)
    covered = np.mean((ci.ci_low <= fresh_truth) & (fresh_truth <= ci.ci_high))
    assert 0.92 <= covered <= 0.98
