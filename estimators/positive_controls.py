"""Synthetic positive controls: negative-control outcomes with a known effect injected.

As OHDSI's MethodEvaluation does: among the treated, a Poisson model of the negative-control
outcome's rate on the baseline covariates gives each person a baseline hazard lambda_i; new
events are drawn with hazard lambda_i * (theta - 1) during each treated person's time at risk,
so the first-event hazard of the treated becomes theta times what it was. Because injected
events follow the covariate-predicted risk, the measured confounding structure is preserved,
and the true hazard ratio of the synthetic outcome is theta (if the control was truly null).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import PoissonRegressor

from estimators.errors import EstimationError

MIN_EVENTS_FOR_MODEL = 25
"""Fewer treated events than this and the outcome model (and so the injection) is not fitted."""
RATE_MODEL_ALPHA = 1e-3
"""L2 penalty of the rate model (scikit-learn's alpha, per unit of mean deviance)."""


def injected_outcomes(
    X: sp.spmatrix | np.ndarray, treated: np.ndarray, time: np.ndarray, event: np.ndarray,
    eligible: np.ndarray, effect_sizes: Sequence[float], *, seed: int = 0,
) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """For each theta > 1: (time, event) of the outcome with events injected among the treated.

    `eligible` marks the persons analysed for this outcome (e.g. without a prior outcome);
    only they get injected events. Times are whole days (>= 1), like the input.
    """
    treated = np.asarray(treated).astype(bool)
    event = np.asarray(event).astype(np.int8)
    time = np.asarray(time, dtype=np.float64)
    rows = np.flatnonzero(treated & np.asarray(eligible, dtype=bool))
    observed = int(event[rows].sum())
    if observed < MIN_EVENTS_FOR_MODEL:
        raise EstimationError(
            f"only {observed} events among the treated: at least {MIN_EVENTS_FOR_MODEL} are "
            "needed to model the outcome rate for positive-control synthesis"
        )
    if any(theta <= 1 for theta in effect_sizes):
        raise EstimationError("positive-control effect sizes must be greater than 1")
    exposure = np.maximum(time[rows], 1.0)
    model = PoissonRegressor(alpha=RATE_MODEL_ALPHA, max_iter=300)
    model.fit(X[rows], event[rows] / exposure, sample_weight=exposure)
    rate = model.predict(X[rows])  # events per day at risk
    rng = np.random.default_rng(seed)
    draws = rng.exponential(size=rows.shape[0])  # one unit-rate draw, rescaled per theta
    result = {}
    for theta in effect_sizes:
        new_time, new_event = time.copy(), event.copy()
        injected = draws / (rate * (theta - 1.0))
        earlier = injected < time[rows]
        hit = rows[earlier]
        new_time[hit] = np.maximum(np.ceil(injected[earlier]), 1.0)
        new_event[hit] = 1
        result[float(theta)] = (new_time, new_event)
    return result
