"""Pooling a candidate's battery of trials that share its treated arm (estimators.pooling)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from estimators.cox import fit_cox
from estimators.errors import EstimationError
from estimators.meta import fixed_effect, random_effects
from estimators.pooling import pool_trials

TRUE_HR = 0.7
BASE_RATE = 1 / 1000  # per day, every comparator drug
FOLLOW_UP = 365


def test_two_trials_by_hand():
    y = np.log([0.5, 0.8])
    s = np.array([0.1, 0.2])
    pooled = pool_trials(y, s)
    w = np.array([100.0, 25.0]) / 125.0  # 1/s^2, normalised: 0.8, 0.2
    mean = 0.8 * math.log(0.5) + 0.2 * math.log(0.8)
    fe = mean  # the fixed-effect mean is the same weighted mean
    q = 100 * (y[0] - fe) ** 2 + 25 * (y[1] - fe) ** 2
    tau2 = (q - 1) / (125 - (100**2 + 25**2) / 125)  # DL: (Q - df) / (sum w - sum w^2 / sum w)
    se = math.sqrt((0.8 * 0.1 + 0.2 * 0.2) ** 2 + tau2 * (0.8**2 + 0.2**2))
    assert pooled.k == 2
    assert pooled.log_hr == pytest.approx(mean)
    assert pooled.estimate == pytest.approx(math.exp(mean))
    assert pooled.sampling_se == pytest.approx(0.12)
    assert pooled.tau2 == pytest.approx(tau2)
    assert pooled.se == pytest.approx(se)
    assert pooled.ci_low == pytest.approx(math.exp(mean - 1.959964 * se))
    assert pooled.ci_high == pytest.approx(math.exp(mean + 1.959964 * se))
    assert pooled.p_value == pytest.approx(math.erfc(abs(mean / se) / math.sqrt(2)))
    assert w.sum() == pytest.approx(1.0)


def test_homogeneous_trials_pool_to_the_weighted_mean_of_the_ses():
    pooled = pool_trials(np.log([0.7, 0.7, 0.7]), [0.1, 0.2, 0.2])
    assert pooled.tau2 == 0.0
    assert pooled.estimate == pytest.approx(0.7)
    assert pooled.se == pytest.approx((4 * 0.1 + 0.2 + 0.2) / 6)  # weights 4:1:1


def test_one_trial_is_itself_and_unusable_trials_are_dropped():
    pooled = pool_trials([math.log(0.6), math.nan, 0.1], [0.2, 0.1, math.inf])
    assert pooled.k == 1
    assert pooled.estimate == pytest.approx(0.6) and pooled.se == pytest.approx(0.2)
    with pytest.raises(EstimationError):
        pool_trials([math.nan], [0.1])


def _battery_rate_ratios(rng, replicates, k, n_treated, n_comparator, tau=0.0):
    """Log rate ratios and SEs of k trials sharing one treated sample, per replicate: exponential
    event times censored at FOLLOW_UP, the closed-form estimator log(d1/T1) - log(d0/T0). With
    tau > 0 each comparator drug's log rate deviates by N(0, tau^2): heterogeneous trials whose
    average log HR is still log(TRUE_HR)."""
    def arm(rate, n):
        times = rng.exponential(1 / rate[..., None], size=(*rate.shape, n))
        return (times < FOLLOW_UP).sum(axis=-1), np.minimum(times, FOLLOW_UP).sum(axis=-1)

    d1, t1 = arm(np.full((replicates, 1), TRUE_HR * BASE_RATE), n_treated)
    d0, t0 = arm(BASE_RATE * np.exp(rng.normal(0, tau, size=(replicates, k))), n_comparator)
    log_hr = np.log(d1 / t1) - np.log(d0 / t0)
    return log_hr, np.sqrt(1 / d1 + 1 / d0)


def _coverage(log_hr, se, naive_method=fixed_effect):
    """Share of replicates whose CI covers TRUE_HR: pool_trials, and a meta-analysis assuming
    independent trials (fixed effect, or DerSimonian-Laird random effects)."""
    truth = math.log(TRUE_HR)
    pooled = naive = 0
    for y, s in zip(log_hr, se, strict=True):
        p = pool_trials(y, s)
        pooled += p.ci_low <= TRUE_HR <= p.ci_high
        independent = naive_method(y, s)
        naive += independent.ci_low <= truth <= independent.ci_high
    return pooled / len(log_hr), naive / len(log_hr)


def test_pooled_ci_covers_when_trials_share_the_treated_arm_and_naive_does_not():
    rng = np.random.default_rng(7)
    log_hr, se = _battery_rate_ratios(rng, replicates=2000, k=10, n_treated=500,
                                      n_comparator=500)
    pooled, naive = _coverage(log_hr, se)
    assert pooled >= 0.93
    assert naive <= 0.80  # ~0.57 expected: the shared arm's variance is counted k times smaller


def test_pooled_ci_covers_heterogeneous_comparators_where_random_effects_does_not():
    rng = np.random.default_rng(5)
    log_hr, se = _battery_rate_ratios(rng, replicates=2000, k=10, n_treated=500,
                                      n_comparator=500, tau=0.3)
    pooled, naive = _coverage(log_hr, se, naive_method=random_effects)
    assert pooled >= 0.93
    assert naive <= 0.87  # ~0.81 expected


def _battery_cox(rng, replicates, k, n):
    """Per-trial log HR and SE from the project's Cox model (whole days, Breslow ties): one
    treated sample per replicate, k comparator samples of the same size."""
    treated_times = rng.exponential(1 / (TRUE_HR * BASE_RATE), size=(replicates, n))
    log_hr = np.empty((replicates, k))
    se = np.empty((replicates, k))
    x = np.r_[np.ones(n), np.zeros(n)]
    for r in range(replicates):
        for j in range(k):
            times = np.r_[treated_times[r], rng.exponential(1 / BASE_RATE, size=n)]
            fit = fit_cox(np.floor(np.minimum(times, FOLLOW_UP)), times < FOLLOW_UP, x)
            log_hr[r, j], se[r, j] = fit.log_hr, fit.se
    return log_hr, se


def test_coverage_with_the_projects_cox_model():
    pooled, naive = _coverage(*_battery_cox(np.random.default_rng(11), 300, 8, 400))
    assert pooled >= 0.93
    assert naive <= 0.80
