"""Tests for estimators.survival: weighted Kaplan-Meier vs lifelines, Greenwood by hand,
influence-function variance vs numerical derivatives."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from estimators.errors import EstimationError
from estimators.survival import km_influence, risk_at, survival_at, weighted_km


def _data(n: int, seed: int, *, tied: bool = True):
    rng = np.random.default_rng(seed)
    t = rng.exponential(50, n)
    t = np.floor(t) if tied else t
    e = rng.integers(0, 2, n)
    w = rng.uniform(0.2, 3.0, n)
    return t, e, w


def _lifelines_survival(t, e, w, horizons):
    from lifelines import KaplanMeierFitter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lifelines warns about non-integer weights
        kmf = KaplanMeierFitter().fit(t, e, weights=w)
    return kmf.survival_function_at_times(horizons).to_numpy()


@pytest.mark.parametrize("tied", [True, False])
def test_weighted_km_matches_lifelines(tied):
    t, e, w = _data(400, 1, tied=tied)
    curve = weighted_km(t, e, w)
    horizons = [0.0, 3.0, 10.5, 40.0, 99.0, float(np.quantile(t, 0.9))]
    ours = np.array([survival_at(curve, h)[0] for h in horizons])
    ref = _lifelines_survival(t, e, w, horizons)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)
    unweighted = weighted_km(t, e)
    ours0 = np.array([survival_at(unweighted, h)[0] for h in horizons])
    np.testing.assert_allclose(ours0, _lifelines_survival(t, e, None, horizons), atol=1e-10)


def test_greenwood_by_hand():
    # S: 5/6 at t=1, 4/6 at t=2, 4/9 at t=3, 0 at t=5 (the censored person at 2 stays at risk).
    t = np.array([1, 2, 2, 3, 4, 5])
    e = np.array([1, 1, 0, 1, 0, 1])
    curve = weighted_km(t, e)
    np.testing.assert_allclose(curve.time, [1, 2, 3, 5])
    np.testing.assert_allclose(curve.at_risk, [6, 5, 3, 1])
    np.testing.assert_allclose(curve.survival, [5 / 6, 4 / 6, 4 / 9, 0.0], atol=1e-15)
    s, v = survival_at(curve, 3.5)
    assert s == pytest.approx(4 / 9)
    assert v == pytest.approx((4 / 9) ** 2 * (1 / 30 + 1 / 20 + 1 / 6), rel=1e-12)
    assert curve.variance_method == "greenwood"
    r, vr = risk_at(curve, 2)
    assert r == pytest.approx(1 / 3) and vr == pytest.approx((4 / 6) ** 2 * (1 / 30 + 1 / 20))
    assert survival_at(curve, 0.5) == (1.0, 0.0)  # before the first event
    assert survival_at(curve, 10)[0] == 0.0  # the last person had the event: S = 0 after


def test_influence_variance_is_sum_of_squared_weight_derivatives():
    t, e, w = _data(120, 2)
    horizon = 40.0
    curve = weighted_km(t, e, w)
    assert curve.variance_method == "influence"

    def surv(weights):
        return survival_at(weighted_km(t, e, weights), horizon)[0]

    h = 1e-6
    grad = np.array([
        (surv(w + h * np.eye(len(w))[i]) - surv(w - h * np.eye(len(w))[i])) / (2 * h)
        for i in range(len(w))
    ])
    infl = km_influence(curve, t, e, w, horizon)
    np.testing.assert_allclose(infl, -w * grad, atol=1e-8)  # influence of the risk = -dS
    _, var = survival_at(curve, horizon)
    assert var == pytest.approx(float(np.sum(infl**2)), rel=1e-12)
    # the whole-curve variance agrees with per-horizon influence values at every event time
    for j in (0, 5, len(curve.time) // 2):
        infl_j = km_influence(curve, t, e, w, curve.time[j])
        assert curve.variance[j] == pytest.approx(float(np.sum(infl_j**2)), rel=1e-10)


@pytest.mark.parametrize("seed", [3, 4])
def test_unit_weight_influence_variance_equals_greenwood(seed):
    t, e, _ = _data(300, seed)
    greenwood = weighted_km(t, e)
    robust = weighted_km(t, e, np.ones_like(t))
    np.testing.assert_allclose(robust.survival, greenwood.survival, atol=1e-14)
    np.testing.assert_allclose(robust.variance, greenwood.variance, rtol=1e-10, atol=1e-16)


def test_zero_weights_drop_persons():
    t, e, w = _data(200, 5)
    w[::3] = 0.0
    keep = w > 0
    a = weighted_km(t, e, w)
    b = weighted_km(t[keep], e[keep], w[keep])
    np.testing.assert_allclose(a.survival, b.survival)
    np.testing.assert_allclose(a.variance, b.variance)
    infl = km_influence(a, t, e, w, 30.0)
    assert np.all(infl[~keep] == 0.0)


def test_horizon_beyond_follow_up_raises():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    e = np.array([1, 0, 1, 0])
    curve = weighted_km(t, e)
    assert risk_at(curve, 4.0)[0] == pytest.approx(1 - 3 / 4 * 1 / 2)
    with pytest.raises(EstimationError, match="not identified"):
        risk_at(curve, 5.0)
    with pytest.raises(EstimationError, match="horizon"):
        risk_at(curve, -1.0)


@pytest.mark.parametrize(
    "time, event, weights, message",
    [
        ([1.0, -2.0], [1, 0], None, "non-negative"),
        ([1.0, 2.0], [1, 2], None, "binary"),
        ([1.0, 2.0], [1, 0], [1.0, -1.0], "weights"),
        ([1.0, 2.0], [1, 0], [0.0, 0.0], "all weights are zero"),
        ([], [], None, "no persons"),
    ],
)
def test_bad_inputs(time, event, weights, message):
    with pytest.raises(EstimationError, match=message):
        weighted_km(np.asarray(time), np.asarray(event), weights)
