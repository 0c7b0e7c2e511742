"""Readable summaries of a run from the store: one line per comparison and outcome.

Counts below the study's min_cell_count are masked ("<5") in everything shown to people; the
store itself keeps exact counts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from results.masking import mask_text_columns
from results.store import open_store


def mask_counts(frame: pd.DataFrame, columns: list[str], min_cell_count: int) -> pd.DataFrame:
    """Replace counts in (0, min_cell_count) by "<min_cell_count" for display or export."""
    masked = frame.copy()
    for column in columns:
        values = masked[column]
        small = values.notna() & (values > 0) & (values < min_cell_count)
        masked[column] = values.astype("Int64").astype(str).where(~small, f"<{min_cell_count}")
    return masked


def latest_run_id(results: Path, study: str | None = None) -> str:
    """The most recently finished run (of a study, if given)."""
    with open_store(results, read_only=True) as con:
        rows = con.execute(
            "SELECT run_id FROM runs WHERE status = 'completed' AND (? IS NULL OR study = ?) "
            "ORDER BY finished_at DESC LIMIT 1", [study, study],
        ).fetchall()
    if not rows:
        raise LookupError(f"{results}: no completed run" + (f" of study {study}" if study else ""))
    return rows[0][0]


def run_summary(results: Path, run_id: str) -> pd.DataFrame:
    """Per comparison x outcome: each estimator's HR with CI, diagnostics verdict, counts."""
    with open_store(results, read_only=True) as con:
        frame = con.execute("""
            SELECT e.comparison_id, e.treatment, e.comparator, e.outcome, e.role, e.estimator,
                   e.estimate, e.ci_low, e.ci_high, e.p_value, e.status, e.message,
                   e.n_treated, e.n_comparator, e.events_treated, e.events_comparator,
                   e.calibrated_estimate, e.calibrated_ci_low, e.calibrated_ci_high, e.rank,
                   d.passed, d.reasons, d.max_abs_smd_after, d.equipoise, d.mdrr
            FROM estimates e
            LEFT JOIN diagnostics d USING (run_id, comparison_id, outcome, estimator)
            WHERE e.run_id = ?
            ORDER BY e.outcome, e.treatment, e.estimator
        """, [run_id]).df()
    return frame


def format_hr(row: pd.Series, prefix: str = "") -> str:
    """'0.52 (0.41-0.66)' from the row's [prefix]estimate/ci columns, or the failure reason."""
    if row["status"] != "ok":
        return f"failed: {row['message']}"
    estimate = row[f"{prefix}estimate"]
    if pd.isna(estimate):
        return "-"
    return f"{estimate:.2f} ({row[f'{prefix}ci_low']:.2f}-{row[f'{prefix}ci_high']:.2f})"


def wide_summary(summary: pd.DataFrame, min_cell_count: int,
                 primary: str | None = None) -> pd.DataFrame:
    """One row per comparison x outcome with a column per estimator, counts masked.

    Outcomes of interest come before controls; within an outcome, treatments follow the
    evidence rank of the primary estimator (default IPTW if run, else the first estimator in
    the rows); unranked ones follow, most protective estimate first.
    """
    keys = ["treatment", "comparator", "outcome", "role"]
    summary = mask_text_columns(summary, min_cell_count)  # failure messages are shown
    summary = summary.assign(hr=summary.apply(format_hr, axis=1))
    wide = summary.pivot_table(index=keys, columns="estimator", values="hr",
                               aggfunc="first").reset_index()
    primary = primary or ("iptw" if "iptw" in set(summary["estimator"])
                          else summary["estimator"].iloc[0])
    counts = (summary.groupby(keys, as_index=False)
              .agg(n_treated=("n_treated", "max"), n_comparator=("n_comparator", "max"),
                   events_treated=("events_treated", "max"),
                   events_comparator=("events_comparator", "max")))
    mine = summary[summary["estimator"] == primary]
    rank = mine[keys].assign(
        estimate=mine["estimate"],
        **{f"{primary} calibrated": mine.apply(format_hr, axis=1, prefix="calibrated_"),
           "diagnostics": mine["passed"].map({True: "pass", False: "fail"}).fillna("-"),
           "rank": mine["rank"]})
    wide = wide.merge(rank, on=keys, how="left").merge(counts, on=keys)
    wide = wide.assign(_interest=wide["role"] != "outcome").sort_values(
        ["_interest", "outcome", "rank", "estimate"], na_position="last"
    ).drop(columns=["_interest", "estimate"])
    wide.columns.name = None
    return mask_counts(wide, ["n_treated", "n_comparator", "events_treated",
                              "events_comparator"], min_cell_count).reset_index(drop=True)


def calibration_summary(results: Path, run_id: str, estimator: str) -> pd.DataFrame:
    """Per comparison: the empirical null, EASE and how many controls it rests on."""
    with open_store(results, read_only=True) as con:
        return con.execute("""
            SELECT treatment, comparator, any_value(n_negative_controls) AS negative_controls,
                   any_value(n_positive_controls) AS positive_controls,
                   round(any_value(null_mean), 3) AS null_mean,
                   round(any_value(null_sd), 3) AS null_sd, round(any_value(ease), 3) AS ease,
                   any_value(calibration_note) AS note
            FROM diagnostics WHERE run_id = ? AND estimator = ?
            GROUP BY treatment, comparator ORDER BY treatment
        """, [run_id, estimator]).df()
