"""End-to-end speed benchmark with a naive baseline (issue #7): `python -m bench.speed
[--persons 1000000] [--scaling 100000 300000 1000000] [--baseline-persons 20000]
[--baseline-pairs 300]`.

What it measures, on the national-scale synthetic CDM (bench/scale_cdm.py, cached under
data/bench/; ~60 drug and condition records per person): a study of the 100 candidate drugs,
each vs the shared comparator, x (20 outcomes + 50 negative controls) x every estimator in
`flows.config.SUPPORTED_ESTIMATORS` (read at run time), written as a study file under
data/bench/speed/ with the source's concept ids.

1. End to end, through the product path: `cohortflow run FILE --runner threads --workers 2
   --fresh --quiet` (the CLI's own `main`, so validation, preflight, the Prefect flow with its
   ephemeral server, cohort preparation, the comparison tasks on the flow's thread pool,
   finalisation with calibration, the store write, the HTML report and the artifacts all
   count), in a fresh child process so its peak memory includes DuckDB's native buffers. Why
   the CLI rather than pipeline.prepare/analyze/finalize on a pool of our own: the issue asks
   what a user waits for, and the flow's overhead (Prefect start ~10 s, task submission)
   belongs to that. The child wraps stage functions with timers (flows.pipeline,
   estimators.comparison; nothing is changed but the clock) and marks the stage boundaries for
   memory with bench.cohorts.StageProbe. Stage seconds come from the run record
   (`runs.timings`: prepare, prepare_stages, analyze, analyze_work) where it has them and from
   those timers where it does not (the report lists which is which). Peak memory: the child's
   own high-water mark (VmHWM per stage, wait4 for the last segment: exact) plus the peak of
   its child processes (Prefect's ephemeral server), sampled every 0.25 s; the target is
   judged on their sum, an upper bound of the whole tree's peak.
2. The naive baseline (bench/baseline.py: per treatment-outcome pair pandas reads, a pandas
   new-user cohort, a pandas crosstab of covariates, scikit-learn's LogisticRegressionCV and
   lifelines' weighted Cox) on a smaller CDM, in the same run, next to a cohortflow run of the
   same study on that CDM whose covariates are defined as the baseline's (conditions and
   drugs in [-365, -1] plus demographics: the same definitions, so the estimates can agree).
   The baseline analyses `--baseline-pairs` pairs spread over the candidates' sizes and the
   outcomes; its mean seconds per pair times the study's pairs is its time for the study
   (every pair needs the same steps). Reported: both times, their ratio, and the agreement of
   the estimates (crude and IPTW log HR) and of the counts on every pair both estimated.
3. A scaling table over the `--scaling` sizes (the end-to-end measure at each).

Every measured run records the load average before and after and sampled during it (other
jobs share this 2-core VM). Appends one JSON line per invocation to data/bench/speed.jsonl and
writes the Markdown tables (for bench/RESULTS.md) to data/bench/speed.md.
Targets (issue #7): 1M persons end to end in <= 5 minutes and <= 8 GB on 2 cores; >= 20x faster
than the baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.baseline import Pair, Rules, spread_pairs

TARGET_SECONDS, TARGET_GB, TARGET_SPEEDUP = 300.0, 8.0, 20.0
ROOT = Path(__file__).resolve().parent.parent
FULL_COVARIATES = {"windows": [[-365, -1], [-30, -1]],
                   "domains": ["condition", "drug", "procedure", "measurement", "demographics"]}
BASELINE_DOMAINS = ["condition", "drug", "demographics"]  # + Rules.covariate_window
SAMPLE_SECONDS = 0.25
PREPARE_STAGES = ("concept_sets", "screen", "cohorts", "outcomes", "covariates", "write_workspace")
# (module, function): timed in the measured child (summed over calls and worker threads)
TIMED = (
    ("flows.pipeline", "preflight"), ("flows.pipeline", "source_fingerprint"),
    ("flows.pipeline", "prepare"), ("flows.pipeline", "analyze"),
    ("flows.pipeline", "load_comparison"), ("flows.pipeline", "analyze_comparison"),
    ("flows.pipeline", "finalize"), ("flows.pipeline", "_gather"),
    ("flows.pipeline", "assemble_evidence"), ("flows.pipeline", "write_run"),
    ("flows.pipeline", "report"), ("flows.run_study", "_publish_artifacts"),
    ("estimators.comparison", "fit_propensity"), ("estimators.comparison", "_adjust"),
    ("estimators.comparison", "covariate_balance"), ("estimators.comparison", "_estimate"),
    ("estimators.comparison", "_survival_curves"),
)


# ----------------------------------------------------------------------------- study files
def study_concepts(candidates: int = 100, outcomes: int = 20,
                   negative_controls: int = 50) -> dict[str, list[tuple[str, int]]]:
    """(name, concept id) of the study's drugs and outcomes: all 100 candidates by default
    (fewer: the largest ones, so a tiny CDM still has users), the commonest outcomes and
    negative controls first."""
    from bench.scale_cdm import (
        CANDIDATE_IDS,
        COMPARATOR_ID,
        NEGATIVE_CONTROL_IDS,
        OUTCOME_IDS,
        concept_name,
    )

    def named(ids) -> list[tuple[str, int]]:
        return [(concept_name(cid), cid) for cid in ids]

    return {"comparator": named([COMPARATOR_ID]),
            "treatments": named(CANDIDATE_IDS[len(CANDIDATE_IDS) - candidates:]),
            "outcomes": named(OUTCOME_IDS[:outcomes]),
            "negative_controls": named(NEGATIVE_CONTROL_IDS[:negative_controls])}


def study_text(cdm: Path, name: str, concepts: dict, *, covariates: dict, rules: Rules,
               estimators: list[str], workers: int, memory_limit: str | None,
               duckdb_threads: int | None, temp_directory: Path | None) -> str:
    """The benchmark's study file: the scale CDM's concept ids, the design of `rules`."""
    (comparator, comparator_id), = concepts["comparator"]
    sets = [(comparator, comparator_id), *concepts["treatments"], *concepts["outcomes"],
            *concepts["negative_controls"]]
    execution = [f"runner: threads, workers: {workers}"]
    if memory_limit:
        execution.append(f"memory_limit: {memory_limit}")
    if duckdb_threads:
        execution.append(f"threads: {duckdb_threads}")
    if temp_directory:
        execution.append(f"temp_directory: {json.dumps(str(temp_directory))}")
    lines = [
        f"study: {name}",
        f"description: bench.speed on {json.dumps(str(cdm.name))}",
        f"source: {json.dumps(str(cdm))}",
        "concept_sets:",
        *[f"  {set_name}: {{include: [{cid}]}}" for set_name, cid in sets],
        "exposure_table: drug_era",
        f"treatments: [{', '.join(n for n, _ in concepts['treatments'])}]",
        f"comparator: {{active: {comparator}}}",
        f"population: {{prior_observation_days: {rules.prior_observation_days}, "
        f"washout_days: {rules.washout_days}, min_age: {rules.min_age}}}",
        f"outcomes: [{', '.join(n for n, _ in concepts['outcomes'])}]",
        f"negative_controls: [{', '.join(n for n, _ in concepts['negative_controls'])}]",
        f"follow_up: {{start_day: {rules.start_day}, exclude_prior_outcome: true}}",
        f"covariates: {{windows: {covariates['windows']}, "
        f"domains: [{', '.join(covariates['domains'])}], "
        f"min_prevalence: {rules.min_prevalence}}}",
        f"estimators: [{', '.join(estimators)}]",
        f"execution: {{{', '.join(execution)}}}",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- measured child
class Timers:
    """Seconds spent inside wrapped functions, summed over calls and threads (thread-safe),
    with the first start and last end of each (seconds since the child started)."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.lock = threading.Lock()
        self.stats: dict[str, dict] = {}
        self.missing: list[str] = []

    def wrap(self, module: object, name: str, before: Callable[[], None] | None = None,
             after: Callable[[], None] | None = None) -> None:
        fn = getattr(module, name, None)
        label = f"{module.__name__}.{name}"
        if fn is None:  # renamed by later code: reported as not measured
            self.missing.append(label)
            return

        def timed(*args: object, **kwargs: object) -> object:
            if before:
                before()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                with self.lock:
                    entry = self.stats.setdefault(label, {
                        "seconds": 0.0, "calls": 0, "first_start": start - self.origin,
                        "last_end": 0.0})
                    entry["seconds"] += end - start
                    entry["calls"] += 1
                    entry["last_end"] = max(entry["last_end"], end - self.origin)
                if after:
                    after()

        setattr(module, name, timed)

    def seconds(self, label: str) -> float:
        return round(self.stats.get(label, {}).get("seconds", 0.0), 3)


def child_main(spec: str) -> None:
    """The measured child: `cohortflow run` (flows.cli.main) with timers and memory probes."""
    import importlib

    origin = time.perf_counter()
    args = json.loads(spec)
    from bench.cohorts import StageProbe
    from cohort import prepare as cohort_prepare
    from flows import cli

    class TimedProbe(StageProbe):
        """StageProbe whose marks also carry the wall clock, so the parent can line its
        samples of the child processes' memory up with the stages."""

        def mark(self, stage: str) -> None:
            self.times[stage] = time.time()
            super().mark(stage)

    probe = TimedProbe(None)  # no DuckDB connection of ours: RSS only
    probe.times = {"startup": time.time()}
    timers = Timers(origin)
    marks = {("flows.pipeline", "prepare"): (None, "write_workspace"),
             ("flows.pipeline", "finalize"): ("analyze", "finalize"),
             ("flows.pipeline", "report"): (None, "report")}
    for module_name, name in TIMED:
        before, after = marks.get((module_name, name), (None, None))
        timers.wrap(importlib.import_module(module_name), name,
                    (lambda s=before: probe.mark(s)) if before else None,
                    (lambda s=after: probe.mark(s)) if after else None)
    argv = ["run", args["study"], "--runner", "threads", "--workers", str(args["workers"]),
            "--fresh", "--quiet", "--results", args["results"], "--data-dir", args["data_dir"]]
    cli_start = time.perf_counter() - origin
    with probe.installed(cohort_prepare):
        code = cli.main(argv)
    cli_end = time.perf_counter() - origin
    Path(args["out"]).write_text(json.dumps({
        "exit_code": code, "cli_start": round(cli_start, 3), "cli_end": round(cli_end, 3),
        "timers": timers.stats, "not_measured": timers.missing,
        "stage_memory": probe.stages, "probe_peak_rss_mb": probe.peak_mb(),
        "startup_rss_mb": probe.before_mb, "exit_at": round(time.perf_counter() - origin, 3),
        "mark_times": probe.times,
    }))


# ----------------------------------------------------------------------------- parent side
def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


def _descendants(root: int) -> list[int]:
    """Every live descendant of `root` (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for pid in children.get(stack.pop(), []):
            found.append(pid)
            stack.append(pid)
    return found


class TreeSampler(threading.Thread):
    """Samples the RSS of a process and its descendants, and the load average, until stopped."""

    def __init__(self, pid: int, interval: float = SAMPLE_SECONDS) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop_event = threading.Event()
        self.tree_peak_kb = self.others_peak_kb = 0
        self.samples: list[tuple[float, int, int]] = []  # (time, own kB, descendants' kB)
        self.loads: list[float] = []

    def run(self) -> None:
        last_load = 0.0
        while not self.stop_event.is_set():
            others = sum(_rss_kb(p) for p in _descendants(self.pid))
            own = _rss_kb(self.pid)
            self.tree_peak_kb = max(self.tree_peak_kb, own + others)
            self.others_peak_kb = max(self.others_peak_kb, others)
            self.samples.append((time.time(), own, others))
            if time.monotonic() - last_load >= 5:
                self.loads.append(os.getloadavg()[0])
                last_load = time.monotonic()
            self.stop_event.wait(self.interval)

    def summary(self) -> dict:
        loads = self.loads or [os.getloadavg()[0]]
        return {"tree_peak_rss_mb_sampled": round(self.tree_peak_kb / 1024),
                "children_peak_rss_mb_sampled": round(self.others_peak_kb / 1024),
                "rss_samples": len(self.samples),
                "loadavg_1min_during": {"min": round(min(loads), 2),
                                        "mean": round(sum(loads) / len(loads), 2),
                                        "max": round(max(loads), 2)}}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_child(module: str, spec: dict, log: Path) -> dict:
    """Run `python -m module --child SPEC` in a fresh process; wall seconds, exact peak RSS of
    its last memory segment (wait4), sampled process-tree RSS, CPU seconds, load averages."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PREFECT_API_URL", None)  # the single-command path: Prefect's ephemeral server
    if spec.get("prefect_home"):
        env["PREFECT_HOME"] = spec["prefect_home"]
    load_before = _loadavg()
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "-m", module, "--child", json.dumps(spec)],
                                 cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(child.pid)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    sampler.stop_event.set()
    sampler.join()
    code = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux
    return {"exit_code": code, "child_wall_seconds": round(wall, 2), "samples": sampler.samples,
            "child_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "last_segment_rss_mb": round(usage.ru_maxrss * scale / 2**20),
            "loadavg_before": load_before, "loadavg_after": _loadavg(), "log": str(log),
            **sampler.summary()}


def warm_prefect(prefect_home: Path) -> float | None:
    """One trivial flow in PREFECT_HOME (creates and migrates its database once), so the
    measured runs pay Prefect's usual start, not its first-ever set-up. Seconds, or None."""
    if (prefect_home / "prefect.db").exists():
        return None
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from prefect import flow\n"
                    "flow(lambda: None, name='warm-up')()"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    return round(time.perf_counter() - start, 1)


def run_record(results: Path, study: str) -> dict:
    """The latest run of `study` in the store: counts and timings (the run record)."""
    from results.store import open_store

    with open_store(results, read_only=True) as con:
        row = con.execute(
            "SELECT run_id, timings, n_comparisons, n_outcomes, n_estimates, "
            "n_estimates_failed, started_at, finished_at FROM runs WHERE study = ? "
            "ORDER BY finished_at DESC LIMIT 1", [study]).fetchone()
    if row is None:
        raise RuntimeError(f"{results}: no run of {study}")
    keys = ("run_id", "timings", "n_comparisons", "n_outcomes", "n_estimates",
            "n_estimates_failed", "started_at", "finished_at")
    record = dict(zip(keys, row, strict=True))
    record["timings"] = json.loads(record["timings"])
    with open_store(results, read_only=True) as con:
        reasons = con.execute(
            "SELECT regexp_replace(message, '[0-9]+', 'N', 'g') AS reason, count(*) AS n "
            "FROM estimates WHERE run_id = ? AND status <> 'ok' GROUP BY 1 ORDER BY 2 DESC",
            [record["run_id"]]).fetchall()
    record["failed_reasons"] = {str(reason): int(n) for reason, n in reasons}
    record["started_at"], record["finished_at"] = (str(record["started_at"]),
                                                   str(record["finished_at"]))
    return record


def stage_breakdown(child: dict, record: dict) -> list[dict]:
    """The end-to-end wall time split into the issue's stages, each with where it came from.

    Wall seconds for the sequential stages; for the comparison work (on the flow's worker
    threads) the summed work seconds and their share of the analyse stage's wall time.
    """
    t = {label.rsplit(".", 1)[1]: entry["seconds"] for label, entry in child["timers"].items()}
    timings = record["timings"]
    prepare_stages = timings.get("prepare_stages", {})
    rows: list[dict] = []

    def add(group: str, stage: str, wall: float | None, source: str,
            work: float | None = None) -> None:
        rows.append({"group": group, "stage": stage, "wall_seconds": None if wall is None
                     else round(wall, 2), "work_seconds": None if work is None
                     else round(work, 2), "source": source})

    add("read", "validate + preflight (open the CDM, check tables and concepts)",
        t.get("preflight", 0.0), "timer: pipeline.preflight")
    add("read", "source fingerprint (run identity)", t.get("source_fingerprint", 0.0),
        "timer: pipeline.source_fingerprint")
    add("read", "open the CDM + fingerprint again in the prepare task",
        t.get("prepare", 0.0) - sum(prepare_stages.values()),
        "timer: pipeline.prepare - runs.timings.prepare_stages")
    for stage in PREPARE_STAGES:
        if stage == "screen" and stage not in prepare_stages:
            continue  # only a screen study expands its candidates
        group = ("cohorts" if stage in ("concept_sets", "screen", "cohorts", "outcomes")
                 else "covariates")
        add(group, f"prepare_study: {stage}", prepare_stages.get(stage),
            "runs.timings.prepare_stages")
    analyze_wall = timings.get("analyze", 0.0)
    work_total = t.get("analyze", 0.0) or 1e-9
    parts = [
        ("load", "load comparison arrays (workspace Parquet -> CSR)", t.get("load_comparison")),
        ("PS fits", "propensity models (1 CV'd L1 fit per comparison)",
         t.get("fit_propensity")),
        ("adjustment", "weights, strata, matching + covariate balance",
         t.get("_adjust", 0.0) + t.get("covariate_balance", 0.0)),
        ("outcome models", "Cox models (every outcome x estimator) + diagnostics rows",
         t.get("_estimate")),
        ("outcome models", "weighted Kaplan-Meier curves (outcomes of interest)",
         t.get("_survival_curves")),
    ]
    inside = sum(v or 0.0 for _, _, v in parts)
    parts.append(("analyse other", "rest of analyze_comparison + writing the comparison's rows",
                  work_total - inside))
    for group, stage, work in parts:
        add(group, stage, analyze_wall * (work or 0.0) / work_total,
            "timers (work summed over worker threads; wall = share of runs.timings.analyze)",
            work)
    finalize = t.get("finalize", 0.0)
    add("finalize", "gather the comparisons' rows", t.get("_gather"), "timer: pipeline._gather")
    add("calibration", "calibration + diagnostics gates (assemble_evidence)",
        t.get("assemble_evidence"), "timer: pipeline.assemble_evidence")
    add("store", "write the run to the result store (one transaction)", t.get("write_run"),
        "timer: pipeline.write_run")
    add("finalize", "rest of finalize (labels, run row)", finalize - t.get("_gather", 0.0)
        - t.get("assemble_evidence", 0.0) - t.get("write_run", 0.0), "timer: pipeline.finalize")
    add("report", "HTML report", t.get("report"), "timer: pipeline.report")
    add("report", "Prefect artifacts", t.get("_publish_artifacts"),
        "timer: run_study._publish_artifacts")
    measured = sum(r["wall_seconds"] or 0.0 for r in rows)
    add("overhead", "Python start-up, imports, Prefect (ephemeral server, flow and task runs), "
        "exit", child["child_wall_seconds"] - measured, "child wall - the rows above")
    return rows


def memory_segments(child: dict, samples: list[tuple[float, int, int]]) -> list[dict]:
    """Per memory segment of the measured process (between stage marks): its exact peak RSS
    (VmHWM, reset at each mark; wait4 for the last), the sampled peak of its child processes
    during the segment, and their sum, an upper bound of the process tree's peak then."""
    marks = child["mark_times"]
    names = ["startup", *child["stage_memory"], "exit"]
    peaks = [child.get("startup_rss_mb")] + [
        v.get("peak_rss_mb") for v in child["stage_memory"].values()] + [
        child["last_segment_rss_mb"]]
    starts = [samples[0][0] if samples else 0.0] + [marks[n] for n in names[:-1]]
    ends = [*starts[1:], math.inf]
    segments = []
    for name, peak, start, end in zip(names, peaks, starts, ends, strict=True):
        near = [others for t, _own, others in samples
                if start - SAMPLE_SECONDS <= t <= end + SAMPLE_SECONDS]
        children = round(max(near, default=0) / 1024)
        segments.append({"segment": name, "seconds": round(min(end, samples[-1][0] if samples
                                                               else end) - start, 1),
                         "peak_rss_mb": peak, "children_mb": children,
                         "bound_mb": (peak or 0) + children})
    return segments


def code_version() -> dict:
    """The commit and a hash of the measured packages' sources as they are on disk now (other
    engineers edit the working tree; each measured run records what it ran)."""
    import hashlib

    from bench.cohorts import git_commit

    digest = hashlib.sha256()
    for package in ("cohort", "estimators", "flows", "results"):
        for file in sorted((ROOT / package).glob("*.py")):
            digest.update(f"{package}/{file.name}".encode() + b"\0" + file.read_bytes())
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "cohort", "estimators", "flows", "results"],
            capture_output=True, text=True, cwd=ROOT, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        dirty = []
    return {"commit": git_commit(), "sources_sha": digest.hexdigest()[:12],
            "uncommitted": [line[3:] for line in dirty if line.strip()]}


def measure_study(study_file: Path, study_name: str, *, out: Path, workers: int,
                  prefect_home: Path, keep: bool = False) -> dict:
    """One end-to-end `cohortflow run` in a measured child; the record for the report."""
    version = code_version()
    results = out / f"results_{study_name}.duckdb"
    data_dir = out / f"data_{study_name}"
    results.unlink(missing_ok=True)  # each run writes a store of its own
    shutil.rmtree(data_dir, ignore_errors=True)
    result_file = out / f"{study_name}.child.json"
    result_file.unlink(missing_ok=True)
    spec = {"study": str(study_file), "workers": workers, "results": str(results),
            "data_dir": str(data_dir), "out": str(result_file),
            "prefect_home": str(prefect_home)}
    measured = run_child("bench.speed", spec, out / f"{study_name}.log")
    if measured["exit_code"] != 0 or not result_file.exists():
        raise RuntimeError(f"cohortflow run failed (exit {measured['exit_code']}); see "
                           f"{measured['log']}")
    child = json.loads(result_file.read_text())
    result_file.unlink()
    if child["exit_code"] != 0:
        raise RuntimeError(f"cohortflow run exited {child['exit_code']}; see {measured['log']}")
    child.update(measured)
    record = run_record(results, study_name)
    peaks = [child["last_segment_rss_mb"], child.get("probe_peak_rss_mb")]
    child["peak_rss_mb"] = max(p for p in peaks if p is not None)
    child["segments"] = memory_segments(child, child.pop("samples"))
    child["peak_rss_bound_mb"] = max(seg["bound_mb"] for seg in child["segments"])
    # Seconds from the process start until the run is in the store (the stages end
    # there; the HTML report and the artifacts come after): interpreter start-up and imports
    # before child_main (wall - exit_at, which also holds the short teardown) + write_run's end.
    store = child["timers"].get("flows.pipeline.write_run", {})
    child["to_store_seconds"] = round(child["child_wall_seconds"] - child["exit_at"]
                                      + store.get("last_end", math.nan), 2)
    workspace = data_dir / "workspace"
    child["workspace_mb"] = round(sum(f.stat().st_size for f in workspace.rglob("*")
                                      if f.is_file()) / 2**20) if workspace.exists() else 0
    if not keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    changed = code_version()["sources_sha"] != version["sources_sha"]
    return {"study": study_name, "study_file": str(study_file), "results": str(results),
            "code": {**version, "changed_during_run": changed}, "run": record, "child": child,
            "stages": stage_breakdown(child, record),
            "recorded_timings": sorted(record["timings"])}


def our_estimates(results: Path, run_id: str):
    """Crude and IPTW rows of a run (treatment, outcome, estimator, log HR, counts)."""
    from results.store import open_store

    with open_store(results, read_only=True) as con:
        return con.execute(
            "SELECT treatment, outcome, estimator, status, ln(estimate) AS log_hr, se, "
            "n_treated, n_comparator, events_treated, events_comparator FROM estimates "
            "WHERE run_id = ? AND estimator IN ('crude', 'iptw')", [run_id]).df()


def agreement(ours, baseline_rows: list[dict]) -> dict:
    """Per pair the baseline ran: the same status? the same counts? and, where both estimated,
    |log HR difference| per estimator (crude: a check of cohorts and outcomes; IPTW: the
    analysis), also in units of cohortflow's SE, with the largest IPTW differences listed."""
    import pandas as pd

    base = pd.DataFrame(baseline_rows)
    wide = ours.pivot_table(index=["treatment", "outcome"], columns="estimator",
                            values=["log_hr", "se", "status"], aggfunc="first")
    wide.columns = [f"{value}_{estimator}" for value, estimator in wide.columns]
    counts = ours[ours["estimator"] == "crude"].set_index(["treatment", "outcome"])[
        ["n_treated", "n_comparator", "events_treated", "events_comparator"]]
    merged = base.join(wide, on=["treatment", "outcome"]).join(
        counts.add_prefix("ours_"), on=["treatment", "outcome"])
    count_columns = ["n_treated", "n_comparator", "events_treated", "events_comparator"]
    with_counts = merged.dropna(subset=["n_treated", "ours_n_treated"])
    same_counts = (with_counts[count_columns].to_numpy()
                   == with_counts[[f"ours_{c}" for c in count_columns]].to_numpy()).all(axis=1)
    result = {"pairs": len(merged), "pairs_with_counts": len(with_counts),
              "pairs_counts_identical": int(same_counts.sum())}
    for estimator, status in (("crude", "crude_status"), ("iptw", "status")):
        theirs_ok, ours_ok = merged[status] == "ok", merged[f"status_{estimator}"] == "ok"
        both = merged[theirs_ok & ours_ok]
        diff = (both[f"{estimator}_log_hr"] - both[f"log_hr_{estimator}"]).abs()
        in_se = diff / both[f"se_{estimator}"]
        result[estimator] = {
            "status_agrees": int((theirs_ok == ours_ok).sum()),
            "only_ours_estimated": int((~theirs_ok & ours_ok).sum()),
            "only_baseline_estimated": int((theirs_ok & ~ours_ok).sum()),
            "both_estimated": len(both),
            "max_abs_log_hr_diff": round(float(diff.max()), 6) if len(diff) else None,
            "median_abs_log_hr_diff": round(float(diff.median()), 6) if len(diff) else None,
            "p90_abs_log_hr_diff": round(float(diff.quantile(0.9)), 6) if len(diff) else None,
            "max_abs_diff_in_se": round(float(in_se.max()), 4) if len(in_se) else None,
            "median_abs_diff_in_se": round(float(in_se.median()), 4) if len(in_se) else None,
        }
        if estimator == "iptw":
            largest = both.assign(diff=diff, diff_in_se=in_se).nlargest(5, "diff")
            result[estimator]["largest"] = json.loads(largest[[
                "treatment", "outcome", "n_treated", "n_comparator", "events_treated",
                "events_comparator", "n_covariates", "iptw_log_hr", "iptw_se", "log_hr_iptw",
                "se_iptw", "log_hr_crude", "diff", "diff_in_se"]].to_json(orient="records"))
    result["baseline_failures"] = {
        str(k): int(v) for k, v in merged.loc[merged["status"] != "ok", "message"].str.replace(
            r"-?\d+(\.\d+)?(e[+-]?\d+)?", "N", regex=True).str.slice(0, 90).value_counts().items()}
    result["rows"] = json.loads(merged.drop(columns=["seconds"]).to_json(orient="records"))
    return result


def measure_baseline(cdm: Path, pairs: list[Pair], rules: Rules, out: Path) -> dict:
    """The naive baseline over `pairs` in a measured child process."""
    from dataclasses import asdict

    result_file = out / "baseline.child.json"
    result_file.unlink(missing_ok=True)
    spec = {"cdm": str(cdm), "pairs": [asdict(p) for p in pairs], "rules": asdict(rules),
            "out": str(result_file), "progress": True}
    measured = run_child("bench.baseline", spec, out / "baseline.log")
    if measured["exit_code"] != 0 or not result_file.exists():
        raise RuntimeError(f"baseline failed (exit {measured['exit_code']}); see "
                           f"{measured['log']}")
    payload = json.loads(result_file.read_text())
    result_file.unlink()
    rows = payload["rows"]
    steps = {step: round(sum(r["seconds"][step] for r in rows), 2)
             for step in rows[0]["seconds"]} if rows else {}
    return {**measured, "pairs": len(rows), "loop_seconds": payload["seconds"],
            "steps_seconds": steps, "ok": sum(r["status"] == "ok" for r in rows),
            "peak_rss_mb": measured["last_segment_rss_mb"], "rows": rows}


@contextmanager
def _announce(what: str) -> Iterator[None]:
    print(f"{what} (load {_loadavg()}) ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"  done in {time.perf_counter() - start:.1f} s (load {_loadavg()})", flush=True)


def prepare_cdm(out: Path, persons: int, seed: int) -> tuple[Path, dict, bool]:
    from bench.scale_cdm import cached_cdm

    return cached_cdm(out, persons=persons, seed=seed, threads=2)


def run(persons: int | None = 1_000_000, scaling: tuple[int, ...] = (100_000, 300_000, 1_000_000),
        baseline_persons: int | None = 20_000, baseline_pairs: int = 300, *,
        candidates: int = 100, outcomes: int = 20, negative_controls: int = 50,
        workers: int = 2, memory_limit: str | None = "4GB", duckdb_threads: int | None = 2,
        seed: int = 0, out: Path = Path("data/bench"), keep: bool = False) -> dict:
    """Measure the end-to-end runs (the `persons` headline and every `scaling` size) and the
    baseline comparison; return one record (also appended to <out>/speed.jsonl)."""
    from bench.cohorts import git_commit
    from flows.config import SUPPORTED_ESTIMATORS

    out = Path(out).resolve()
    work = out / "speed"
    work.mkdir(parents=True, exist_ok=True)
    prefect_home = work / "prefect"
    warm = warm_prefect(prefect_home)
    estimators = list(SUPPORTED_ESTIMATORS)
    concepts = study_concepts(candidates, outcomes, negative_controls)
    rules = Rules()
    record: dict = {
        "benchmark": "speed", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(), "machine": platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(), "estimators": estimators,
        "candidates": candidates, "outcomes": outcomes, "negative_controls": negative_controls,
        "workers": workers, "memory_limit": memory_limit, "duckdb_threads": duckdb_threads,
        "prefect_warm_up_seconds": warm, "loadavg_start": _loadavg(), "runs": {},
    }

    def end_to_end(size: int, covariates: dict, tag: str) -> dict:
        cdm, info, generated = prepare_cdm(out, size, seed)
        name = f"speed_{tag}_p{size}"
        study_file = work / f"{name}.yaml"
        study_file.write_text(study_text(
            cdm, name, concepts, covariates=covariates, rules=rules, estimators=estimators,
            workers=workers, memory_limit=memory_limit, duckdb_threads=duckdb_threads,
            temp_directory=work / "duckdb_tmp"))
        with _announce(f"cohortflow run {study_file.name}: {size:,} persons"):
            measured = measure_study(study_file, name, out=work, workers=workers,
                                     prefect_home=prefect_home, keep=keep)
        rows = info["rows"]
        measured.update(persons=size, cdm=str(cdm), cdm_generated_now=generated,
                        cdm_records_million=round(sum(rows[t] for t in (
                            "condition_occurrence", "drug_era", "procedure_occurrence",
                            "measurement")) / 1e6, 1),
                        cdm_mb=round(info["bytes"] / 2**20))
        print(summary_line(measured), flush=True)
        return measured

    sizes = sorted({*(scaling or ()), *([persons] if persons else [])})
    for size in sizes:
        record["runs"][str(size)] = end_to_end(size, FULL_COVARIATES, "full")
    record["headline_persons"] = persons
    record["scaling_persons"] = sorted(scaling or ())
    if baseline_persons:
        ours = end_to_end(baseline_persons, {"windows": [list(rules.covariate_window)],
                                             "domains": BASELINE_DOMAINS}, "baseline_cmp")
        cdm = Path(ours["cdm"])
        (_, comparator_id), = concepts["comparator"]
        pairs = spread_pairs(concepts["treatments"], [
            *[(n, c, "outcome") for n, c in concepts["outcomes"]],
            *[(n, c, "negative_control") for n, c in concepts["negative_controls"]]],
            comparator_id, baseline_pairs)
        with _announce(f"naive baseline: {len(pairs)} pairs on {baseline_persons:,} persons"):
            baseline = measure_baseline(cdm, pairs, rules, work)
        total_pairs = len(concepts["treatments"]) * (len(concepts["outcomes"])
                                                     + len(concepts["negative_controls"]))
        per_pair = baseline["loop_seconds"] / max(1, baseline["pairs"])
        extrapolated = per_pair * total_pairs
        ours_wall = ours["child"]["child_wall_seconds"]
        ours_stored = ours["child"]["to_store_seconds"]
        agree = agreement(our_estimates(Path(ours["results"]), ours["run"]["run_id"]),
                          baseline["rows"])
        record["baseline"] = {
            "persons": baseline_persons, "estimators": len(estimators), "ours": ours,
            "baseline": baseline,
            "pairs_in_study": total_pairs, "baseline_seconds_per_pair": round(per_pair, 3),
            "baseline_seconds_extrapolated": round(extrapolated, 1),
            "ours_seconds": ours_wall, "ours_seconds_per_pair": round(ours_wall / total_pairs, 4),
            "ratio_ours_over_baseline": round(ours_wall / extrapolated, 5),
            "speedup": round(extrapolated / ours_wall, 1),
            "ours_to_store_seconds": ours_stored,
            "ratio_to_store_over_baseline": round(ours_stored / extrapolated, 5),
            "speedup_to_store": round(extrapolated / ours_stored, 1), "agreement": agree,
        }
    record["loadavg_end"] = _loadavg()
    with (out / "speed.jsonl").open("a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    return record


# ----------------------------------------------------------------------------- report
def summary_line(run: dict) -> str:
    child, record = run["child"], run["run"]
    return (f"  {run['persons']:,} persons: {child['child_wall_seconds']:.1f} s wall, "
            f"peak RSS {child['peak_rss_mb']:,} MB (+{child['children_peak_rss_mb_sampled']} MB "
            f"child processes), {record['n_comparisons']} comparisons, "
            f"{record['n_estimates']:,} estimates ({record['n_estimates_failed']:,} failed); "
            f"load {child['loadavg_before']} -> {child['loadavg_after']}")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _load(child: dict) -> str:
    during = child["loadavg_1min_during"]
    return (f"{child['loadavg_before'][0]} / {during['mean']} / {child['loadavg_after'][0]}")


def markdown(result: dict) -> str:
    """Tables for bench/RESULTS.md: end to end (stages, memory, targets), the baseline
    comparison, the scaling table."""
    lines = [f"Measured {result['time']} on {result['machine']}, {result['cores']} cores, commit "
             f"{result['commit']} (working tree), {len(result['estimators'])} estimators "
             f"({', '.join(result['estimators'])}), {result['candidates']} candidates x "
             f"({result['outcomes']} outcomes + {result['negative_controls']} negative "
             f"controls), `cohortflow run --runner threads --workers {result['workers']}`, "
             f"DuckDB memory_limit {result['memory_limit']}, threads "
             f"{result['duckdb_threads']}. Load averages are 1-minute figures: before / mean "
             f"during / after (other jobs share this VM; our run adds ~2).", ""]
    headline = result["runs"].get(str(result.get("headline_persons")))
    if headline:
        child, run = headline["child"], headline["run"]
        wall, peak = child["child_wall_seconds"], child["peak_rss_bound_mb"]
        stored = child["to_store_seconds"]
        met_time, met_memory = wall <= TARGET_SECONDS, peak <= TARGET_GB * 1024
        met_stored = stored <= TARGET_SECONDS
        lines += [
            f"### End to end: {headline['persons']:,} persons "
            f"({headline['cdm_records_million']}M records, {headline['cdm_mb']:,} MB Parquet)",
            "",
            f"{run['n_comparisons']} comparisons, {run['n_estimates']:,} estimates "
            f"({run['n_estimates_failed']:,} failed: {_failed_note(run)}); load "
            f"{_load(child)}; code {_code(headline)}.", "",
            "| target | measured | met |", "|---|---:|---|",
            f"| wall time <= {TARGET_SECONDS / 60:.0f} min, to the run in the store (the "
            f"issue's stages: read ... store) | {stored:,.1f} s ({stored / 60:.1f} min) | "
            f"{'yes' if met_stored else 'no'} |",
            f"| wall time <= {TARGET_SECONDS / 60:.0f} min, the whole `cohortflow run` (+ HTML "
            f"report, artifacts, exit) | {wall:,.1f} s ({wall / 60:.1f} min) | "
            f"{'yes' if met_time else 'no'} |",
            f"| peak memory <= {TARGET_GB:.0f} GB | {peak:,} MB (upper bound: the largest "
            f"per-stage sum below; process tree sampled every {SAMPLE_SECONDS} s: "
            f"{child['tree_peak_rss_mb_sampled']:,}) | {'yes' if met_memory else 'no'} |",
            "",
            *stage_table(headline),
            "",
            *memory_table(headline),
            "",
        ]
    baseline = result.get("baseline")
    if baseline:
        lines += baseline_tables(baseline)
    sizes = [s for s in result.get("scaling_persons", []) if str(s) in result["runs"]]
    if sizes:
        lines += ["### Scaling", "",
                  "| persons | records (M) | comparisons | estimates (failed) | prepare s | "
                  "analyse s (wall) | analyse work s | finalize s | to store s | report s | "
                  "total wall s | peak RSS MB (process + children) | CPU s | load before / "
                  "during / after | code |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for size in sizes:
            entry = result["runs"][str(size)]
            child, run = entry["child"], entry["run"]
            timings = run["timings"]
            timer = {k.rsplit(".", 1)[1]: v["seconds"] for k, v in child["timers"].items()}
            lines.append(
                f"| {size:,} | {entry['cdm_records_million']} | {run['n_comparisons']} | "
                f"{run['n_estimates']:,} ({run['n_estimates_failed']:,}) | "
                f"{_fmt(timings.get('prepare'))} | {_fmt(timings.get('analyze'))} | "
                f"{_fmt(timings.get('analyze_work'))} | {_fmt(timer.get('finalize'))} | "
                f"{_fmt(child['to_store_seconds'])} | "
                f"{_fmt(timer.get('report', 0) + timer.get('_publish_artifacts', 0))} | "
                f"{child['child_wall_seconds']:,.1f} | {child['peak_rss_bound_mb']:,} | "
                f"{child['child_cpu_seconds']:,.0f} | {_load(child)} | {_code(entry)} |")
        lines.append("")
    missing = _unrecorded(result)
    if missing:
        lines += ["Not in the run record (`runs.timings`), measured here by timers around the "
                  "functions: " + ", ".join(missing) + ".", ""]
    return "\n".join(lines)


def _code(entry: dict) -> str:
    """Which code a run measured: commit, sources hash, uncommitted packages' files."""
    code = entry.get("code", {})
    dirty = code.get("uncommitted") or []
    text = f"{code.get('commit')} + sources {code.get('sources_sha')}"
    if dirty:
        text += f" ({len(dirty)} uncommitted file(s): {', '.join(dirty[:4])})"
    if code.get("changed_during_run"):
        text += ", **sources changed during the run**"
    return text


def _failed_note(run: dict) -> str:
    """The commonest reasons of the failed estimates (numbers replaced by N)."""
    reasons = list(run.get("failed_reasons", {}).items())
    shown = "; ".join(f"{n:,} x \"{reason}\"" for reason, n in reasons[:3])
    return shown + ("; ..." if len(reasons) > 3 else "") if shown else "none"


def stage_table(entry: dict) -> list[str]:
    lines = ["| issue stage | step | wall s | work s (2 threads) | from |",
             "|---|---|---:|---:|---|"]
    for row in entry["stages"]:
        lines.append(f"| {row['group']} | {row['stage']} | {_fmt(row['wall_seconds'], 2)} | "
                     f"{_fmt(row['work_seconds'], 2)} | {row['source']} |")
    total = entry["child"]["child_wall_seconds"]
    lines.append(f"| **total** | child process wall (`cohortflow run`) | **{total:,.1f}** | "
                 f"{_fmt(entry['child']['child_cpu_seconds'], 0)} CPU s | wait4 |")
    return lines


def memory_table(entry: dict) -> list[str]:
    """Peak memory per stage: the main process exactly, its child processes sampled."""
    labels = {"startup": "Python start-up, imports",
              "concept_sets": "Prefect start (ephemeral server), read, concept sets",
              "cohorts": "cohorts", "outcomes": "outcomes", "covariates": "covariates",
              "write_workspace": "write workspace", "analyze": "analyse comparisons",
              "finalize": "finalize (calibration, store)", "report": "HTML report",
              "exit": "artifacts, exit"}
    lines = ["| segment | seconds | peak RSS MB, `cohortflow` process (exact) | child processes "
             "MB (Prefect server, report workers; sampled) | sum MB |",
             "|---|---:|---:|---:|---:|"]
    for seg in entry["child"]["segments"]:
        lines.append(f"| {labels.get(seg['segment'], seg['segment'])} | {seg['seconds']} | "
                     f"{seg['peak_rss_mb']} | {seg['children_mb']} | {seg['bound_mb']:,} |")
    return lines


def baseline_tables(b: dict) -> list[str]:
    ours, base, agree = b["ours"], b["baseline"], b["agreement"]
    crude, iptw = agree["crude"], agree["iptw"]
    child = ours["child"]
    met = b["speedup"] >= TARGET_SPEEDUP
    steps = ", ".join(f"{k} {v:.1f}" for k, v in base["steps_seconds"].items())
    return [
        f"### Against the naive baseline: {b['persons']:,} persons "
        f"({ours['cdm_records_million']}M records)", "",
        "Same study, covariates as the baseline defines them (conditions and drugs in "
        "[-365, -1], sex, age group, index year and month). Baseline: per pair pandas reads, "
        "pandas cohort and crosstab, scikit-learn LogisticRegressionCV (L1, 10 C, 3-fold), "
        "lifelines weighted Cox with robust SE (+ crude); its time for the study = mean seconds "
        f"per pair over {base['pairs']} pairs spread over candidates and outcomes x "
        f"{b['pairs_in_study']:,} pairs.", "",
        "| path | pairs run | seconds | seconds per pair | peak RSS MB | load before / during "
        "/ after |",
        "|---|---:|---:|---:|---:|---|",
        f"| cohortflow (`cohortflow run`, {ours['run']['n_comparisons']} "
        f"comparisons, {ours['run']['n_estimates']:,} estimates) | {b['pairs_in_study']:,} | "
        f"{b['ours_seconds']:,.1f} | {b['ours_seconds_per_pair']:.4f} | "
        f"{child['peak_rss_bound_mb']:,} | {_load(child)} |",
        f"| naive baseline, measured | {base['pairs']} ({base['ok']} estimated) | "
        f"{base['loop_seconds']:,.1f} ({steps}) | {b['baseline_seconds_per_pair']:.3f} | "
        f"{base['peak_rss_mb']:,} | {_load(base)} |",
        f"| naive baseline, whole study (extrapolated) | {b['pairs_in_study']:,} | "
        f"{b['baseline_seconds_extrapolated']:,.0f} | | | |", "",
        f"cohortflow / baseline, the whole `cohortflow run` = "
        f"{b['ratio_ours_over_baseline']:.4f}: **{b['speedup']:,.0f}x faster** (target >= "
        f"{TARGET_SPEEDUP:.0f}x: {'met' if met else 'not met'}); to the run in the store "
        f"({b['ours_to_store_seconds']:,.1f} s, without the HTML report the baseline does not "
        f"make) = {b['ratio_to_store_over_baseline']:.4f}: **{b['speedup_to_store']:,.0f}x "
        f"faster** ({'met' if b['speedup_to_store'] >= TARGET_SPEEDUP else 'not met'}). "
        f"cohortflow ran {b['estimators']} estimators per pair "
        "(and diagnostics, calibration), the baseline 2 (crude, IPTW).", "",
        "| agreement on the baseline's pairs | crude | IPTW |", "|---|---:|---:|",
        f"| pairs run by both | {agree['pairs']} | {agree['pairs']} |",
        f"| identical counts (persons and events per arm) | {agree['pairs_counts_identical']} of "
        f"{agree['pairs_with_counts']} | |",
        *[f"| {label} | {_fmt(crude[key], digits)} | {_fmt(iptw[key], digits)} |"
          for label, key, digits in (
              ("same status (both estimated or both not)", "status_agrees", 0),
              ("estimated by cohortflow only", "only_ours_estimated", 0),
              ("estimated by the baseline only", "only_baseline_estimated", 0),
              ("both estimated", "both_estimated", 0),
              ("max abs log HR difference", "max_abs_log_hr_diff", 5),
              ("90th percentile", "p90_abs_log_hr_diff", 5),
              ("median", "median_abs_log_hr_diff", 5),
              ("max abs difference / cohortflow's SE", "max_abs_diff_in_se", 4),
              ("median abs difference / cohortflow's SE", "median_abs_diff_in_se", 4))],
        "",
        "Largest IPTW differences:", "",
        "| pair | treated / comparator | events | covariates (baseline) | baseline log HR (SE) "
        "| cohortflow log HR (SE) | cohortflow crude | diff / SE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['treatment']} x {r['outcome']} | {r['n_treated']:,} / {r['n_comparator']:,} | "
          f"{r['events_treated']} / {r['events_comparator']} | {r['n_covariates']:,.0f} | "
          f"{r['iptw_log_hr']:.3f} ({r['iptw_se']:.3f}) | {r['log_hr_iptw']:.3f} "
          f"({r['se_iptw']:.3f}) | {r['log_hr_crude']:.3f} | {r['diff_in_se']:.3f} |"
          for r in iptw.get("largest", [])],
        "",
        "Baseline pairs not estimated: " + "; ".join(
            f"{n} x {reason}" for reason, n in agree["baseline_failures"].items()) + ".", "",
        "Counts and crude estimates test that both paths built the same cohorts and outcomes "
        "(lifelines breaks tied event times by Efron's method, cohortflow by Breslow's). IPTW "
        "estimates differ by their propensity models: scikit-learn's C grid and folds vs "
        "cohortflow's early-stopped path, fitted on the pair's population (prior-outcome "
        "persons removed) vs once on the whole comparison.", "",
    ]


def _unrecorded(result: dict) -> list[str]:
    """Issue stages the run record does not hold (filled from timers in this benchmark)."""
    entries = list(result["runs"].values())
    if not entries:
        return []
    recorded = set(entries[0]["recorded_timings"])
    wanted = {"read (preflight, fingerprint)": "read", "PS fits": "analyze_stages",
              "outcome models": "analyze_stages", "calibration": "finalize_stages",
              "store write": "store", "finalize": "finalize", "report": "report"}
    return [label for label, key in wanted.items() if key not in recorded]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=1_000_000,
                        help="the headline end-to-end size (0: none)")
    parser.add_argument("--scaling", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--baseline-persons", type=int, default=20_000, help="0: no baseline")
    parser.add_argument("--baseline-pairs", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--outcomes", type=int, default=20)
    parser.add_argument("--negative-controls", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="4GB", help="DuckDB's, in the study file")
    parser.add_argument("--duckdb-threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/bench"))
    parser.add_argument("--keep", action="store_true", help="keep the run workspaces")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return None
    result = run(args.persons or None, tuple(args.scaling), args.baseline_persons or None,
                 args.baseline_pairs, candidates=args.candidates, outcomes=args.outcomes,
                 negative_controls=args.negative_controls, workers=args.workers,
                 memory_limit=args.memory_limit, duckdb_threads=args.duckdb_threads,
                 seed=args.seed, out=args.out, keep=args.keep)
    text = markdown(result)
    (Path(args.out) / "speed.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return result


if __name__ == "__main__":
    main()
