"""Orchestration benchmark: `python -m bench.orchestration [--persons N] [--comparisons K]`.

A study of K comparisons (default 100) on the synthetic CDM (cohort/synthetic.py): new users of
each of the 4 study drugs and 60 noise ingredients, then of pairs of noise ingredients, each vs
the shared comparator, with 6 outcomes and 10 negative controls. Cohorts are prepared once; each
configuration then recomputes every comparison (the workspace's analyses are removed, so the
run resumes from the prepared cohorts; the HTML report stage is skipped unless --with-report)
and reports:
  - the flow's wall time and the summed work inside its tasks (measured in the task bodies);
  - the orchestration overhead: flow wall time minus the task work (with N workers, minus the
    other stages' work plus the analyses' work / N: the wall time of a perfect N-way split);
  - the analyse stage's speed-up over running every comparison in a plain loop (no Prefect).
Configurations: threads x1, threads x2, processes x2, a Dask cluster of 2 worker processes
started by the flow, and one started and warmed beforehand (`--dask-address`, long-lived).
Runs against a local Prefect server (started here unless PREFECT_API_URL is set).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

NOISE_INGREDIENTS = [2000000300 + i for i in range(60)]
STUDY_DRUGS = [2000000101, 2000000102, 2000000103, 2000000104]
COMPARATOR = 2000000100
OUTCOMES = [2000001001 + i for i in range(6)]
NEGATIVE_CONTROLS = [2000001201 + i for i in range(10)]
CONFIGURATIONS = [("threads1", "threads", 1), ("threads2", "threads", 2),
                  ("processes2", "processes", 2), ("dask2", "dask", 2),
                  ("dask2-warm", "dask", 2)]


def treatments(count: int) -> dict[str, list[int]]:
    """Concept-set name -> ingredient ids: single drugs first, then pairs of noise ingredients."""
    sets = {f"drug_{i + 1}": [c] for i, c in enumerate(STUDY_DRUGS)}
    sets |= {f"ingredient_{i + 1:02d}": [c] for i, c in enumerate(NOISE_INGREDIENTS)}
    pairs = [(a, b) for i, a in enumerate(NOISE_INGREDIENTS) for b in NOISE_INGREDIENTS[i + 1:]]
    for a, b in pairs:
        if len(sets) >= count:
            break
        sets[f"either_{a - 2000000299:02d}_{b - 2000000299:02d}"] = [a, b]
    return dict(list(sets.items())[:count])


def study_text(cdm: Path, count: int) -> str:
    """The benchmark's study file."""
    lines = ["study: orchestration_bench", f"source: {cdm}", "concept_sets:",
             f"  comparator_drug: {{include: [{COMPARATOR}]}}"]
    chosen = treatments(count)
    lines += [f"  {name}: {{include: {ids}}}" for name, ids in chosen.items()]
    lines += [f"  outcome_{i + 1}: {{include: [{c}]}}" for i, c in enumerate(OUTCOMES)]
    lines += [f"treatments: [{', '.join(chosen)}]", "comparator: {active: comparator_drug}",
              f"outcomes: [{', '.join(f'outcome_{i + 1}' for i in range(len(OUTCOMES)))}]",
              f"negative_controls: {NEGATIVE_CONTROLS}", "follow_up: {start_day: 1}",
              "estimators: [crude, iptw, ps_strata]"]
    return "\n".join(lines) + "\n"


class Stopwatch:
    """Wraps stage functions of flows.pipeline to add up the seconds spent inside them."""

    def __init__(self, module: object, names: tuple[str, ...]) -> None:
        self.seconds = dict.fromkeys(names, 0.0)
        for name in names:
            setattr(module, name, self._timed(name, getattr(module, name)))

    def _timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return wrapper

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=20_000)
    parser.add_argument("--comparisons", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/bench/orchestration"))
    parser.add_argument("--runners", nargs="*", default=None,
                        help="subset of threads1 threads2 processes2 dask2 dask2-warm")
    parser.add_argument("--with-report", action="store_true",
                        help="keep the HTML report stage in each flow (skipped by default: "
                             "it is serial plotting, the same for every runner)")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.runners import local_prefect_server

    server = nullcontext(os.environ.get("PREFECT_API_URL")) if os.environ.get(
        "PREFECT_API_URL") else local_prefect_server()
    with server as url:
        os.environ["PREFECT_API_URL"] = url
        run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> None:
    """Prepare once, then time the sequential loop and each task-runner configuration."""
    from threadpoolctl import threadpool_limits

    from cohort.synthetic import generate_demo_cdm
    from flows import pipeline
    from flows.config import load_study
    from flows.run_study import run_study

    out = args.out.resolve()
    cdm = out / f"cdm_{args.persons}_{args.seed}"
    if not (cdm / "person.parquet").exists():
        print(f"generating {args.persons:,} synthetic persons in {cdm}", flush=True)
        generate_demo_cdm(cdm, persons=args.persons, seed=args.seed)
    study_file = out / f"study_{args.comparisons}.yaml"
    study_file.write_text(study_text(cdm, args.comparisons))
    results, data = out / "results.duckdb", out / "data"
    paths = pipeline.new_run(load_study(study_file), results, data)
    workspace = str(paths.workspace)
    start = time.perf_counter()
    prepared = pipeline.prepare(str(study_file), workspace, resume=True)
    ids = prepared["comparison_ids"]
    print(f"{len(ids)} comparisons prepared in {time.perf_counter() - start:.1f} s "
          f"({'reused' if prepared['reused'] else 'built'}); {platform.machine()}, "
          f"{os.cpu_count()} cores", flush=True)

    def plain_loop() -> tuple[float, list[dict]]:
        shutil.rmtree(paths.workspace / "analysis", ignore_errors=True)
        start = time.perf_counter()
        with threadpool_limits(limits=1):
            summaries = [pipeline.analyze(str(study_file), workspace, cid) for cid in ids]
        return time.perf_counter() - start, summaries

    sequential, summaries = plain_loop()
    work = sum(s["seconds"] for s in summaries)
    sizes = sorted(s["n_persons"] for s in summaries)
    print(f"sequential plain loop: {sequential:.1f} s for {len(ids)} comparisons "
          f"(persons per comparison: median {sizes[len(sizes) // 2]:,}, max {sizes[-1]:,})",
          flush=True)

    if not args.with_report:
        pipeline.report = lambda results, run_id, data_dir: Path(data_dir) / "no-report.html"
    watch = Stopwatch(pipeline, ("prepare", "finalize", "report"))
    rows = [("sequential (plain loop, no Prefect)", sequential, work, sequential, 0.0)]
    for name, runner, workers in CONFIGURATIONS:
        if args.runners and name not in args.runners:
            continue
        shutil.rmtree(paths.workspace / "analysis", ignore_errors=True)
        watch.reset()
        with warm_cluster(workers) if name == "dask2-warm" else nullcontext() as address:
            start = time.perf_counter()
            run = run_study(str(study_file), str(results), str(data), show_progress=False,
                            runner=runner, workers=workers, dask_address=address)
            wall = time.perf_counter() - start
        timings = run["timings"]
        other = sum(watch.seconds.values())
        task_work = timings["analyze_work"] + other
        overhead = wall - (other + timings["analyze_work"] / workers)  # vs a perfect split
        label = f"{runner}, {workers} worker(s)" + (
            ", cluster started and warmed beforehand" if address else "")
        rows.append((label, wall, task_work, timings["analyze"], overhead))
        stages = ", ".join(f"{k} {v:.1f}" for k, v in watch.seconds.items())
        print(f"{name}: flow {wall:.1f} s, task work {task_work:.1f} s "
              f"(analyses {timings['analyze_work']:.1f}; {stages}), analyse stage "
              f"{timings['analyze']:.1f} s, {timings['worker_processes']} worker process(es)",
              flush=True)

    again, summaries = plain_loop()   # the VM's speed drifts: the faster of two loops counts
    print(f"sequential plain loop again: {again:.1f} s", flush=True)
    if again < sequential:
        sequential, work = again, sum(s["seconds"] for s in summaries)
    rows[0] = ("sequential (plain loop, no Prefect; faster of 2)", sequential, work, sequential,
               0.0)
    print("\n| configuration | flow wall s | task work s (sum) | analyse stage s | speed-up of "
          "the analyse stage vs sequential | overhead s: wall - (work / workers) |")
    print("|---|---|---|---|---|---|")
    for label, wall, task_work, stage, overhead in rows:
        print(f"| {label} | {wall:.1f} | {task_work:.1f} | {stage:.1f} | "
              f"{sequential / stage:.2f}x | {overhead:.1f} ({overhead / wall:.0%}) |")


@contextmanager
def warm_cluster(workers: int) -> Iterator[str]:
    """A local Dask cluster whose workers already imported the analysis code; yields its address."""
    from distributed import Client, LocalCluster

    from flows.runners import PINNED_THREADS, keep_malloc_defaults

    os.environ.update(PINNED_THREADS)
    keep_malloc_defaults()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(_warm)
        yield cluster.scheduler_address


def _warm() -> None:
    """Import what an analysis task needs (run in each Dask worker)."""
    import flows.run_study  # noqa: F401


if __name__ == "__main__":
    main()
