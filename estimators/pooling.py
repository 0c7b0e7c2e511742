"""Pooling one candidate's battery of trials into one effect whose SE stays honest although the
trials share the candidate's treated persons.

Each trial of a battery compares the same treated persons with a different comparator drug, so
the trials' log hazard ratios are positively correlated (the treated arm's sampling error is in
every one of them) and a fixed-effect inverse-variance SE, which assumes independent trials, is
too narrow: by up to sqrt(k) when the treated arm dominates the variance. With the correlations
unknown, `pool_trials` uses
- the inverse-variance-weighted mean y = sum w_i y_i (w_i proportional to 1/s_i^2);
- a bound on its sampling variance that holds for any correlations:
  Var(sum w_i e_i) = sum_ij w_i w_j rho_ij s_i s_j <= (sum w_i s_i)^2, reached when every
  rho_ij = 1. The pooled SE is therefore never below the smallest trial's SE: pooling buys
  robustness to one comparator's bias, not precision the shared treated arm cannot give;
- plus between-trial heterogeneity (comparators differing in effect or residual confounding),
  tau^2 * sum w_i^2, with the DerSimonian-Laird tau^2. DL assumes independent errors;
  positively correlated errors shrink Cochran's Q, so tau^2 is if anything underestimated,
  which the worst-case sampling bound more than covers in tests/test_pooling.py.
Bootstrapping trials (Zang et al. 2023) alone would ignore the shared arm's sampling variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from estimators.effect import two_sided_p, z_quantile
from estimators.meta import heterogeneity, usable_studies


@dataclass(frozen=True)
class PooledEstimate:
    """A battery's pooled hazard ratio (HR scale) with its log-scale SE, CI and test."""

    estimate: float
    log_hr: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    k: int
    """Trials pooled (those with a finite estimate and a positive finite SE)."""
    tau2: float
    """DerSimonian-Laird between-trial variance (log scale)."""
    sampling_se: float
    """The bound (sum w_i s_i) on the sampling part of `se`, before heterogeneity."""


def pool_trials(log_hr: ArrayLike, se: ArrayLike, level: float = 0.95) -> PooledEstimate:
    """Pool trials sharing a treated arm: IV-weighted mean, SE bounded for any correlation plus
    DL heterogeneity (see the module docstring). Raises EstimationError if no trial is usable."""
    y, s, _ = usable_studies(log_hr, se)
    w = 1.0 / (s * s)
    w /= w.sum()
    estimate = float(np.dot(w, y))
    sampling_se = float(np.dot(w, s))
    tau2 = heterogeneity(y, s * s)[3]
    pooled_se = math.sqrt(sampling_se**2 + tau2 * float(np.dot(w, w)))
    half = z_quantile(level) * pooled_se
    return PooledEstimate(
        estimate=math.exp(estimate), log_hr=estimate, se=pooled_se,
        ci_low=math.exp(estimate - half), ci_high=math.exp(estimate + half),
        p_value=two_sided_p(estimate / pooled_se), k=int(y.size), tau2=tau2,
        sampling_se=sampling_se,
    )
