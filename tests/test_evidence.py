"""The evidence layer on hand-made rows: gates with reasons, calibration, q-values, ranking."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from estimators.calibration import fit_null
from estimators.sensitivity import benjamini_hochberg
from results.evidence import assemble_evidence
from results.gates import Thresholds, evaluate_gates


def diagnostics_row(**values) -> dict:
    row = {"comparison_id": 1, "outcome": "o", "estimator": "iptw", "max_abs_smd_after": 0.05,
           "equipoise": 0.6, "mdrr": 1.5, "ease": 0.05}
    row.update(values)
    return row


def test_each_gate_fails_with_its_reason():
    rows = pd.DataFrame([
        diagnostics_row(outcome="fine"),
        diagnostics_row(outcome="imbalanced", max_abs_smd_after=0.25),
        diagnostics_row(outcome="no_equipoise", equipoise=0.1),
        diagnostics_row(outcome="weak", mdrr=12.0),
        diagnostics_row(outcome="biased", ease=0.4),
        diagnostics_row(outcome="not_assessed", equipoise=math.nan, ease=math.nan),
        diagnostics_row(outcome="failed"),
    ])
    status = pd.DataFrame({"comparison_id": 1, "estimator": "iptw", "outcome": rows["outcome"],
                           "status": ["ok"] * 6 + ["failed"],
                           "message": [None] * 6 + ["no events among the treated"]})
    gates = evaluate_gates(rows, status, Thresholds()).set_index("outcome")
    assert gates.loc["fine", "passed"] and gates.loc["fine", "reasons"] is None
    assert gates.loc["imbalanced", "reasons"] == "covariate imbalance: max |SMD| 0.250 > 0.1"
    assert gates.loc["no_equipoise", "reasons"].startswith("low equipoise: 0.10 < 0.2")
    assert gates.loc["weak", "reasons"] == "underpowered: MDRR 12.00 > 10"
    assert gates.loc["biased", "reasons"] == "systematic error: EASE 0.400 > 0.25"
    assert gates.loc["not_assessed", "passed"]
    assert pd.isna(gates.loc["not_assessed", "ease_pass"])
    assert gates.loc["failed", "reasons"] == "not estimable: no events among the treated"
    assert gates["passed"].sum() == 2
    assert (gates["max_ease_threshold"] == 0.25).all()


def estimates_frame(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One comparison per treatment; 30 biased negative controls and 3 outcomes each."""
    rng = np.random.default_rng(seed)
    rows, diagnostics = [], []
    truth = {"a": 0.5, "b": 1.0, "c": 2.0}
    for cid, (treatment, hr) in enumerate(truth.items(), start=1):
        bias = 0.3
        for k in range(30):
            se = rng.uniform(0.1, 0.3)
            rows.append((cid, treatment, f"nc{k}", "negative_control",
                         math.exp(bias + rng.normal(0, 0.1) + rng.normal(0, se)), se, 1.0))
        for outcome in ("x", "y"):
            rows.append((cid, treatment, outcome, "outcome", hr * math.exp(bias), 0.05, None))
        rows.append((cid, treatment, "z", "outcome", math.exp(bias), 0.05, None))
        for outcome in ("x", "y", "z", *[f"nc{k}" for k in range(30)]):
            diagnostics.append(diagnostics_row(comparison_id=cid, outcome=outcome, ease=None))
    frame = pd.DataFrame(rows, columns=["comparison_id", "treatment", "outcome", "role",
                                        "estimate", "se", "true_effect_size"])
    z = 1.959963984540054
    frame = frame.assign(
        estimator="iptw", status="ok", message=None,
        ci_low=frame["estimate"] * np.exp(-z * frame["se"]),
        ci_high=frame["estimate"] * np.exp(z * frame["se"]),
        p_value=2 * (1 - pd.Series(np.abs(np.log(frame["estimate"]) / frame["se"])).map(
            lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2))))),
        n_treated=1000, n_comparator=1000, events_treated=50, events_comparator=50)
    return frame, pd.DataFrame(diagnostics).drop(columns=["ease"])


def test_calibration_removes_the_shared_bias():
    estimates, diagnostics = estimates_frame()
    calibrated, gated = assemble_evidence(estimates, diagnostics, Thresholds(max_ease=0.5))
    mine = calibrated[(calibrated["comparison_id"] == 1)]
    controls = mine[mine["role"] == "negative_control"]
    null = fit_null(np.log(controls["estimate"]), controls["se"])
    assert null.mean == pytest.approx(0.3, abs=0.1)
    outcome = mine[mine["outcome"] == "x"].iloc[0]
    assert outcome["estimate"] == pytest.approx(0.5 * math.exp(0.3))
    assert outcome["calibrated_estimate"] == pytest.approx(0.5, rel=0.15)  # bias removed
    assert math.log(outcome["calibrated_ci_high"] / outcome["calibrated_ci_low"]) > math.log(
        outcome["ci_high"] / outcome["ci_low"])                   # and wider (on the log scale)
    uncalibrated = ((controls["ci_low"] <= 1) & (controls["ci_high"] >= 1)).mean()
    covered = ((controls["calibrated_ci_low"] <= 1) & (controls["calibrated_ci_high"] >= 1))
    assert covered.mean() >= 0.9 > uncalibrated
    row = gated[(gated["comparison_id"] == 1) & (gated["outcome"] == "x")].iloc[0]
    assert row["ease"] == pytest.approx(0.3, abs=0.1) and row["ease_pass"]


def test_ranking_orders_passing_outcomes_with_bh_q_values():
    estimates, diagnostics = estimates_frame()
    diagnostics.loc[(diagnostics["comparison_id"] == 3) & (diagnostics["outcome"] == "y"),
                    "mdrr"] = 50.0                                    # c fails on outcome y
    ranked, _ = assemble_evidence(estimates, diagnostics, Thresholds(max_ease=0.5))
    x = ranked[(ranked["outcome"] == "x")].sort_values("rank")
    assert list(x["treatment"]) == ["a", "c", "b"]       # strongest evidence first; b is null
    assert x["q_value"].to_numpy() == pytest.approx(benjamini_hochberg(x["calibrated_p_value"]))
    y = ranked[ranked["outcome"] == "y"]
    assert y.loc[y["treatment"] == "c", "rank"].isna().all()     # failed a gate: not ranked
    assert ranked.loc[ranked["role"] != "outcome", "rank"].isna().all()
    a = x.iloc[0]
    assert a["e_value"] > a["e_value_ci"] > 1                    # protective and significant


def test_too_few_controls_means_no_calibration_and_no_ease_gate():
    estimates, diagnostics = estimates_frame()
    keep = ~estimates["outcome"].isin([f"nc{k}" for k in range(27)])
    calibrated, gated = assemble_evidence(estimates[keep], diagnostics, Thresholds())
    assert calibrated["calibrated_estimate"].isna().all()
    assert gated["ease"].isna().all() and gated["ease_pass"].isna().all()
    assert gated["calibration_note"].str.startswith("not calibrated: 3 usable").all()
    assert calibrated["rank"].notna().any()              # ranked on uncalibrated estimates
