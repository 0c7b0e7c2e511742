"""Accuracy benchmark: `python -m bench.accuracy [--seeds 0 1 2 3 4] [--persons N] [--out FILE]
[--scenario itt|on_treatment]`.

How close do the study pipeline's estimates come to a planted truth? For each seed, the demo
generator (cohort.synthetic) writes a synthetic OMOP CDM with known hazard ratios, confounding
by indication and an unrecorded confounder; `configs/demo.yaml` (4 drugs vs a shared comparator,
6 outcomes, 40 negative controls, synthetic positive controls at HR 1.5/2/4 on each of them) is
run on it with every estimator the pipeline supports, through the pipeline's plain functions
(no Prefect). Then, per estimator, before and after empirical calibration, over all seeds:

- coverage of the 95% CI (all pairs; negative controls; positive controls; outcomes of interest),
- AUC separating true effects from nulls (|log true HR| >= log 2, and any true HR != 1),
- bias and RMSE of the log HR,
- type I error (p < 0.05) on the negative controls,
- the share of pairs passing the diagnostic gates, and the share estimable.

Truth: the planted HR of truth.csv for outcomes of interest (1 for most pairs), 1 for negative
controls, `true_effect_size` for synthetic positive controls. A pair with no usable estimate
(status != ok, or missing from the store) counts against "estimable" and is left out of every
other metric; the counts are reported. The issue's targets (calibrated coverage >= 0.90 and
AUC >= 0.90 for true HRs >= 2 or <= 0.5) are checked and reported, never tuned for.

Scenarios (`--scenario`): `itt` (default) plants effects that act from time zero to the end of
observation whatever the exposure, and runs the study as configured (intention to treat).
`on_treatment` generates CDMs whose planted HRs act only while exposed (the first exposure
episode + 30 days, `generate_demo_cdm(exposure_effect="on_treatment")`) and runs the study twice
per seed, with `follow_up.strategy: intention_to_treat` and with `strategy: on_treatment,
gap_days: 30, end_day: 30`, so the table shows what each analysis recovers of a per-exposure-time
truth (rows `<estimator> [itt]` and `<estimator> [on_treatment]`, plus the geometric mean
estimate of each planted effect). Its CDMs are cached apart from the ITT ones, keyed on the mode.

Writes the result as JSON (`--out`), its Markdown table next to it (`.md`) and the pair-level
frame (`.pairs.parquet`); prints the table. Data and run workspaces go to data/bench/accuracy/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
DEMO_STUDY = ROOT / "configs" / "demo.yaml"
DEFAULT_WORK_DIR = ROOT / "data" / "bench" / "accuracy"
DEFAULT_OUT = ROOT / "data" / "bench" / "accuracy.json"
SCENARIO_OUT = {"itt": DEFAULT_OUT,
                "on_treatment": ROOT / "data" / "bench" / "accuracy_on_treatment.json"}
"""Default --out per scenario (the on-treatment run does not overwrite the ITT result)."""
SCENARIOS = ("itt", "on_treatment")
FOLLOW_UP: dict[str, dict] = {
    "itt": {"strategy": "intention_to_treat"},
    "on_treatment": {"strategy": "on_treatment", "gap_days": 30, "end_day": 30},
}
"""Follow-up overrides of configs/demo.yaml per analysis (the on-treatment scenario runs both)."""
ROLES = ("negative_control", "positive_control", "outcome")
TARGETS = {"calibrated_coverage": 0.90, "calibrated_auc_strong": 0.90}
"""The issue's targets: calibrated coverage (all pairs) and calibrated AUC for |log HR| >= log 2."""
STRONG = math.log(2.0) - 1e-9  # |log true HR| at or above this is a "strong" effect (2 or 0.5)
ALPHA = 0.05
TABLE_COLUMNS = ("coverage", "coverage_negative_control", "coverage_positive_control",
                 "coverage_outcome", "auc_strong", "auc_strong_outcomes", "auc_any", "bias",
                 "rmse", "type1_error", "share_passing", "share_estimable")
"""The metrics of the Markdown table, in its column order (after estimator and CI)."""


# ----------------------------------------------------------------------------- metrics
def _columns(calibrated: bool) -> tuple[str, str, str, str]:
    prefix = "calibrated_" if calibrated else ""
    return tuple(f"{prefix}{c}" for c in ("estimate", "ci_low", "ci_high", "p_value"))


def _share(mask: pd.Series) -> float | None:
    """Mean of a boolean series, None when it is empty (so JSON and tables show 'n/a')."""
    return float(mask.mean()) if len(mask) else None


def directional_auc(log_estimate: np.ndarray, log_truth: np.ndarray) -> float | None:
    """AUC of "a true effect" vs "a null", each effect scored in its own direction.

    A harmful effect (true HR > 1) should have a larger log HR than a null, a protective one
    (true HR < 1) a smaller one, as in OHDSI MethodEvaluation's AUC per true effect size. Over
    every (effect, null) pair this is the count-weighted mean of the AUC of log HR for harmful
    effects vs nulls and of -log HR for protective effects vs nulls. None without both classes.
    """
    null = log_truth == 0
    parts = []
    for sign, effects in ((1.0, log_truth > 0), (-1.0, log_truth < 0)):
        if effects.any() and null.any():
            keep = effects | null
            auc = roc_auc_score(effects[keep], sign * log_estimate[keep])
            parts.append((int(effects.sum()), float(auc)))
    if not parts:
        return None
    return sum(n * auc for n, auc in parts) / sum(n for n, _ in parts)


def metrics(frame: pd.DataFrame, *, calibrated: bool = False) -> dict:
    """The accuracy metrics of one estimator's pairs, from its uncalibrated or calibrated columns.

    `frame`: one row per comparison x outcome with `role`, `truth` (the true HR), `status`,
    `estimate`, `ci_low`, `ci_high`, `p_value`, their `calibrated_` twins and `passed` (the
    diagnostic gates). A row is usable when status is ok and its estimate and CI are finite and
    positive; only usable rows enter coverage, AUC, bias, RMSE and type I error.
    `auc_strong_outcomes` is `auc_strong` among outcomes of interest alone (planted effects vs
    planted nulls), free of the synthetic positive controls that dominate `auc_strong`.
    """
    est, low, high, p = _columns(calibrated)
    n = len(frame)
    usable = (
        frame["status"].eq("ok")
        & np.isfinite(frame[[est, low, high]].to_numpy(dtype=float)).all(axis=1)
        & (frame[[est, low, high]].to_numpy(dtype=float) > 0).all(axis=1)
    )
    ok = frame[usable]
    covers = (ok[low] <= ok["truth"]) & (ok["truth"] <= ok[high])
    log_truth = np.log(ok["truth"].to_numpy(dtype=float))
    log_est = np.log(ok[est].to_numpy(dtype=float))
    error = log_est - log_truth
    strong = (np.abs(log_truth) >= STRONG) | (log_truth == 0)
    negatives = ok["role"].eq("negative_control")
    p_values = ok.loc[negatives, p].astype(float)
    p_values = p_values[np.isfinite(p_values)]
    ok_status = frame["status"].eq("ok")
    passed = frame["passed"].eq(True) & ok_status if "passed" in frame else None  # NULL: no
    out = {
        "n_pairs": n,
        "n_failed": int((~frame["status"].eq("ok")).sum()),
        "n_unusable": int(n - usable.sum()),
        "share_estimable": float(usable.mean()) if n else None,
        "coverage": _share(covers),
        **{f"coverage_{role}": _share(covers[ok["role"].eq(role)]) for role in ROLES},
        **{f"n_{role}": int(ok["role"].eq(role).sum()) for role in ROLES},
        "auc_strong": directional_auc(log_est[strong], log_truth[strong]),
        "auc_any": directional_auc(log_est, log_truth),
        "n_strong": int((np.abs(log_truth) >= STRONG).sum()),
        "n_effects": int((log_truth != 0).sum()),
        "n_nulls": int((log_truth == 0).sum()),
        "bias": float(error.mean()) if error.size else None,
        "rmse": float(np.sqrt((error**2).mean())) if error.size else None,
        "type1_error": _share(p_values < ALPHA),
        "share_passing": float(passed.mean()) if passed is not None and n else None,
    }
    interest = ok["role"].eq("outcome").to_numpy()
    sel = interest & strong
    out["auc_strong_outcomes"] = directional_auc(log_est[sel], log_truth[sel])
    return out


def summarize(pairs: pd.DataFrame, by: str = "estimator") -> dict:
    """{estimator: {"uncalibrated": metrics, "calibrated": metrics}} over every seed's pairs.

    `by="label"` groups by estimator and analysis (the on-treatment scenario's rows).
    """
    return {
        estimator: {mode: metrics(group, calibrated=mode == "calibrated")
                    for mode in ("uncalibrated", "calibrated")}
        for estimator, group in pairs.groupby(by, sort=False)
    }


def planted_effects(pairs: pd.DataFrame, by: str = "label") -> list[dict]:
    """Per planted effect (outcome of interest with true HR != 1): the geometric mean of the
    usable uncalibrated estimates over seeds, per `by` group, with the number of seeds used.

    The on-treatment scenario's direct view of dilution: an ITT analysis of a per-exposure-time
    effect lands between 1 and the truth, an on-treatment one near it.
    """
    planted = pairs[pairs["role"].eq("outcome") & pairs["truth"].ne(1.0)]
    rows = []
    for (treatment, outcome), group in planted.groupby(["treatment", "outcome"], sort=True):
        cells = {}
        for label, g in group.groupby(by, sort=False):
            est = g.loc[g["status"].eq("ok"), "estimate"].to_numpy(dtype=float)
            est = est[np.isfinite(est) & (est > 0)]
            cells[label] = {"estimate": float(np.exp(np.log(est).mean())) if est.size else None,
                            "n": int(est.size)}
        rows.append({"treatment": treatment, "outcome": outcome,
                     "truth": float(group["truth"].iloc[0]), "estimates": cells})
    return rows


def check_targets(summary: dict) -> dict:
    """Per estimator: each target's value, threshold, whether it is met and the shortfall."""
    out = {}
    for estimator, modes in summary.items():
        cal = modes["calibrated"]
        checks = {}
        for key, threshold in TARGETS.items():
            value = cal[key.removeprefix("calibrated_")]
            met = value is not None and value >= threshold
            checks[key] = {"value": value, "target": threshold, "met": met,
                           "shortfall": None if met or value is None else threshold - value}
        out[estimator] = checks
    return out


# ----------------------------------------------------------------------------- runs
def truth_table(cdm: Path, effect_sizes: list[float]) -> pd.DataFrame:
    """Every treatment x outcome the demo study estimates, with its true HR.

    Outcome names as the store writes them: outcomes of interest by name, negative controls
    as `concept_<id>`, synthetic positive controls as `concept_<id>@hr<size>`.
    """
    from flows.pipeline import positive_control_name

    truth = pd.read_csv(cdm / "truth.csv")
    control = truth["role"].eq("negative_control")
    truth["outcome"] = np.where(control, "concept_" + truth["outcome_concept_id"].astype(str),
                                truth["outcome"])
    truth.loc[control, "true_hr"] = 1.0
    rows = [truth[["treatment", "outcome", "role", "true_hr"]]]
    for size in effect_sizes:
        pcs = truth.loc[control, ["treatment", "outcome"]].copy()
        pcs["outcome"] = [positive_control_name(o, size) for o in pcs["outcome"]]
        rows.append(pcs.assign(role="positive_control", true_hr=float(size)))
    return pd.concat(rows, ignore_index=True).rename(columns={"true_hr": "truth"})


def write_study(cdm: Path, study_file: Path, estimators: list[str],
                follow_up: dict | None = None) -> dict:
    """A copy of configs/demo.yaml reading `cdm` and running `estimators`; returns its dict.

    `follow_up` (keys of the study's follow_up block) overrides the design's risk window.
    """
    config = yaml.safe_load(DEMO_STUDY.read_text())
    config.update(study="accuracy", source=str(cdm.resolve()), estimators=list(estimators))
    changed = "source and estimators"
    if follow_up:
        config["follow_up"] = {**config.get("follow_up", {}), **follow_up}
        changed += " and follow_up"
    study_file.write_text(
        f"# Written by bench.accuracy from configs/demo.yaml ({changed} changed).\n"
        + yaml.safe_dump(config, sort_keys=False, width=100))
    return config


def ensure_cdm(cdm: Path, *, persons: int, seed: int, scenario: str) -> Path:
    """The scenario's synthetic CDM in `cdm`, generated unless the cached one matches.

    ITT uses the demo's cache (flows.demo); the on-treatment CDM's marker also records the
    exposure effect, so a cache of the other mode (or an older generator) is never reused.
    """
    if scenario == "itt":
        from flows.demo import ensure_demo_data

        return ensure_demo_data(cdm, persons=persons, seed=seed)
    from cohort.synthetic import GENERATOR_VERSION, generate_demo_cdm
    from flows.demo import MARKER

    wanted = {"persons": persons, "seed": seed, "generator": GENERATOR_VERSION,
              "exposure_effect": scenario}
    marker = cdm / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return cdm / "truth.csv"
    truth = generate_demo_cdm(cdm, persons=persons, seed=seed, exposure_effect=scenario)
    marker.write_text(json.dumps(wanted))
    return truth


def run_plain(study_file: Path, results: Path, data_dir: Path) -> dict:
    """prepare -> analyze each comparison -> finalize, as tests/plain_run.py does, from scratch.

    The run's workspace is removed first: a run is named by its study and data, not by the
    code, so a kept workspace would give back an earlier version's estimates. A comparison
    that raises is recorded as failed (as the Prefect flow does) and counted by the metrics.
    """
    from flows import pipeline
    from flows.config import load_study

    study = load_study(study_file)
    paths = pipeline.new_run(study, results, data_dir)
    shutil.rmtree(paths.workspace, ignore_errors=True)
    started = datetime.now(UTC)
    prepared = pipeline.prepare(str(study_file), str(paths.workspace))
    analyses = []
    for cid in prepared["comparison_ids"]:
        try:
            analyses.append(pipeline.analyze(str(study_file), str(paths.workspace), cid))
        except Exception as exc:  # recorded per comparison, like the flow; the rest goes on
            analyses.append(pipeline.record_failure(
                str(study_file), str(paths.workspace), cid, f"{type(exc).__name__}: {exc}"))
    run = pipeline.finalize(str(study_file), paths, prepared, analyses, started, {})
    shutil.rmtree(paths.workspace, ignore_errors=True)  # person-level files, no longer needed
    return run


def read_pairs(results: Path, run_id: str, truth: pd.DataFrame,
               estimators: list[str]) -> pd.DataFrame:
    """Every expected (treatment, outcome, estimator) of a run with its estimate and gate verdict.

    Expected pairs the store lacks (e.g. positive controls of a comparison that failed) come
    back with status 'missing', so they count against "estimable".
    """
    from results.store import open_store

    with open_store(results, read_only=True) as con:
        estimates = con.execute(
            "SELECT e.treatment, e.outcome, e.estimator, e.status, e.estimate, e.ci_low, "
            "e.ci_high, e.se, e.p_value, e.calibrated_estimate, e.calibrated_ci_low, "
            "e.calibrated_ci_high, e.calibrated_p_value, e.true_effect_size, d.passed "
            "FROM estimates e LEFT JOIN diagnostics d "
            "USING (run_id, comparison_id, outcome, estimator) WHERE e.run_id = ?",
            [run_id]).df()
    grid = truth.merge(pd.DataFrame({"estimator": estimators}), how="cross")
    pairs = grid.merge(estimates, how="left", on=["treatment", "outcome", "estimator"],
                       validate="one_to_one")
    pairs["status"] = pairs["status"].fillna("missing")
    given = pairs["true_effect_size"].notna() & pairs["role"].eq("positive_control")
    if not np.allclose(pairs.loc[given, "true_effect_size"], pairs.loc[given, "truth"]):
        raise RuntimeError("store's true_effect_size disagrees with the expected positive controls")
    return pairs


def machine() -> dict:
    """What the benchmark ran on (timings only mean something with it)."""
    return {"machine": platform.machine(), "processor": platform.processor() or None,
            "cores": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}


def run(seeds: list[int], persons: int, work_dir: Path,
        estimators: list[str] | None = None, scenario: str = "itt") -> dict:
    """Generate, run and score the demo study for each seed; return metrics and run facts.

    `estimators` defaults to every estimator the pipeline supports, read when called (the list
    grows as estimators are added). `scenario` "itt" runs the demo study as configured on ITT
    CDMs; "on_treatment" runs it with ITT and with on-treatment follow-up on on-treatment CDMs,
    and its metrics are keyed by `<estimator> [<analysis>]` (the `labels` of the result).
    """
    from flows.config import SUPPORTED_ESTIMATORS

    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, not {scenario!r}")
    estimators = list(estimators or SUPPORTED_ESTIMATORS)
    work_dir = Path(work_dir)
    itt = scenario == "itt"
    suffix = "" if itt else f"_{scenario}"
    results = work_dir / f"results_p{persons}{suffix}.duckdb"
    analyses = ["itt"] if itt else ["itt", "on_treatment"]
    by = "estimator" if itt else "label"
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    frames, per_seed = [], []
    for seed in seeds:
        folder = work_dir / f"p{persons}_s{seed}{suffix}"
        t0 = time.perf_counter()
        ensure_cdm(folder / "cdm", persons=persons, seed=seed, scenario=scenario)
        t1 = time.perf_counter()
        seed_frames, run_ids, analysis_seconds = [], [], 0.0
        for analysis in analyses:
            # ITT scenario: the study exactly as before (same file, same run identity).
            study_file = folder / ("study.yaml" if itt else f"study_{analysis}.yaml")
            config = write_study(folder / "cdm", study_file, estimators,
                                 None if itt else FOLLOW_UP[analysis])
            record = run_plain(study_file, results, work_dir)
            sizes = config.get("positive_controls", {}).get("effect_sizes", [])
            pairs = read_pairs(results, record["run_id"], truth_table(folder / "cdm", sizes),
                               estimators).assign(seed=seed)
            if not itt:
                pairs = pairs.assign(analysis=analysis,
                                     label=pairs["estimator"] + f" [{analysis}]")
            seed_frames.append(pairs)
            run_ids.append(record["run_id"])
            analysis_seconds += sum(record["timings"]["comparisons"].values())
        t2 = time.perf_counter()
        pairs = pd.concat(seed_frames, ignore_index=True)
        frames.append(pairs)
        per_seed.append({"seed": seed, "run_id": run_ids[0] if itt else run_ids,
                         "generate_seconds": round(t1 - t0, 2),
                         "run_seconds": round(t2 - t1, 2),
                         "analysis_seconds": round(analysis_seconds, 2),
                         "n_failed": int((pairs["status"] != "ok").sum()),
                         "metrics": summarize(pairs, by)})
        print(f"seed {seed}: generated in {t1 - t0:.1f} s, run in {t2 - t1:.1f} s", flush=True)
    pairs = pd.concat(frames, ignore_index=True)
    summary = summarize(pairs, by)
    extra = {} if itt else {
        "labels": list(summary), "analyses": analyses,
        "follow_up": {a: FOLLOW_UP[a] for a in analyses},
        "planted": planted_effects(pairs, by),
    }
    return {
        "benchmark": "accuracy",
        "scenario": scenario,
        **extra,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "seeds": list(seeds), "persons": persons, "estimators": estimators,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {**machine(), "loadavg_before": load_before,
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "metrics": summary,
        "targets": check_targets(summary),
        "per_seed": per_seed,
        "pairs": pairs,
    }


# ----------------------------------------------------------------------------- report
def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """The benchmark as Markdown for bench/RESULTS.md: settings, metrics table, targets."""
    m = result["machine"]
    scenario = result.get("scenario", "itt")
    flag = "" if scenario == "itt" else f" --scenario {scenario}"
    lines = [
        f"Accuracy against planted truth: seeds {', '.join(map(str, result['seeds']))} x "
        f"{result['persons']:,} persons (`python -m bench.accuracy --seeds "
        f"{' '.join(map(str, result['seeds']))} --persons {result['persons']}{flag}`), "
        f"{result['seconds']:.0f} s in all on {m['machine']}, {m['cores']} cores, Python "
        f"{m['python']} (load average {m['loadavg_before'][0]} before, "
        f"{m['loadavg_after'][0]} after), {result['time']}.",
        "",
        "Coverage of the 95% CI (all pairs / negative controls / positive controls / outcomes of "
        "interest); AUC of true effects vs nulls (|log HR| >= log 2; the same among outcomes of "
        "interest only; any HR != 1), each effect scored in its direction; bias and RMSE of log "
        "HR; type I error (p < 0.05) on negative controls; share of pairs passing every "
        "diagnostic gate; share estimable (status ok with a finite CI) of n pairs. Calibrated "
        "coverage of the controls is in-sample (the systematic-error model is fitted on them); "
        "the outcomes-of-interest column is the out-of-sample check.",
        "",
        *_scenario_lines(result),
        "| estimator | CI | coverage all | NC | PC | outcomes | AUC >=2x | AUC >=2x outcomes "
        "| AUC any | bias | RMSE | type I | pass diag. | estimable | n pairs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for estimator, modes in result["metrics"].items():
        for mode, r in modes.items():
            cells = [_fmt(r[key]) for key in TABLE_COLUMNS]
            cells[TABLE_COLUMNS.index("bias")] = _fmt(r["bias"], 3)
            cells[TABLE_COLUMNS.index("rmse")] = _fmt(r["rmse"], 3)
            cells[TABLE_COLUMNS.index("share_estimable")] = _fmt(r["share_estimable"], 3)
            lines.append(f"| {estimator} | {mode} | {' | '.join(cells)} | {r['n_pairs']} |")
    lines += ["", "Targets (calibrated coverage >= 0.90, calibrated AUC >= 0.90 for HR >= 2 or "
              "<= 0.5):", ""]
    for estimator, checks in result["targets"].items():
        parts = []
        for key, c in checks.items():
            verdict = "met" if c["met"] else (
                "n/a" if c["value"] is None else f"missed by {c['shortfall']:.3f}")
            parts.append(f"{key.removeprefix('calibrated_')} {_fmt(c['value'], 3)} ({verdict})")
        lines.append(f"- {estimator}: {'; '.join(parts)}")
    labels = result.get("labels", result["estimators"])
    lines += ["", "Per seed (calibrated coverage all / outcomes of interest; calibrated AUC >=2x):",
              "", "| seed | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(labels)]
    for s in result["per_seed"]:
        cells = []
        for estimator in labels:
            c = s["metrics"].get(estimator, {}).get("calibrated")
            cells.append("n/a" if c is None else f"{_fmt(c['coverage'])} / "
                         f"{_fmt(c['coverage_outcome'])}; {_fmt(c['auc_strong'])}")
        lines.append(f"| {s['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _scenario_lines(result: dict) -> list[str]:
    """The on-treatment scenario's preamble and planted-effect table (nothing for ITT)."""
    if result.get("scenario", "itt") == "itt":
        return []
    follow = "; ".join(f"{a}: " + ", ".join(f"{k} {v}" for k, v in f.items())
                       for a, f in result["follow_up"].items())
    labels = result["labels"]
    lines = [
        "Scenario on_treatment: the planted HRs act only while exposed (first exposure episode "
        "+ 30 days; truth.csv's HRs are per exposed time), and the study runs twice per seed "
        f"({follow}). Rows `<estimator> [<analysis>]`. Geometric mean of the uncalibrated "
        "estimates of each planted effect over seeds:",
        "",
        "| treatment | outcome | true HR | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for row in result["planted"]:
        cells = [_fmt(row["estimates"].get(label, {}).get("estimate")) for label in labels]
        lines.append(f"| {row['treatment']} | {row['outcome']} | {row['truth']:g} | "
                     + " | ".join(cells) + " |")
    return [*lines, ""]


def write(result: dict, out: Path) -> str:
    """Write the result as JSON at `out`, its table at `.md` and its pairs at `.pairs.parquet`.

    Takes the pair-level frame out of `result` (it goes to Parquet, not JSON); returns the table.
    """
    pairs = result.pop("pairs")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    pairs.to_parquet(out.with_suffix(".pairs.parquet"))
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the benchmark, write its files and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--persons", type=int, default=50_000)
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default data/bench/accuracy.json, "
                             "accuracy_on_treatment.json for --scenario on_treatment)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="where CDMs, run workspaces and the result store go")
    parser.add_argument("--scenario", choices=SCENARIOS, default="itt",
                        help="itt: effects from time zero on, the study as configured; "
                             "on_treatment: effects while exposed, ITT and on-treatment analyses")
    args = parser.parse_args(argv)
    result = run(args.seeds, args.persons, args.work_dir, scenario=args.scenario)
    print(write(result, args.out or SCENARIO_OUT[args.scenario]), flush=True)
    return result


if __name__ == "__main__":
    main()
