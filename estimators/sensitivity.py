"""Sensitivity to unmeasured confounding (E-values) and false-discovery-rate control.

E-values follow VanderWeele & Ding (2017, Ann Intern Med 167:268) and the conventions of the R
EValue package (evalues.RR / evalues.HR / evalues.MD), including its `true` argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from statsmodels.stats.multitest import multipletests


class EValue(NamedTuple):
    """E-value of the point estimate and of the CI limit nearest the true value (NaN if no CI)."""

    point: float
    ci: float


def _threshold(rr: float, true: float = 1.0) -> float:
    """E-value for shifting risk ratio rr to `true`: RR + sqrt(RR (RR - 1)) on the >1 side."""
    if rr <= 1.0:
        rr, true = 1.0 / rr, 1.0 / true
    if true <= rr:
        return (rr + math.sqrt(rr * (rr - true))) / true
    ratio = true / rr  # the true value is further from 1 than the estimate
    return ratio + math.sqrt(ratio * (ratio - 1.0))


def _check_optional(x: float | None, name: str) -> float:
    """None or NaN as NaN; a positive finite float otherwise; else ValueError."""
    if x is None:
        return math.nan
    v = float(x)
    if math.isnan(v):
        return v
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive finite ratio, got {x}")
    return v


def e_value_ratio(
    estimate: float,
    ci_low: float | None = None,
    ci_high: float | None = None,
    *,
    true: float = 1.0,
) -> EValue:
    """E-values of a risk ratio (or rate ratio, rare-outcome OR/HR) and of its CI.

    The CI E-value is for the limit nearest `true`, and 1 when the CI includes `true`.
    A NaN estimate gives NaN E-values.
    """
    if math.isnan(float(estimate)):
        return EValue(math.nan, math.nan)
    est = _check_optional(estimate, "estimate")
    lo = _check_optional(ci_low, "ci_low")
    hi = _check_optional(ci_high, "ci_high")
    true = _check_optional(true, "true")
    if lo > hi:
        raise ValueError(f"ci_low {lo} is above ci_high {hi}")
    if est < lo or est > hi:
        raise ValueError(f"estimate {est} is outside its confidence interval ({lo}, {hi})")
    point = _threshold(est, true)
    if est > true:
        limit = lo
        crosses = lo < true
    elif est < true:
        limit = hi
        crosses = hi > true
    else:
        return EValue(point, 1.0 if not (math.isnan(lo) and math.isnan(hi)) else math.nan)
    if math.isnan(limit):
        return EValue(point, math.nan)
    return EValue(point, 1.0 if crosses else _threshold(limit, true))


def hr_to_rr(hr: float) -> float:
    """Approximate RR for a hazard ratio of a common outcome (VanderWeele 2020, square root)."""
    return (1.0 - 0.5 ** math.sqrt(hr)) / (1.0 - 0.5 ** math.sqrt(1.0 / hr))


def e_value_hr(
    estimate: float,
    ci_low: float | None = None,
    ci_high: float | None = None,
    *,
    rare: bool,
    true: float = 1.0,
) -> EValue:
    """E-values of a hazard ratio: as a risk ratio if the outcome is rare (< 15% at end of
    follow-up), else after the square-root conversion hr_to_rr (estimate, limits and `true`).
    """
    if rare:
        return e_value_ratio(estimate, ci_low, ci_high, true=true)

    def convert(value: float | None, name: str) -> float | None:
        if value is None:
            return None
        v = _check_optional(value, name)
        return v if math.isnan(v) else hr_to_rr(v)

    est = float(estimate)
    if math.isnan(est):
        return EValue(math.nan, math.nan)
    return e_value_ratio(
        hr_to_rr(_check_optional(est, "estimate")), convert(ci_low, "ci_low"),
        convert(ci_high, "ci_high"), true=hr_to_rr(_check_optional(true, "true")),
    )


def e_value_difference(d: float, se: float | None = None, *, true: float = 0.0) -> EValue:
    """E-values of a standardised mean difference d via RR ~ exp(0.91 d).

    The CI is exp(0.91 d -/+ 1.78 se), the constants of VanderWeele & Ding and EValue's evalues.MD.
    """
    d = float(d)
    if math.isnan(d):
        return EValue(math.nan, math.nan)
    if se is not None and not math.isnan(float(se)) and float(se) < 0:
        raise ValueError(f"se must be non-negative, got {se}")
    lo = hi = None
    if se is not None and not math.isnan(float(se)):
        lo = math.exp(0.91 * d - 1.78 * float(se))
        hi = math.exp(0.91 * d + 1.78 * float(se))
    return e_value_ratio(math.exp(0.91 * d), lo, hi, true=math.exp(0.91 * float(true)))


def benjamini_hochberg(p_values: ArrayLike) -> NDArray[np.float64]:
    """Benjamini-Hochberg adjusted p-values (q-values) of the non-NaN entries; NaN stays NaN.

    Same shape as the input; the adjustment is over the non-NaN entries only.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    mask = ~np.isnan(p)
    finite = p[mask]
    if finite.size == 0:
        return out
    if np.any((finite < 0) | (finite > 1)):
        raise ValueError("p-values must lie in [0, 1] (or be NaN)")
    out[mask] = multipletests(finite, method="fdr_bh")[1]
    return out
