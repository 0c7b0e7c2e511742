"""Run a study through the pipeline's plain functions (no Prefect), as the flow would."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from flows import pipeline
from flows.config import load_study
from results.store import open_store

KEYS = ["treatment", "outcome", "estimator"]
VALUES = ["estimate", "ci_low", "ci_high", "se", "p_value", "calibrated_estimate",
          "events_treated", "events_comparator", "status"]


def run_study_plain(study_file: Path, results: Path, data_dir: Path) -> dict:
    """prepare -> analyze every comparison -> finalize; returns the run record."""
    study = load_study(study_file)
    paths = pipeline.new_run(study, results, data_dir)
    started = datetime.now(UTC)
    prepared = pipeline.prepare(str(study_file), str(paths.workspace))
    analyses = [pipeline.analyze(str(study_file), str(paths.workspace), cid)
                for cid in prepared["comparison_ids"]]
    return pipeline.finalize(str(study_file), paths, prepared, analyses, started, {})


def stored_estimates(store: Path, run_id: str | None = None) -> pd.DataFrame:
    """A run's (or every run's) estimates in a stable order, the columns results compare on."""
    with open_store(store, read_only=True) as con:
        frame = con.execute(
            "SELECT * FROM estimates WHERE ? IS NULL OR run_id = ?", [run_id, run_id]).df()
    return frame.sort_values(KEYS).reset_index(drop=True)[KEYS + VALUES]
