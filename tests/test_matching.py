"""Tests for estimators.matching: hand-worked matches and estimates, a brute-force greedy
reference, Abadie-Imbens variance, Cox on matched sets vs lifelines, seeds and speed."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

from estimators.errors import EstimationError
from estimators.matching import PSMatching, match_on_ps
from estimators.survival import km_influence, weighted_km

# Hand-worked population (caliper 0.1 on the ps scale):
#   treated  A ps .30 y 5 | B ps .505 y 8 | C ps .52 y 9
#   compar.  a ps .31 y 4 | b ps .50 y 6 | c ps .70 y 9 | d ps .10 y 1
# Pairs below the caliper: B-b .005, A-a .01, C-b .02. Closest-first: B-b, A-a; C finds b taken
# and nothing else within .1, so C is unmatched (a random-order greedy taking C first would have
# given C-b and left B unmatched).
PS = np.array([0.30, 0.505, 0.52, 0.31, 0.50, 0.70, 0.10])
T = np.array([1, 1, 1, 0, 0, 0, 0])
Y = np.array([5.0, 8.0, 9.0, 4.0, 6.0, 9.0, 1.0])
X0 = np.zeros((7, 1))


def _pairs(m) -> list[tuple[int, int]]:
    return sorted(zip(m.treated.tolist(), m.control.tolist(), strict=True))


def test_hand_worked_one_to_one_without_replacement():
    m = match_on_ps(PS, T, caliper=0.1, caliper_scale="ps")
    assert _pairs(m) == [(0, 3), (1, 4)]
    assert m.caliper == 0.1
    np.testing.assert_allclose(m.weights(), [1, 1, 0, 1, 1, 0, 0])
    res = PSMatching(caliper=0.1, caliper_scale="ps").fit(X0, T, Y, ps=PS).effect()
    # D = (5-4, 8-6) = (1, 2): ATT 1.5, variance sum (D - 1.5)^2 / 2^2 = 0.125
    assert res.estimate == pytest.approx(1.5)
    assert res.se == pytest.approx(math.sqrt(0.125))
    assert (res.n_treated, res.n_control, res.estimand) == (2, 2, "ATT")


def test_hand_worked_variable_ratio_rounds():
    # add comparators e ps .285 y 3 and f ps .512 y 7. Round 1, closest first: B-b .005,
    # (B-f .007 skipped: B has its match), C-f .008, A-a .01. Round 2: A-e .015; B and C have
    # nothing free within .1. Sets A{a, e}, B{b}, C{f}.
    ps = np.r_[PS, 0.285, 0.512]
    t = np.r_[T, 0, 0]
    y = np.r_[Y, 3.0, 7.0]
    m = match_on_ps(ps, t, k=2, caliper=0.1, caliper_scale="ps")
    assert _pairs(m) == [(0, 3), (0, 7), (1, 4), (2, 8)]
    np.testing.assert_array_equal(m.set_size, [2, 1, 1])
    np.testing.assert_allclose(m.weights(), [1, 1, 1, 0.5, 1, 0, 0, 0.5, 1])
    res = PSMatching(k=2, caliper=0.1, caliper_scale="ps").fit(np.zeros((9, 1)), t, y,
                                                               ps=ps).effect()
    # D = (5 - 3.5, 8 - 6, 9 - 7) = (1.5, 2, 2): ATT 11/6, variance (1/9 + 2/36) / 9 = 1/54
    assert res.estimate == pytest.approx(11 / 6)
    assert res.se == pytest.approx(math.sqrt(1 / 54))


def test_hand_worked_with_replacement_abadie_imbens():
    # A-a, B-b, C-b (b reused: K = 2, K' = 2). D = (1, 2, 3): ATT 2, sum (D - 2)^2 = 2.
    # s^2 of b from its two nearest comparators a (.19 away, y 4) and c (.20, y 9):
    # 2/3 (6 - 6.5)^2 = 1/6. Variance (2 + (K^2 - K') 1/6) / 3^2 = (7/3) / 9.
    m = match_on_ps(PS, T, caliper=0.1, caliper_scale="ps", replace=True)
    assert _pairs(m) == [(0, 3), (1, 4), (2, 4)]
    np.testing.assert_allclose(m.weights(), [1, 1, 1, 1, 2, 0, 0])
    res = PSMatching(caliper=0.1, caliper_scale="ps", replace=True).fit(
        X0, T, Y, ps=PS).effect()
    assert res.estimate == pytest.approx(2.0)
    assert res.se == pytest.approx(math.sqrt(7 / 27))
    assert (res.n_treated, res.n_control) == (3, 2)


def test_risk_ratio_uses_the_linearised_paired_variance():
    y = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    res = PSMatching(caliper=0.1, caliper_scale="ps", measure="ratio").fit(
        X0, T, y, ps=PS).effect()
    # matched treated A, B: y 1, 1 (risk 1); controls a, b: y 0, 1 (risk 0.5)
    assert res.estimate == pytest.approx(2.0)
    z = np.array([1 / 1 - 0 / 0.5, 1 / 1 - 1 / 0.5])
    assert res.se == pytest.approx(math.sqrt(np.sum((z - z.mean()) ** 2)) / 2)


def _greedy_reference(score, t, k, width, rank):
    """Sequential closest-first greedy (CohortMethod's heap), edges ordered by (distance, treated
    score, comparator score, treated rank, comparator rank), k rounds."""
    used, size, pairs = set(), {}, []
    for r in range(1, k + 1):
        edges = sorted(
            (abs(score[i] - score[j]), score[i], score[j], rank[i], rank[j], i, j)
            for i in np.flatnonzero(t == 1) if size.get(i, 0) == r - 1
            for j in np.flatnonzero(t == 0)
            if j not in used and abs(score[i] - score[j]) < width
        )
        got = set()
        for *_, i, j in edges:
            if i in got or j in used:
                continue
            got.add(i)
            used.add(j)
            size[i] = r
            pairs.append((int(i), int(j)))
        if not got:
            break
    return sorted(pairs)


@pytest.mark.parametrize("ties", [False, True])
def test_vectorised_greedy_equals_sequential_reference(ties):
    rng = np.random.default_rng(11 if ties else 12)
    for _ in range(60):
        n = int(rng.integers(8, 50))
        ps = (rng.choice([0.2, 0.3, 0.4, 0.5, 0.6, 0.7], n) if ties
              else rng.uniform(0.05, 0.95, n))
        t = (rng.random(n) < 0.5).astype(int)
        if t.sum() in (0, n):
            continue
        k, seed = int(rng.integers(1, 4)), int(rng.integers(100))
        caliper = float(rng.choice([0.1, 0.5, 2.0]))
        try:
            m = match_on_ps(ps, t, k=k, caliper=caliper, seed=seed)
        except EstimationError:
            m = None
        rank = np.random.default_rng(seed).permutation(n)
        width = caliper * logit(ps).std(ddof=1)
        ref = _greedy_reference(logit(ps), t, k, width, rank)
        assert (_pairs(m) if m is not None else []) == ref


def test_caliper_on_the_standardised_logit_scale():
    rng = np.random.default_rng(3)
    ps = rng.uniform(0.05, 0.95, 300)
    t = (rng.random(300) < ps).astype(int)
    m = match_on_ps(ps, t, caliper=0.2)
    assert m.caliper == pytest.approx(0.2 * np.std(logit(ps), ddof=1))
    dist = np.abs(logit(ps[m.treated]) - logit(ps[m.control]))
    assert dist.max() < m.caliper
    assert np.unique(m.control).size == m.control.size  # without replacement
    assert math.isinf(match_on_ps(ps, t, caliper=None).caliper)


def test_with_replacement_takes_the_k_nearest():
    rng = np.random.default_rng(4)
    ps = rng.uniform(0.05, 0.95, 200)
    t = (rng.random(200) < 0.4).astype(int)
    m = match_on_ps(ps, t, k=3, caliper=None, replace=True)
    s = logit(ps)
    comp = np.flatnonzero(t == 0)
    for i in np.flatnonzero(t == 1):
        nearest = comp[np.argsort(np.abs(s[comp] - s[i]))[:3]]
        assert sorted(m.control[m.treated == i]) == sorted(nearest)


def test_abadie_imbens_with_replacement_matches_a_loop_reference():
    rng = np.random.default_rng(5)
    n = 80
    ps = rng.uniform(0.1, 0.9, n)
    t = (rng.random(n) < ps).astype(int)
    y = rng.normal(size=n) + 2 * t
    est = PSMatching(k=2, replace=True, caliper=None).fit(np.zeros((n, 1)), t, y, ps=ps)
    m = est.matches_
    s = logit(ps)
    comp = np.flatnonzero(t == 0)
    treated = sorted(set(m.treated.tolist()))
    D = {i: y[i] - np.mean(y[m.control[m.treated == i]]) for i in treated}
    tau = np.mean(list(D.values()))
    total = sum((d - tau) ** 2 for d in D.values())
    for j in comp:
        uses = [1 / np.sum(m.treated == i) for i in m.treated[m.control == j]]
        K, K2 = sum(uses), sum(u * u for u in uses)
        if K * K - K2 > 1e-12:
            others = [c for c in comp if c != j]
            near = sorted(others, key=lambda c: abs(s[c] - s[j]))[:2]
            s2 = 2 / 3 * (y[j] - np.mean(y[near])) ** 2
            total += (K * K - K2) * s2
    res = est.effect()
    assert res.estimate == pytest.approx(tau, abs=1e-12)
    assert res.se == pytest.approx(math.sqrt(total) / len(treated), rel=1e-12)


def _survival(n, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    ps = expit(0.8 * z - 0.4)
    t = (rng.random(n) < ps).astype(int)
    te = rng.exponential(1 / (0.01 * np.exp(math.log(0.6) * t + 0.7 * z)))
    tc = rng.uniform(5, 150, n)
    return ps, t, np.minimum(te, tc), (te <= tc).astype(int)


def test_cox_stratified_on_matched_sets_matches_lifelines():
    from lifelines import CoxPHFitter

    ps, t, tt, e = _survival(600, 6)
    est = PSMatching(k=2).fit(np.zeros((600, 1)), t, time=tt, event=e, ps=ps)
    res, m = est.effect(), est.matches_
    first = np.unique(m.set_id, return_index=True)[1]
    rows = np.r_[m.treated[first], m.control]
    df = pd.DataFrame({"t": tt[rows], "e": e[rows], "x": t[rows],
                       "set": np.r_[np.arange(m.n_sets), m.set_id]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CoxPHFitter().fit(df, "t", "e", strata=["set"],
                                fit_options={"precision": 1e-14, "r_precision": 1e-15})
    assert res.measure == "hazard_ratio"
    assert math.log(res.estimate) == pytest.approx(ref.params_["x"], abs=1e-7)
    assert res.se == pytest.approx(ref.standard_errors_["x"], rel=1e-6)


def test_horizon_risks_on_the_matched_sample_clustered_on_sets():
    ps, t, tt, e = _survival(800, 7)
    horizon = 60.0
    est = PSMatching(horizon=horizon).fit(np.zeros((800, 1)), t, time=tt, event=e, ps=ps)
    res, m = est.effect(), est.matches_
    first = np.unique(m.set_id, return_index=True)[1]
    tr, co = m.treated[first], m.control
    c1, c0 = weighted_km(tt[tr], e[tr]), weighted_km(tt[co], e[co])
    r1 = 1 - c1.survival[np.searchsorted(c1.time, horizon, side="right") - 1]
    r0 = 1 - c0.survival[np.searchsorted(c0.time, horizon, side="right") - 1]
    assert res.estimate == pytest.approx(r1 - r0, abs=1e-12)
    per_set = km_influence(c1, tt[tr], e[tr], None, horizon) - km_influence(
        c0, tt[co], e[co], None, horizon)  # 1:1: pair i is set i in both arrays
    assert res.se == pytest.approx(math.sqrt(np.sum(per_set**2)), rel=1e-12)
    unclustered = math.sqrt(np.sum(km_influence(c1, tt[tr], e[tr], None, horizon) ** 2)
                            + np.sum(km_influence(c0, tt[co], e[co], None, horizon) ** 2))
    assert res.se != pytest.approx(unclustered, rel=1e-3)


def test_seeds_make_matching_and_bootstrap_deterministic():
    rng = np.random.default_rng(8)
    n = 400
    ps = rng.choice([0.2, 0.35, 0.5, 0.65], n)  # heavy ties: the seed breaks them
    t = (rng.random(n) < ps).astype(int)
    y = rng.normal(size=n) + t
    a, b = match_on_ps(ps, t, seed=1), match_on_ps(ps, t, seed=1)
    assert _pairs(a) == _pairs(b)
    assert _pairs(a) != _pairs(match_on_ps(ps, t, seed=2))
    X = np.zeros((n, 1))
    boot = [PSMatching(variance="bootstrap", n_bootstrap=25, seed=s).fit(X, t, y, ps=ps).effect()
            for s in (3, 3, 4)]
    assert boot[0] == boot[1]
    assert boot[0].se != boot[2].se
    ai = PSMatching(seed=3).fit(X, t, y, ps=ps).effect()
    assert boot[0].estimate == ai.estimate
    assert boot[0].se == pytest.approx(ai.se, rel=0.5)


def test_errors():
    ps = np.r_[np.full(5, 0.9), np.full(5, 0.1)]
    t = np.r_[np.ones(5), np.zeros(5)].astype(int)
    X = np.zeros((10, 1))
    with pytest.raises(EstimationError, match="within the caliper"):
        PSMatching(caliper=0.1, caliper_scale="ps").fit(X, t, np.ones(10), ps=ps)
    with pytest.raises(EstimationError, match="caliper_scale"):
        PSMatching(caliper_scale="sd").fit(X, t, np.ones(10), ps=ps)
    with pytest.raises(EstimationError, match="k must be"):
        PSMatching(k=0).fit(X, t, np.ones(10), ps=ps)
    with pytest.raises(EstimationError, match="variance"):
        PSMatching(variance="sandwich").fit(X, t, np.ones(10), ps=ps)


def test_matches_100k_persons_quickly():
    rng = np.random.default_rng(9)
    n = 100_000
    ps = expit(1.2 * rng.normal(size=n) - 0.5)
    t = (rng.random(n) < ps).astype(int)
    start = time.perf_counter()
    m = match_on_ps(ps, t, k=4)
    elapsed = time.perf_counter() - start
    assert m.n_sets > 0.5 * t.sum()
    assert np.unique(m.control).size == m.control.size
    assert elapsed < 5.0  # ~0.2 s on the reference VM; quadratic behaviour would take minutes


def test_att_coverage_by_simulation():
    """200 confounded data sets with a constant effect 1 (so ATT = 1): 95% CIs of 1:1 matching
    without replacement (paired variance) and 1:2 with replacement (Abadie-Imbens) cover in
    90-99%, while the crude difference is far off."""
    reps, n = 200, 1000
    cover = {"paired": 0, "ai": 0}
    crude_err = []
    X = np.zeros((n, 1))
    for r in range(reps):
        rng = np.random.default_rng(2000 + r)
        z = rng.normal(size=(n, 2))
        ps = expit(-0.3 + z @ np.array([0.8, -0.6]))
        t = (rng.random(n) < ps).astype(int)
        y = t + z @ np.array([1.0, -1.0]) + rng.normal(size=n)
        paired = PSMatching().fit(X, t, y, ps=ps).effect()
        ai = PSMatching(k=2, replace=True).fit(X, t, y, ps=ps).effect()
        cover["paired"] += paired.ci_low <= 1 <= paired.ci_high
        cover["ai"] += ai.ci_low <= 1 <= ai.ci_high
        crude_err.append((y[t == 1].mean() - y[t == 0].mean() - 1) / paired.se)
    assert 0.90 <= cover["paired"] / reps <= 0.99
    assert 0.90 <= cover["ai"] / reps <= 0.99
    assert np.mean(crude_err) > 5
