"""What of a run's curves and histograms may leave the store without revealing small counts.

Tables of counts are masked cell by cell (results.summary.mask_counts). Plots and their
exported points need more: a preference-score bin, or a Kaplan-Meier step, read together with a
published arm size gives the count behind it. So histogram bins are pooled until each holds at
least min_cell_count persons (an arm smaller than that is left out), and a survival curve is
shared only for arms with at least min_cell_count events, up to the last day on which at least
min_cell_count persons of the arm were at risk.

Free text (failure messages, gate reasons, warnings, notes, log lines) is masked too: every
whole number in it below min_cell_count is replaced, whatever words surround it. Attrition is
masked against differencing: a step that removes fewer than min_cell_count persons (but some)
does not show its count, and later steps are compared with the last count shown.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

CURVE_KEYS = ["comparison_id", "outcome", "arm"]
# A whole number standing alone: not part of a word, an identifier (outcome_1), a decimal
# (0.25), a negative day (-1), a ratio (1:1, 4/5 trials) or a date (2020-01-05), nor a
# comparison's id; a number that ends a sentence ("arm: 3.") is a number.
WHOLE_NUMBER = re.compile(r"(?<![\w.\-:/])(?<!comparison )(?<!comparison_id )"
                          r"(\d{1,3}(?:,\d{3})+|\d+)(?![\w:/]|\.\d|-\d)")
# Figures computed from an arm's persons, hidden when that arm's count is masked.
ARM_FIGURES = {"n_treated": ("ess_treated", "person_days_treated"),
               "n_comparator": ("ess_comparator", "person_days_comparator")}
TEXT_COLUMNS = ("message", "reasons", "calibration_note", "warnings", "note", "description",
                "cohort_note", "battery_note", "reason", "commonest_failure",
                "commonest_failed_gate", "commonest_cohort_note", "status")


def mask_free_text(text: object, min_cell_count: int) -> object:
    """Text with every whole number in (0, min_cell_count) replaced by "<min_cell_count";
    anything that is not a string (None, NaN) is returned as is."""
    if not isinstance(text, str):
        return text

    def replace(match: re.Match) -> str:
        value = int(match.group(0).replace(",", ""))
        return f"<{min_cell_count}" if 0 < value < min_cell_count else match.group(0)

    return WHOLE_NUMBER.sub(replace, text)


def mask_text_columns(frame: pd.DataFrame, min_cell_count: int) -> pd.DataFrame:
    """The frame with its free-text columns (TEXT_COLUMNS present in it) masked."""
    present = [c for c in TEXT_COLUMNS if c in frame]
    if not present:
        return frame
    return frame.assign(**{c: frame[c].map(lambda t: mask_free_text(t, min_cell_count))
                           for c in present})


def mask_arm_figures(frame: pd.DataFrame, min_cell_count: int) -> pd.DataFrame:
    """Effective sample sizes and person-days of an arm whose person count is masked, blanked
    (an ESS of 3.0 beside "<5" persons would give the count away)."""
    masked = frame.copy()
    for count, figures in ARM_FIGURES.items():
        if count not in masked:
            continue
        values = pd.to_numeric(masked[count], errors="coerce")
        small = values.notna() & (values > 0) & (values < min_cell_count)
        for figure in figures:
            if figure in masked:
                masked[figure] = masked[figure].astype("float64").where(~small)
    return masked


def mask_attrition_steps(attrition: pd.DataFrame, min_cell_count: int) -> pd.DataFrame:
    """Attrition with small counts masked and steps that remove 1 to min_cell_count - 1
    persons (against the last count shown for the arm) shown as "<N removed", as OHDSI does,
    so consecutive steps cannot be differenced into a small count. Per-outcome steps follow
    their comparison's last common step."""
    keys = [c for c in ("run_id", "comparison_id") if c in attrition]
    frame = attrition.sort_values([*keys, "step_index"]).copy()
    shown = {column: pd.Series(index=frame.index, dtype="object")
             for column in ("treated_persons", "comparator_persons")}
    for _, steps in (frame.groupby(keys, sort=False) if keys else [(None, frame)]):
        common = steps[steps["outcome"].isna()]
        for column, cells in shown.items():
            last = _show_chain(common[column], None, cells, min_cell_count)
            for _, own in steps[steps["outcome"].notna()].groupby("outcome", sort=False):
                _show_chain(own[column], last, cells, min_cell_count)
    return frame.assign(**shown)


def _show_chain(values: pd.Series, last: object, cells: pd.Series, min_cell_count: int) -> object:
    """Fill `cells` for consecutive steps starting after a shown count `last`; return the last
    count shown."""
    for index, value in values.items():
        cells[index] = _attrition_cell(value, last, min_cell_count)
        if cells[index] == _count_text(value, min_cell_count):
            last = value
    return last


def _attrition_cell(value: object, last: object, min_cell_count: int) -> str:
    """One attrition count as shown: masked when small, hidden when it differs by a small
    number from the last count shown."""
    if pd.notna(value) and pd.notna(last) and 0 < last - value < min_cell_count:
        return f"<{min_cell_count} removed"
    return _count_text(value, min_cell_count)


def _count_text(value: object, min_cell_count: int) -> str:
    if pd.isna(value):
        return "<NA>"
    return f"<{min_cell_count}" if 0 < value < min_cell_count else str(int(value))


def pooled_bins(edges: np.ndarray, counts: np.ndarray,
                min_cell_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram (edges, counts) re-binned so that every non-empty bin holds at least
    min_cell_count persons: (lows, highs, counts) of the pooled bins.

    Consecutive bins are pooled from the left until the pool reaches the threshold; empty bins
    outside a pool stay empty; a short pool at the right end joins the previous one.
    """
    bars: list[list[float]] = []  # [low, high, count]
    open_pool: list[float] | None = None
    for low, high, count in zip(edges[:-1], edges[1:], counts, strict=True):
        if open_pool is None and count == 0:
            bars.append([low, high, 0.0])
            continue
        if open_pool is None:
            open_pool = [low, high, 0.0]
            bars.append(open_pool)
        open_pool[1], open_pool[2] = high, open_pool[2] + count
        if open_pool[2] >= min_cell_count:
            open_pool = None
    if open_pool is not None:
        earlier = [i for i, bar in enumerate(bars[:-1]) if bar[2] > 0]
        if earlier:  # fold the short last pool (and empty bins before it) into the last pool
            first = earlier[-1]
            bars[first:] = [[bars[first][0], open_pool[1],
                             sum(bar[2] for bar in bars[first:])]]
    lows, highs, n = (np.array(column, dtype=float) for column in zip(*bars, strict=True))
    return lows, highs, n


def shareable_histogram(bins: pd.DataFrame, min_cell_count: int) -> pd.DataFrame:
    """ps_distribution rows (comparison_id, arm, bin_low, bin_high, persons, ...) with each
    comparison's arms pooled by `pooled_bins`; arms of fewer than min_cell_count persons are
    left out."""
    parts = []
    for (cid, arm), rows in bins.groupby(["comparison_id", "arm"], sort=False):
        rows = rows.sort_values("bin_low")
        counts = rows["persons"].to_numpy(dtype=float)
        if counts.sum() < max(min_cell_count, 1):
            continue
        edges = np.append(rows["bin_low"].to_numpy(float), rows["bin_high"].iloc[-1])
        lows, highs, n = pooled_bins(edges, counts, min_cell_count)
        parts.append(pd.DataFrame({"comparison_id": cid, "arm": arm, "bin_low": lows,
                                   "bin_high": highs, "persons": n.astype("int64")}))
    return pd.concat(parts, ignore_index=True) if parts else bins.iloc[:0][
        ["comparison_id", "arm", "bin_low", "bin_high", "persons"]]


def arm_events(estimates: pd.DataFrame) -> pd.DataFrame:
    """Per comparison, outcome and arm: the events among the persons the curves are drawn for
    (the largest count over the estimators; matching can only drop persons)."""
    wide = estimates.groupby(["comparison_id", "outcome"], as_index=False).agg(
        treated=("events_treated", "max"), comparator=("events_comparator", "max"))
    return wide.melt(id_vars=["comparison_id", "outcome"], var_name="arm", value_name="events")


def shareable_curves(curves: pd.DataFrame, events: pd.DataFrame,
                     min_cell_count: int) -> pd.DataFrame:
    """km_curves rows of arms with at least min_cell_count events, up to the last point with
    at least min_cell_count persons at risk; unknown counts (runs stored before cohortflow
    recorded them) are not shared."""
    known = curves[curves["at_risk"].notna()]
    kept = known[known["at_risk"].astype("int64") >= min_cell_count]
    enough = events[events["events"].fillna(0) >= min_cell_count][CURVE_KEYS]
    return kept.merge(enough, on=CURVE_KEYS, how="inner")[list(curves.columns)]
