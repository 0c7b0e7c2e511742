"""Analyse one treatment-comparator comparison: one propensity fit, every outcome, every estimator.

Arrays in, rows out: estimates and the diagnostic values (balance, equipoise, ESS, MDRR) that
the evidence layer judges against the study's gates. A failure of one outcome or estimator
becomes a row with status "failed" and the reason; the rest of the comparison still runs.
Balance is measured on the whole comparison cohort (the population the PS model was fitted on),
weighted by each adjustment; for `ps_match` on the matched sample.

Estimators (all Cox hazard ratios): `crude`; `iptw` (stabilised ATE weights truncated at 10,
robust SE); `overlap` (overlap/ATO weights, robust SE); `ps_strata` (Cox stratified on PS
quintiles); `ps_match` (CohortMethod's matchOnPs defaults: greedy 1:1 matching without
replacement on the logit PS, caliper 0.2 SD of the logit PS; then Cox stratified on matched
sets, model-based SE). Matching is done once per comparison, like the PS fit; persons left
unmatched are not in that estimator's rows or counts, and when an outcome's prior-outcome
exclusion removes one arm of a matched set, the rest of that set is dropped from that outcome's
estimate too (it could not contribute to the stratified likelihood).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from estimators.balance import covariate_balance, max_abs_smd, share_imbalanced
from estimators.effect import EffectEstimate
from estimators.errors import EstimationError
from estimators.hazard import (
    crude_hr,
    iptw_hr,
    matched_hr,
    overlap_hr,
    overlap_weights,
    stratified_hr,
    truncated_iptw_weights,
)
from estimators.matching import match_on_ps
from estimators.power import mdrr
from estimators.propensity import (
    MAX_PER_ARM,
    Selection,
    effective_sample_size,
    equipoise,
    fit_propensity,
    preference_score,
    ps_strata,
    stratification_weights,
)
from estimators.survival import weighted_km

ESTIMATORS = ("crude", "iptw", "ps_strata")
"""The default set of estimators."""
KNOWN_ESTIMATORS = ("crude", "iptw", "overlap", "ps_strata", "ps_match")
"""Every estimator analyze_comparison can run."""
N_STRATA = 5
MATCH_MAX_RATIO = 1
MATCH_CALIPER = 0.2
MATCH_CALIPER_SCALE = "logit_sd"
"""CohortMethod's createMatchOnPsArgs defaults: maxRatio = 1, caliper = 0.2, caliperScale =
"standardized logit" (Austin 2011), allowReverseMatch = FALSE (only treated persons are matched
to comparators, greedily and without replacement)."""
HISTOGRAM_BINS = 50
CURVE_POINTS = 100


@dataclass(frozen=True)
class OutcomeInput:
    """One outcome's arrays over the comparison's persons."""

    time: np.ndarray
    event: np.ndarray
    prior: np.ndarray
    role: str = "outcome"
    true_effect_size: float | None = None   # known truth for controls (1 for negatives)


@dataclass
class ComparisonResult:
    """Rows for the estimates, diagnostics and balance tables (without study labels)."""

    estimates: list[dict] = field(default_factory=list)
    diagnostics: list[dict] = field(default_factory=list)
    balance: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    propensity: dict = field(default_factory=dict)
    preference_histogram: list[dict] = field(default_factory=list)
    survival_curves: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # time per stage, for the record


@dataclass(frozen=True)
class _Adjustment:
    """One estimator's adjustment of the comparison, shared by every outcome."""

    weights: np.ndarray | None = None
    """Outcome-model weights (iptw, overlap)."""
    strata: np.ndarray | None = None
    """PS stratum (ps_strata) or matched set (ps_match, -1 = unmatched) of each person."""
    max_smd: float = math.nan
    share_imbalanced: float = math.nan
    """Share of covariates with |SMD| > 0.1 after this adjustment (before it, for crude)."""
    ess: tuple[float, float] = (math.nan, math.nan)


def analyze_comparison(
    X: sp.spmatrix | np.ndarray,
    treated: np.ndarray,
    outcomes: Mapping[str, OutcomeInput],
    *,
    estimators: Sequence[str] = ESTIMATORS,
    exclude_prior_outcome: bool = True,
    seed: int = 0,
    ps_selection: Selection = "likelihood",
    ps_max_per_arm: int | None = MAX_PER_ARM,
) -> ComparisonResult:
    """Fit the propensity model once, then every estimator on every outcome.

    ps_selection chooses the PS model's penalty by held-out likelihood or by covariate balance
    (estimators.propensity.fit_by_balance); ps_max_per_arm caps each arm of the PS fitting
    sample (None: no cap).

    Raises ValueError for an estimator name not in KNOWN_ESTIMATORS (a caller's mistake, not a
    property of the data); everything the data cannot support becomes a failed row instead.
    """
    unknown = [name for name in estimators if name not in KNOWN_ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {unknown} (expected some of "
                         f"{', '.join(KNOWN_ESTIMATORS)})")
    treated = np.asarray(treated).astype(np.int8)
    result = ComparisonResult()
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.seconds[stage] = round(result.seconds.get(stage, 0.0) + now - clock, 4)
        clock = now

    adjustments: dict[str, _Adjustment | EstimationError] = {}
    arm_error = _empty_arm(treated)
    before = covariate_balance(X, treated) if X.shape[1] and arm_error is None else None
    smd_before = max_abs_smd(before) if before is not None else math.nan
    adjustments["crude"] = arm_error or _Adjustment(
        max_smd=smd_before, ess=_arm_ess(None, treated),
        share_imbalanced=share_imbalanced(before) if before is not None else math.nan)
    ps_error: EstimationError | None = arm_error
    pref_equipoise = math.nan
    lap("balance_before")
    if arm_error is None and any(e != "crude" for e in estimators):
        try:
            ps_fit = fit_propensity(X, treated, seed=seed, selection=ps_selection,
                                    max_fit_rows=ps_max_per_arm)
            pref_equipoise = equipoise(ps_fit.ps, treated)
            result.propensity = {"auc": ps_fit.auc, "c": ps_fit.C,
                                 "n_nonzero": ps_fit.n_nonzero, "equipoise": pref_equipoise,
                                 "selection": ps_fit.selection}
            result.preference_histogram = _preference_histogram(ps_fit.ps, treated)
        except EstimationError as exc:
            ps_error = exc
    lap("propensity")
    for name in estimators:
        if name == "crude":
            continue
        if ps_error is not None:
            adjustments[name] = ps_error
            continue
        try:
            adjustment, balance_weights = _adjust(name, ps_fit.ps, treated, seed)
            after = (covariate_balance(X, treated, balance_weights) if before is not None
                     else None)
        except EstimationError as exc:
            adjustments[name] = exc
            continue
        adjustments[name] = replace(
            adjustment, max_smd=max_abs_smd(after) if after is not None else math.nan,
            share_imbalanced=share_imbalanced(after) if after is not None else math.nan)
        if after is not None:
            result.balance[name] = {
                "mean_treated_before": before.mean_treated,
                "mean_comparator_before": before.mean_comparator,
                "smd_before": before.smd,
                "mean_treated_after": after.mean_treated,
                "mean_comparator_after": after.mean_comparator,
                "smd_after": after.smd,
            }
    lap("adjustment")
    for outcome, data in outcomes.items():
        keep = ~data.prior if exclude_prior_outcome else np.ones(treated.shape[0], bool)
        if data.role == "outcome":
            result.survival_curves += _survival_curves(outcome, data, treated, keep,
                                                       adjustments.get("iptw"))
            lap("km_curves")
        kept = _Rows.of(keep, treated, data)
        for name in estimators:
            adjustment = adjustments[name]
            row = _estimate(name, adjustment, data, treated, kept)
            row.update(outcome=outcome, role=data.role, estimator=name,
                       true_effect_size=1.0 if data.role == "negative_control"
                       else data.true_effect_size)
            result.estimates.append(row)
            result.diagnostics.append(_diagnostics(
                outcome, name, adjustment, row, smd_before, result.propensity, X.shape[1],
            ))
        lap("outcome_models")
    return result


def _adjust(
    name: str, ps: np.ndarray, treated: np.ndarray, seed: int
) -> tuple[_Adjustment, np.ndarray]:
    """One estimator's adjustment (without its balance) and the weights balance is judged with.

    ps_match: the balance weights are the matching weights (1 for matched treated persons,
    1/(comparators in the set) for matched comparators, 0 for the unmatched; all 1 when 1:1),
    and the effective sample sizes are the matched counts.
    """
    if name == "iptw":
        weights = truncated_iptw_weights(ps, treated)
        return _Adjustment(weights=weights, ess=_arm_ess(weights, treated)), weights
    if name == "overlap":
        weights = overlap_weights(ps, treated)
        return _Adjustment(weights=weights, ess=_arm_ess(weights, treated)), weights
    if name == "ps_strata":
        strata = ps_strata(ps, N_STRATA)
        weights = stratification_weights(strata, treated)
        return _Adjustment(strata=strata, ess=_arm_ess(weights, treated)), weights
    if name == "ps_match":
        matches = match_on_ps(ps, treated, k=MATCH_MAX_RATIO, caliper=MATCH_CALIPER,
                              caliper_scale=MATCH_CALIPER_SCALE, seed=seed)
        sets = np.full(treated.shape[0], -1, dtype=np.int64)
        sets[matches.treated] = matches.set_id
        sets[matches.control] = matches.set_id
        ess = (float(matches.n_sets), float(np.unique(matches.control).size))
        return _Adjustment(strata=sets, ess=ess), matches.weights()
    raise ValueError(f"unknown estimator {name!r}")


def _matched_rows(sets: np.ndarray, treated: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Persons kept for the outcome who are in a matched set that still holds both arms."""
    rows = keep & (sets >= 0)
    s, t = sets[rows], treated[rows].astype(np.float64)
    n_sets = int(sets.max()) + 1
    complete = ((np.bincount(s, t, minlength=n_sets) > 0)
                & (np.bincount(s, 1.0 - t, minlength=n_sets) > 0))
    rows[rows] = complete[s]
    if not rows.any():
        raise EstimationError("no matched set keeps both arms after excluding persons with "
                              "the outcome before time zero")
    return rows


def _empty_arm(treated: np.ndarray) -> EstimationError | None:
    """The reason no estimate is possible when one arm has nobody in it."""
    n_treated = int(treated.sum())
    if n_treated == 0:
        return EstimationError("the treated arm is empty")
    if n_treated == treated.shape[0]:
        return EstimationError("the comparator arm is empty")
    return None


def _preference_histogram(ps: np.ndarray, treated: np.ndarray) -> list[dict]:
    """Persons per preference-score bin and arm: the overlap picture reviewers look at."""
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    score = preference_score(ps, treated)
    rows = []
    for arm, name in ((1, "treated"), (0, "comparator")):
        counts, _ = np.histogram(score[treated == arm], bins=edges)
        rows += [{"arm": name, "bin_low": lo, "bin_high": hi, "persons": int(c)}
                 for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]
    return rows


def _survival_curves(outcome: str, data: OutcomeInput, treated: np.ndarray, keep: np.ndarray,
                     iptw: _Adjustment | EstimationError | None) -> list[dict]:
    """Kaplan-Meier curves per arm, unadjusted and IPTW-weighted, at most CURVE_POINTS each.

    Each point carries the arm's (unweighted) persons still at risk, so that reports and exports
    can end a curve where fewer than min_cell_count persons remain.
    """
    rows = []
    weightings = [("crude", None)]
    if isinstance(iptw, _Adjustment):
        weightings.append(("iptw", iptw.weights))
    for arm, name in ((1, "treated"), (0, "comparator")):
        rows_arm = keep & (treated == arm)
        if not data.event[rows_arm].any():
            continue
        times = np.sort(data.time[rows_arm])
        for adjustment, weights in weightings:
            curve = weighted_km(data.time[rows_arm], data.event[rows_arm],
                                None if weights is None else weights[rows_arm], variance=False)
            pick = np.unique(np.linspace(0, curve.time.size - 1, CURVE_POINTS).astype(int))
            days = curve.time[pick]
            at_risk = times.size - np.searchsorted(times, days, side="left")
            rows += [{"outcome": outcome, "adjustment": adjustment, "arm": name, "day": day,
                      "survival": surv, "at_risk": n}
                     for day, surv, n in zip(days.tolist(), curve.survival[pick].tolist(),
                                             at_risk.tolist(), strict=True)]
    return rows


def _arm_ess(weights: np.ndarray | None, treated: np.ndarray) -> tuple[float, float]:
    arm = treated == 1
    if weights is None:
        return float(arm.sum()), float((~arm).sum())
    return effective_sample_size(weights[arm]), effective_sample_size(weights[~arm])


@dataclass(frozen=True, eq=False)
class _Rows:
    """The persons an outcome's estimates use, with their arrays and counts (built once per
    outcome and shared by the estimators that use the same persons)."""

    keep: np.ndarray
    treated: np.ndarray
    time: np.ndarray
    event: np.ndarray
    counts: dict

    @classmethod
    def of(cls, keep: np.ndarray, treated: np.ndarray, data: OutcomeInput) -> _Rows:
        t, time, event = treated[keep], data.time[keep], data.event[keep]
        arm = t == 1
        counts = {
            "n_treated": int(arm.sum()), "n_comparator": int(arm.size - arm.sum()),
            "events_treated": int(event[arm].sum()),
            "events_comparator": int(event.sum() - event[arm].sum()),
            "person_days_treated": int(time[arm].sum()),
            "person_days_comparator": int(time[~arm].sum()),
        }
        return cls(keep, t, time, event, counts)


def _estimate(
    name: str, adjustment: _Adjustment | EstimationError, data: OutcomeInput,
    treated: np.ndarray, kept: _Rows,
) -> dict:
    """One estimator on one outcome: the estimate row, or a failed row with the reason.

    Counts (persons, events, person-days) are of the persons the estimate uses: for ps_match the
    matched persons in sets that keep both arms after the prior-outcome exclusion.
    """
    error = adjustment if isinstance(adjustment, EstimationError) else None
    if error is None and name == "ps_match":
        try:
            kept = _Rows.of(_matched_rows(adjustment.strata, treated, kept.keep), treated, data)
        except EstimationError as exc:
            error = exc
            kept = _Rows.of(kept.keep & (adjustment.strata >= 0), treated, data)
    keep, t, time, event = kept.keep, kept.treated, kept.time, kept.event
    row = {**kept.counts, "measure": "hr", **NO_EFFECT, "status": "ok", "message": None}
    try:
        if error is not None:
            raise error
        if name == "crude":
            effect = crude_hr(time, event, t)
        elif name == "iptw":
            effect = iptw_hr(time, event, t, adjustment.weights[keep])
        elif name == "overlap":
            effect = overlap_hr(time, event, t, adjustment.weights[keep])
        elif name == "ps_strata":
            effect = stratified_hr(time, event, t, adjustment.strata[keep])
        else:
            effect = matched_hr(time, event, t, adjustment.strata[keep])
    except EstimationError as exc:
        row.update(status="failed", message=str(exc))
        return row
    row.update(_effect_columns(effect))
    return row


NO_EFFECT = {"estimand": None, "estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan,
             "se": math.nan, "p_value": math.nan}
"""The effect columns of a failed row: every row has the same columns, whatever failed."""


def _effect_columns(effect: EffectEstimate) -> dict:
    return {
        "estimand": effect.estimand, "estimate": effect.estimate, "ci_low": effect.ci_low,
        "ci_high": effect.ci_high, "se": effect.se, "p_value": effect.p_value,
    }


def _diagnostics(
    outcome: str, name: str, adjustment: _Adjustment | EstimationError, row: dict,
    smd_before: float, propensity: dict, n_covariates: int,
) -> dict:
    events = row["events_treated"] + row["events_comparator"]
    failed = isinstance(adjustment, EstimationError)
    ess = (math.nan, math.nan) if failed else adjustment.ess
    return {
        "outcome": outcome, "estimator": name,
        "n_treated": row["n_treated"], "n_comparator": row["n_comparator"],
        "n_covariates": n_covariates, "ps_auc": propensity.get("auc", math.nan),
        "ps_c": propensity.get("c", math.nan), "equipoise": propensity.get("equipoise", math.nan),
        **_ps_selected(name, propensity),
        "max_abs_smd_before": smd_before,
        "max_abs_smd_after": math.nan if failed else adjustment.max_smd,
        "share_imbalanced": math.nan if failed else adjustment.share_imbalanced,
        "ess_treated": ess[0], "ess_comparator": ess[1],
        "mdrr": mdrr(row["n_treated"], row["n_comparator"], events),
    }


NO_COVARIATE_SELECTED = "propensity model selected no covariate: adjusted estimate equals crude"


def _ps_selected(name: str, propensity: dict) -> dict:
    """How the PS model was chosen and how many covariates it kept; a note when it kept none,
    since every PS adjustment is then the crude comparison in disguise."""
    selected = propensity.get("n_nonzero")
    return {
        "ps_selection": propensity.get("selection"), "ps_covariates_selected": selected,
        "ps_note": NO_COVARIATE_SELECTED if selected == 0 and name != "crude" else None,
    }
