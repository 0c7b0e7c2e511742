"""Candidate rows of a screen from hand-made trial rows (results.candidates)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from estimators.pooling import pool_trials
from results.candidates import candidate_evidence, identified

Z = 1.959963984540054


def _p(log_hr: float, se: float) -> float:
    return math.erfc(abs(log_hr / se) / math.sqrt(2))


def trial(cid, treatment, hr, se, *, passed=True, status="ok", strategy="random",
          role="outcome", outcome="o", calibrated=None):
    """One estimate row and its diagnostics row; calibrated = (hr, se, p) or None."""
    cal = calibrated or (math.nan, math.nan, math.nan)
    estimate = {"comparison_id": cid, "treatment": treatment, "comparator": f"c{cid}",
                "outcome": outcome, "role": role, "estimator": "iptw", "measure": "hr",
                "strategy": strategy, "status": status,
                "estimate": hr if status == "ok" else math.nan,
                "se": se if status == "ok" else math.nan,
                "p_value": _p(math.log(hr), se) if status == "ok" else math.nan,
                "calibrated_estimate": cal[0], "calibrated_se": cal[1],
                "calibrated_p_value": cal[2]}
    diagnostics = {"comparison_id": cid, "outcome": outcome, "estimator": "iptw",
                   "strategy": strategy, "passed": passed and status == "ok"}
    return estimate, diagnostics


def frames(trials):
    estimates, diagnostics = zip(*trials, strict=True)
    return pd.DataFrame(estimates), pd.DataFrame(diagnostics)


@pytest.fixture(scope="module")
def battery():
    trials = [
        # a: two balanced trials and one that fails its diagnostics (HR 0.3 must not be pooled)
        trial(1, "a", 0.5, 0.1), trial(2, "a", 0.8, 0.2), trial(3, "a", 0.3, 0.1, passed=False),
        # b: nothing estimable
        trial(4, "b", 1.0, 0.1, status="failed"), trial(5, "b", 1.0, 0.1, status="failed"),
        # d: one balanced trial, calibrated
        trial(6, "d", 0.9, 0.3, calibrated=(0.6, 0.25, 0.04)),
        # e: estimable, none balanced
        trial(7, "e", 0.9, 0.2, passed=False),
        # a negative control of a's first trial: rolled up, never ranked
        trial(1, "a", 1.1, 0.2, role="negative_control", outcome="nc"),
    ]
    # c: 1 of 20 trials balanced
    trials += [trial(100 + i, "c", 0.7, 0.2, passed=i == 0) for i in range(20)]
    estimates, diagnostics = frames(trials)
    rows = candidate_evidence(estimates, diagnostics)
    return rows.set_index(["treatment", "outcome"])


def test_counts_rates_and_reasons(battery):
    a = battery.loc[("a", "o")]
    assert (a.trials_run, a.trials_estimable, a.trials_balanced) == (3, 3, 2)
    assert a.balanced_rate == pytest.approx(2 / 3)
    assert a.reported and a.reason is None
    b = battery.loc[("b", "o")]
    assert (b.trials_run, b.trials_estimable, b.trials_balanced) == (2, 0, 0)
    assert not b.reported and b.reason == "no trial estimable"
    assert math.isnan(b.estimate) and math.isnan(b.share_protective)
    e = battery.loc[("e", "o")]
    assert not e.reported and e.reason == "no balanced trial"
    c = battery.loc[("c", "o")]
    assert (c.trials_run, c.trials_balanced, c.balanced_rate) == (20, 1, 0.05)
    assert not c.reported and c.reason == "1 of 20 trials balanced (5%) < 10%"
    assert not np.isnan(c.estimate)  # pooled all the same, but not reported or ranked
    assert pd.isna(c["rank"]) and math.isnan(c.q_value)


def test_pooled_estimate_of_two_balanced_trials_by_hand(battery):
    a = battery.loc[("a", "o")]
    # weights 1/0.1^2 : 1/0.2^2 = 100 : 25 -> 0.8 : 0.2
    mean = 0.8 * math.log(0.5) + 0.2 * math.log(0.8)
    fe_q = 100 * (math.log(0.5) - mean) ** 2 + 25 * (math.log(0.8) - mean) ** 2
    tau2 = (fe_q - 1) / (125 - (100**2 + 25**2) / 125)
    se = math.sqrt((0.8 * 0.1 + 0.2 * 0.2) ** 2 + tau2 * (0.8**2 + 0.2**2))
    assert a.estimate == pytest.approx(math.exp(mean))
    assert a.se == pytest.approx(se)
    assert a.ci_low == pytest.approx(math.exp(mean - Z * se))
    assert a.ci_high == pytest.approx(math.exp(mean + Z * se))
    assert a.p_value == pytest.approx(_p(mean, se))
    assert not a.calibrated
    # share significant at 0.05 among the 2 balanced trials: HR 0.5 (p < 0.001), 0.8 (p 0.26)
    assert a.share_protective == 0.5 and a.share_harmful == 0.0


def test_a_trial_failing_diagnostics_never_enters_the_pool():
    ok = [trial(1, "a", 0.5, 0.1), trial(2, "a", 0.8, 0.2)]
    failing = trial(3, "a", 0.05, 0.1, passed=False)
    no_row = trial(4, "a", 0.05, 0.1)
    estimates, diagnostics = frames([*ok, failing, no_row])
    diagnostics = diagnostics[diagnostics["comparison_id"] != 4]  # no diagnostics at all
    row = candidate_evidence(estimates, diagnostics).iloc[0]
    expected = pool_trials(np.log([0.5, 0.8]), [0.1, 0.2])
    assert row.trials_run == 4 and row.trials_balanced == 2
    assert row.estimate == pytest.approx(expected.estimate)
    assert row.se == pytest.approx(expected.se)


def test_calibrated_values_are_pooled_when_every_balanced_trial_has_them(battery):
    d = battery.loc[("d", "o")]
    assert d.calibrated
    assert d.estimate == pytest.approx(0.6) and d.se == pytest.approx(0.25)
    assert d.p_value == pytest.approx(_p(math.log(0.6), 0.25))
    assert d.share_protective == 1.0  # calibrated p 0.04 < 0.05


def test_mixed_calibration_pools_the_raw_values():
    estimates, diagnostics = frames([trial(1, "a", 0.5, 0.1, calibrated=(0.6, 0.2, 0.01)),
                                     trial(2, "a", 0.8, 0.2)])
    row = candidate_evidence(estimates, diagnostics).iloc[0]
    assert not row.calibrated
    assert row.estimate == pytest.approx(pool_trials(np.log([0.5, 0.8]), [0.1, 0.2]).estimate)


def test_q_values_and_ranks_within_outcome_strategy_estimator(battery):
    a, d = battery.loc[("a", "o")], battery.loc[("d", "o")]
    p_a, p_d = a.p_value, d.p_value
    assert p_d == pytest.approx(0.041, abs=1e-3)
    assert p_a < p_d
    # BH over the m = 2 reported candidates (b, c, e are not reported): the smaller p-value
    # times m / 1, capped by the larger one's q = p times m / 2.
    assert d.q_value == pytest.approx(p_d)
    assert a.q_value == pytest.approx(min(2 * p_a, p_d))
    assert (a["rank"], d["rank"]) == (1, 2)
    nc = battery.loc[("a", "nc")]
    assert nc.role == "negative_control" and pd.isna(nc["rank"]) and math.isnan(nc.q_value)
    assert battery.loc[("a", "o")].significant == (a.q_value < 0.05)


def test_strategies_are_separate_rows_and_families():
    estimates, diagnostics = frames([
        trial(1, "a", 0.5, 0.1), trial(2, "a", 0.7, 0.1, strategy="same_class"),
        trial(3, "b", 0.9, 0.1, strategy="same_class")])
    rows = candidate_evidence(estimates, diagnostics).set_index(["treatment", "strategy"])
    assert len(rows) == 3
    assert rows.loc[("a", "random"), "rank"] == 1
    # a and b share the same_class family; a has the smaller p-value
    assert rows.loc[("a", "same_class"), "rank"] == 1 and rows.loc[("b", "same_class"), "rank"] == 2


def _candidate_rows():
    rows = []
    for treatment, strategy, hr, q in [
        ("x", "random", 0.6, 0.01), ("x", "same_class", 0.7, 0.03),   # beneficial under both
        ("y", "random", 0.6, 0.01), ("y", "same_class", 0.7, 0.20),   # not significant in one
        ("z", "random", 0.6, 0.01), ("z", "same_class", 1.3, 0.01),   # harmful in one
        ("w", "random", 0.6, 0.01),                                   # only one strategy run
    ]:
        rows.append({"treatment": treatment, "outcome": "o", "role": "outcome",
                     "strategy": strategy, "estimator": "iptw", "estimate": hr, "q_value": q,
                     "reported": True})
    rows.append({"treatment": "x", "outcome": "nc", "role": "negative_control",
                 "strategy": "random", "estimator": "iptw", "estimate": 0.5, "q_value": 0.001,
                 "reported": True})
    rows.append({"treatment": "v", "outcome": "o", "role": "outcome", "strategy": "random",
                 "estimator": "iptw", "estimate": math.nan, "q_value": math.nan,
                 "reported": False})
    return pd.DataFrame(rows)


def test_identified_needs_benefit_under_every_strategy():
    out = identified(_candidate_rows()).set_index("treatment")
    assert out["identified"].to_dict() == {"v": False, "w": True, "x": True, "y": False,
                                           "z": False}
    assert out.loc["x", "strategies"] == "random, same_class"
    assert out.loc["w", "strategies"] == "random"
    assert out.loc["y", "n_beneficial"] == 1 and out.loc["y", "n_strategies"] == 2
    assert "nc" not in set(identified(_candidate_rows())["outcome"])


def test_trial_rows_without_a_strategy_are_refused():
    estimates, diagnostics = frames([trial(1, "a", 0.5, 0.1)])
    with pytest.raises(ValueError, match="strategy"):
        candidate_evidence(estimates.drop(columns="strategy"), diagnostics)
