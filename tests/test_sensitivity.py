"""E-values (VanderWeele & Ding 2017; R EValue package's documented examples and its tests)
and Benjamini-Hochberg q-values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from estimators.sensitivity import (
    benjamini_hochberg,
    e_value_difference,
    e_value_hr,
    e_value_ratio,
    hr_to_rr,
)


def _e(rr: float) -> float:
    """Hand formula: RR + sqrt(RR (RR - 1)) after taking RR >= 1."""
    rr = max(rr, 1 / rr)
    return rr + math.sqrt(rr * (rr - 1))


def test_paper_and_package_documented_examples() -> None:
    # EValue vignette: evalues.RR(10.73, 8.02, 14.36) -> 20.94777, 15.52336 (Hammond & Horn)
    e = e_value_ratio(10.73, 8.02, 14.36)
    assert (round(e.point, 5), round(e.ci, 5)) == (20.94777, 15.52336)
    # Annals paper / vignette: breastfeeding RR 3.9 (1.8, 8.7) -> 7.26 and 3.0 (7.263034, 3.0)
    e = e_value_ratio(3.9, 1.8, 8.7)
    assert round(e.point, 6) == 7.263034 and e.ci == pytest.approx(3.0, abs=1e-12)
    # Annals paper / vignette: leukemia RR 0.80 (0.71, 0.91) -> 1.81 and 1.43 (1.809017, 1.428571)
    e = e_value_ratio(0.80, 0.71, 0.91)
    assert (round(e.point, 6), round(e.ci, 6)) == (1.809017, 1.428571)
    assert (round(e.point, 2), round(e.ci, 2)) == (1.81, 1.43)
    # vignette: evalues.RR(est = 2.5, true = 1.5) -> 2.720759; no CI -> NaN
    e = e_value_ratio(2.5, true=1.5)
    assert round(e.point, 6) == 2.720759 and math.isnan(e.ci)
    # symmetry: 1/0.8 has the E-value of 0.8
    assert e_value_ratio(1 / 0.8).point == pytest.approx(e_value_ratio(0.8).point)


def test_ci_crossing_and_null_estimates() -> None:
    assert e_value_ratio(1.3, 0.9, 1.8) == (pytest.approx(_e(1.3)), 1.0)
    assert e_value_ratio(0.7, 0.4, 1.2) == (pytest.approx(_e(0.7)), 1.0)
    assert e_value_ratio(1.0, 0.8, 1.25) == (1.0, 1.0)
    assert e_value_ratio(1.2, 1.1) == (pytest.approx(_e(1.2)), pytest.approx(_e(1.1)))
    assert math.isnan(e_value_ratio(1.2, ci_high=1.5).ci)  # only the far limit given
    assert all(math.isnan(v) for v in e_value_ratio(float("nan"), 0.5, 2.0))
    with pytest.raises(ValueError, match="outside"):
        e_value_ratio(1.2, 1.3, 1.4)
    with pytest.raises(ValueError, match="positive"):
        e_value_ratio(-0.1)
    with pytest.raises(ValueError, match="above"):
        e_value_ratio(1.0, 1.5, 0.5)


def test_non_null_true_values_as_evalue_package_tests() -> None:
    e = e_value_ratio(1.3, 1.1, 1.4, true=1.05)
    assert e.point == pytest.approx((1.3 + math.sqrt(1.3 * 0.25)) / 1.05)
    assert e.ci == pytest.approx((1.1 + math.sqrt(1.1 * 0.05)) / 1.05)
    e = e_value_ratio(1.3, 1.1, 1.4, true=1.35)  # truth beyond the estimate
    rat = 1.35 / 1.3
    assert e == (pytest.approx(rat + math.sqrt(rat * (rat - 1))), 1.0)
    e = e_value_ratio(0.6, 0.5, 0.7, true=0.4)
    assert e.point == pytest.approx(_e(0.6 / 0.4)) and e.ci == pytest.approx(_e(0.5 / 0.4))


def test_hazard_ratio_rare_and_common() -> None:
    # evalues.HR(0.56, 0.46, 0.69, rare = FALSE): HR -> RR by the square-root transformation
    rr = (1 - 0.5 ** math.sqrt(0.56)) / (1 - 0.5 ** math.sqrt(1 / 0.56))
    rr_hi = (1 - 0.5 ** math.sqrt(0.69)) / (1 - 0.5 ** math.sqrt(1 / 0.69))
    assert hr_to_rr(0.56) == pytest.approx(rr, rel=1e-14)
    e = e_value_hr(0.56, 0.46, 0.69, rare=False)
    assert e.point == pytest.approx(_e(rr), rel=1e-12)
    assert e.ci == pytest.approx(_e(rr_hi), rel=1e-12)
    assert (round(e.point, 2), round(e.ci, 2)) == (2.35, 1.91)
    # rare outcome: the HR is used as a risk ratio
    assert e_value_hr(0.56, 0.46, 0.69, rare=True) == e_value_ratio(0.56, 0.46, 0.69)
    # EValue's "Common HR" test: HR 1.3 (1.2, 1.4), true 1.1
    r, r_lo, r_true = hr_to_rr(1.3), hr_to_rr(1.2), hr_to_rr(1.1)
    e = e_value_hr(1.3, 1.2, 1.4, rare=False, true=1.1)
    assert e.point == pytest.approx((r + math.sqrt(r * (r - r_true))) / r_true)
    assert e.ci == pytest.approx((r_lo + math.sqrt(r_lo * (r_lo - r_true))) / r_true)
    assert hr_to_rr(1.0) == 1.0


def test_standardised_mean_difference() -> None:
    # EValue docs example evalues.MD(0.5, 0.25): RR = exp(0.91 * 0.5), lower exp(0.455 - 0.445)
    e = e_value_difference(0.5, 0.25)
    assert e.point == pytest.approx(_e(math.exp(0.455)), rel=1e-12)
    assert e.ci == pytest.approx(_e(math.exp(0.01)), rel=1e-12)
    # EValue's "SMD, causative" test: d 0.5, se 0.2, true 0.1
    rr, rr_true, rr_lo = math.exp(0.455), math.exp(0.091), math.exp(0.455 - 0.356)
    e = e_value_difference(0.5, 0.2, true=0.1)
    assert e.point == pytest.approx((rr + math.sqrt(rr * (rr - rr_true))) / rr_true)
    assert e.ci == pytest.approx((rr_lo + math.sqrt(rr_lo * (rr_lo - rr_true))) / rr_true)
    # "SMD, preventive": d -0.5, se 0.4, true -0.1: the CI crosses the truth
    assert e_value_difference(-0.5, 0.4, true=-0.1).ci == 1.0
    assert math.isnan(e_value_difference(0.3).ci)
    with pytest.raises(ValueError, match="non-negative"):
        e_value_difference(0.3, -0.1)


def test_benjamini_hochberg() -> None:
    # hand: sorted 0.01, 0.03, 0.04, 0.5 (m = 4) -> 0.04, min(0.06, 0.0533), 0.0533, 0.5
    q = benjamini_hochberg([0.01, np.nan, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(q, [0.04, np.nan, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (20, 5)) ** 3
    p[rng.uniform(size=p.shape) < 0.2] = np.nan
    q = benjamini_hochberg(p)
    assert q.shape == p.shape
    assert np.array_equal(np.isnan(q), np.isnan(p))
    ok = ~np.isnan(p)
    np.testing.assert_allclose(q[ok], multipletests(p[ok], method="fdr_bh")[1], rtol=0, atol=0)
    assert benjamini_hochberg([]).shape == (0,)
    assert np.isnan(benjamini_hochberg([np.nan, np.nan])).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg([0.2, 1.2])
