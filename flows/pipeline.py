"""The three stages of a study run as plain functions; the Prefect flow wraps each as a task.

prepare  -> cohorts, outcomes and covariates for every comparison, into the run workspace;
analyze  -> one comparison: load its arrays, run the estimators, write its rows to the workspace;
finalize -> gather every comparison's rows and write the run to the result store at once.
Stages exchange paths and small dicts only, never data frames.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from cohort.comparison_data import load_comparison
from cohort.concepts import resolve_concept_sets
from cohort.prepare import PreparedStudy, prepare_study, source_requirements
from cohort.source import open_source
from estimators.comparison import OutcomeInput, analyze_comparison
from estimators.errors import EstimationError
from estimators.positive_controls import injected_outcomes
from flows.config import LoadedStudy, StudyConfig, load_study
from results.evidence import assemble_evidence
from results.gates import Thresholds
from results.store import write_run

RESULT_TABLES = ("estimates", "diagnostics", "balance", "ps_distribution", "km_curves")


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its intermediate files and writes its results."""

    run_id: str
    workspace: Path
    results: Path


def new_run(study: LoadedStudy, results: Path, data_dir: Path) -> RunPaths:
    """Name a run after its study, start time and study hash."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    run_id = f"{study.config.study}-{stamp}-{study.sha256[:8]}"
    return RunPaths(run_id, data_dir / "workspace" / run_id, results)


def preflight(study: LoadedStudy) -> None:
    """Check the source can serve the study (tables, columns, concept ids) before a run."""
    source = open_source(study.source_path)
    try:
        design = study.design()
        source.require(source_requirements(source, design))
        resolve_concept_sets(source, design.concept_sets)
    finally:
        source.close()


def prepare(study_file: str, workspace: str) -> dict:
    """Build the cohorts of every comparison; return the run facts later stages need."""
    study = load_study(study_file)
    source = open_source(study.source_path)
    try:
        fingerprint = source.fingerprint()
        prepared = prepare_study(source, study.design(), Path(workspace))
    finally:
        source.close()
    return {
        "comparison_ids": [int(i) for i in prepared.comparisons["comparison_id"]],
        "fingerprint": fingerprint,
        "warnings": prepared.warnings,
        "seconds": prepared.seconds,
    }


def analyze(study_file: str, workspace: str, comparison_id: int) -> dict:
    """Estimate every outcome of one comparison; write its rows as Parquet in the workspace."""
    started = time.perf_counter()
    study = load_study(study_file)
    config = study.config
    prepared = PreparedStudy.load(Path(workspace))
    outcomes = prepared.outcomes
    data = load_comparison(Path(workspace), comparison_id, list(outcomes["outcome_id"]))
    inputs = {
        row.outcome: OutcomeInput(
            data.outcomes[row.outcome_id].time, data.outcomes[row.outcome_id].event,
            data.outcomes[row.outcome_id].prior, row.role,
        )
        for row in outcomes.itertuples()
    }
    notes = _add_positive_controls(inputs, data, config, comparison_id)
    result = analyze_comparison(
        data.X, data.treated, inputs,
        estimators=config.estimators,
        exclude_prior_outcome=config.follow_up.exclude_prior_outcome,
        seed=int(comparison_id),
    )
    out = Path(workspace) / "analysis" / f"comparison_{comparison_id}"
    out.mkdir(parents=True, exist_ok=True)
    labels = prepared.comparisons.set_index("comparison_id").loc[comparison_id]
    pd.DataFrame(result.estimates).assign(
        comparison_id=comparison_id, treatment=labels.treatment, comparator=labels.comparator,
    ).to_parquet(out / "estimates.parquet")
    pd.DataFrame(result.diagnostics).assign(
        comparison_id=comparison_id, treatment=labels.treatment, comparator=labels.comparator,
    ).to_parquet(out / "diagnostics.parquet")
    _balance_frame(result.balance, data.covariate_ids, prepared.workspace).assign(
        comparison_id=comparison_id
    ).to_parquet(out / "balance.parquet")
    for table, rows in (("ps_distribution", result.preference_histogram),
                        ("km_curves", result.survival_curves)):
        pd.DataFrame(rows).assign(comparison_id=comparison_id).to_parquet(
            out / f"{table}.parquet")
    return {
        "comparison_id": comparison_id,
        "seconds": round(time.perf_counter() - started, 3),
        "n_persons": data.n,
        "n_covariates": int(data.X.shape[1]),
        "failed": sum(row["status"] != "ok" for row in result.estimates),
        "notes": notes,
    }


def positive_control_name(negative_control: str, effect_size: float) -> str:
    """The outcome name of a synthetic positive control."""
    return f"{negative_control}@hr{effect_size:g}"


def _add_positive_controls(inputs: dict[str, OutcomeInput], data, config: StudyConfig,
                           comparison_id: int) -> list[str]:
    """Inject synthetic positive controls on every negative control (if the study asks)."""
    if config.positive_controls is None:
        return []
    notes = []
    sizes = config.positive_controls.effect_sizes
    for name, control in list(inputs.items()):
        if control.role != "negative_control":
            continue
        eligible = ~control.prior if config.follow_up.exclude_prior_outcome else (
            np.ones(data.n, dtype=bool))
        try:
            synthetic = injected_outcomes(data.X, data.treated, control.time, control.event,
                                          eligible, sizes, seed=int(comparison_id))
        except EstimationError as exc:
            notes.append(f"no positive controls from {name}: {exc}")
            continue
        for size, (days, event) in synthetic.items():
            inputs[positive_control_name(name, size)] = OutcomeInput(
                days, event, control.prior, "positive_control", true_effect_size=size)
    return notes


def _balance_frame(
    balance: dict[str, dict[str, np.ndarray]], covariate_ids: np.ndarray, workspace: Path
) -> pd.DataFrame:
    if not balance:
        return pd.DataFrame(columns=["adjustment", "covariate_id"])
    reference = pd.read_parquet(workspace / "covariate_ref.parquet").set_index("covariate_id")
    frames = [
        pd.DataFrame({"adjustment": adjustment, "covariate_id": covariate_ids, **columns})
        for adjustment, columns in balance.items()
    ]
    frame = pd.concat(frames, ignore_index=True)
    return frame.join(
        reference[["covariate_name", "analysis", "concept_id"]], on="covariate_id"
    )


def finalize(
    study_file: str, paths: RunPaths, prepared_info: dict, analyses: list[dict],
    started_at: datetime, timings: dict,
) -> dict:
    """Write the whole run to the result store in one transaction; return the run record."""
    study = load_study(study_file)
    prepared = PreparedStudy.load(paths.workspace)
    tables = {name: _gather(paths.workspace, name) for name in RESULT_TABLES}
    tables["estimates"], tables["diagnostics"] = assemble_evidence(
        tables["estimates"], tables["diagnostics"],
        Thresholds(**study.config.diagnostics.model_dump()))
    comparisons = prepared.comparisons.set_index("comparison_id")
    outcomes = prepared.outcomes.set_index("outcome")
    estimates = tables["estimates"]
    if len(estimates):
        for arm in ("treatment", "comparator"):
            for label in ("concept_ids", "codes", "names", "atc"):
                column = f"{arm}_{label}"
                estimates[column] = estimates["comparison_id"].map(comparisons[column])
        base_outcome = estimates["outcome"].str.split("@").str[0]  # positive control -> its NC
        for label in ("concept_ids", "codes", "names"):
            estimates[f"outcome_{label}"] = base_outcome.map(outcomes[label])
    attrition = prepared.attrition.join(
        comparisons[["treatment", "comparator"]], on="comparison_id"
    )
    tables["attrition"] = attrition
    timings = {**timings, "prepare_stages": prepared_info["seconds"],
               "comparisons": {str(a["comparison_id"]): a["seconds"] for a in analyses}}
    run = {
        "run_id": paths.run_id,
        "study": study.config.study,
        "description": study.config.description,
        "study_file": str(study.path.resolve()),
        "config_sha256": study.sha256,
        "config_json": study.config.model_dump(mode="json"),
        "source_path": str(study.source_path),
        "source_sha256": prepared_info["fingerprint"]["sha256"],
        "source_fingerprint": prepared_info["fingerprint"],
        "cdm_version": prepared_info["fingerprint"]["cdm_version"],
        "started_at": started_at.replace(tzinfo=None),
        "finished_at": datetime.now(UTC).replace(tzinfo=None),
        "status": "completed",
        "n_comparisons": len(comparisons),
        "n_outcomes": len(outcomes),
        "n_estimates": len(estimates),
        "n_estimates_failed": int((estimates.get("status") != "ok").sum()) if len(estimates)
        else 0,
        "warnings": prepared_info["warnings"] + [n for a in analyses for n in a["notes"]],
        "versions": versions(),
        "timings": timings,
    }
    write_run(paths.results, run, tables)
    return run


def report(results: Path, run_id: str, data_dir: Path) -> Path:
    """Write the run's HTML report to data/reports/<run_id>.html."""
    from results.report import write_report

    return write_report(results, data_dir / "reports" / f"{run_id}.html", run_id=run_id)


def _gather(workspace: Path, table: str) -> pd.DataFrame:
    files = sorted((workspace / "analysis").glob(f"comparison_*/{table}.parquet"))
    frames = [pd.read_parquet(f) for f in files]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def versions() -> dict:
    """Versions of the software that produced a run, for its record."""
    packages = ("cohortflow", "duckdb", "numpy", "scipy", "scikit-learn", "pandas",
                "statsmodels", "prefect", "pydantic")
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found
