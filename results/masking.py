"""What of a run's curves and histograms may leave the store without revealing small counts.

Tables of counts are masked cell by cell (results.summary.mask_counts). Plots and their
exported points need more: a preference-score bin, or a Kaplan-Meier step, read together with a
published arm size gives the count behind it. So histogram bins are pooled until each holds at
least min_cell_count persons (an arm smaller than that is left out), and a survival curve is
shared only for arms with at least min_cell_count events, up to the last day on which at least
min_cell_count persons of the arm were at risk.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CURVE_KEYS = ["comparison_id", "outcome", "arm"]


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
