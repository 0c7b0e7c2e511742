"""Minimum detectable relative risk of a Cox comparison (Schoenfeld's formula, as CohortMethod)."""

from __future__ import annotations

import math

from estimators.effect import z_quantile


def mdrr(n_treated: int, n_comparator: int, events: int, *, alpha: float = 0.05,
         power: float = 0.8) -> float:
    """Smallest hazard ratio detectable with the given power at two-sided alpha; inf if none."""
    total = n_treated + n_comparator
    if events <= 0 or n_treated <= 0 or n_comparator <= 0:
        return math.inf
    p_treated = n_treated / total
    z_alpha = z_quantile(1 - alpha)
    z_beta = z_quantile(2 * power - 1)
    return math.exp(math.sqrt((z_beta + z_alpha) ** 2 / (events * p_treated * (1 - p_treated))))
