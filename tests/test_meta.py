"""Fixed-effect and DerSimonian-Laird meta-analysis: a hand computation and statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.meta_analysis import combine_effects

from estimators.errors import EstimationError
from estimators.meta import fixed_effect, random_effects


def test_hand_computed_three_studies() -> None:
    # y = 0, 0.4, 0.8 with SE 0.1, 0.2, 0.2 -> weights 100, 25, 25 (sum 150)
    # fixed effect = (0 + 10 + 20) / 150 = 0.2;  Q = 100*0.04 + 25*0.04 + 25*0.36 = 14, df 2
    # C = 150 - (10000 + 625 + 625) / 150 = 75;  tau2 = (14 - 2) / 75 = 0.16
    # RE weights 1/0.17, 1/0.2, 1/0.2 (sum 270/17): RE = (2 + 4) / (270/17) = 17/45
    # se = sqrt(17/270);  I2 = 12/14 = 6/7;  Q p-value = chi2_2 survival = exp(-7)
    y, se = [0.0, 0.4, 0.8], [0.1, 0.2, 0.2]
    res = random_effects(y, se)
    z = stats.norm.ppf(0.975)
    est, s = 17 / 45, math.sqrt(17 / 270)
    assert res.k == 3 and res.n_dropped == 0 and res.method == "dl"
    assert res.q == pytest.approx(14.0, abs=1e-12)
    assert res.q_p == pytest.approx(math.exp(-7), rel=1e-12)
    assert res.tau2 == pytest.approx(0.16, abs=1e-12)
    assert res.tau == pytest.approx(0.4, abs=1e-12)
    assert res.i2 == pytest.approx(6 / 7, abs=1e-12)
    assert res.estimate == pytest.approx(est, abs=1e-12)
    assert res.se == pytest.approx(s, abs=1e-12)
    assert (res.ci_low, res.ci_high) == pytest.approx((est - z * s, est + z * s), abs=1e-12)
    assert res.p_value == pytest.approx(2 * stats.norm.sf(est / s), rel=1e-10)

    fe = fixed_effect(y, se)
    assert fe.method == "fixed"
    assert fe.estimate == pytest.approx(0.2, abs=1e-12)
    assert fe.se == pytest.approx(math.sqrt(1 / 150), abs=1e-12)
    assert fe.q == pytest.approx(14.0) and fe.tau2 == pytest.approx(0.16)


@pytest.mark.parametrize("seed", range(5))
def test_matches_statsmodels_dl(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 12))
    se = rng.uniform(0.05, 0.5, k)
    y = rng.normal(0.3, 0.5, k) + rng.normal(0, se)  # heterogeneous: Q > df
    sm = combine_effects(y, se**2, method_re="dl")
    assert sm.tau2 > 0
    res = random_effects(y, se)
    assert res.estimate == pytest.approx(sm.mean_effect_re, abs=1e-10)
    assert res.se == pytest.approx(sm.sd_eff_w_re, abs=1e-10)
    assert res.tau2 == pytest.approx(sm.tau2, abs=1e-10)
    assert res.q == pytest.approx(sm.q, abs=1e-10)
    assert res.i2 == pytest.approx(sm.i2, abs=1e-10)
    ci = sm.conf_int(use_t=False)
    assert (res.ci_low, res.ci_high) == pytest.approx(tuple(ci[1]), abs=1e-10)
    fe = fixed_effect(y, se)
    assert fe.estimate == pytest.approx(sm.mean_effect_fe, abs=1e-10)
    assert fe.se == pytest.approx(sm.sd_eff_w_fe, abs=1e-10)
    assert (fe.ci_low, fe.ci_high) == pytest.approx(tuple(ci[0]), abs=1e-10)


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")
def test_homogeneous_studies_truncate_tau2_at_zero() -> None:
    # Q < df: DerSimonian-Laird's tau2 = max(0, (Q - df) / C) = 0, so RE equals FE.
    # statsmodels 0.15's combine_effects(method_re="dl") leaves tau2 negative here.
    y, se = np.array([0.10, 0.12, 0.09, 0.11]), np.array([0.1, 0.2, 0.15, 0.1])
    sm = combine_effects(y, se**2, method_re="dl")
    assert sm.q < 3 and sm.tau2 < 0
    res = random_effects(y, se)
    assert res.tau2 == 0.0 and res.i2 == 0.0
    assert res.estimate == pytest.approx(sm.mean_effect_fe, abs=1e-12)
    assert res.se == pytest.approx(sm.sd_eff_w_fe, abs=1e-12)
    assert res.q == pytest.approx(sm.q, abs=1e-12)


def test_drops_unusable_studies_and_single_study() -> None:
    res = random_effects([0.1, np.nan, 0.3, 0.2], [0.1, 0.1, np.inf, 0.0])
    assert (res.k, res.n_dropped) == (1, 3)
    assert res.estimate == pytest.approx(0.1) and res.se == pytest.approx(0.1)
    assert res.tau2 == 0.0 and math.isnan(res.q_p) and math.isnan(res.i2)
    with pytest.raises(EstimationError, match="no study"):
        random_effects([np.nan], [0.1])
    with pytest.raises(ValueError, match="standard errors"):
        random_effects([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="level"):
        random_effects([0.1, 0.2], [0.1, 0.2], level=1.5)
