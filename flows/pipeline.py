"""The three stages of a study run as plain functions; the Prefect flow wraps each as a task.

prepare  -> cohorts, outcomes and covariates for every comparison, into the run workspace;
analyze  -> one comparison: load its arrays, run the estimators, write its rows to the workspace;
finalize -> gather every comparison's rows and write the run to the result store at once.
Stages exchange paths and small dicts only, never data frames.

A run is named by what it computes (the study's content and its source's fingerprint), so a rerun
of an unchanged study on unchanged data is the same run: it resumes from the run workspace, where
a stage's output counts only once its marker file exists (files are written under a temporary
name, then renamed), and its final write replaces that run_id in the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from cohort.comparison_data import load_comparison
from cohort.concepts import resolve_concept_sets
from cohort.prepare import (
    PreparedStudy,
    check_usable_rows,
    prepare_study,
    source_requirements,
)
from cohort.source import RecordSource, SourceError, open_source, scan_tables
from estimators.comparison import OutcomeInput, analyze_comparison
from estimators.errors import EstimationError
from estimators.positive_controls import injected_outcomes
from flows.config import LoadedStudy, StudyConfig, load_study
from results.evidence import assemble_evidence, screen_evidence, with_cohort_notes
from results.gates import Thresholds
from results.masking import mask_free_text
from results.store import StoreError, open_store, write_run

RESULT_TABLES = ("estimates", "diagnostics", "balance", "ps_distribution", "km_curves")
OPERATIONAL_KEYS = ("schedule", "execution")  # when and where a study runs, not what it computes
PREPARED_MARKER = "prepared.done.json"
DONE_MARKER = "done.json"
FAILED_MARKER = "failed.json"
CODE_PACKAGES = ("cohort", "estimators", "flows", "results")


class RunBusyError(RuntimeError):
    """Another process is running the same run (same study content on the same data)."""


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its intermediate files and writes its results."""

    run_id: str
    workspace: Path
    results: Path
    identity: str = ""
    fingerprint: dict = field(default_factory=dict, compare=False)


def open_study_source(study: LoadedStudy) -> RecordSource:
    """The study's CDM, with the DuckDB settings of its `execution` key (paths relative to it)."""
    execution = study.config.execution
    if execution is None:
        return open_source(study.source_path)
    temp = execution.temp_directory
    if temp is not None and not Path(temp).expanduser().is_absolute():
        temp = str(study.path.parent / temp)
    return open_source(study.source_path, memory_limit=execution.memory_limit,
                       threads=execution.threads, temp_directory=temp)


def source_fingerprint(study: LoadedStudy) -> dict:
    """The source's fingerprint (tables, row counts, file sizes and mtimes)."""
    source = open_study_source(study)
    try:
        return source.fingerprint()
    finally:
        source.close()


def run_identity(study: LoadedStudy, fingerprint: dict) -> str:
    """sha256 of what a run computes: the study's content (minus when/where keys) and its data."""
    content = study.config.model_dump(mode="json")
    for key in OPERATIONAL_KEYS:
        content.pop(key, None)
    if study.atlas:  # the concept sets read from ATLAS files are part of what is computed
        content["atlas_items"] = {name: [repr(item) for item in items]
                                  for name, items in study.atlas.items()}
    canonical = json.dumps({"study": content, "source": fingerprint["sha256"]}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_run(study: LoadedStudy, results: Path, data_dir: Path,
            fingerprint: dict | None = None) -> RunPaths:
    """Name a run after its study and identity: the same study on the same data is the same run."""
    fingerprint = fingerprint if fingerprint is not None else source_fingerprint(study)
    identity = run_identity(study, fingerprint)
    run_id = f"{study.config.study}-{identity[:16]}"
    return RunPaths(run_id, Path(data_dir) / "workspace" / run_id, Path(results), identity,
                    fingerprint)


@contextmanager
def run_lock(paths: RunPaths) -> Iterator[None]:
    """Hold the run's lock (released by the OS if the process dies); a second holder fails."""
    lock = paths.workspace.with_name(f"{paths.workspace.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(
                f"run {paths.run_id} is already in progress in another process (lock {lock})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def last_completed_run(results: Path, study: LoadedStudy) -> str | None:
    """run_id of the latest completed run of this study file in the store (None if none)."""
    if not Path(results).exists():
        return None
    try:
        with open_store(results, read_only=True) as con:
            row = con.execute(
                "SELECT run_id FROM runs WHERE study_file = ? AND status = 'completed' "
                "ORDER BY finished_at DESC LIMIT 1", [str(study.path.resolve())]).fetchone()
    except StoreError:
        return None
    return row[0] if row else None


@dataclass(frozen=True)
class BatchItem:
    """One study file of a batch folder and whether it needs a run."""

    study_file: Path
    run_id: str | None
    changed: bool
    reason: str


def batch_plan(studies: Path, results: Path, data_dir: Path) -> list[BatchItem]:
    """Every study file of a folder: changed (file or source) since its last successful run?"""
    from flows.config import StudyFileError

    items = []
    for file in sorted([*Path(studies).glob("*.yaml"), *Path(studies).glob("*.yml")]):
        try:
            study = load_study(file)
            paths = new_run(study, results, data_dir)
        except (StudyFileError, SourceError) as exc:
            items.append(BatchItem(file, None, False, f"unusable: {exc}"))
            continue
        last = last_completed_run(results, study)
        if last == paths.run_id:
            items.append(BatchItem(file, paths.run_id, False, "unchanged since its last run"))
        else:
            reason = "never run" if last is None else f"changed since run {last}"
            items.append(BatchItem(file, paths.run_id, True, reason))
    return items


_STUDIES: dict[tuple[str, int, int], LoadedStudy] = {}


def _study(study_file: str) -> LoadedStudy:
    """load_study, parsed once per process while the file is unchanged (one call per task)."""
    path = Path(study_file)
    try:
        stat = path.stat()
    except OSError:
        return load_study(path)  # which says what is wrong with the path
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _STUDIES:
        if len(_STUDIES) > 32:
            _STUDIES.clear()
        _STUDIES[key] = load_study(path)
    return _STUDIES[key]


def _write_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name, then rename it: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def preflight(study: LoadedStudy) -> None:
    """Check the source can serve the study before a run: tables, columns, concept ids, rows
    in the tables it needs, and every needed column readable."""
    source = open_study_source(study)
    try:
        design = study.design()
        needs = source_requirements(source, design)
        source.require(needs)
        resolve_concept_sets(source, design.concept_sets)
        check_usable_rows(source, design)  # what the run would find only later
        scan_tables(source, needs)
    finally:
        source.close()


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of the software that computes a run: cohortflow's source files and the versions
    of Python and the libraries, so a resumed run never mixes work of two versions."""
    digest = hashlib.sha256(json.dumps(versions(), sort_keys=True).encode())
    root = Path(__file__).resolve().parents[1]
    for package in CODE_PACKAGES:
        for file in sorted((root / package).glob("*.py")):
            digest.update(f"{package}/{file.name}".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def workspace_code_matches(workspace: str | Path) -> bool:
    """False when the workspace holds prepared work of other code (or of a cohortflow that
    did not record its code); True when it matches or nothing was prepared yet."""
    try:
        marker = json.loads((Path(workspace) / PREPARED_MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return True
    return marker.get("code") == code_fingerprint()


def prepare(study_file: str, workspace: str, *, resume: bool = False,
            expect_source: str | None = None) -> dict:
    """Build the cohorts of every comparison; return the run facts later stages need.

    With `resume`, a workspace whose preparation finished (its marker exists) is reused as is.
    """
    marker = Path(workspace) / PREPARED_MARKER
    if resume and marker.is_file():
        return {**json.loads(marker.read_text()), "reused": True}
    study = load_study(study_file)
    source = open_study_source(study)
    try:
        fingerprint = source.fingerprint()
        if expect_source is not None and fingerprint["sha256"] != expect_source:
            raise SourceError(f"{study.source_path}: the data changed as the run started; "
                              "run the study again")
        prepared = prepare_study(source, study.design(), Path(workspace))
    finally:
        source.close()
    info = {
        "comparison_ids": [int(i) for i in prepared.comparisons["comparison_id"]],
        "code": code_fingerprint(),
        "fingerprint": fingerprint,
        "warnings": shareable_texts(_cell_count_warning(study.config) + prepared.warnings,
                                    study.config),
        "seconds": prepared.seconds,
    }
    _write_atomic(marker, json.dumps(info, indent=1))
    return {**info, "reused": False}


def shareable_texts(texts: list[str], config: StudyConfig) -> list[str]:
    """Warnings and notes as they may be logged, stored and shown: every number below the
    study's min_cell_count masked (they name counts of persons and records)."""
    return [str(mask_free_text(text, config.min_cell_count)) for text in texts]


def _cell_count_warning(config: StudyConfig) -> list[str]:
    if config.min_cell_count >= 5:
        return []
    return [f"min_cell_count is {config.min_cell_count}: counts from {config.min_cell_count} "
            "persons up are shown; OHDSI's convention is at least 5"]


def analysis_dir(workspace: str | Path, comparison_id: int) -> Path:
    """Where a comparison's rows live once it is finished (or recorded as failed)."""
    return Path(workspace) / "analysis" / f"comparison_{comparison_id}"


def finished(workspace: str | Path, comparison_id: int) -> dict | None:
    """The saved summary of a finished comparison, or None when it must be (re)computed."""
    try:
        summary = json.loads((analysis_dir(workspace, comparison_id) / DONE_MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return {**summary, "reused": True}


@contextmanager
def _staged(workspace: str | Path, comparison_id: int) -> Iterator[Path]:
    """A temporary folder for a comparison's files, renamed into place when the block ends."""
    final = analysis_dir(workspace, comparison_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*.tmp"):  # left by a killed attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def analyze(study_file: str, workspace: str, comparison_id: int) -> dict:
    """Estimate every outcome of one comparison; write its rows as Parquet in the workspace."""
    started = time.perf_counter()
    study = _study(study_file)
    config = study.config
    prepared = PreparedStudy.load(Path(workspace))
    outcomes = prepared.outcomes
    data = load_comparison(Path(workspace), comparison_id, list(outcomes["outcome_id"]))
    loaded = time.perf_counter()
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
        ps_selection=config.propensity.selection,
        ps_max_per_arm=config.propensity.max_persons_per_arm,
    )
    labels = prepared.comparisons.set_index("comparison_id").loc[comparison_id]
    summary = {
        "comparison_id": comparison_id,
        "n_persons": data.n,
        "n_covariates": int(data.X.shape[1]),
        "failed": sum(row["status"] != "ok" for row in result.estimates),
        "notes": notes,
        "worker": f"{platform.node()}:{os.getpid()}",
        "stages": {"load": round(loaded - started, 4), **result.seconds},
    }
    written = time.perf_counter()
    keys = comparison_keys(labels, comparison_id)
    with _staged(workspace, comparison_id) as out:
        pd.DataFrame(result.estimates).assign(**keys).to_parquet(out / "estimates.parquet")
        pd.DataFrame(result.diagnostics).assign(**keys).to_parquet(
            out / "diagnostics.parquet")
        _balance_frame(result.balance, data.covariate_ids, prepared.workspace).assign(
            comparison_id=comparison_id
        ).to_parquet(out / "balance.parquet")
        for table, rows in (("ps_distribution", result.preference_histogram),
                            ("km_curves", result.survival_curves)):
            pd.DataFrame(rows).assign(comparison_id=comparison_id).to_parquet(
                out / f"{table}.parquet")
        summary["stages"]["write"] = round(time.perf_counter() - written, 4)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        (out / DONE_MARKER).write_text(json.dumps(summary, indent=1))
    return {**summary, "reused": False}


def comparison_keys(labels: pd.Series, comparison_id: int) -> dict:
    """The columns that say which comparison (and which trial of a battery) a row belongs to."""
    trial = labels.get("trial")
    return {"comparison_id": comparison_id, "treatment": labels.treatment,
            "comparator": labels.comparator,
            "strategy": labels.get("strategy"),
            "trial": None if trial is None or pd.isna(trial) else int(trial)}


def record_failure(study_file: str, workspace: str, comparison_id: int, message: str) -> dict:
    """Record an unexpected failure of one comparison as 'failed' rows (recomputed on resume)."""
    config = _study(study_file).config
    prepared = PreparedStudy.load(Path(workspace))
    labels = prepared.comparisons.set_index("comparison_id").loc[comparison_id]
    rows = [{**comparison_keys(labels, comparison_id), "outcome": outcome.outcome,
             "role": outcome.role,
             "estimator": estimator, "measure": "hr", "status": "failed", "message": message,
             "true_effect_size": 1.0 if outcome.role == "negative_control" else None}
            for outcome in prepared.outcomes.itertuples() for estimator in config.estimators]
    summary = {"comparison_id": comparison_id, "seconds": 0.0, "n_persons": 0,
               "n_covariates": 0, "failed": len(rows), "error": message,
               "notes": [f"comparison {comparison_id} ({labels.treatment} vs "
                         f"{labels.comparator}) failed: {message}"]}
    with _staged(workspace, comparison_id) as out:
        pd.DataFrame(rows).astype({"true_effect_size": "float64"}).to_parquet(
            out / "estimates.parquet")
        (out / FAILED_MARKER).write_text(json.dumps(summary, indent=1))
    return {**summary, "reused": False}


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
    ids = [a["comparison_id"] for a in analyses]
    clock = time.perf_counter()
    tables = {name: _gather(paths.workspace, name, ids) for name in RESULT_TABLES}
    gathered = time.perf_counter()
    tables["estimates"], tables["diagnostics"] = assemble_evidence(
        tables["estimates"], tables["diagnostics"],
        Thresholds(**study.config.diagnostics.model_dump(exclude={"min_balanced_rate"})))
    finalize_stages = {"gather": round(gathered - clock, 3),
                       "calibration_and_gates": round(time.perf_counter() - gathered, 3)}
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
        comparisons.reindex(columns=["treatment", "comparator", "strategy"]), on="comparison_id"
    )
    tables["attrition"] = attrition
    tables["comparisons"] = prepared.comparisons
    tables["diagnostics"] = with_cohort_notes(tables["diagnostics"], comparisons)
    if prepared.screen is not None and len(estimates):
        tables["candidate_evidence"] = screen_evidence(
            estimates, tables["diagnostics"], study.config.diagnostics.min_balanced_rate)
    if prepared.screen is not None:  # the treatment screen's expansion, with its counts
        tables["screen"] = prepared.screen
    analyze_stages: dict[str, float] = {}  # work summed over the comparisons run now
    for analysis in analyses:
        for stage, seconds in (analysis.get("stages") or {}).items():
            if not analysis.get("reused"):
                analyze_stages[stage] = round(analyze_stages.get(stage, 0.0) + seconds, 3)
    timings = {**timings, "prepare_stages": prepared_info["seconds"],
               "analyze_stages": analyze_stages, "finalize_stages": finalize_stages,
               "comparisons": {str(a["comparison_id"]): a["seconds"] for a in analyses},
               "reused": sorted(a["comparison_id"] for a in analyses if a.get("reused")),
               "worker_processes": len({a["worker"] for a in analyses
                                        if not a.get("reused") and a.get("worker")})}
    run = {
        "run_id": paths.run_id,
        "study": study.config.study,
        "description": study.config.description,
        "study_file": str(study.path.resolve()),
        "config_sha256": study.sha256,
        "config_json": study.config.model_dump(mode="json"),
        "source_path": str(study.source_path),
        "source_sha256": prepared_info["fingerprint"]["sha256"],
        "run_identity": paths.identity,
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
        "warnings": prepared_info["warnings"] + shareable_texts(
            [n for a in analyses for n in a["notes"]], study.config),
        "versions": versions(),
        "timings": timings,
    }
    write_run(paths.results, run, tables)
    return run


def report(results: Path, run_id: str, data_dir: Path) -> Path:
    """Write the run's HTML report to data/reports/<run_id>.html."""
    from results.report import write_report

    return write_report(results, data_dir / "reports" / f"{run_id}.html", run_id=run_id)


def _gather(workspace: Path, table: str, comparison_ids: list[int]) -> pd.DataFrame:
    files = [analysis_dir(workspace, cid) / f"{table}.parquet" for cid in sorted(comparison_ids)]
    frames = [pd.read_parquet(f) for f in files if f.exists()]
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
