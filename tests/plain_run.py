"""Run a study through the pipeline's plain functions (no Prefect), as the flow would."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from flows import pipeline
from flows.config import load_study


def run_study_plain(study_file: Path, results: Path, data_dir: Path) -> dict:
    """prepare -> analyze every comparison -> finalize; returns the run record."""
    study = load_study(study_file)
    paths = pipeline.new_run(study, results, data_dir)
    started = datetime.now(UTC)
    prepared = pipeline.prepare(str(study_file), str(paths.workspace))
    analyses = [pipeline.analyze(str(study_file), str(paths.workspace), cid)
                for cid in prepared["comparison_ids"]]
    return pipeline.finalize(str(study_file), paths, prepared, analyses, started, {})
