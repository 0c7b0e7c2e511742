"""Tests for estimators.refute: placebo treatment and random common cause refuters."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.special import expit
from sklearn.linear_model import LinearRegression, LogisticRegression

from estimators.base import CausalEstimator, FitData
from estimators.doubly_robust import AIPW
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.iv import TwoStageLeastSquares
from estimators.outcome_models import Standardization
from estimators.refute import RefutationResult, placebo_treatment, random_common_cause


def _data(n: int = 600, seed: int = 0, effect: float = 1.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    t = (rng.random(n) < expit(X[:, 0] - 0.5 * X[:, 1])).astype(int)
    y = effect * t + X @ np.array([1.0, 0.5, 0.5]) + rng.normal(size=n)
    return X, t, y


class _RateRatio(CausalEstimator):
    """Crude event-rate ratio (events per person-day), a cheap ratio-measure estimator."""

    def __init__(self, fail_below: float = 0.0, max_columns: int = 100) -> None:
        self.fail_below = fail_below
        self.max_columns = max_columns

    def _fit(self, data: FitData) -> EffectEstimate:
        tr = data.t == 1
        e1, e0 = data.event[tr].sum(), data.event[~tr].sum()
        rr = (e1 / data.time[tr].sum()) / (e0 / data.time[~tr].sum())
        if rr < self.fail_below or data.X.shape[1] > self.max_columns:
            raise EstimationError("refused")
        return EffectEstimate.from_log_ratio(
            math.log(rr), math.sqrt(1 / e1 + 1 / e0), measure="ratio", estimand="crude",
            n_treated=data.n_treated, n_control=data.n_control)


def test_placebo_treatment_removes_a_real_effect():
    X, t, y = _data(effect=1.0)
    est = Standardization(n_bootstrap=0)
    res = placebo_treatment(est, X, t, y, n=60, seed=1)
    assert isinstance(res, RefutationResult) and res.refuter == "placebo_treatment"
    assert res.distribution.shape == (60,) and res.n_failed == 0
    assert res.original.estimate == pytest.approx(
        Standardization(n_bootstrap=0).fit(X, t, y).effect().estimate)
    assert res.expected == 0.0
    assert abs(res.mean) < 4 * res.sd / math.sqrt(60)          # placebo effects centre on 0
    assert np.abs(res.distribution).max() < 0.5 * res.original.estimate
    assert res.p_value == pytest.approx(1 / 61)                  # the original stands out
    again = placebo_treatment(est, X, t, y, n=60, seed=1)
    np.testing.assert_array_equal(res.distribution, again.distribution)
    other = placebo_treatment(est, X, t, y, n=60, seed=2)
    assert not np.array_equal(res.distribution, other.distribution)


def test_placebo_treatment_does_not_flag_a_null_effect():
    X, t, y = _data(effect=0.0, seed=3)
    rng = np.random.default_rng(0)
    t = rng.permutation(t)                                       # no confounding, no effect
    res = placebo_treatment(Standardization(n_bootstrap=0), X, t, y, n=99, seed=4)
    assert res.p_value > 0.05


def test_random_common_cause_leaves_the_estimate_in_place():
    X, t, y = _data(seed=5)
    aipw = AIPW(LogisticRegression(), LinearRegression(), n_folds=2)
    for covariates in (X, sp.csr_matrix(X), pd.DataFrame(X)):
        res = random_common_cause(aipw, covariates, t, y, n=20, seed=6)
        assert res.refuter == "random_common_cause"
        assert res.expected == res.original.estimate
        assert np.abs(res.distribution - res.original.estimate).max() < 0.5 * res.original.se
        assert res.p_value > 0.1
    a = random_common_cause(aipw, X, t, y, n=10, seed=6).distribution
    np.testing.assert_array_equal(a, random_common_cause(aipw, X, t, y, n=10, seed=6).distribution)


class _MovesWithColumns(Standardization):
    """A broken estimator whose estimate shifts with every added column (for the p-value)."""

    def _fit(self, data: FitData) -> EffectEstimate:
        res = super()._fit(data)
        shift = 0.5 * data.X.shape[1]
        return EffectEstimate(res.estimate + shift, res.se, res.ci_low + shift,
                              res.ci_high + shift, res.p_value, res.measure, res.estimand,
                              res.n_treated, res.n_control)


def test_random_common_cause_flags_an_estimate_that_moves():
    X, t, y = _data(seed=7)
    res = random_common_cause(_MovesWithColumns(n_bootstrap=0), X, t, y, n=20)
    assert res.p_value == 0.0


def test_ratio_measures_time_to_event_and_failed_refits():
    rng = np.random.default_rng(8)
    n = 4000
    t = rng.integers(0, 2, n)
    time = rng.exponential(100 / np.where(t == 1, 2.0, 1.0)).round() + 1
    event = (rng.random(n) < 0.5).astype(int)
    X = rng.normal(size=(n, 2))
    res = placebo_treatment(_RateRatio(), X, t, time=time, event=event, n=50, seed=0)
    assert res.expected == 1.0 and res.original.estimate > 1.5
    assert abs(np.log(res.distribution).mean()) < 0.05          # centred on log(1) = 0
    assert res.p_value == pytest.approx(1 / 51)
    # Refits that raise EstimationError are recorded as NaN and counted.
    flaky = placebo_treatment(_RateRatio(fail_below=1.0), X, t, time=time, event=event, n=50)
    assert 0 < flaky.n_failed < 50
    assert np.isnan(flaky.distribution).sum() == flaky.n_failed
    assert np.isfinite(flaky.mean)


def test_fit_keywords_pass_through_and_errors():
    rng = np.random.default_rng(9)
    n = 2000
    X = rng.normal(size=(n, 2))
    z = rng.normal(size=n)
    u = rng.normal(size=n)
    t = (z + u + rng.normal(size=n) > 0).astype(int)
    y = 2.0 * t + X[:, 0] + u + rng.normal(size=n)
    # With the treatment permuted the instrument is irrelevant: refits raise (F < 1) or
    # give noise around 0, never the original effect.
    res = placebo_treatment(TwoStageLeastSquares(), X, t, y, z=z, n=30, seed=1)
    assert res.original.ci_low < 2.0 < res.original.ci_high
    assert res.n_failed > 0
    with pytest.raises(EstimationError, match="at least 1"):
        placebo_treatment(Standardization(n_bootstrap=0), X, t, y, n=0)
    with pytest.raises(EstimationError, match="all 5 refits"):
        random_common_cause(_RateRatio(max_columns=2), X, t, time=np.ones(n) * 10,
                            event=rng.integers(0, 2, n), n=5)
