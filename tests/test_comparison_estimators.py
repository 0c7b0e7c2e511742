"""The `overlap` and `ps_match` estimators of the study pipeline (estimators.comparison).

Checked against direct computations with the library pieces they are built from (the PS fit,
overlap weights, CohortMethod-style matching, fit_cox), against a planted hazard ratio on
confounded simulated data, and for failure isolation, counts and balance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from estimators import comparison
from estimators.balance import covariate_balance, max_abs_smd
from estimators.comparison import OutcomeInput, analyze_comparison
from estimators.cox import fit_cox
from estimators.hazard import overlap_weights
from estimators.matching import match_on_ps
from estimators.propensity import fit_propensity
from flows.config import load_study

ALL = ["crude", "iptw", "overlap", "ps_strata", "ps_match"]
TRUE_HR = 0.6
BETA_PS = np.array([0.9, -0.7, 0.8, 0.0])
BETA_OUTCOME = np.array([0.7, -0.5, 0.6, 0.3])


def _study(n: int = 20_000, seed: int = 0, prior_share: float = 0.02):
    """Two normal and two binary covariates; the first three confound treatment and outcome in
    the same direction (so the crude HR is biased far upwards). Exponential event times with a
    constant conditional HR of TRUE_HR, censoring uniform on 30-365 days, whole days. The
    outcome is rare (~8%), so the marginal HR the adjusted estimators target is close to the
    conditional one (little non-collapsibility)."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.normal(size=n), rng.normal(size=n), rng.random(n) < 0.3,
                         rng.random(n) < 0.5]).astype(float)
    t = (rng.random(n) < expit(-0.3 + X @ BETA_PS)).astype(np.int8)
    rate = 0.0003 * np.exp(math.log(TRUE_HR) * t + X @ BETA_OUTCOME)
    te = rng.exponential(1 / rate)
    tc = rng.uniform(30, 365, n)
    time = np.floor(np.minimum(te, tc))
    event = te <= tc
    prior = rng.random(n) < prior_share
    return X, t, OutcomeInput(time, event, prior)


def _run(X, t, outcome, seed, estimators=ALL):
    result = analyze_comparison(sp.csr_matrix(X), t, {"o": outcome}, estimators=estimators,
                                seed=seed)
    rows = {r["estimator"]: r for r in result.estimates}
    diagnostics = {d["estimator"]: d for d in result.diagnostics}
    return result, rows, diagnostics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_and_matching_recover_the_planted_hr_where_crude_does_not(seed):
    X, t, outcome = _study(seed=seed)
    _, rows, _ = _run(X, t, outcome, seed)
    truth = math.log(TRUE_HR)
    for name in ("overlap", "ps_match"):
        row = rows[name]
        assert row["status"] == "ok", row["message"]
        assert row["ci_low"] <= TRUE_HR <= row["ci_high"], (name, row["estimate"])
        assert abs(math.log(row["estimate"]) - truth) < 0.15, (name, row["estimate"])
    crude = rows["crude"]
    assert not crude["ci_low"] <= TRUE_HR <= crude["ci_high"]
    assert math.log(crude["estimate"]) - truth > 0.5
    assert rows["overlap"]["estimand"] == "ATO"
    assert rows["ps_match"]["estimand"] == "ATT (matched)"


def test_overlap_equals_a_weighted_cox_fit_with_hand_computed_weights():
    seed = 3
    X, t, outcome = _study(n=8000, seed=seed)
    _, rows, diagnostics = _run(X, t, outcome, seed)
    ps = fit_propensity(sp.csr_matrix(X), t, seed=seed).ps   # the same single PS fit
    w = np.where(t == 1, 1.0 - ps, ps)
    keep = ~outcome.prior
    ref = fit_cox(outcome.time[keep], outcome.event[keep], t[keep], weights=w[keep],
                  robust=True)
    row = rows["overlap"]
    assert math.log(row["estimate"]) == pytest.approx(ref.log_hr, abs=1e-10)
    assert row["se"] == pytest.approx(ref.se, rel=1e-10)
    assert ref.se != pytest.approx(ref.se_model, rel=1e-3)       # the robust SE, not the model's
    assert (row["n_treated"], row["n_comparator"]) == (int(t[keep].sum()),
                                                       int((1 - t[keep]).sum()))
    ess = [w[t == arm].sum() ** 2 / (w[t == arm] ** 2).sum() for arm in (1, 0)]
    d = diagnostics["overlap"]
    assert (d["ess_treated"], d["ess_comparator"]) == pytest.approx(ess, rel=1e-12)


def test_overlap_weights_balance_the_ps_covariates():
    """Overlap weights from a maximum-likelihood logistic PS balance each model covariate's mean
    exactly (the score equations); the pipeline's L1-penalised PS nearly so."""
    seed = 4
    X, t, outcome = _study(n=8000, seed=seed)
    model = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=100)
    ps = model.fit(X, t).predict_proba(X)[:, 1]
    exact = covariate_balance(X, t, overlap_weights(ps, t))
    assert max_abs_smd(exact) < 1e-8
    assert max_abs_smd(covariate_balance(X, t)) > 0.5                  # confounded before

    result, _, diagnostics = _run(X, t, outcome, seed)
    penalised = fit_propensity(sp.csr_matrix(X), t, seed=seed).ps
    wired = covariate_balance(X, t, overlap_weights(penalised, t))
    np.testing.assert_allclose(result.balance["overlap"]["smd_after"], wired.smd, atol=1e-12)
    assert diagnostics["overlap"]["max_abs_smd_after"] < 0.05
    assert diagnostics["overlap"]["max_abs_smd_after"] == pytest.approx(max_abs_smd(wired))


def _direct_match(X, t, seed):
    """What ps_match should do, from the library pieces: one PS fit, CohortMethod's matchOnPs
    defaults (1:1, caliper 0.2 SD of the logit PS)."""
    ps = fit_propensity(sp.csr_matrix(X), t, seed=seed).ps
    m = match_on_ps(ps, t, k=1, caliper=0.2, caliper_scale="logit_sd", seed=seed)
    sets = np.full(t.size, -1)
    sets[m.treated] = m.set_id
    sets[m.control] = m.set_id
    return m, sets


def test_ps_match_equals_cox_stratified_on_direct_matches():
    seed = 5
    X, t, outcome = _study(n=8000, seed=seed, prior_share=0.05)
    _, rows, diagnostics = _run(X, t, outcome, seed)
    m, sets = _direct_match(X, t, seed)
    assert m.n_sets == m.control.size < t.sum()                  # 1:1, some treated unmatched
    # persons with a prior outcome are dropped, and then so are their partners
    kept = (sets >= 0) & ~outcome.prior
    complete = [s for s in np.unique(sets[kept]) if len(np.unique(t[kept & (sets == s)])) == 2]
    use = kept & np.isin(sets, complete)
    assert use.sum() < 2 * m.n_sets                              # some pairs were broken
    ref = fit_cox(outcome.time[use], outcome.event[use], t[use], strata=sets[use])
    row = rows["ps_match"]
    assert row["status"] == "ok"
    assert math.log(row["estimate"]) == pytest.approx(ref.log_hr, abs=1e-10)
    assert row["se"] == pytest.approx(ref.se_model, rel=1e-10)    # model-based SE
    n_pairs = len(complete)
    assert (row["n_treated"], row["n_comparator"]) == (n_pairs, n_pairs)
    assert row["events_treated"] == int(outcome.event[use & (t == 1)].sum())
    assert row["events_comparator"] == int(outcome.event[use & (t == 0)].sum())
    assert row["person_days_treated"] == int(outcome.time[use & (t == 1)].sum())
    d = diagnostics["ps_match"]
    assert (d["n_treated"], d["n_comparator"]) == (n_pairs, n_pairs)
    assert (d["ess_treated"], d["ess_comparator"]) == (m.n_sets, m.n_sets)   # matched counts


def test_ps_match_balance_is_on_the_matched_sample():
    seed = 6
    X, t, outcome = _study(n=8000, seed=seed)
    result, _, diagnostics = _run(X, t, outcome, seed)
    _, sets = _direct_match(X, t, seed)
    matched = sets >= 0
    plain = covariate_balance(X[matched], t[matched])   # 1:1: every matched person counts once
    smd = result.balance["ps_match"]["smd_after"]
    np.testing.assert_allclose(smd, plain.smd, rtol=1e-3, atol=1e-12)   # n vs n-1 variance
    np.testing.assert_allclose(result.balance["ps_match"]["mean_treated_after"],
                               plain.mean_treated, atol=1e-12)
    assert diagnostics["ps_match"]["max_abs_smd_after"] < 0.1
    assert diagnostics["ps_match"]["max_abs_smd_before"] > 0.5


def test_no_match_within_the_caliper_fails_only_ps_match(monkeypatch):
    monkeypatch.setattr(comparison, "MATCH_CALIPER", 1e-12)   # continuous scores: no pair fits
    X, t, outcome = _study(n=4000, seed=7)
    _, rows, diagnostics = _run(X, t, outcome, 7)
    assert rows["ps_match"]["status"] == "failed"
    assert "within the caliper" in rows["ps_match"]["message"]
    assert math.isnan(diagnostics["ps_match"]["max_abs_smd_after"])
    assert all(rows[name]["status"] == "ok" for name in ALL if name != "ps_match")


def test_matched_sets_all_broken_by_prior_outcomes_fail_with_the_reason():
    X, t, outcome = _study(n=4000, seed=8)
    everyone_prior = OutcomeInput(outcome.time, outcome.event, np.ones(t.size, bool))
    _, rows, _ = _run(X, t, everyone_prior, 8, estimators=["ps_match"])
    assert rows["ps_match"]["status"] == "failed"
    assert "no matched set keeps both arms" in rows["ps_match"]["message"]


def test_unknown_estimator_is_a_caller_error():
    X, t, outcome = _study(n=500, seed=9)
    with pytest.raises(ValueError, match="unknown estimator"):
        _run(X, t, outcome, 9, estimators=["crude", "aipw"])


def test_the_study_file_accepts_the_new_estimators(tmp_path):
    text = ("study: tiny\nsource: cdm\nconcept_sets:\n  t: {include: [101]}\n"
            "  c: {include: [102]}\n  o: {include: [201]}\ntreatments: [t]\n"
            "comparator: {active: c}\noutcomes: [o]\n"
            "estimators: [crude, iptw, overlap, ps_strata, ps_match]\n")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    assert load_study(path).config.estimators == ALL


def test_survival_curve_points_carry_the_arms_persons_at_risk():
    """Each stored KM point says how many of its arm (prior-outcome persons excluded) are still
    at risk on that day: the count reports and exports cut curves on."""
    X, t, outcome = _study(n=5_000, seed=3)
    result, _, _ = _run(X, t, outcome, seed=3, estimators=["crude", "iptw"])
    curves = result.survival_curves
    assert {(r["adjustment"], r["arm"]) for r in curves} == {
        (a, arm) for a in ("crude", "iptw") for arm in ("treated", "comparator")}
    keep = ~outcome.prior
    for arm_name, arm in (("treated", 1), ("comparator", 0)):
        times = outcome.time[keep & (t == arm)]
        for adjustment in ("crude", "iptw"):
            rows = [r for r in curves if r["arm"] == arm_name and r["adjustment"] == adjustment]
            assert 1 < len(rows) <= comparison.CURVE_POINTS
            days = np.array([r["day"] for r in rows])
            at_risk = np.array([r["at_risk"] for r in rows])
            np.testing.assert_array_equal(at_risk, [(times >= d).sum() for d in days])
            assert (np.diff(at_risk) <= 0).all() and at_risk[0] <= times.size
            assert (np.diff([r["survival"] for r in rows]) <= 0).all()
