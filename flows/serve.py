"""`cohortflow serve` and `cohortflow submit`: study runs as Prefect deployments on a server.

Two deployments are served from one long-running process: `run-study/run-study` (one study
file per run; each study file of the folder with a `schedule:` gets its cron schedule, skipping
runs whose study and data are unchanged) and `batch/batch` (every study of the folder whose
file or source changed since its last successful run, on the `--cron` schedule).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.config import StudyFileError, load_study

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments.runner import RunnerDeployment

RUN_STUDY = "run-study/run-study"
BATCH = "batch/batch"


class NoServerError(RuntimeError):
    """serve and submit need a Prefect server (PREFECT_API_URL)."""


def require_server(command: str) -> str:
    """The Prefect API URL, or an error that says how to start a server."""
    from flows.runners import api_url

    url = api_url()
    if not url:
        raise NoServerError(
            f"cohortflow {command} needs a Prefect server: start one with `prefect server "
            "start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api` (README, "
            "Orchestration)")
    return url


def scheduled_studies(studies: Path) -> list[tuple[Path, str]]:
    """(study file, cron) for every valid study file of the folder that has a `schedule:`."""
    found = []
    for file in sorted([*studies.glob("*.yaml"), *studies.glob("*.yml")]):
        try:
            study = load_study(file)
        except StudyFileError:
            continue  # the batch flow reports unusable files when it runs
        if study.config.schedule:
            found.append((file.resolve(), study.config.schedule))
    return found


def build_deployments(studies: Path | None, cron: str | None, common: dict[str, Any],
                      ) -> list[RunnerDeployment]:
    """The run-study and batch deployments; `common` holds results_path, data_dir, runner..."""
    from prefect.schedules import Cron

    from flows.run_study import batch, run_study

    common = {key: value for key, value in common.items() if value is not None}
    schedules = [Cron(schedule, parameters={"study_file": str(file), "only_if_changed": True},
                      slug=f"study-{i}")
                 for i, (file, schedule) in enumerate(scheduled_studies(studies) if studies
                                                      else [])]
    single = run_study.to_deployment(
        name="run-study", parameters={**common, "show_progress": False},
        schedules=schedules or None,
        description="One study file end to end (parameter study_file: an absolute path).")
    batch_parameters = dict(common)
    if studies is not None:
        batch_parameters["studies_dir"] = str(studies.resolve())
    folder = batch.to_deployment(
        name="batch", parameters=batch_parameters, cron=cron,
        description="Every study of a folder whose file or source changed since its last "
                    "successful run.")
    return [single, folder]


def serve(studies: Path | None, cron: str | None, common: dict[str, Any],
          limit: int | None = None) -> None:
    """Serve both deployments until interrupted (runs execute in subprocesses of this one)."""
    from prefect import serve as prefect_serve

    if cron is not None:
        from prefect.schedules import validate_cron_string

        try:
            validate_cron_string(cron)
        except ValueError as exc:
            raise StudyFileError(f"--cron: {exc}") from None
    if cron is not None and studies is None:
        raise StudyFileError("--cron: the batch schedule needs a folder of studies (--studies)")
    prefect_serve(*build_deployments(studies, cron, common), limit=limit)


def submit(study_file: Path, parameters: dict[str, Any], wait: bool = False) -> FlowRun:
    """Start a run of the served run-study deployment; return the flow run (finished if wait)."""
    from prefect.deployments import run_deployment

    given = {key: value for key, value in parameters.items() if value is not None}
    return run_deployment(
        RUN_STUDY, parameters={"study_file": str(study_file.resolve()), **given},
        timeout=None if wait else 0, poll_interval=2, as_subflow=False)
