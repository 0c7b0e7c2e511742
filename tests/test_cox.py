"""Tests for estimators.cox: references (statsmodels, lifelines, R's coxscore2), hand algebra."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from estimators import cox
from estimators.cox import CoxFit, fit_cox
from estimators.errors import EstimationError


def _data(n: int, seed: int, *, log_hr: float = math.log(0.6), n_strata: int = 1,
          max_day: float = 120.0):
    """Confounded survival data in whole days (many ties), IPTW weights and strata labels."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    p = 1 / (1 + np.exp(-0.8 * z))
    x = (rng.random(n) < p).astype(np.int64)
    s = rng.integers(0, n_strata, n)
    rate = 0.01 * np.exp(log_hr * x + 0.5 * z + 0.3 * s)
    t_event = rng.exponential(1 / rate)
    t_cens = rng.uniform(1, max_day, n)
    t = np.floor(np.minimum(t_event, t_cens))
    e = (t_event <= t_cens).astype(np.int64)
    w = np.where(x == 1, 1 / p, 1 / (1 - p))
    return t, e, x, w, s


def _untie(t: np.ndarray) -> np.ndarray:
    """Distinct whole days with the same order as `t` (ties broken at random)."""
    rng = np.random.default_rng(99)
    order = np.lexsort((rng.random(len(t)), t))
    out = np.empty(len(t))
    out[order] = 3.0 * np.arange(len(t))
    return out


def _lifelines(df: pd.DataFrame, **kwargs):
    from lifelines import CoxPHFitter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter().fit(
            df, "t", "e", fit_options={"precision": 1e-14, "r_precision": 1e-15}, **kwargs
        )


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- reference implementations -------------------------------------------------------------

def _coxscore2(t, e, x, w, beta: float, efron: bool) -> np.ndarray:
    """Weighted score residuals, a line-by-line port of R survival's coxscore2.c (one stratum)."""
    order = np.lexsort((1 - e, t))  # ascending time, deaths before censored
    t, e, x, w = t[order], e[order], x[order].astype(float), w[order]
    n = len(t)
    score = np.exp(beta * x)
    resid = np.zeros(n)
    denom = a = e_denom = a2 = deaths = meanwt = 0.0
    for i in range(n - 1, -1, -1):
        risk = score[i] * w[i]
        denom += risk
        a += risk * x[i]
        if e[i] == 1:
            deaths += 1
            e_denom += risk
            meanwt += w[i]
            a2 += risk * x[i]
        if deaths > 0 and (i == 0 or t[i] != t[i - 1]):
            if deaths < 2 or not efron:
                hazard, xbar = meanwt / denom, a / denom
                for k in range(i, n):
                    if t[k] == t[i] and e[k] == 1:
                        resid[k] += x[k] - xbar
                    resid[k] -= (x[k] - xbar) * score[k] * hazard
            else:
                meanwt /= deaths
                for dd in range(int(deaths)):
                    down = dd / deaths
                    tmp = denom - down * e_denom
                    hazard, mean = meanwt / tmp, (a - down * a2) / tmp
                    for k in range(i, n):
                        if t[k] == t[i] and e[k] == 1:
                            resid[k] += (x[k] - mean) / deaths
                            resid[k] -= (x[k] - mean) * score[k] * hazard * (1 - down)
                        else:
                            resid[k] -= (x[k] - mean) * score[k] * hazard
            e_denom = deaths = meanwt = a2 = 0.0
    return resid * w


def _reference_robust_se(t, e, x, w, s, fit: CoxFit, efron: bool) -> float:
    """R's coxph(..., robust=TRUE) SE: sqrt(sum of squared dfbeta residuals)."""
    meat = sum(
        (_coxscore2(t[s == k], e[s == k], x[s == k], w[s == k], fit.log_hr, efron) ** 2).sum()
        for k in np.unique(s)
    )
    return math.sqrt(meat) * fit.se_model**2


# --- agreement with reference implementations ---------------------------------------------

@pytest.mark.parametrize("n_strata", [1, 4])
def test_breslow_matches_statsmodels(n_strata):
    from statsmodels.duration.hazard_regression import PHReg

    t, e, x, _, s = _data(3000, 1, n_strata=n_strata)
    strata = s if n_strata > 1 else None
    ref = PHReg(t, x[:, None].astype(float), status=e, strata=strata, ties="breslow").fit()
    fit = fit_cox(t, e, x, strata=strata)
    assert _rel(fit.log_hr, ref.params[0]) < 1e-6
    assert _rel(fit.se_model, ref.bse[0]) < 1e-6
    assert fit.se == fit.se_model  # unweighted: model-based by default
    assert (fit.n, fit.events) == (3000, int(e.sum()))


def test_efron_matches_lifelines():
    t, e, x, _, _ = _data(2000, 2)
    ref = _lifelines(pd.DataFrame({"t": t, "e": e, "x": x}))
    fit = fit_cox(t, e, x, ties="efron")
    assert _rel(fit.log_hr, ref.params_["x"]) < 1e-6
    assert _rel(fit.se_model, ref.standard_errors_["x"]) < 1e-6
    breslow = fit_cox(t, e, x)
    assert abs(breslow.log_hr - fit.log_hr) > 1e-4  # the tie handling really differs


def test_weighted_efron_robust_matches_lifelines_without_tied_times():
    t, e, x, w, _ = _data(2000, 3)
    t = _untie(t)
    ref = _lifelines(pd.DataFrame({"t": t, "e": e, "x": x, "w": w}), weights_col="w", robust=True)
    fit = fit_cox(t, e, x, weights=w, ties="efron")
    assert _rel(fit.log_hr, ref.params_["x"]) < 1e-6
    assert _rel(fit.se, ref.standard_errors_["x"]) < 1e-5
    assert _rel(fit.se_model, math.sqrt(ref.variance_matrix_.to_numpy()[0, 0])) < 1e-6
    assert fit.se > fit.se_model * 1.01  # the sandwich is not the model SE


@pytest.mark.parametrize("n_strata", [1, 3])
def test_weighted_efron_robust_with_ties_close_to_lifelines(n_strata):
    """Same fit; robust SE within 1%: lifelines' score residuals ignore tied times (see module)."""
    t, e, x, w, s = _data(2000, 4, n_strata=n_strata)
    df = pd.DataFrame({"t": t, "e": e, "x": x, "w": w, "s": s})
    strata = s if n_strata > 1 else None
    ref = _lifelines(df if n_strata > 1 else df.drop(columns="s"), weights_col="w", robust=True,
                     strata=["s"] if n_strata > 1 else None)
    fit = fit_cox(t, e, x, weights=w, strata=strata, ties="efron")
    assert _rel(fit.log_hr, ref.params_["x"]) < 1e-6
    assert _rel(fit.se_model, math.sqrt(ref.variance_matrix_.to_numpy()[0, 0])) < 1e-6
    assert _rel(fit.se, ref.standard_errors_["x"]) < 1e-2


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("n_strata", [1, 3])
def test_robust_se_matches_r_coxscore2_port(ties, n_strata):
    t, e, x, w, s = _data(400, 5, n_strata=n_strata, max_day=40)
    strata = s if n_strata > 1 else None
    fit = fit_cox(t, e, x, weights=w, strata=strata, ties=ties)
    expected = _reference_robust_se(t, e, x, w, s, fit, efron=ties == "efron")
    assert _rel(fit.se, expected) < 1e-10
    unweighted = fit_cox(t, e, x, strata=strata, ties=ties, robust=True)
    expected = _reference_robust_se(t, e, x, np.ones(len(t)), s, unweighted, ties == "efron")
    assert _rel(unweighted.se, expected) < 1e-10


# --- algebra and invariances ---------------------------------------------------------------

def test_hand_computed_breslow_example():
    # (time, event, treated): A(1,1,1) B(2,1,0) C(2,1,1) D(3,0,0) E(4,1,1), h = exp(beta).
    # t=1: risk {A..E}, 3 treated/2 comparator, A dies     -> 1 - 3h/(2+3h) = 2/(2+3h)
    # t=2: risk {B..E}, 2/2, B and C die (Breslow, d=2)    -> 1 - 2*2h/(2+2h) = (1-h)/(1+h)
    # t=4: risk {E} only, E dies                            -> 1 - h/h = 0
    # U = 2/(2+3h) + (1-h)/(1+h) = 0  <=>  3h^2 - 3h - 4 = 0  <=>  h = (3 + sqrt(57))/6
    t = np.array([1, 2, 2, 3, 4])
    e = np.array([1, 1, 1, 0, 1])
    x = np.array([1, 0, 1, 0, 1])
    fit = fit_cox(t, e, x)
    h = (3 + math.sqrt(57)) / 6
    info = 6 * h / (2 + 3 * h) ** 2 + 2 * h / (1 + h) ** 2  # sum of d * m * (1 - m)
    assert fit.log_hr == pytest.approx(math.log(h), rel=1e-12)
    assert fit.se_model == pytest.approx(1 / math.sqrt(info), rel=1e-12)
    assert (fit.n, fit.events) == (5, 4)


def test_weights_rescaling_and_replication():
    t, e, x, _, _ = _data(1500, 6)
    w = np.random.default_rng(0).integers(1, 4, len(t)).astype(float)
    fit = fit_cox(t, e, x, weights=w)
    doubled = fit_cox(t, e, x, weights=2 * w)
    assert doubled.log_hr == pytest.approx(fit.log_hr, rel=1e-10)
    assert doubled.se == pytest.approx(fit.se, rel=1e-10)  # the sandwich is scale-free
    assert doubled.se_model == pytest.approx(fit.se_model / math.sqrt(2), rel=1e-10)
    # Breslow: integer weights are the same as replicated rows
    idx = np.repeat(np.arange(len(t)), w.astype(int))
    replicated = fit_cox(t[idx], e[idx], x[idx])
    assert replicated.log_hr == pytest.approx(fit.log_hr, rel=1e-10)
    assert replicated.se_model == pytest.approx(fit.se_model, rel=1e-10)


def test_only_order_of_times_and_labels_of_strata_matter():
    t, e, x, w, s = _data(1500, 7, n_strata=3)
    for ties in ("breslow", "efron"):
        base = fit_cox(t, e, x, weights=w, strata=s, ties=ties)
        # non-integer times and sparse, huge stratum labels take the sorting (np.unique) path
        other = fit_cox(t / 7.3 + 0.01, e, x, weights=w, strata=s * 1_000_003 - 5, ties=ties)
        assert other.log_hr == pytest.approx(base.log_hr, rel=1e-12)
        assert other.se == pytest.approx(base.se, rel=1e-10)


def test_single_arm_stratum_and_zero_weights_contribute_nothing():
    t, e, x, w, s = _data(1500, 8, n_strata=2)
    base = fit_cox(t, e, x, weights=w, strata=s)
    extra = 50  # stratum 9 has only treated subjects, some with events
    t2 = np.concatenate([t, np.arange(extra, dtype=float)])
    e2 = np.concatenate([e, np.ones(extra, dtype=int)])
    x2 = np.concatenate([x, np.ones(extra, dtype=int)])
    s2 = np.concatenate([s, np.full(extra, 9)])
    w2 = np.concatenate([w, np.ones(extra)])
    with_single = fit_cox(t2, e2, x2, weights=w2, strata=s2)
    assert with_single.log_hr == pytest.approx(base.log_hr, rel=1e-12)
    assert with_single.se == pytest.approx(base.se, rel=1e-10)
    zero = fit_cox(t2, e2, x2, weights=np.concatenate([w, np.zeros(extra)]), strata=s2)
    assert zero.log_hr == pytest.approx(base.log_hr, rel=1e-12)
    assert (zero.n, zero.events) == (base.n, base.events) == (1500, int(e.sum()))


def test_recovers_planted_hazard_ratio():
    # a 5-level confounder raises both the chance of treatment and the hazard; stratifying on it
    # recovers the planted conditional HR (IPTW would target the different, marginal HR)
    rng = np.random.default_rng(11)
    n = 20_000
    s = rng.integers(0, 5, n)
    x = (rng.random(n) < 0.2 + 0.15 * s).astype(int)
    t_event = rng.exponential(1 / (0.002 * np.exp(math.log(0.5) * x + 0.4 * s)))
    t_cens = rng.uniform(30, 730, n)
    t, e = np.floor(np.minimum(t_event, t_cens)), (t_event <= t_cens).astype(int)
    for ties in ("breslow", "efron"):
        fit = fit_cox(t, e, x, strata=s, ties=ties)
        est = fit.effect(estimand="ATT", n_treated=int(x.sum()), n_control=int(n - x.sum()))
        assert est.measure == "hazard_ratio"
        assert est.estimate == pytest.approx(math.exp(fit.log_hr))
        assert est.ci_low < 0.5 < est.ci_high
        assert est.ci_high - est.ci_low < 0.1
    naive = fit_cox(t, e, x)  # ignoring the confounder biases the estimate towards 1
    assert math.exp(naive.log_hr) > est.ci_high


# --- errors -------------------------------------------------------------------------------

T = np.array([1.0, 2, 3, 4, 5, 6])
E = np.array([1, 0, 1, 1, 0, 1])
X = np.array([1, 0, 1, 0, 1, 0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"time": T[:5]}, "mismatched lengths"),
        ({"weights": np.ones(5)}, "mismatched lengths"),
        ({"strata": np.ones(7)}, "mismatched lengths"),
        ({"time": np.array([]), "event": np.array([]), "treated": np.array([])}, "empty input"),
        ({"time": np.where(T == 3, np.nan, T)}, "time contains NaN or infinite"),
        ({"time": np.where(T == 3, np.inf, T)}, "time contains NaN or infinite"),
        ({"time": np.where(T == 3, -1.0, T)}, "time contains negative"),
        ({"weights": np.where(T == 3, np.nan, 1.0)}, "weights contain NaN or infinite"),
        ({"weights": np.where(T == 3, -0.5, 1.0)}, "weights contain negative"),
        ({"weights": np.zeros(6)}, "all weights are zero"),
        ({"event": np.where(E == 1, 2, 0)}, "event must contain only 0/1"),
        ({"treated": np.ones(6)}, "no comparator subjects"),
        ({"treated": np.zeros(6)}, "no treated subjects"),
        ({"event": np.zeros(6)}, "no outcome events: hazard ratio not estimable"),
        ({"event": np.array([0, 1, 0, 1, 0, 1])},
         "no events among the treated (3 at risk): hazard ratio not estimable"),
        ({"event": np.array([1, 0, 1, 0, 1, 0])},
         "no events among the comparator (3 at risk): hazard ratio not estimable"),
        ({"strata": X}, "no stratum contains both"),
        # treated events only after every comparator left the risk set: infinite MLE
        ({"time": np.array([5.0, 1, 6, 2, 7, 3]), "event": np.array([1, 1, 1, 1, 0, 1])},
         "no events among the treated while comparator subjects are at risk"),
    ],
)
def test_errors(kwargs, message):
    args = {"time": T, "event": E, "treated": X} | kwargs
    extra = {k: args.pop(k) for k in ("weights", "strata") if k in args}
    with pytest.raises(EstimationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_cox(args["time"], args["event"], args["treated"], **extra)


def test_valid_example_fits_and_bad_ties_rejected():
    assert math.isfinite(fit_cox(T, E, X).log_hr)  # the base of test_errors is estimable
    with pytest.raises(ValueError, match="ties must be"):
        fit_cox(T, E, X, ties="exact")


def test_non_convergence_raises(monkeypatch):
    t, e, x, _, _ = _data(500, 12)
    monkeypatch.setattr(cox, "MAX_ITER", 1)
    with pytest.raises(EstimationError, match="did not converge in 1 iterations"):
        fit_cox(t, e, x)
