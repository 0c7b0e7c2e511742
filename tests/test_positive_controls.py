"""Synthetic positive controls: injected events give the planted hazard ratio."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from estimators.cox import fit_cox
from estimators.errors import EstimationError
from estimators.positive_controls import injected_outcomes


def null_outcome(n: int = 40_000, seed: int = 0):
    """A negative control: risk depends on covariates, not on (randomised) treatment."""
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix((rng.random((n, 6)) < 0.3).astype(float))
    treated = (rng.random(n) < 0.5).astype(np.int8)
    rate = 2e-4 * np.exp(X @ np.array([0.8, -0.5, 0.6, 0.0, 0.3, -0.2]))
    follow = rng.integers(200, 2000, n).astype(float)
    event_time = np.ceil(rng.exponential(1 / rate))
    event = (event_time <= follow).astype(np.int8)
    time = np.where(event == 1, event_time, follow)
    return X, treated, time, event


@pytest.mark.parametrize("theta", [1.5, 2.0, 4.0])
def test_injection_reaches_the_planted_hazard_ratio(theta):
    X, treated, time, event = null_outcome()
    eligible = np.ones(treated.shape[0], dtype=bool)
    base = fit_cox(time, event, treated)
    assert abs(base.log_hr) < 2.5 * base.se            # the control itself is null
    new_time, new_event = injected_outcomes(X, treated, time, event, eligible, [theta])[theta]
    fit = fit_cox(new_time, new_event, treated)
    assert abs(fit.log_hr - np.log(theta)) < 2.5 * fit.se
    assert (new_event[treated == 0] == event[treated == 0]).all()   # comparators untouched
    assert (new_time <= time).all() and (new_time >= 1).all()


def test_only_eligible_treated_persons_get_events():
    X, treated, time, event = null_outcome(seed=1)
    eligible = np.arange(treated.shape[0]) % 2 == 0
    new_time, new_event = injected_outcomes(X, treated, time, event, eligible, [4.0])[4.0]
    changed = (new_event != event) | (new_time != time)
    assert changed.any() and not changed[~eligible].any() and not changed[treated == 0].any()


def test_deterministic_and_refuses_too_few_events():
    X, treated, time, event = null_outcome(seed=2)
    ok = np.ones(treated.shape[0], dtype=bool)
    a = injected_outcomes(X, treated, time, event, ok, [2.0], seed=3)[2.0]
    b = injected_outcomes(X, treated, time, event, ok, [2.0], seed=3)[2.0]
    np.testing.assert_array_equal(a[0], b[0])
    few = np.zeros_like(event)
    few[:3] = 1
    with pytest.raises(EstimationError, match=r"only \d+ events among the treated"):
        injected_outcomes(X, treated, time, few, ok, [2.0])
