"""Cohort-engine benchmark: `python -m bench.cohorts [--persons N] [--candidates K] ...`.

On the national-scale synthetic CDM (bench/scale_cdm.py: 1,000,000 persons and ~60M drug and
condition records by default, cached under data/bench/), builds a CohortDesign directly: K
candidate drugs (default 100, spread over the candidates' sizes) each vs one shared
comparator, 20 outcomes + 50 negative controls, covariates in windows (-365, -1) and (-30, -1)
over conditions, drugs, procedures, measurements and demographics (~7,000 concepts),
min_prevalence 0.001. It then runs `cohort.prepare.prepare_study` (cohorts and attrition,
outcome times, covariates, workspace Parquet) in a fresh child process with DuckDB's memory
limit, threads and temp directory as given, and reports:
  - the wall time of prepare_study and of the whole child (start-up, opening the source,
    counting), and prepare_study's own per-stage seconds;
  - peak resident memory from the kernel's high-water mark (VmHWM / wait4's ru_maxrss: all of
    the process, DuckDB's native buffers included): per stage (Linux: the mark is reset at
    each stage boundary through /proc/self/clear_refs, which also resets what wait4 reports,
    so the whole peak is the maximum over the segments), up to the end of prepare_study (the
    target's figure, `peak_rss_mb`) and for the whole child including our counting
    (`child_peak_rss_mb`); with DuckDB's own buffer memory and spilled bytes per boundary;
  - row counts from the workspace: cohort rows, covariate rows, outcome rows, comparisons,
    distinct covariate ids (covariates stored per comparison, or once per cohort entry with
    an entry_id on each cohort row: then counted by the rules applied when a comparison loads);
  - the generator's time (measured when the CDM was generated, also for a cached one).
Prints a table and appends one JSON line to data/bench/cohorts.jsonl.
Target (issue): 1M persons x 100 candidates x 70 outcomes in <= 60 s wall on 2 cores, <= 6 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGES = ("concept_sets", "cohorts", "outcomes", "covariates", "write_workspace")
WINDOWS = ((-365, -1), (-30, -1))
DOMAINS = ("condition", "drug", "procedure", "measurement", "demographics")
TARGET_SECONDS, TARGET_GB = 60.0, 6.0
COMPARATOR = "comparator"


def chosen_candidates(count: int) -> list[int]:
    """`count` candidate concept ids spread evenly over the generator's sizes (all for 100)."""
    from bench.scale_cdm import CANDIDATE_IDS

    if not 1 <= count <= len(CANDIDATE_IDS):
        raise ValueError(f"candidates must be 1..{len(CANDIDATE_IDS)}")
    if count == 1:
        return [CANDIDATE_IDS[-1]]
    last = len(CANDIDATE_IDS) - 1
    return [CANDIDATE_IDS[round(i * last / (count - 1))] for i in range(count)]


def bench_design(candidates: int = 100, domains: tuple[str, ...] = DOMAINS):
    """The benchmark's CohortDesign: candidates vs the comparator, 20 outcomes + 50 controls."""
    from bench.scale_cdm import COMPARATOR_ID, NEGATIVE_CONTROL_IDS, OUTCOME_IDS, concept_name
    from cohort.design import CohortDesign, ConceptSetDef, OutcomeDef

    treatments = [concept_name(cid) for cid in chosen_candidates(candidates)]
    ids = {concept_name(cid): cid for cid in (
        COMPARATOR_ID, *chosen_candidates(candidates), *OUTCOME_IDS, *NEGATIVE_CONTROL_IDS)}
    outcomes = [OutcomeDef(concept_name(c), "outcome") for c in OUTCOME_IDS]
    outcomes += [OutcomeDef(concept_name(c), "negative_control") for c in NEGATIVE_CONTROL_IDS]
    return CohortDesign(
        concept_sets={name: ConceptSetDef(name, (cid,)) for name, cid in ids.items()},
        exposure_table="drug_era",
        comparisons=tuple((t, COMPARATOR) for t in treatments),
        prior_observation_days=365, washout_days=365, min_age=18,
        outcomes=tuple(outcomes), risk_start_day=1, risk_end_day=None,
        exclude_prior_outcome=True, covariate_windows=WINDOWS, covariate_domains=domains,
        min_prevalence=0.001,
    )


# ----------------------------------------------------------------------------- memory probes
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StageProbe:
    """Per-stage peak RSS and DuckDB memory, at the boundaries prepare_study laps at.

    prepare_study laps concept_sets just before build_cohorts, cohorts before build_outcomes,
    outcomes before build_covariates and covariates right after it, so wrapping those three
    functions (looked up in cohort.prepare's globals) marks the same boundaries.
    """

    def __init__(self, con) -> None:
        self.con = con
        hwm = _status_kb("VmHWM")
        self.before_mb = round(hwm / 1024) if hwm else None  # start-up and opening the source
        self.resettable = _reset_peak()
        self.stages: dict[str, dict] = {}

    def peak_mb(self) -> int | None:
        """The peak so far over every segment: resets also clear what wait4 reports later."""
        peaks = [self.before_mb] + [s["peak_rss_mb"] for s in self.stages.values()]
        peaks = [p for p in peaks if p is not None]
        return max(peaks) if peaks else None

    def mark(self, stage: str) -> None:
        entry: dict = {"peak_rss_mb": None}
        if self.resettable:
            hwm = _status_kb("VmHWM")
            entry["peak_rss_mb"] = round(hwm / 1024) if hwm else None
        entry["rss_mb_after"] = round((_status_kb("VmRSS") or 0) / 1024)
        try:
            memory = self.con.execute(
                "SELECT sum(memory_usage_bytes), sum(temporary_storage_bytes) "
                "FROM duckdb_memory()").fetchall()[0]
            entry["duckdb_memory_mb"] = round((memory[0] or 0) / 2**20)
            entry["duckdb_temp_mb"] = round((memory[1] or 0) / 2**20)
        except Exception:
            pass
        self.stages[stage] = entry
        _reset_peak()

    @contextmanager
    def installed(self, module) -> Iterator[None]:
        """Wrap the boundary functions in `module` (cohort.prepare); restore them on exit."""
        originals = {}

        def wrap(name: str, before: str | None, after: str | None) -> None:
            fn = getattr(module, name, None)
            if fn is None:  # renamed: that boundary merges into the next stage
                return
            originals[name] = fn

            def wrapper(*args, **kwargs):
                if before:
                    self.mark(before)
                result = fn(*args, **kwargs)
                if after:
                    self.mark(after)
                return result
            setattr(module, name, wrapper)

        wrap("build_cohorts", "concept_sets", None)
        wrap("build_outcomes", "cohorts", None)
        wrap("build_covariates", "outcomes", "covariates")
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(module, name, fn)


# ----------------------------------------------------------------------------- child
def run_prepare(cdm: Path, workspace: Path, *, candidates: int = 100,
                memory_limit: str | None = None, threads: int | None = None,
                temp_directory: str | None = None, domains: tuple[str, ...] = DOMAINS) -> dict:
    """Open the CDM, prepare the benchmark design into `workspace`; seconds, memory, counts."""
    from cohort import prepare
    from cohort.source import open_source

    started = time.perf_counter()
    design = bench_design(candidates, domains)
    source = open_source(cdm, memory_limit=memory_limit, threads=threads,
                         temp_directory=temp_directory)
    opened = time.perf_counter()
    probe = StageProbe(source.con)
    try:
        with probe.installed(prepare):
            prepared = prepare.prepare_study(source, design, workspace)
        finished = time.perf_counter()
        probe.mark("write_workspace")
        prepare_peak = probe.peak_mb()  # start-up and every stage; counting comes after
        counts = workspace_counts(source.con, workspace, prepared)
        settings = dict(source.con.execute(
            "SELECT name, value FROM duckdb_settings() "
            "WHERE name IN ('memory_limit', 'threads', 'temp_directory')").fetchall())
    finally:
        source.close()
    return {
        "prepare_seconds": round(finished - opened, 3),
        "open_seconds": round(opened - started, 3),
        "stages": prepared.seconds,
        "stage_memory": probe.stages,
        "prepare_peak_rss_mb": prepare_peak,
        "probe_peak_rss_mb": probe.peak_mb(),
        "counts": counts,
        "duckdb_settings": settings,
        "warnings": prepared.warnings,
    }


def workspace_counts(con, workspace: Path, prepared) -> dict:
    """Rows the workspace holds (read back from its Parquet, not from temp tables)."""
    import pandas as pd

    def parquet(folder: str) -> str:
        return str(workspace / folder / "**" / "*.parquet").replace("'", "''")

    cohort = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE treated), count(DISTINCT person_id) "
        f"FROM read_parquet('{parquet('cohort')}', hive_partitioning = true)").fetchall()[0]
    if (workspace / "covariate").is_dir():  # per-comparison rows
        rows = f"read_parquet('{parquet('covariate')}', hive_partitioning = true)"
        layout = "comparison"
    else:  # covariates once per entry (proposed layout): the rows each comparison loads
        rows = f"({entry_level_rows(workspace, parquet('cohort'))})"
        layout = "entry"
    covariate = con.execute(
        f"SELECT count(*), count(DISTINCT covariate_id), count(DISTINCT comparison_id) "
        f"FROM {rows}").fetchall()[0]
    outcome = con.execute(
        f"SELECT count(*), count(event_time), count(*) FILTER (WHERE prior_outcome), "
        f"count(DISTINCT outcome_id) "
        f"FROM read_parquet('{parquet('outcome_time')}', hive_partitioning = true)"
    ).fetchall()[0]
    comparisons = prepared.comparisons
    both = comparisons[(comparisons["n_treated"] > 0) & (comparisons["n_comparator"] > 0)]
    roles = prepared.outcomes["role"].value_counts().to_dict()
    return {
        "comparisons": len(comparisons),
        "comparisons_with_both_arms": len(both),
        "cohort_rows": cohort[0], "cohort_treated_rows": cohort[1],
        "cohort_distinct_persons": cohort[2],
        "treated_per_comparison": {
            "min": int(comparisons["n_treated"].min()),
            "median": int(comparisons["n_treated"].median()),
            "max": int(comparisons["n_treated"].max())},
        "comparator_per_comparison_max": int(comparisons["n_comparator"].max()),
        "covariate_layout": layout,
        "covariate_rows": covariate[0], "distinct_covariate_ids": covariate[1],
        "covariate_ref_rows": len(pd.read_parquet(workspace / "covariate_ref.parquet")),
        "comparisons_with_covariates": covariate[2],
        "outcome_rows": outcome[0], "outcome_events": outcome[1],
        "outcome_prior_rows": outcome[2], "outcomes_with_rows": outcome[3],
        "outcomes": len(prepared.outcomes),
        "outcome_roles": {str(k): int(v) for k, v in roles.items()},
        "attrition_rows": len(prepared.attrition),
    }


def entry_level_rows(workspace: Path, cohort_glob: str) -> str:
    """SQL for (comparison_id, row_id, covariate_id) from a workspace that stores covariates
    once per entry: the rows' entries, less arm concepts, less rare covariates per comparison
    (the rules cohort.comparison_data applies when it loads a comparison)."""
    meta = json.loads((workspace / "prepared.json").read_text())
    floor = float(meta.get("covariate_min_prevalence", 0.0))
    entries = str(workspace / "entry_covariate.parquet").replace("'", "''")
    excluded = str(workspace / "arm_exclusion.parquet").replace("'", "''")
    return f"""
        WITH expanded AS (
            SELECT h.comparison_id, h.row_id, e.covariate_id
            FROM read_parquet('{cohort_glob}', hive_partitioning = true) h
            JOIN read_parquet('{entries}') e USING (entry_id)
            WHERE e.covariate_id % 1000 >= 900 OR NOT EXISTS (
                SELECT 1 FROM read_parquet('{excluded}') x
                WHERE x.comparison_id = h.comparison_id
                  AND x.concept_id = e.covariate_id // 1000)
        ), size AS (
            SELECT comparison_id, count(*) AS n
            FROM read_parquet('{cohort_glob}', hive_partitioning = true) GROUP BY ALL
        ), kept AS (
            SELECT comparison_id, covariate_id FROM expanded JOIN size USING (comparison_id)
            GROUP BY comparison_id, covariate_id, n
            HAVING count(*) >= greatest(1, {floor!r} * n)
        )
        SELECT comparison_id, row_id, covariate_id FROM expanded
        SEMI JOIN kept USING (comparison_id, covariate_id)"""


def child_main(spec: str) -> None:
    """Entry point of the measured child: spec is JSON; writes the result JSON to spec.out."""
    args = json.loads(spec)
    result = run_prepare(
        Path(args["cdm"]), Path(args["workspace"]), candidates=args["candidates"],
        memory_limit=args["memory_limit"], threads=args["threads"],
        temp_directory=args["temp_directory"], domains=tuple(args["domains"]),
    )
    Path(args["out"]).write_text(json.dumps(result, default=int))


# ----------------------------------------------------------------------------- parent
def measure(cdm: Path, workspace: Path, *, candidates: int, memory_limit: str | None,
            threads: int | None, temp_directory: str | None,
            domains: tuple[str, ...] = DOMAINS) -> dict:
    """Run run_prepare in a fresh child; add its wall time and peak RSS (wait4 rusage)."""
    result_file = workspace.with_name(workspace.name + ".result.json")
    result_file.unlink(missing_ok=True)
    spec = json.dumps({"cdm": str(cdm), "workspace": str(workspace), "candidates": candidates,
                       "memory_limit": memory_limit, "threads": threads,
                       "temp_directory": temp_directory, "domains": list(domains),
                       "out": str(result_file)})
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "bench.cohorts", "--child", spec],
                             cwd=root, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"benchmark child failed (exit {child.returncode})")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    result["child_wall_seconds"] = round(wall, 3)
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    # The child resets its high-water mark at stage boundaries (which also resets what the
    # kernel reports to wait4), so the true peak is the larger of the last segment's (wait4)
    # and every earlier segment's (measured in the child).
    result["last_segment_rss_mb"] = round(usage.ru_maxrss * scale / 2**20)
    result["child_peak_rss_mb"] = max(filter(None, [result["last_segment_rss_mb"],
                                                    result.get("probe_peak_rss_mb")]))
    # the target's figure: the peak up to the end of prepare_study (without our counting);
    # where stage probes are unavailable, the whole child's
    result["peak_rss_mb"] = result.get("prepare_peak_rss_mb") or result["child_peak_rss_mb"]
    result["child_cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 2)
    return result


def report(record: dict) -> str:
    """The human-readable table of one benchmark record."""
    counts, stages = record["counts"], record["stages"]
    memory = record.get("stage_memory", {})
    lines = [
        f"cohort engine: {record['persons']:,} persons, {counts['comparisons']} comparisons x "
        f"{counts['outcomes']} outcomes; DuckDB memory_limit={record['memory_limit']}, "
        f"threads={record['threads']}; {record['cores']} cores",
        f"generator: {record['generator_seconds']:.1f} s "
        f"({'generated now' if record['generated_now'] else 'cached'}; "
        f"{record['generator_rows_million']:.1f}M drug+condition rows, "
        f"{record['cdm_mb']:,} MB Parquet)",
        "",
        "| stage | seconds | peak RSS in stage (MB) | DuckDB memory after (MB) | spilled (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in [*STAGES, *(s for s in stages if s not in STAGES)]:
        if stage not in stages:
            continue
        m = memory.get(stage, {})
        lines.append(f"| {stage} | {stages[stage]:.2f} | {m.get('peak_rss_mb', '')} | "
                     f"{m.get('duckdb_memory_mb', '')} | {m.get('duckdb_temp_mb', '')} |")
    verdict = ("meets" if record["prepare_seconds"] <= TARGET_SECONDS
               and record["peak_rss_mb"] <= TARGET_GB * 1024 else "misses")
    lines += [
        f"| **prepare_study** | **{record['prepare_seconds']:.2f}** | "
        f"**{record['peak_rss_mb']:,}** | | |",
        "",
        f"prepare_study: {record['prepare_seconds']:.1f} s wall, peak RSS "
        f"{record['peak_rss_mb']:,} MB; {verdict} the target "
        f"({TARGET_SECONDS:.0f} s, {TARGET_GB:.0f} GB) at this size; child process (with "
        f"start-up, opening the source {record['open_seconds']:.2f} s, and counting the "
        f"workspace): {record['child_wall_seconds']:.1f} s wall, "
        f"{record['child_cpu_seconds']:.1f} s CPU, peak RSS {record['child_peak_rss_mb']:,} MB; "
        f"load average {record['loadavg_before'][0]} before, {record['loadavg_after'][0]} after",
        f"counts: cohort rows {counts['cohort_rows']:,} ({counts['cohort_treated_rows']:,} "
        f"treated; {counts['cohort_distinct_persons']:,} persons), comparisons "
        f"{counts['comparisons']} ({counts['comparisons_with_both_arms']} with both arms; "
        f"treated per comparison {counts['treated_per_comparison']['min']:,}-"
        f"{counts['treated_per_comparison']['max']:,}, median "
        f"{counts['treated_per_comparison']['median']:,}), covariate rows "
        f"{counts['covariate_rows']:,}, distinct covariate ids "
        f"{counts['distinct_covariate_ids']:,}, outcome rows {counts['outcome_rows']:,} "
        f"({counts['outcome_events']:,} events, {counts['outcome_prior_rows']:,} prior), "
        f"attrition rows {counts['attrition_rows']:,}",
    ]
    return "\n".join(lines)


def engine_sha() -> str:
    """Hash of the cohort package's sources measured (the working tree may differ from HEAD)."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted((Path(__file__).resolve().parent.parent / "cohort").glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=1_000_000)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit", default="4GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temp-directory", default=None,
                        help="DuckDB spill directory (default: <out>/duckdb_tmp)")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    parser.add_argument("--out", type=Path, default=Path("data/bench"),
                        help="where the CDM cache, workspace and cohorts.jsonl live")
    parser.add_argument("--keep", action="store_true", help="keep the prepared workspace")
    parser.add_argument("--label", default="", help="free text stored with the record "
                        "(e.g. which experimental change was measured)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return None

    from bench.scale_cdm import cached_cdm

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    temp_directory = args.temp_directory or str(out / "duckdb_tmp")
    print(f"CDM: {args.persons:,} persons, seed {args.seed} ...", flush=True)
    cdm, info, generated = cached_cdm(out, persons=args.persons, seed=args.seed,
                                      threads=args.threads)
    print(f"CDM {'generated' if generated else 'cached'} in {cdm} "
          f"(generator: {info['seconds']:.1f} s)", flush=True)
    workspace = out / f"workspace_cohorts_p{args.persons}_k{args.candidates}"
    load_before = [round(x, 2) for x in os.getloadavg()]  # the machine may be shared
    result = measure(cdm, workspace, candidates=args.candidates,
                     memory_limit=args.memory_limit, threads=args.threads,
                     temp_directory=temp_directory, domains=tuple(args.domains))
    workspace_mb = round(sum(f.stat().st_size for f in workspace.rglob("*") if f.is_file())
                         / 2**20)
    if not args.keep:
        shutil.rmtree(workspace, ignore_errors=True)
    rows = info["rows"]
    record = {
        "benchmark": "cohorts", "label": args.label,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(), "cohort_sources_sha": engine_sha(),
        "persons": args.persons, "candidates": args.candidates,
        "seed": args.seed, "memory_limit": args.memory_limit, "threads": args.threads,
        "temp_directory": temp_directory, "domains": list(args.domains),
        "cores": os.cpu_count(), "machine": platform.machine(),
        "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "duckdb": info["duckdb_version"],
        "generator_version": info["generator_version"], "generated_now": generated,
        "generator_seconds": info["seconds"], "cdm_rows": rows,
        "generator_rows_million": (rows["condition_occurrence"] + rows["drug_era"]) / 1e6,
        "cdm_mb": round(info["bytes"] / 2**20), "workspace_mb": workspace_mb,
        **result,
    }
    print(report(record), flush=True)
    with (out / "cohorts.jsonl").open("a") as fh:
        fh.write(json.dumps(record, default=int) + "\n")
    return record


if __name__ == "__main__":
    main()
