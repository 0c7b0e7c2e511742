"""The optional causal forest: recovers planted heterogeneity and the average effect."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from estimators.errors import EstimationError
from estimators.forest import CausalForest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("econml") is None,
                                reason="econml (optional extra 'cate') is not installed")


def test_recovers_planted_heterogeneity_and_average_effect():
    rng = np.random.default_rng(0)
    n = 3000
    X = rng.normal(size=(n, 4))
    t = (rng.random(n) < 1 / (1 + np.exp(-X[:, 0]))).astype(int)
    tau = 1.0 + X[:, 1]                                  # effect varies with the 2nd covariate
    y = X[:, 0] + tau * t + rng.normal(size=n)
    forest = CausalForest(n_estimators=200).fit(X, t, y)
    res = forest.effect()
    assert res.ci_low < 1.0 < res.ci_high and res.estimand == "ATE"
    ite = forest.predict_ite(X)
    assert np.corrcoef(ite, tau)[0, 1] > 0.9
    by = forest.effect_by(X[:, 1] > 0)
    assert by[True].estimate > by[False].estimate + 1.0  # subgroups differ by ~1.6


def test_refuses_time_to_event():
    X = np.random.default_rng(1).normal(size=(200, 2))
    t = np.arange(200) % 2
    with pytest.raises(EstimationError, match="not time to event"):
        CausalForest().fit(X, t, time=np.ones(200), event=np.zeros(200))
