"""`cohortflow demo`: make the synthetic CDM the demo study reads, and show estimates vs truth."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cohort.synthetic import GENERATOR_VERSION, generate_demo_cdm

MARKER = "generator.json"


def ensure_demo_data(cdm: Path, *, persons: int, seed: int) -> Path:
    """Generate the demo CDM into `cdm` unless one of the same size, seed and generator is."""
    wanted = {"persons": persons, "seed": seed, "generator": GENERATOR_VERSION}
    marker = cdm / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return cdm / "truth.csv"
    truth = generate_demo_cdm(cdm, persons=persons, seed=seed)
    marker.write_text(json.dumps(wanted))
    return truth


def add_truth(wide: pd.DataFrame, cdm: Path) -> pd.DataFrame:
    """Put the planted hazard ratio next to each estimate, keeping the ranking's order."""
    truth = pd.read_csv(cdm / "truth.csv")
    truth["outcome"] = [
        name if role == "outcome" else f"concept_{cid}"
        for name, role, cid in zip(truth["outcome"], truth["role"], truth["outcome_concept_id"],
                                   strict=True)
    ]
    merged = wide.merge(truth[["treatment", "outcome", "true_hr"]], how="left",
                        on=["treatment", "outcome"])
    columns = ["outcome", "treatment", "true_hr"] + [
        c for c in merged.columns if c not in ("outcome", "treatment", "true_hr", "comparator")
    ]
    return merged[columns]
