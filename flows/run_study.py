"""The Prefect flows: `run-study` (prepare once, analyse comparisons in parallel, finalise) and
`batch` (every study of a folder whose file or data changed since its last successful run).

One task per treatment-comparator comparison (all its outcomes and estimators inside, one
propensity fit reused), because Prefect's per-task overhead would dominate finer tasks. Tasks
get paths and ids, never data frames, and caching is off (hashing inputs costs more than it
saves). BLAS/OpenMP threads are pinned to one per worker so parallel fits don't oversubscribe.
The comparison tasks run on threads, worker processes or a Dask cluster (`flows.runners`); a
run resumes from its workspace (finished comparisons are reused), transient I/O errors are
retried, and a comparison that fails anyway is recorded as failed rows while the rest finish.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.futures import as_completed
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner
from threadpoolctl import threadpool_limits

from cohort.source import SourceError
from flows import pipeline
from flows.config import load_study
from flows.progress import Progress
from flows.runners import Execution, RunnerKind, api_url, make_task_runner, resolve_execution

DEFAULT_RESULTS = "data/results.duckdb"
RETRIES = 2
RETRY_DELAYS = [2, 10]  # seconds before the first and the second retry
TOP_CANDIDATES = 5      # per outcome and estimator, in the run's table artifact


def transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry a task only for OS-level errors (I/O, network file systems), not for bugs."""
    return isinstance(state.result(raise_on_failure=False), OSError)


@task(name="prepare-cohorts", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def prepare_task(study_file: str, workspace: str, resume: bool, expect_source: str) -> dict:
    try:
        return pipeline.prepare(study_file, workspace, resume=resume, expect_source=expect_source)
    except SourceError as exc:  # bad input found while building cohorts: a message, no traceback
        return {"input_error": str(exc)}


@task(name="analyze-comparison", cache_policy=NO_CACHE, task_run_name="comparison-{comparison_id}",
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def analyze_task(study_file: str, workspace: str, comparison_id: int) -> dict:
    threadpool_limits(limits=1)  # in a worker process; the flow pins its own threads around
    return pipeline.analyze(study_file, workspace, comparison_id)


@task(name="finalize-run", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=transient)
def finalize_task(study_file: str, paths: pipeline.RunPaths, prepared: dict,
                  analyses: list[dict], started_at: datetime, timings: dict) -> dict:
    return pipeline.finalize(study_file, paths, prepared, analyses, started_at, timings)


@task(name="write-report", cache_policy=NO_CACHE)
def report_task(results_path: str, run_id: str, data_dir: str) -> Path:
    return pipeline.report(Path(results_path), run_id, Path(data_dir))


@flow(name="run-study", task_runner=ThreadPoolTaskRunner(max_workers=2))
def run_study(study_file: str, results_path: str = DEFAULT_RESULTS, data_dir: str = "data",
              show_progress: bool = True, runner: RunnerKind | None = None,
              workers: int | None = None, dask_address: str | None = None,
              fresh: bool = False, only_if_changed: bool = False) -> dict:
    """Run one study file end to end and return its run record.

    runner/workers/dask_address override the study file's `execution:`; `fresh` recomputes
    everything; `only_if_changed` skips a study whose last completed run is this same run.
    """
    logger = get_run_logger()
    study = load_study(study_file)
    execution = resolve_execution(study.config.execution, runner, workers, dask_address)
    paths = pipeline.new_run(study, Path(results_path), Path(data_dir))
    if only_if_changed and pipeline.last_completed_run(paths.results, study) == paths.run_id:
        logger.info("run %s: study and data unchanged since it completed; skipped", paths.run_id)
        return {"run_id": paths.run_id, "study": study.config.study, "skipped": True}
    if execution.runner != "threads" and api_url() is None:
        logger.warning("%s workers each start a temporary Prefect server: set PREFECT_API_URL "
                       "to a running server (see README, Orchestration)", execution.runner)
    with pipeline.run_lock(paths):
        return _run_locked(study_file, study.config.study, paths, data_dir, execution, fresh,
                           show_progress)


def _run_locked(study_file: str, study_name: str, paths: pipeline.RunPaths, data_dir: str,
                execution: Execution, fresh: bool, show_progress: bool) -> dict:
    logger = get_run_logger()
    started_at = datetime.now(UTC)
    logger.info("run %s: study %s, %s, %s", paths.run_id, study_name,
                "fresh" if fresh else "resuming finished work", execution.describe())
    workspace = str(paths.workspace)
    if not fresh and not pipeline.workspace_code_matches(workspace):
        logger.warning("the interrupted run's work was computed by other cohortflow code or "
                       "library versions: recomputing everything")
        fresh = True
    clock = time.perf_counter()
    prepared = prepare_task(study_file, workspace, not fresh, paths.fingerprint["sha256"])
    if "input_error" in prepared:
        logger.error("stopped: %s", prepared["input_error"])
        return {"run_id": paths.run_id, "input_error": prepared["input_error"]}
    timings: dict = {"prepare": round(time.perf_counter() - clock, 3),
                     "runner": execution.runner, "workers": execution.workers}
    ids = prepared["comparison_ids"]
    for warning in prepared["warnings"]:
        logger.warning(warning)
    logger.info("cohorts for %d comparison(s) %s in %.1f s", len(ids),
                "reused" if prepared.get("reused") else "ready", timings["prepare"])
    clock = time.perf_counter()
    analyses, todo = [], []
    for cid in ids:
        done = None if fresh else pipeline.finished(workspace, cid)
        if done:
            analyses.append(done)
        else:
            todo.append(cid)
    if analyses:
        logger.info("%d of %d comparison(s) already finished: reused", len(analyses), len(ids))
    with threadpool_limits(limits=1), Progress(len(ids), "comparisons",
                                                enabled=show_progress) as bar:
        for _ in analyses:
            bar.advance()
        if todo:
            analyses += _analyze_all(study_file, workspace, todo, execution, bar)
    timings["analyze"] = round(time.perf_counter() - clock, 3)
    timings["analyze_work"] = round(sum(a["seconds"] for a in analyses if not a["reused"]), 3)
    clock = time.perf_counter()
    run = finalize_task(study_file, paths, prepared, sorted(analyses,
                        key=lambda a: a["comparison_id"]), started_at, timings)
    logger.info("run %s written to %s in %.1f s", paths.run_id, paths.results,
                time.perf_counter() - clock)
    run["report"] = str(report_task(str(paths.results), paths.run_id, data_dir))
    logger.info("report: %s", run["report"])
    try:
        _publish_artifacts(run, paths.results)
    except Exception as exc:  # the run is written; a missing artifact must not fail it
        logger.warning("could not create the run's Prefect artifacts: %s", exc)
    return run


def _analyze_all(study_file: str, workspace: str, ids: list[int], execution: Execution,
                 bar: Progress) -> list[dict]:
    """Submit one task per comparison; a task that fails after its retries is recorded."""
    logger = get_run_logger()
    analyses = []
    with make_task_runner(execution) as task_runner:
        futures = {task_runner.submit(analyze_task, {"study_file": study_file,
                                                     "workspace": workspace,
                                                     "comparison_id": cid}): cid
                   for cid in ids}
        for future in as_completed(list(futures)):
            cid = futures[future]
            outcome = future.result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                message = f"{type(outcome).__name__}: {outcome}"
                shown = pipeline.shareable_texts([message], load_study(study_file).config)[0]
                logger.error("comparison %d failed: %s (recorded; the others go on)", cid,
                             shown)
                summary = pipeline.record_failure(study_file, workspace, cid, message)
            else:
                summary = outcome
                logger.info("comparison %d done in %.1f s (%d covariates, %d failed "
                            "estimates)", cid, summary["seconds"], summary["n_covariates"],
                            summary["failed"])  # person counts stay in the store
            analyses.append(summary)
            bar.advance()
    return analyses


def _publish_artifacts(run: dict, results: Path) -> None:
    """A markdown summary and a table of the top-ranked candidates, as Prefect artifacts."""
    from results.ranking import ranked_candidates

    key = re.sub(r"[^a-z0-9-]+", "-", run["study"].lower()).strip("-") or "study"
    timings = run["timings"]
    failed = [w for w in run["warnings"] if " failed: " in w]
    lines = [
        f"# {run['study']}: run `{run['run_id']}`", "",
        f"{run.get('description') or ''}", "",
        "| item | value |", "|---|---|",
        f"| source | `{run['source_path']}` (CDM {run['cdm_version']}) |",
        f"| comparisons | {run['n_comparisons']} ({len(timings.get('reused', []))} reused "
        f"from an earlier attempt) |",
        f"| outcomes | {run['n_outcomes']} |",
        f"| estimates | {run['n_estimates']} ({run['n_estimates_failed']} failed) |",
        f"| runner | {timings.get('runner')} x {timings.get('workers')} |",
        f"| seconds | prepare {timings.get('prepare')}, analyse {timings.get('analyze')} "
        f"(task work {timings.get('analyze_work')}) |",
        f"| report | `{run.get('report')}` |", "",
    ]
    if failed:
        lines += ["## Failed comparisons", "", *[f"- {w}" for w in failed], ""]
    create_markdown_artifact(markdown="\n".join(lines), key=f"{key}-summary",
                             description=f"cohortflow run {run['run_id']}")
    top = ranked_candidates(results, run_id=run["run_id"], top=TOP_CANDIDATES)
    top = top.drop(columns=["run_id", "study"], errors="ignore")
    rows = json.loads(top.to_json(orient="records", date_format="iso"))
    create_table_artifact(table=rows or [{"note": "no candidate passed every diagnostic"}],
                          key=f"{key}-top-candidates",
                          description=f"top {TOP_CANDIDATES} candidates per outcome and "
                                      f"estimator, run {run['run_id']}")


@flow(name="batch")
def batch(studies_dir: str, results_path: str = DEFAULT_RESULTS, data_dir: str = "data",
          runner: RunnerKind | None = None, workers: int | None = None,
          dask_address: str | None = None) -> list[dict]:
    """Run every study file in a folder whose file or source changed since its last run."""
    logger = get_run_logger()
    plan = pipeline.batch_plan(Path(studies_dir), Path(results_path), Path(data_dir))
    outcomes, problems = [], []
    for item in plan:
        logger.info("%s: %s", item.study_file.name, item.reason)
        entry = {"study_file": str(item.study_file), "run_id": item.run_id,
                 "reason": item.reason, "ran": item.changed}
        if item.run_id is None:
            problems.append(f"{item.study_file.name}: {item.reason}")
        elif item.changed:
            state = run_study(str(item.study_file.resolve()), results_path, data_dir,
                              show_progress=False, runner=runner, workers=workers,
                              dask_address=dask_address, return_state=True)
            entry["state"] = state.type.value
            if state.is_failed():
                problems.append(f"{item.study_file.name}: {state.message}")
        outcomes.append(entry)
    if problems:
        raise RuntimeError(f"{len(problems)} study file(s) failed: " + "; ".join(problems))
    return outcomes


def with_workers(workers: int | None) -> Callable[..., dict]:
    """The run_study flow with the number of parallel comparison tasks fixed."""
    return functools.partial(run_study, workers=workers)
