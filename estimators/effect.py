"""The common result type of every estimator: a point estimate with its uncertainty."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

from scipy import stats

Measure = Literal["difference", "ratio", "hazard_ratio"]


@lru_cache(maxsize=8)
def z_quantile(level: float) -> float:
    """The standard normal quantile of a two-sided `level` interval (1.96 for 0.95)."""
    return float(stats.norm.ppf(0.5 + level / 2))


def two_sided_p(z: float) -> float:
    """Two-sided normal p-value of a z statistic: 2 * (1 - Phi(|z|)), via erfc (no scipy call
    per estimate: thousands of estimates per comparison)."""
    return math.erfc(abs(z) / math.sqrt(2.0))


@dataclass(frozen=True)
class EffectEstimate:
    """An effect with a Wald 95% interval; ratios keep `se` on the log scale."""

    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    measure: Measure
    estimand: str
    n_treated: int
    n_control: int

    @classmethod
    def from_log_ratio(
        cls, log_estimate: float, se: float, *, measure: Measure, estimand: str,
        n_treated: int, n_control: int, level: float = 0.95,
    ) -> EffectEstimate:
        """Build a ratio estimate from its log and the standard error of the log."""
        z = z_quantile(level)
        p = two_sided_p(log_estimate / se) if se > 0 else math.nan
        return cls(
            estimate=math.exp(log_estimate), se=se,
            ci_low=math.exp(log_estimate - z * se), ci_high=math.exp(log_estimate + z * se),
            p_value=float(p), measure=measure, estimand=estimand,
            n_treated=n_treated, n_control=n_control,
        )

    @classmethod
    def from_difference(
        cls, estimate: float, se: float, *, estimand: str, n_treated: int, n_control: int,
        level: float = 0.95, ci: tuple[float, float] | None = None,
    ) -> EffectEstimate:
        """A difference with its Wald interval (or a given one, e.g. bootstrap percentiles)."""
        z = z_quantile(level)
        valid = math.isfinite(se) and se > 0
        p = two_sided_p(estimate / se) if valid else math.nan
        low, high = ci if ci is not None else (estimate - z * se, estimate + z * se)
        return cls(
            estimate=float(estimate), se=float(se), ci_low=float(low), ci_high=float(high),
            p_value=float(p), measure="difference", estimand=estimand,
            n_treated=n_treated, n_control=n_control,
        )

    @property
    def log_estimate(self) -> float:
        """Log of a ratio estimate (the scale on which `se` is given)."""
        return math.log(self.estimate)

    def as_dict(self) -> dict:
        return asdict(self)
