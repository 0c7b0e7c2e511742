"""Benchmark: a drug-repurposing screen as batteries of emulated trials, end to end at scale.

`python -m bench.screen [--persons 1000000] [--random 10] [--same-class 10] [--max-ratio 3]
[--estimators crude iptw] [--selection likelihood|balance]` generates (once, cached under
data/bench/) the national-scale CDM of `bench.scale_cdm` (100 candidate drugs in 9 ATC-like
classes), then runs `cohortflow run` in a measured child process on a screen of those
candidates (the noise ingredients and the shared comparator excluded by their class): each
candidate against `random` drugs drawn from the other candidates and `same_class` drugs of its
class, `max_ratio` comparator persons per treated person (Zang et al.: 3), 20 outcomes + 50
negative controls. It reports the stage breakdown and the process tree's peak memory (the same
measurement as bench.speed) and appends the record to data/bench/screen.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from bench.scale_cdm import CONDITION_BASE, NOISE_GROUP_ID

NAME = "screen_battery"


def screen_study_text(cdm: Path, name: str, concepts: dict, *, random: int, same_class: int,
                      max_ratio: float | None, estimators: list[str], selection: str,
                      workers: int, memory_limit: str | None, threads: int | None,
                      temp_directory: Path) -> str:
    """The benchmark's screen study: the candidates of the scale CDM, a comparator battery,
    a disease cohort on the commonest condition, 365 days of history, ages 18+."""
    sets = [("disease", CONDITION_BASE), *concepts["outcomes"], *concepts["negative_controls"]]
    execution = [f"runner: threads, workers: {workers}",
                 f"temp_directory: {json.dumps(str(temp_directory))}"]
    execution += [f"memory_limit: {memory_limit}"] if memory_limit else []
    execution += [f"threads: {threads}"] if threads else []
    ratio = f", max_ratio: {max_ratio:g}" if max_ratio else ""
    lines = [
        f"study: {name}",
        f"description: bench.screen on {json.dumps(str(cdm.name))}",
        f"source: {json.dumps(str(cdm))}",
        "concept_sets:",
        *[f"  {set_name}: {{include: [{cid}]}}" for set_name, cid in sets],
        "exposure_table: drug_era",
        f"treatments: {{screen: {{min_new_users: 100, exclude: [{NOISE_GROUP_ID}]}}}}",
        f"comparator: {{battery: {{random: {random}, same_class: {same_class}, atc_level: 2}}"
        f"{ratio}}}",
        "population: {prior_observation_days: 365, washout_days: 365, min_age: 18, "
        "disease: {concept_set: disease, window: [0, null]}, both_arms: treated}",
        f"outcomes: [{', '.join(n for n, _ in concepts['outcomes'])}]",
        f"negative_controls: [{', '.join(n for n, _ in concepts['negative_controls'])}]",
        "follow_up: {start_day: 1, exclude_prior_outcome: true}",
        "covariates: {windows: [[-365, -1], [-30, -1]], domains: [condition, drug, procedure, "
        "measurement, demographics], min_prevalence: 0.01}",
        f"propensity: {{selection: {selection}}}",
        f"estimators: [{', '.join(estimators)}]",
        "diagnostics: {max_share_imbalanced: 0.02, min_balanced_rate: 0.1}",
        f"execution: {{{', '.join(execution)}}}",
    ]
    return "\n".join(lines) + "\n"


def run(persons: int, *, random: int = 10, same_class: int = 10, max_ratio: float | None = 3,
        estimators: tuple[str, ...] = ("crude", "iptw"), selection: str = "likelihood",
        workers: int = 2, memory_limit: str | None = "4GB", threads: int | None = 2,
        seed: int = 0, out: Path = Path("data/bench"), keep: bool = False) -> dict:
    """Measure one screen end to end; return its record (also appended to screen.jsonl)."""
    from bench.cohorts import git_commit
    from bench.speed import (
        _announce,
        _loadavg,
        measure_study,
        prepare_cdm,
        study_concepts,
        warm_prefect,
    )

    out = Path(out).resolve()
    work = out / "screen"
    work.mkdir(parents=True, exist_ok=True)
    prefect_home = work / "prefect"
    warm = warm_prefect(prefect_home)
    cdm, info, generated = prepare_cdm(out, persons, seed)
    name = f"{NAME}_p{persons}"
    study_file = work / f"{name}.yaml"
    study_file.write_text(screen_study_text(
        cdm, name, study_concepts(), random=random, same_class=same_class,
        max_ratio=max_ratio, estimators=list(estimators), selection=selection, workers=workers,
        memory_limit=memory_limit, threads=threads, temp_directory=work / "duckdb_tmp"))
    load_start = _loadavg()
    with _announce(f"cohortflow run {study_file.name}: {persons:,} persons"):
        measured = measure_study(study_file, name, out=work, workers=workers,
                                 prefect_home=prefect_home, keep=keep)
    record = {
        "benchmark": "screen", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(), "machine": platform.machine(), "cores": os.cpu_count(),
        "persons": persons, "random": random, "same_class": same_class, "max_ratio": max_ratio,
        "estimators": list(estimators), "selection": selection, "workers": workers,
        "memory_limit": memory_limit, "prefect_warm_up_seconds": warm,
        "cdm_generated_now": generated, "cdm_mb": round(info["bytes"] / 2**20),
        "loadavg_start": load_start, "loadavg_end": _loadavg(), **measured,
    }
    with open(out / "screen.jsonl", "a") as log:
        log.write(json.dumps(record, default=str) + "\n")
    print(summary(record), flush=True)
    return record


def summary(record: dict) -> str:
    """One paragraph: trials, wall time to the store and in all, peak memory, the stages."""
    child, run_record = record["child"], record["run"]
    stages = ", ".join(f"{s['stage']} {s['wall_seconds']:.0f} s" for s in record["stages"]
                       if (s.get("wall_seconds") or 0) >= 1)
    return (f"screen at {record['persons']:,} persons: {run_record.get('n_comparisons')} "
            f"trials, {run_record.get('n_estimates')} estimates; whole run "
            f"{child['child_wall_seconds']:.0f} s, to the store {child['to_store_seconds']:.0f} "
            f"s; peak memory {child['peak_rss_bound_mb']:,} MB (stages: {stages})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=1_000_000)
    parser.add_argument("--random", type=int, default=10)
    parser.add_argument("--same-class", type=int, default=10)
    parser.add_argument("--max-ratio", type=float, default=3.0)
    parser.add_argument("--estimators", nargs="+", default=["crude", "iptw"])
    parser.add_argument("--selection", choices=("likelihood", "balance"), default="likelihood")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="4GB")
    parser.add_argument("--out", type=Path, default=Path("data/bench"))
    parser.add_argument("--keep", action="store_true", help="keep the run's workspace")
    args = parser.parse_args()
    run(args.persons, random=args.random, same_class=args.same_class,
        max_ratio=args.max_ratio or None, estimators=tuple(args.estimators),
        selection=args.selection, workers=args.workers, memory_limit=args.memory_limit,
        out=args.out, keep=args.keep)


if __name__ == "__main__":
    main()
