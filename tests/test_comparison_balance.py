"""analyze_comparison's balance diagnostics for screens: the share of imbalanced covariates, the
PS selection passed through, and a PS model that kept no covariate made visible."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import expit

from estimators import comparison
from estimators.comparison import NO_COVARIATE_SELECTED, OutcomeInput, analyze_comparison
from estimators.propensity import fit_propensity


def _data(n=3000, p=40, seed=0):
    """Binary covariates, the first 6 confounding treatment; exponential event times."""
    rng = np.random.default_rng(seed)
    X = (rng.random((n, p)) < rng.uniform(0.05, 0.5, p)).astype(float)
    beta = np.zeros(p)
    beta[:6] = [1.0, -0.8, 0.9, 0.7, -0.6, 0.8]
    t = (rng.random(n) < expit(-0.4 + X @ beta)).astype(np.int8)
    te = rng.exponential(1 / (0.002 * np.exp(X[:, :3].sum(axis=1) * 0.4)))
    time = np.floor(np.minimum(te, 365))
    return sp.csr_matrix(X), t, {"o": OutcomeInput(time, te <= 365, np.zeros(n, bool))}


def _by_estimator(rows):
    return {row["estimator"]: row for row in rows}


def test_share_imbalanced_counts_covariates_over_0_1():
    X, t, outcomes = _data()
    result = analyze_comparison(X, t, outcomes, estimators=["crude", "iptw", "ps_strata"])
    rows = _by_estimator(result.diagnostics)
    smd_before = result.balance["iptw"]["smd_before"]
    assert rows["crude"]["share_imbalanced"] == np.mean(np.abs(smd_before) > 0.1)
    assert rows["crude"]["share_imbalanced"] >= 6 / 40  # the confounders are imbalanced
    for name in ("iptw", "ps_strata"):
        smd_after = result.balance[name]["smd_after"]
        assert rows[name]["share_imbalanced"] == np.mean(np.abs(smd_after) > 0.1)
        assert rows[name]["share_imbalanced"] < rows["crude"]["share_imbalanced"]
        assert rows[name]["ps_selection"] == "likelihood"
        assert rows[name]["ps_covariates_selected"] >= 6
        assert rows[name]["ps_note"] is None


@pytest.fixture
def seen(monkeypatch):
    """The keyword arguments analyze_comparison passes to fit_propensity."""
    kwargs_seen = {}

    def spy(X, treated, **kwargs):
        kwargs_seen.update(kwargs)
        return fit_propensity(X, treated, **kwargs)

    monkeypatch.setattr(comparison, "fit_propensity", spy)
    return kwargs_seen


def test_selection_and_cap_are_passed_to_the_propensity_fit(seen):
    X, t, outcomes = _data()
    result = analyze_comparison(X, t, outcomes, estimators=["iptw"], ps_selection="balance",
                                ps_max_per_arm=500)
    assert seen["selection"] == "balance" and seen["max_fit_rows"] == 500
    assert result.propensity["selection"] == "balance"
    assert _by_estimator(result.diagnostics)["iptw"]["ps_selection"] == "balance"


def test_defaults_keep_the_pipeline_fit(seen):
    X, t, outcomes = _data()
    analyze_comparison(X, t, outcomes, estimators=["iptw"])
    assert seen["selection"] == "likelihood" and seen["max_fit_rows"] == 250_000


def test_a_model_without_covariates_is_flagged(monkeypatch):
    # A penalty far above lambda_max: every coefficient is zero.
    monkeypatch.setattr(comparison, "fit_propensity",
                        functools.partial(fit_propensity, grid=[10.0]))
    X, t, outcomes = _data()
    result = analyze_comparison(X, t, outcomes, estimators=["crude", "iptw"])
    rows = _by_estimator(result.diagnostics)
    assert rows["iptw"]["ps_covariates_selected"] == 0
    assert rows["iptw"]["ps_note"] == NO_COVARIATE_SELECTED
    assert rows["crude"]["ps_note"] is None
    estimates = _by_estimator(result.estimates)
    assert estimates["iptw"]["estimate"] == pytest.approx(estimates["crude"]["estimate"],
                                                          rel=1e-3)
