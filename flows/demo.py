"""`cohortflow demo`: make the synthetic CDM a demo study reads, and show estimates vs truth.

Two demos: the screen (default; cohort.synthetic_screen, configs/screen_demo.yaml) prints the
ranked candidates next to the planted effects; the single comparison (`--comparison`;
cohort.synthetic, configs/demo.yaml) prints every estimate next to its planted hazard ratio.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cohort.synthetic import GENERATOR_VERSION, generate_demo_cdm
from cohort.synthetic_screen import SCREEN_GENERATOR_VERSION, generate_screen_cdm
from results.store import open_store

MARKER = "generator.json"
# kind -> (generator, version recorded in the marker; the comparison demo's predates the screen)
GENERATORS = {"comparison": (generate_demo_cdm, GENERATOR_VERSION),
              "screen": (generate_screen_cdm, f"screen-{SCREEN_GENERATOR_VERSION}")}


def ensure_demo_data(cdm: Path, *, persons: int, seed: int, kind: str = "comparison") -> Path:
    """Generate a demo CDM into `cdm` unless one of the same kind, size, seed and generator
    version is there already; return its truth.csv."""
    generate, version = GENERATORS[kind]
    wanted = {"persons": persons, "seed": seed, "generator": version}
    marker = cdm / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return cdm / "truth.csv"
    truth = generate(cdm, persons=persons, seed=seed)
    marker.write_text(json.dumps(wanted))
    return truth


PLANTED_KINDS = ("protective", "harmful", "decoy")


def screen_against_truth(results: Path, run_id: str, cdm: Path, estimator: str, *,
                         top_per_strategy: int = 8) -> pd.DataFrame:
    """The candidates' pooled evidence per comparator strategy next to the planted effect: the
    best-ranked of each strategy, and every planted candidate (protective, harmful, decoy)."""
    with open_store(results, read_only=True) as con:
        pooled = con.execute("""
            SELECT outcome, strategy, rank, treatment, estimate AS hr, ci_low, ci_high,
                   q_value, identified, trials_balanced || '/' || trials_run AS balanced, reason
            FROM candidate_evidence
            WHERE run_id = ? AND estimator = ? AND role = 'outcome'""",
                             [run_id, estimator]).df()
    truth = pd.read_csv(cdm / "truth.csv", keep_default_na=False)  # kind "null" is a word
    truth = truth[truth["role"] == "outcome"][["ingredient", "outcome", "true_hr", "kind"]]
    merged = pooled.merge(truth, how="left", left_on=["treatment", "outcome"],
                          right_on=["ingredient", "outcome"]).drop(columns=["ingredient"])
    merged = merged.sort_values(["outcome", "strategy", "rank", "treatment"],
                                na_position="last")
    ranked = merged[merged["rank"].notna()]
    top = ranked.groupby(["outcome", "strategy"]).head(top_per_strategy).index
    shown = merged[merged.index.isin(top) | merged["kind"].isin(PLANTED_KINDS)]
    shown = shown.assign(reason=shown["reason"].where(shown["rank"].isna(), ""))
    return shown.reset_index(drop=True)


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
