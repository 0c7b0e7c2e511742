"""The Prefect flow `run_study`: prepare cohorts once, analyse comparisons in parallel, finalise.

One task per treatment-comparator comparison (all its outcomes and estimators inside, one
propensity fit reused), because Prefect's per-task overhead would dominate finer tasks. Tasks
get paths and ids, never data frames, and caching is off (hashing inputs costs more than it
saves). BLAS/OpenMP threads are pinned to one per worker so parallel fits don't oversubscribe.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import Flow, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from threadpoolctl import threadpool_limits

from flows import pipeline
from flows.config import load_study
from flows.progress import Progress


@task(name="prepare-cohorts", cache_policy=NO_CACHE)
def prepare_task(study_file: str, workspace: str) -> dict:
    return pipeline.prepare(study_file, workspace)


@task(name="analyze-comparison", cache_policy=NO_CACHE, task_run_name="comparison-{comparison_id}")
def analyze_task(study_file: str, workspace: str, comparison_id: int) -> dict:
    return pipeline.analyze(study_file, workspace, comparison_id)


@task(name="finalize-run", cache_policy=NO_CACHE)
def finalize_task(study_file: str, paths: pipeline.RunPaths, prepared: dict,
                  analyses: list[dict], started_at: datetime, timings: dict) -> dict:
    return pipeline.finalize(study_file, paths, prepared, analyses, started_at, timings)


@task(name="write-report", cache_policy=NO_CACHE)
def report_task(results_path: str, run_id: str, data_dir: str) -> Path:
    return pipeline.report(Path(results_path), run_id, Path(data_dir))


@flow(name="run-study", task_runner=ThreadPoolTaskRunner(max_workers=2))
def run_study(study_file: str, results_path: str = "data/results.duckdb",
              data_dir: str = "data", show_progress: bool = True) -> dict:
    """Run one study file end to end and return its run record.

    Parallelism comes from the flow's task runner: `with_workers(n)` gives a copy with n threads.
    """
    logger = get_run_logger()
    study = load_study(study_file)
    paths = pipeline.new_run(study, Path(results_path), Path(data_dir))
    started_at = datetime.now(UTC)
    logger.info("run %s: study %s on %s", paths.run_id, study.config.study, study.source_path)
    clock = time.perf_counter()
    prepared = prepare_task(study_file, str(paths.workspace))
    timings = {"prepare": round(time.perf_counter() - clock, 3)}
    ids = prepared["comparison_ids"]
    for warning in prepared["warnings"]:
        logger.warning(warning)
    logger.info("cohorts ready for %d comparison(s) in %.1f s", len(ids), timings["prepare"])
    clock = time.perf_counter()
    analyses = []
    with threadpool_limits(limits=1), Progress(len(ids), "comparisons",
                                                enabled=show_progress) as bar:
        futures = [analyze_task.submit(study_file, str(paths.workspace), cid) for cid in ids]
        for future in as_completed(futures):
            summary = future.result()
            analyses.append(summary)
            bar.advance()
            logger.info("comparison %d done in %.1f s (%d persons, %d covariates, "
                        "%d failed estimates)", summary["comparison_id"], summary["seconds"],
                        summary["n_persons"], summary["n_covariates"], summary["failed"])
    timings["analyze"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    run = finalize_task(study_file, paths, prepared, sorted(analyses,
                        key=lambda a: a["comparison_id"]), started_at, timings)
    logger.info("run %s written to %s in %.1f s", paths.run_id, results_path,
                time.perf_counter() - clock)
    run["report"] = str(report_task(results_path, paths.run_id, data_dir))
    logger.info("report: %s", run["report"])
    return run


def with_workers(workers: int) -> Flow:
    """The run_study flow with a thread pool of the given size for the comparison tasks."""
    return run_study.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, workers)))
