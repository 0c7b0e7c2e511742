"""Shareable exports of the store: person counts below a run's min_cell_count are masked.

Exact counts stay in the store; anything written for people outside (Parquet, CSV, JSON) shows
a small count as "<N". Person ids never reach the store, so they cannot reach an export.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from results.masking import (
    arm_events,
    mask_arm_figures,
    mask_attrition_steps,
    mask_text_columns,
    shareable_curves,
    shareable_histogram,
)
from results.store import open_store
from results.summary import mask_counts

EXPORTS = {
    "estimates": "SELECT * FROM estimates",
    "diagnostics": "SELECT * FROM diagnostics",
    "attrition": "SELECT * FROM attrition",
    "rankings": "SELECT * FROM rankings",
    "triangulation": "SELECT * FROM triangulation",
    "meta_analysis": "SELECT * FROM meta_analysis",
    "screen": "SELECT * FROM screen",
    "ps_distribution": "SELECT * FROM ps_distribution",
    "km_curves": "SELECT * FROM km_curves",
    "comparisons": "SELECT * FROM comparisons",
    "candidate_evidence": "SELECT * FROM candidate_evidence",
    "candidate_account": "SELECT * FROM candidate_account",
}
PERSON_COUNTS = ("n_treated", "n_comparator", "events_treated", "events_comparator",
                 "treated_persons", "comparator_persons", "persons", "exposed_persons",
                 "eligible_new_users")
FORMATS = (".parquet", ".csv", ".json")


def export(results: Path, what: str, out: Path, *, study: str | None = None) -> int:
    """Write one table or view (optionally one study's rows) to out; return the row count."""
    if what not in EXPORTS:
        raise ValueError(f"cannot export {what!r} (expected one of {', '.join(EXPORTS)})")
    if out.suffix not in FORMATS:
        raise ValueError(f"{out}: expected a file ending in {', '.join(FORMATS)}")
    with open_store(results, read_only=True) as con:
        frame = con.execute(f"SELECT * FROM ({EXPORTS[what]}) x").df()
        events = (con.execute("SELECT run_id, comparison_id, outcome, events_treated, "
                              "events_comparator FROM estimates").df()
                  if what == "km_curves" else None)
        cells = dict(con.execute(
            "SELECT run_id, json_extract(config_json, '$.min_cell_count')::INTEGER FROM runs"
        ).fetchall())
        studies = dict(con.execute("SELECT run_id, study FROM runs").fetchall())
    if study is not None:
        owner = frame["study"] if "study" in frame else frame["run_id"].map(studies)
        frame = frame[owner == study]
    frame = _masked(frame, cells, what, events)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    elif out.suffix == ".csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_json(out, orient="records", date_format="iso")
    return len(frame)


def _masked(frame: pd.DataFrame, cells: dict[str, int], what: str,
            events: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each run's rows with its min_cell_count applied: counts, numbers in free text and
    figures of masked arms masked, attrition guarded against differencing, histograms pooled,
    survival curves cut and shared without their numbers at risk (see results.masking)."""
    if "run_id" not in frame:
        return frame
    smallest = min(cells.values(), default=0)
    parts = []
    for run_id, part in frame.groupby("run_id", sort=False):
        mcc = cells.get(run_id, smallest)
        if what == "km_curves":
            if "at_risk" not in part:  # a store written before cohortflow recorded it
                part = part.assign(at_risk=pd.NA)
            mine = events[events["run_id"] == run_id]
            part = shareable_curves(part, arm_events(mine), mcc).drop(columns="at_risk")
        elif what == "ps_distribution":
            part = shareable_histogram(part, mcc).assign(run_id=run_id)
        elif what == "attrition":
            part = mask_attrition_steps(part, mcc)
        part = mask_text_columns(mask_arm_figures(part, mcc), mcc)
        counts = [c for c in PERSON_COUNTS if c in part and part[c].dtype != object]
        parts.append(mask_counts(part, counts, mcc) if counts else part)
    return pd.concat(parts, ignore_index=True) if parts else frame
