"""The `cohortflow` command: demo, validate, run, serve, submit, query.

Input problems (bad study file, unusable source, bad query) print one line naming the file and
field and exit with code 2; nothing already in the result store is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cohort.source import SourceError
from flows.config import StudyFileError, load_study
from flows.serve import NoServerError
from results.export import EXPORTS
from results.store import StoreError

if TYPE_CHECKING:
    import pandas as pd

INPUT_ERRORS = (StudyFileError, SourceError, StoreError, LookupError, NoServerError)
DEFAULT_RESULTS = "data/results.duckdb"
CONFIGS = Path(__file__).parents[1] / "configs"


def _quiet_prefect(verbose: bool, quiet: bool) -> None:
    """Prefect settings for a machine without a server or internet (set before importing it)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    level = "DEBUG" if verbose else "WARNING" if quiet else "INFO"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", level)


def cmd_validate(args: argparse.Namespace) -> int:
    from flows.pipeline import preflight

    for file in args.files:
        study = load_study(file)
        if not args.no_source:
            preflight(study)
        treatments = study.config.treatments
        listed = (f"{len(treatments)} treatment(s)" if isinstance(treatments, list) else
                  f"a screen of ingredients with {treatments.screen.min_new_users}+ new users")
        print(f"{file}: ok (study {study.config.study}, {listed}, "
              f"{len(study.config.outcomes)} outcome(s), "
              f"{len(study.config.negative_controls)} negative control(s))")
        if args.arms:
            _print_arms(study)
    return 0


def _print_arms(study) -> None:
    """Build the cohorts only (no estimation) and print each comparison's arm sizes, masked."""
    import tempfile

    from cohort.prepare import prepare_study
    from flows.pipeline import open_study_source
    from results.summary import mask_counts

    source = open_study_source(study)
    try:
        with tempfile.TemporaryDirectory(prefix="cohortflow-arms-") as folder:
            prepared = prepare_study(source, study.design(), Path(folder) / "workspace")
    finally:
        source.close()
    columns = ["treatment", "comparator", "strategy", "trial", "n_treated", "n_comparator",
               "cohort_note"]
    shown = mask_counts(prepared.comparisons[columns], ["n_treated", "n_comparator"],
                        study.config.min_cell_count)
    print(shown.astype(object).where(shown.notna(), "").to_string(index=False))
    screen = prepared.screen
    if screen is not None:
        counted = int(screen["eligible_new_users"].notna().sum())
        print(f"screen: {len(screen)} ingredient(s) exposed, {counted} counted, "
              f"{int(screen['selected'].sum())} selected; {len(prepared.comparisons)} "
              "comparison(s)")
        if "battery_note" in screen:
            notes = screen[screen["selected"] & screen["battery_note"].notna()]
            for note, rows in notes.groupby("battery_note"):
                names = list(rows["set_name"])
                print(f"battery: {note}: {', '.join(names[:6])}"
                      + (f" and {len(names) - 6} more" if len(names) > 6 else ""))
    for warning in prepared.warnings:
        print(f"warning: {warning}")


def cmd_run(args: argparse.Namespace) -> int:
    run = _run(args.file, args)
    _print_summary(run, args)
    return 0


def _run(study_file: str, args: argparse.Namespace) -> dict:
    from flows.pipeline import preflight
    from flows.runners import resolve_execution
    from results.store import check_store

    study = load_study(study_file)
    check_store(args.results)
    try:
        execution = resolve_execution(study.config.execution, args.runner, args.workers,
                                      args.dask_address)
    except ValueError as exc:
        raise StudyFileError(f"{study_file}: {exc}") from None
    preflight(study)
    _quiet_prefect(args.verbose, args.quiet)
    options = {"runner": args.runner, "dask_address": args.dask_address, "fresh": args.fresh}
    options = {key: value for key, value in options.items() if value}
    with _prefect_api(execution.runner, args.quiet):
        from flows.run_study import with_workers

        flow = with_workers(args.workers)
        run = flow(study_file=str(study_file), results_path=str(args.results),
                   data_dir=str(args.data_dir), show_progress=not args.quiet, **options)
    if run.get("input_error"):
        raise SourceError(run["input_error"])
    return run


@contextmanager
def _prefect_api(runner: str, quiet: bool) -> Iterator[None]:
    """Process and Dask workers need a real Prefect server: start one if none is set."""
    from flows.runners import api_url, local_prefect_server

    if runner == "threads" or api_url():
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not quiet:
        print(f"cohortflow: starting a local Prefect server for the {runner} workers (~15 s; "
              "set PREFECT_API_URL to use a running one)", file=sys.stderr)
    with local_prefect_server() as url, temporary_settings({PREFECT_API_URL: url}):
        os.environ["PREFECT_API_URL"] = url  # for the worker processes
        try:
            yield
        finally:
            os.environ.pop("PREFECT_API_URL", None)


SUMMARY_ROWS = 30
"""Rows of the end-of-run summary tables before a screen's are cut to the best ones."""


def _strongest_rows(wide: pd.DataFrame, summary: pd.DataFrame, primary: str) -> pd.DataFrame:
    """Per outcome, at most SUMMARY_ROWS / outcomes rows of the summary table (at least 3):
    ranked ones first (best rank first), then the smallest p-values of the primary estimator;
    the table's order kept."""
    keys = ["treatment", "comparator", "outcome"]
    p_value = summary[summary["estimator"] == primary].set_index(keys)["p_value"]
    per_outcome = max(3, SUMMARY_ROWS // max(wide["outcome"].nunique(), 1))
    order = wide.assign(_unranked=wide["rank"].isna(),
                        _p=wide.set_index(keys).index.map(p_value).astype(float))
    pick = (order.sort_values(["outcome", "_unranked", "rank", "_p"], na_position="last")
            .groupby("outcome", sort=False).head(per_outcome).index)
    return wide.loc[wide.index.isin(pick)]


def _print_summary(run: dict, args: argparse.Namespace, extra: Callable | None = None) -> None:
    from results.account import primary_estimator
    from results.summary import calibration_summary, run_summary, wide_summary

    if args.quiet:
        print(run["run_id"])
        return
    summary = run_summary(Path(args.results), run["run_id"])
    study = load_study(run["study_file"])
    primary = primary_estimator(study.config.estimators)
    wide = wide_summary(summary[summary["role"] == "outcome"], study.config.min_cell_count,
                        primary)
    if extra is not None:
        wide = extra(wide)
    seconds = (run["finished_at"] - run["started_at"]).total_seconds()
    print(f"\nrun {run['run_id']}: {run['n_comparisons']} comparison(s), "
          f"{run['n_estimates']} estimates ({run['n_estimates_failed']} failed) "
          f"in {seconds:.0f} s")
    if not study.config.treatment_names:  # a screen: one line per candidate
        print(f"\ncandidates ({primary}; every one: cohortflow account, cohortflow rank):")
        _print_account(Path(args.results), run["run_id"], None, primary)
    elif len(wide) > SUMMARY_ROWS:  # per outcome the ranked, then the smallest p
        shown = _strongest_rows(wide, summary, primary)
        print(shown.to_string(index=False))
        print(f"... {len(shown)} of {len(wide)} rows (per outcome the ranked candidates, then "
              f"the smallest {primary} p-values); every row: cohortflow rank, cohortflow export "
              "estimates, the report")
    else:
        print(wide.to_string(index=False))
    nulls = calibration_summary(Path(args.results), run["run_id"], primary)
    if len(nulls) and nulls["negative_controls"].max() > 0:
        print(f"\nsystematic error ({primary}), from the negative controls:")
        print(nulls.drop(columns=["note"]).head(SUMMARY_ROWS).to_string(index=False))
        if len(nulls) > SUMMARY_ROWS:
            print(f"... {SUMMARY_ROWS} of {len(nulls)} comparisons; every one: the diagnostics "
                  "table (null_mean, null_sd, ease)")
    if run.get("report"):
        print(f"\nreport: {run['report']}")
    print(f"\nresults: {args.results}  (cohortflow rank --results {args.results}; "
          f"cohortflow query \"SELECT * FROM estimates WHERE run_id = '{run['run_id']}'\")")


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import add_truth, ensure_demo_data, screen_against_truth
    from results.account import primary_estimator

    kind = "comparison" if args.comparison else "screen"
    config = args.config or CONFIGS / ("demo.yaml" if args.comparison else "screen_demo.yaml")
    persons = args.persons or (50_000 if args.comparison else 60_000)
    cdm = load_study(config).source_path  # the demo study says where its data lives
    ensure_demo_data(cdm, persons=persons, seed=args.seed, kind=kind)
    run = _run(str(config), args)
    if args.comparison:
        _print_summary(run, args, extra=lambda wide: add_truth(wide, cdm))
        return 0
    _print_summary(run, args)
    if not args.quiet:
        primary = primary_estimator(load_study(config).config.estimators)
        table = screen_against_truth(Path(args.results), run["run_id"], cdm, primary)
        print(f"\nthe best-ranked candidates of each comparator strategy ({primary}, pooled "
              "over the strategy's balanced trials) and every planted one, next to the truth "
              "(true_hr; kind: protective, harmful, decoy or null):")
        shown = table.astype(object).where(table.notna(), "")
        print(shown.to_string(index=False, float_format="{:.3g}".format))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _quiet_prefect(args.verbose, False)
    from flows.serve import require_server, serve

    url = require_server("serve")
    if args.studies is not None and not args.studies.is_dir():
        raise StudyFileError(f"{args.studies}: no such folder of study files")
    print(f"cohortflow: serving run-study/run-study and batch/batch on {url} (Ctrl-C stops)",
          file=sys.stderr)
    serve(args.studies, args.cron, _served_parameters(args), limit=args.limit)
    return 0


def _served_parameters(args: argparse.Namespace) -> dict:
    """Flow parameters given on the command line (absolute paths: runs start elsewhere)."""
    return {"results_path": str(args.results.resolve()) if args.results else None,
            "data_dir": str(args.data_dir.resolve()) if args.data_dir else None,
            "runner": args.runner, "workers": args.workers, "dask_address": args.dask_address}


def cmd_submit(args: argparse.Namespace) -> int:
    from flows.pipeline import preflight

    study = load_study(args.file)
    preflight(study)
    _quiet_prefect(args.verbose, True)
    from prefect.exceptions import ObjectNotFound

    from flows.serve import RUN_STUDY, require_server, submit

    url = require_server("submit")
    parameters = {**_served_parameters(args), "fresh": args.fresh or None}
    try:
        run = submit(Path(args.file), parameters, wait=args.wait)
    except ObjectNotFound:
        print(f"cohortflow: no deployment {RUN_STUDY} on {url}: start `cohortflow serve` "
              "first", file=sys.stderr)
        return 2
    ui = url.removesuffix("/api")
    print(f"flow run {run.id} ({run.name}) of {RUN_STUDY}: {run.state_name}")
    print(f"follow it: prefect flow-run logs {run.id}   or   {ui}/runs/flow-run/{run.id}")
    if args.wait:
        return 0 if run.state is not None and run.state.is_completed() else 1
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from results.account import screen_ranking, screen_runs
    from results.ranking import ranked_candidates

    results = Path(args.results)
    screens = screen_runs(results, study=args.study, run_id=args.run)
    if not screens:
        frame = ranked_candidates(
            results, study=args.study, outcome=args.outcome, direction=args.direction,
            estimator=args.estimator, top=args.top, run_id=args.run)
        _print_frame(frame, args.format, float_format="{:.3g}".format)
        return 0
    for run_id in screens:  # a screen ranks candidates (its trials pooled), not comparisons
        frame = screen_ranking(results, run_id, outcome=args.outcome, estimator=args.estimator,
                               direction=args.direction, top=args.top)
        if len(frame) or args.format != "table":
            _print_frame(frame, args.format, float_format="{:.3g}".format)
            continue
        print(f"run {run_id}: no candidate is ranked; the account of every candidate:")
        _print_account(results, run_id, args.outcome, args.estimator)
    return 0


def cmd_account(args: argparse.Namespace) -> int:
    from results.account import candidate_account

    if args.format == "table":
        _print_account(Path(args.results), args.run, args.outcome, args.estimator, args.study)
        return 0
    frame = candidate_account(Path(args.results), run_id=args.run, study=args.study,
                              outcome=args.outcome, estimator=args.estimator)
    _print_frame(frame, args.format)
    return 0


def _print_account(results: Path, run_id: str | None, outcome: str | None,
                   estimator: str | None, study: str | None = None) -> None:
    from results.account import account_lines, candidate_account

    account = candidate_account(results, run_id=run_id, study=study, outcome=outcome,
                                estimator=estimator)
    print("\n".join(account_lines(account)))


def cmd_export(args: argparse.Namespace) -> int:
    from results.export import export

    try:
        rows = export(Path(args.results), args.what, Path(args.out), study=args.study)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    print(f"{args.out}: {rows} row(s) of {args.what} (counts below min_cell_count masked)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from results.report import write_report

    out = write_report(Path(args.results), Path(args.out), run_id=args.run)
    print(f"{out}: report written (open it in a browser; it needs no network)")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from flows.config import StudyConfig

    schema = StudyConfig.model_json_schema()
    schema["title"] = "cohortflow study file"
    print(json.dumps(schema, indent=1))
    return 0


def cmd_covariates(args: argparse.Namespace) -> int:
    from cohort.covariates import covariate_catalogue

    _print_frame(covariate_catalogue(load_study(args.file).design()), args.format)
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from flows.housekeeping import clean

    done = clean(args.data_dir, args.results, older_than_days=args.older_than,
                 reports_older_than_days=args.reports_older_than, dry_run=args.dry_run)
    print(("would remove (dry run): " if args.dry_run else "removed: ")
          + "; ".join(done.lines()))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from results.store import query

    _print_frame(query(Path(args.results), args.sql, timeout_s=args.timeout,
                       memory_limit=args.memory_limit), args.format)
    return 0


def _bounded(low: float, high: float, what: str,
             with_low: bool = False) -> Callable[[str], float]:
    """An argparse type: a number with low < value < high (or value == low, with_low)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (low < value < high or (with_low and value == low)):
            raise argparse.ArgumentTypeError(f"expected {what} below {high:g}, got {text!r}")
        return value
    return parse


_positive_seconds = _bounded(0, 86_400, "a positive number of seconds")
_days = _bounded(0, 100_000, "a number of days", with_low=True)


def _print_frame(frame: pd.DataFrame, output: str, float_format: Callable | None = None) -> None:
    if output == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif output == "json":
        print(frame.to_json(orient="records", date_format="iso"))
    else:
        print(frame.to_string(index=False, float_format=float_format) if len(frame)
              else "(no rows)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cohortflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--results", type=Path, default=Path(DEFAULT_RESULTS),
                       help=f"result store (default {DEFAULT_RESULTS})")
        p.add_argument("--data-dir", type=Path, default=Path("data"),
                       help="folder for run workspaces and demo data (default data)")
        execution_options(p)
        p.add_argument("--quiet", action="store_true", help="print only the run id")
        p.add_argument("--verbose", action="store_true", help="debug logs and tracebacks")
        resume = p.add_mutually_exclusive_group()
        resume.add_argument("--resume", dest="fresh", action="store_false",
                            help="reuse the finished work of an interrupted run of the same "
                                 "study on the same data (default)")
        resume.add_argument("--fresh", dest="fresh", action="store_true",
                            help="recompute everything")
        p.set_defaults(fresh=False)

    def execution_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--runner", choices=("threads", "processes", "dask"),
                       help="where comparisons run (default: the study's execution: or threads)")
        p.add_argument("--workers", type=int,
                       help="comparisons analysed in parallel (default: the study's or 2)")
        p.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                       help="a running Dask scheduler (implies --runner dask)")

    demo = sub.add_parser("demo", help="generate a synthetic CDM with planted effects and run "
                                       "a drug-repurposing screen on it (configs/"
                                       "screen_demo.yaml; --comparison: configs/demo.yaml)")
    demo.add_argument("--comparison", action="store_true",
                      help="the single-comparison demo: 4 drugs vs a shared comparator")
    demo.add_argument("--persons", type=int,
                      help="persons to generate (default 60,000; 50,000 with --comparison)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--config", type=Path, help="the study file to run on the demo data")
    run_options(demo)
    demo.set_defaults(func=cmd_demo)

    validate = sub.add_parser("validate", help="check study files without running them")
    validate.add_argument("files", nargs="+")
    validate.add_argument("--no-source", action="store_true",
                          help="check the file only, not its source's tables and concepts")
    validate.add_argument("--arms", action="store_true",
                          help="also build the cohorts (no estimation) and print every "
                               "comparison's arm sizes and what shrank them")
    validate.add_argument("--verbose", action="store_true")
    validate.set_defaults(func=cmd_validate)

    run = sub.add_parser("run", help="run a study file and write its results")
    run.add_argument("file")
    run_options(run)
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="serve the run-study and batch deployments on a "
                                         "Prefect server (PREFECT_API_URL)")
    serve.add_argument("--studies", type=Path,
                       help="folder of study files: their schedule: and the batch's folder")
    serve.add_argument("--cron", help='schedule of the batch deployment, e.g. "0 2 * * *"')
    serve.add_argument("--results", type=Path, help=f"result store (default {DEFAULT_RESULTS})")
    serve.add_argument("--data-dir", type=Path, help="folder for run workspaces (default data)")
    serve.add_argument("--limit", type=int, help="at most this many runs at once")
    execution_options(serve)
    serve.add_argument("--verbose", action="store_true")
    serve.set_defaults(func=cmd_serve)

    submit = sub.add_parser("submit", help="start a run of the served run-study deployment")
    submit.add_argument("file")
    submit.add_argument("--results", type=Path, help="result store (default: the server's)")
    submit.add_argument("--data-dir", type=Path, help="workspaces (default: the server's)")
    execution_options(submit)
    submit.add_argument("--fresh", action="store_true", help="recompute everything")
    submit.add_argument("--wait", action="store_true", help="wait until the run finishes")
    submit.add_argument("--verbose", action="store_true")
    submit.set_defaults(func=cmd_submit)

    rank = sub.add_parser("rank", help="candidates that pass diagnostics, best evidence first")
    rank.add_argument("--study")
    rank.add_argument("--outcome")
    rank.add_argument("--estimator", help="e.g. iptw (default: every estimator)")
    rank.add_argument("--direction", choices=("protective", "harmful"))
    rank.add_argument("--top", type=int, help="at most N per study, outcome and estimator")
    rank.add_argument("--run", help="a run id (default: the latest run of each study)")
    rank.add_argument("--results", type=Path, default=Path(DEFAULT_RESULTS))
    rank.add_argument("--format", choices=("table", "csv", "json"), default="table")
    rank.add_argument("--verbose", action="store_true")
    rank.set_defaults(func=cmd_rank)

    account = sub.add_parser("account", help="every candidate of a screen: eligible new users, "
                                             "trials run/estimable/balanced, what became of it")
    account.add_argument("--study")
    account.add_argument("--run", help="a run id (default: the study's latest run)")
    account.add_argument("--outcome")
    account.add_argument("--estimator", help="default: the run's primary (iptw if run)")
    account.add_argument("--results", type=Path, default=Path(DEFAULT_RESULTS))
    account.add_argument("--format", choices=("table", "csv", "json"), default="table")
    account.add_argument("--verbose", action="store_true")
    account.set_defaults(func=cmd_account)

    export = sub.add_parser("export", help="write a table or view for sharing, small counts "
                                           "masked (.parquet, .csv or .json)")
    export.add_argument("what", choices=tuple(EXPORTS))
    export.add_argument("--out", required=True)
    export.add_argument("--study")
    export.add_argument("--results", type=Path, default=Path(DEFAULT_RESULTS))
    export.add_argument("--verbose", action="store_true")
    export.set_defaults(func=cmd_export)

    report = sub.add_parser("report", help="write a self-contained HTML report of a run")
    report.add_argument("--out", required=True, help="the .html file to write")
    report.add_argument("--run", help="a run id (default: the latest completed run)")
    report.add_argument("--results", type=Path, default=Path(DEFAULT_RESULTS))
    report.add_argument("--verbose", action="store_true")
    report.set_defaults(func=cmd_report)

    schema = sub.add_parser("schema", help="print the JSON Schema of the study file (for "
                                           "editor completion)")
    schema.set_defaults(func=cmd_schema)

    covariates = sub.add_parser("covariates", help="the catalogue of covariate analyses a "
                                                   "study builds: ids, windows, names")
    covariates.add_argument("file")
    covariates.add_argument("--format", choices=("table", "csv", "json"), default="table")
    covariates.add_argument("--verbose", action="store_true")
    covariates.set_defaults(func=cmd_covariates)

    tidy = sub.add_parser("clean", help="remove workspaces of completed or abandoned runs, "
                                        "stale locks and (optionally) old reports")
    tidy.add_argument("--data-dir", type=Path, default=Path("data"))
    tidy.add_argument("--results", type=Path, default=Path(DEFAULT_RESULTS))
    tidy.add_argument("--older-than", type=_days, default=7.0,
                      help="days after which an unfinished run's workspace counts as "
                           "abandoned (default 7)")
    tidy.add_argument("--reports-older-than", type=_days, default=None,
                      help="also remove reports older than this many days")
    tidy.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    tidy.add_argument("--verbose", action="store_true")
    tidy.set_defaults(func=cmd_clean)

    query = sub.add_parser("query", help="read-only SQL over the result store")
    query.add_argument("sql")
    query.add_argument("--results", type=Path, default=Path(DEFAULT_RESULTS))
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")
    query.add_argument("--timeout", type=_positive_seconds, default=60.0,
                       help="stop the query after this many seconds (default 60)")
    query.add_argument("--memory-limit", default="2GB",
                       help="DuckDB memory limit for the query (default 2GB)")
    query.add_argument("--verbose", action="store_true")
    query.set_defaults(func=cmd_query)
    return parser


GUARDED_COMMANDS = ("run", "demo", "serve", "report")  # the ones that start processes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and sys.argv[1:2] and sys.argv[1] in GUARDED_COMMANDS:
        from flows.guardian import guard_children

        guard_children()  # what it starts dies with it, even on SIGKILL
    try:
        return args.func(args)
    except INPUT_ERRORS as exc:
        print(f"cohortflow: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cohortflow: interrupted; nothing of this run was written", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one line unless --verbose
        if getattr(args, "verbose", False):
            raise
        print(f"cohortflow: failed: {type(exc).__name__}: {exc} (rerun with --verbose for "
              "details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
