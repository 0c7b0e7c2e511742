"""The share-of-imbalanced-covariates gate (Zang et al. 2023) on hand-made diagnostics rows."""

from __future__ import annotations

import math

import pandas as pd

from results.gates import Thresholds, evaluate_gates


def _rows(shares: dict[str, float], failed: tuple[str, ...] = ()):
    diagnostics = pd.DataFrame([
        {"comparison_id": 1, "outcome": outcome, "estimator": "iptw", "max_abs_smd_after": 0.05,
         "equipoise": 0.6, "mdrr": 1.5, "ease": 0.05, "share_imbalanced": share}
        for outcome, share in shares.items()])
    status = pd.DataFrame({
        "comparison_id": 1, "estimator": "iptw", "outcome": list(shares),
        "status": ["failed" if o in failed else "ok" for o in shares],
        "message": ["no events" if o in failed else None for o in shares]})
    return diagnostics, status


def test_share_gate_fails_above_the_threshold_with_its_reason():
    diagnostics, status = _rows({"under": 0.01, "at": 0.02, "over": 0.035, "unmeasured": math.nan})
    gates = evaluate_gates(diagnostics, status,
                           Thresholds(max_share_imbalanced=0.02)).set_index("outcome")
    assert gates.loc["under", "share_pass"] and gates.loc["under", "passed"]
    assert gates.loc["at", "share_pass"] and gates.loc["at", "passed"]
    assert not gates.loc["over", "share_pass"] and not gates.loc["over", "passed"]
    assert gates.loc["over", "reasons"] == (
        "covariate imbalance: 3.5% of covariates with |SMD| > 0.1, more than 2.0%")
    assert pd.isna(gates.loc["unmeasured", "share_pass"]) and gates.loc["unmeasured", "passed"]
    assert (gates["max_share_imbalanced_threshold"] == 0.02).all()


def test_share_gate_is_off_by_default():
    diagnostics, status = _rows({"over": 0.5})
    gates = evaluate_gates(diagnostics, status, Thresholds())
    assert gates["passed"].all() and gates["share_pass"].isna().all()
    assert gates["max_share_imbalanced_threshold"].isna().all()


def test_share_gate_without_the_column_is_not_assessed():
    diagnostics, status = _rows({"old": 0.5})
    gates = evaluate_gates(diagnostics.drop(columns="share_imbalanced"), status,
                           Thresholds(max_share_imbalanced=0.02))
    assert gates["passed"].all() and gates["share_pass"].isna().all()


def test_a_failed_estimate_gives_only_the_estimation_reason():
    diagnostics, status = _rows({"failed": 0.5}, failed=("failed",))
    gates = evaluate_gates(diagnostics, status, Thresholds(max_share_imbalanced=0.02))
    assert gates["reasons"].tolist() == ["not estimable: no events"]
