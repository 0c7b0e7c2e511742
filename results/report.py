"""One self-contained HTML report of a run: summary, ranking, and per comparison the attrition,
preference scores, covariate balance, negative-control calibration, Kaplan-Meier curves and
diagnostics.

The file needs no network: CSS and the few lines of JavaScript (sortable tables) are inline and
the figures are base64-embedded PNGs. Person counts below the run's ``min_cell_count`` are
masked ("<5") wherever they are printed, in tables, figure labels and free text (warnings,
failure messages); covariate means whose implied count is that small are masked as CohortMethod
does. Every string read from the store is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from results import report_plots as plots
from results.account import primary_estimator
from results.masking import (
    arm_events,
    mask_attrition_steps,
    mask_free_text,
    shareable_curves,
    shareable_histogram,
)
from results.store import open_store
from results.summary import latest_run_id, mask_counts

ATTRITION_PERSONS = ["treated_persons", "comparator_persons"]
ESTIMATE_COUNTS = ["n_treated", "n_comparator", "events_treated", "events_comparator"]
KM_MAX_PANELS = 6       # Kaplan-Meier panels per comparison (the outcomes with most events)
FOREST_MAX_LINES = 60   # forest plot lines (outcome headers included) before it is subset
FOREST_MIN_PER_OUTCOME = 3
PARALLEL_FROM = 12      # comparisons from which sections are drawn in worker processes
SUBSECTIONS = [("attrition", "Attrition"), ("ps", "Preference score"),
               ("balance", "Covariate balance"), ("calibration", "Empirical calibration"),
               ("km", "Kaplan-Meier curves"), ("diagnostics", "Diagnostics")]


@dataclass
class RunData:
    """Everything the report shows of one run, read in one pass over the store."""

    run: pd.Series
    config: dict
    min_cell_count: int
    primary: str
    estimators: list[str]
    attrition: pd.DataFrame
    diagnostics: pd.DataFrame
    balance: pd.DataFrame
    ps: pd.DataFrame
    km: pd.DataFrame
    estimates: pd.DataFrame
    rankings: pd.DataFrame
    interest: frozenset[str] = frozenset()
    """The run's outcomes of interest (kept whole when the frames are cut per comparison)."""
    results: Path | None = None
    """The store the run was read from (a screen's section reads its candidate views)."""


def write_report(results: Path, out: Path, run_id: str | None = None) -> Path:
    """Write the HTML report of one run (default: the latest completed run) to ``out``."""
    results, out = Path(results), Path(out)
    run_id = run_id or latest_run_id(results)
    data = load_run(results, run_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data), encoding="utf-8")
    return out


def load_run(results: Path, run_id: str) -> RunData:
    """Read one run's rows from every table (read-only)."""
    with open_store(results, read_only=True) as con:
        runs = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id]).df()
        if runs.empty:
            raise LookupError(f"{results}: no run {run_id!r}")

        def table(name: str, order: str) -> pd.DataFrame:
            return con.execute(
                f"SELECT * FROM {name} WHERE run_id = ? ORDER BY {order}", [run_id]).df()

        attrition = table("attrition", "comparison_id, step_index, outcome")
        diagnostics = table("diagnostics", "comparison_id, outcome, estimator")
        balance = con.execute("""
            SELECT comparison_id, adjustment, covariate_id, covariate_name,
                   mean_treated_before, mean_comparator_before, smd_before,
                   mean_treated_after, mean_comparator_after, smd_after
            FROM balance WHERE run_id = ?""", [run_id]).df()
        ps = table("ps_distribution", "comparison_id, arm, bin_low")
        stored = {row[0] for row in con.execute("DESCRIBE km_curves").fetchall()}
        at_risk = "k.at_risk" if "at_risk" in stored else "NULL::BIGINT AS at_risk"
        km = con.execute(f"""
            SELECT k.comparison_id, k.outcome, k.adjustment, k.arm, k.day, k.survival,
                   {at_risk}
            FROM km_curves k WHERE k.run_id = ? AND k.outcome IN (
                SELECT outcome FROM estimates WHERE run_id = ? AND role = 'outcome')
            ORDER BY 1, 2, 3, 4, 5""", [run_id, run_id]).df()
        estimates = con.execute("""
            SELECT comparison_id, treatment, comparator, outcome, role, estimator, estimate,
                   ci_low, ci_high, se, p_value, calibrated_estimate, calibrated_ci_low,
                   calibrated_ci_high, calibrated_p_value, n_treated, n_comparator,
                   events_treated, events_comparator, status, message, true_effect_size,
                   q_value, rank
            FROM estimates WHERE run_id = ?
            ORDER BY comparison_id, outcome, estimator""", [run_id]).df()
        rankings = con.execute("""
            SELECT outcome, estimator, rank, treatment, comparator, hr, ci_low, ci_high,
                   p_value, q_value, calibrated, uncalibrated_hr, e_value, e_value_ci,
                   n_treated, n_comparator, events_treated, events_comparator
            FROM rankings WHERE run_id = ? ORDER BY outcome, estimator, rank""",
            [run_id]).df()
    run = runs.iloc[0]
    config = _json(run["config_json"], {})
    min_cell_count = int(config.get("min_cell_count") or 0)
    present = list(dict.fromkeys(estimates["estimator"]))
    ordered = [e for e in config.get("estimators") or [] if e in present]
    estimators = ordered + [e for e in present if e not in ordered]
    primary = primary_estimator(estimators) if estimators else "-"
    interest = frozenset(estimates.loc[estimates["role"] == "outcome", "outcome"])
    return RunData(run, config, min_cell_count, primary, estimators, attrition, diagnostics,
                   balance, ps, km, estimates, rankings, interest, results)


# ----------------------------------------------------------------------------- formatting

def esc(value) -> str:
    """HTML-escaped text of a store value ("-" for missing)."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return "-"
    return html.escape(str(value), quote=True)


def mask_text(text, min_cell_count: int) -> str:
    """Free text with every whole number below the threshold masked, then HTML-escaped."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "-"
    return esc(mask_free_text(str(text), min_cell_count))


def masked_counts(frame: pd.DataFrame, columns: list[str], min_cell_count: int) -> pd.DataFrame:
    """mask_counts, then thousands separators on what is shown as a number; "-" for missing."""
    masked = mask_counts(frame, columns, min_cell_count)
    for column in columns:
        masked[column] = masked[column].map(_shown_count)
    return masked


def _shown_count(text: str) -> str:
    """A masked count as printed: thousands separators, "-" for missing, "<5" as is."""
    return f"{int(text):,}" if text.isdigit() else ("-" if text in ("<NA>", "nan") else text)


def num(value, digits: int = 2, style: str = "f") -> str:
    if value is None or value is pd.NA:
        return "-"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return esc(value)
    if not math.isfinite(value):
        return "-"
    return f"{value:.{digits}{style}}"


def pvalue(value) -> str:
    if value is None or value is pd.NA or not np.isfinite(value):
        return "-"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def hr_ci(estimate, low, high) -> str:
    if estimate is None or estimate is pd.NA or not np.isfinite(estimate):
        return "-"
    return f"{estimate:.2f} ({low:.2f}-{high:.2f})"


def verdict(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return '<span class="na">n/a</span>'
    return '<span class="pass">pass</span>' if bool(value) else '<span class="fail">fail</span>'


def table(headers: list[str], rows: list[list[str]], counts: set[int] = frozenset(),
          css: str = "", wrap: set[int] = frozenset()) -> str:
    """A sortable HTML table of already-escaped cells; `counts` marks count columns, `wrap`
    the columns whose text may wrap (the others stay on one line)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    kinds = {i: ' class="count"' for i in counts} | {i: ' class="wrap"' for i in wrap}
    body = "".join(
        "<tr>" + "".join(f"<td{kinds.get(i, '')}>{c}</td>" for i, c in enumerate(row))
        + "</tr>" for row in rows)
    return (f'<table class="sortable {css}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def figure(png: str, alt: str, kind: str) -> str:
    return (f'<figure><img data-figure="{kind}" alt="{esc(alt)}" '
            f'src="data:image/png;base64,{png}"></figure>')


def note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _when(value) -> str:
    return "-" if value is None or pd.isna(value) else esc(
        pd.Timestamp(value).strftime("%Y-%m-%d %H:%M:%S"))


def _json(value, default):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return default


# ----------------------------------------------------------------------------- sections

def render(data: RunData) -> str:
    """The whole HTML document."""
    comparisons = _comparisons(data)
    screen = []
    if data.results is not None and isinstance(data.config.get("treatments"), dict):
        # a screen: its candidates lead, a few of its trials follow
        from results.report_screen import candidate_rows, screen_section, trial_sections_to_draw

        run_id = str(data.run["run_id"])
        screen = [screen_section(data.results, run_id, data.primary)]
        drawn = set(trial_sections_to_draw(
            pd.DataFrame(comparisons, columns=["comparison_id", "treatment", "comparator"]),
            candidate_rows(data.results, run_id, data.primary)))
        if len(drawn) < len(comparisons):
            screen.append(note(f"Per-trial sections below: {len(drawn)} of {len(comparisons)} "
                               "trials (those of the best-ranked candidates); every trial's "
                               "rows are in the store (attrition, diagnostics, balance)."))
        comparisons = [c for c in comparisons if c[0] in drawn]
    toc = "".join(
        f'<li><a href="#comparison-{cid}">{esc(t)} vs {esc(c)}</a></li>'
        for cid, t, c in comparisons)
    lead = screen or [_ranking(data)]
    body = [_summary(data), *lead, *_comparison_sections(data, comparisons)]
    anchor = ('<a href="#candidates">Candidates</a>' if screen
              else '<a href="#ranking">Ranking</a>')
    run = data.run
    title = f"cohortflow report: {esc(run['study'])}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{CSS}</style>
<script>{ERROR_JS}</script>
</head><body>
<div id="js-errors"></div>
<header><h1>{title}</h1><p class="sub">run <code>{esc(run['run_id'])}</code></p></header>
<nav id="toc"><h2>Contents</h2><ol>
<li><a href="#summary">Summary</a></li><li>{anchor}</li>
<li>Comparisons<ol>{toc}</ol></li></ol></nav>
{"".join(body)}
<footer>Generated by cohortflow from the result store. Counts below {data.min_cell_count}
are shown as &lt;{data.min_cell_count}.</footer>
<script>{SORT_JS}</script>
</body></html>
"""


def _comparisons(data: RunData) -> list[tuple[int, str, str]]:
    frames = [f[["comparison_id", "treatment", "comparator"]]
              for f in (data.attrition, data.estimates) if len(f)]
    if not frames:
        return []
    labels = pd.concat(frames).drop_duplicates("comparison_id").sort_values("comparison_id")
    return [(int(r.comparison_id), str(r.treatment), str(r.comparator))
            for r in labels.itertuples()]


def _summary(data: RunData) -> str:
    run, mcc = data.run, data.min_cell_count
    started, finished = run["started_at"], run["finished_at"]
    duration = "-"
    if pd.notna(started) and pd.notna(finished):
        seconds = (pd.Timestamp(finished) - pd.Timestamp(started)).total_seconds()
        duration = f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    interest = data.estimates[data.estimates["role"] == "outcome"]
    verdicts = data.diagnostics.set_index(["comparison_id", "outcome", "estimator"])["passed"]
    passed = interest.set_index(["comparison_id", "outcome", "estimator"]).index.map(verdicts)
    ok = (interest["status"] == "ok").to_numpy() & np.asarray(
        pd.Series(passed, dtype="boolean").fillna(False), dtype=bool)
    per_estimator = ", ".join(
        f"{esc(e)} {int(ok[(interest['estimator'] == e).to_numpy()].sum())}"
        f"/{int((interest['estimator'] == e).sum())}" for e in data.estimators)
    roles = data.estimates.groupby("role")["outcome"].nunique().to_dict()
    facts = [
        ("Study", esc(run["study"])),
        ("Description", esc(run["description"])),
        ("Source", f"<code>{esc(run['source_path'])}</code> (CDM {esc(run['cdm_version'])})"),
        ("Run id", f"<code>{esc(run['run_id'])}</code> ({esc(run['status'])})"),
        ("Started / finished", f"{_when(started)} / {_when(finished)} UTC ({duration})"),
        ("Comparisons", esc(run["n_comparisons"])),
        ("Outcomes", f"{esc(run['n_outcomes'])} (of interest {roles.get('outcome', 0)}, "
                     f"negative controls {roles.get('negative_control', 0)}, synthetic "
                     f"positive controls {roles.get('positive_control', 0)})"),
        ("Estimates", f"{esc(run['n_estimates'])}, failed {esc(run['n_estimates_failed'])}"),
        ("Estimates of interest passing every diagnostic",
         f"{int(ok.sum())} of {len(interest)} ({per_estimator})"),
        ("Primary estimator", esc(data.primary)),
        ("Minimum cell count", esc(mcc)),
    ]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    warnings = _json(run["warnings"], [])
    if warnings:
        items = "".join(f"<li>{mask_text(w, mcc)}</li>" for w in warnings)
        warn = (f'<details class="warnings"><summary>{len(warnings)} warning(s)</summary>'
                f"<ul>{items}</ul></details>")
    else:
        warn = note("No warnings.")
    return (f'<section id="summary"><h2>Summary</h2><table class="facts">{rows}</table>'
            f"<h3>Warnings</h3>{warn}</section>")


def _ranking(data: RunData) -> str:
    mcc, primary = data.min_cell_count, data.primary
    parts = [f'<section id="ranking"><h2>Ranking ({esc(primary)})</h2>',
             note("Outcomes of interest whose diagnostics all pass, per outcome ordered by the "
                  "calibrated CI bound nearest the null (hazard ratios are calibrated where the "
                  "negative controls allowed it).")]
    ranked = data.rankings[data.rankings["estimator"] == primary]
    others = data.rankings[data.rankings["estimator"] != primary]["estimator"].value_counts()
    if ranked.empty:
        text = f"No {esc(primary)} estimate of this run passed every diagnostic, so none is ranked."
        if len(others):
            listed = ", ".join(f"{esc(e)} {n}" for e, n in others.items())
            text += (f" Ranked with other estimators: {listed} (cohortflow rank --estimator "
                     "NAME; their gates are in each comparison's diagnostics table below).")
        parts.append(note(text))
    else:
        shown = masked_counts(ranked, ESTIMATE_COUNTS, mcc)
        rows = [[esc(r.outcome), esc(r.rank), esc(r.treatment), esc(r.comparator),
                 hr_ci(r.hr, r.ci_low, r.ci_high), "yes" if r.calibrated else "no",
                 pvalue(r.p_value), pvalue(r.q_value), num(r.e_value), num(r.e_value_ci),
                 r.n_treated, r.n_comparator, r.events_treated, r.events_comparator]
                for r in shown.itertuples()]
        parts.append(table(
            ["outcome", "rank", "treatment", "comparator", "HR (95% CI)", "calibrated", "p",
             "q", "E-value", "E-value CI", "treated persons", "comparator persons",
             "events treated", "events comparator"], rows, counts={10, 11, 12, 13}))
    forest = _forest_rows(data)
    if forest.empty:
        parts.append(note("No estimates of outcomes of interest to plot."))
    else:
        comparators = forest["comparator"].unique()
        title = (f"{primary} hazard ratios, calibrated where possible"
                 + (f" (vs {comparators[0]})" if len(comparators) == 1 else ""))
        shown = _forest_subset(forest)
        parts.append(figure(plots.forest_plot(shown, title), "forest plot", "forest"))
        text = ("Filled squares: calibrated HR; open squares: uncalibrated (too few negative "
                "controls). Grey: fails a diagnostic (not ranked). The dashed line is the null "
                "(HR 1).")
        if len(shown) < len(forest):
            text += (f" Shown: {len(shown)} of {len(forest)} estimates, per outcome those that "
                     "pass the diagnostics, then the smallest p-values; every estimate is in the "
                     "volcano plot below and in the store's estimates table.")
        parts.append(note(text))
        if len(shown) < len(forest):
            parts.append(figure(plots.volcano_plot(forest, f"{primary}: every estimate of an "
                                                   "outcome of interest"), "volcano plot",
                                "volcano"))
            parts.append(note("Each point is one candidate x outcome: hazard ratio (calibrated "
                              "where possible) against its p-value; dark points pass every "
                              "diagnostic, grey ones fail one. Points above the dotted line "
                              "have p < 0.05."))
    parts.append("</section>")
    return "".join(parts)


def _forest_rows(data: RunData) -> pd.DataFrame:
    est = data.estimates[(data.estimates["role"] == "outcome")
                         & (data.estimates["estimator"] == data.primary)]
    if est.empty:
        return pd.DataFrame()
    verdicts = data.diagnostics.set_index(["comparison_id", "outcome", "estimator"])["passed"]
    passed = est.set_index(["comparison_id", "outcome", "estimator"]).index.map(verdicts)
    calibrated = est["calibrated_estimate"].notna()
    single = est["comparator"].nunique() == 1
    return pd.DataFrame({
        "outcome": est["outcome"].astype(str),
        "comparator": est["comparator"].astype(str),
        "label": est["treatment"].astype(str) if single
        else est["treatment"].astype(str) + " vs " + est["comparator"].astype(str),
        "hr": est["calibrated_estimate"].where(calibrated, est["estimate"]).astype(float),
        "ci_low": est["calibrated_ci_low"].where(calibrated, est["ci_low"]).astype(float),
        "ci_high": est["calibrated_ci_high"].where(calibrated, est["ci_high"]).astype(float),
        "passed": pd.Series(passed, index=est.index, dtype="boolean").fillna(False).astype(bool),
        "calibrated": calibrated,
        "ok": est["status"] == "ok",
        "p": est["calibrated_p_value"].where(calibrated, est["p_value"]).astype(float),
    }).sort_values(["outcome", "label"])


def _forest_subset(rows: pd.DataFrame) -> pd.DataFrame:
    """At most FOREST_MAX_LINES plotted lines: per outcome the passing estimates, then the
    smallest p-values, so a screen's forest plot stays readable (the rest are in the volcano
    plot and the store)."""
    per_outcome = max(FOREST_MIN_PER_OUTCOME,
                      FOREST_MAX_LINES // max(rows["outcome"].nunique(), 1) - 1)
    if len(rows) + rows["outcome"].nunique() <= FOREST_MAX_LINES:
        return rows
    order = rows.assign(_fail=~rows["passed"], _p=rows["p"].fillna(2.0)).sort_values(
        ["outcome", "_fail", "_p"], kind="stable")
    keep = order.groupby("outcome", sort=False).head(per_outcome).index
    return rows.loc[rows.index.isin(keep)]


PER_COMPARISON = ("attrition", "diagnostics", "balance", "ps", "km", "estimates")
"""RunData frames that a comparison's section reads only its own rows of."""


def _sliced(data: RunData, ids: list[int]) -> list[RunData]:
    """Per comparison id, the run's data with only that comparison's rows (one pass each)."""
    groups = {name: {int(cid): rows for cid, rows in getattr(data, name).groupby(
        "comparison_id", sort=False)} for name in PER_COMPARISON}
    empty = {name: getattr(data, name).iloc[:0] for name in PER_COMPARISON}
    return [replace(data, **{name: groups[name].get(cid, empty[name])
                             for name in PER_COMPARISON}) for cid in ids]


def _section_task(task: tuple[RunData, int, str, str]) -> str:
    return _comparison(*task)


def _comparison_sections(data: RunData, comparisons: list[tuple[int, str, str]]) -> list[str]:
    """Each comparison's section; a screen's many figures are drawn in worker processes (spawned,
    so safe inside a threaded flow), in order, each sent only its comparison's rows."""
    workers = min(os.cpu_count() or 1, 4)
    if len(comparisons) < PARALLEL_FROM or workers < 2:
        return [_comparison(data, cid, t, c) for cid, t, c in comparisons]
    sliced = _sliced(data, [cid for cid, _, _ in comparisons])
    tasks = [(part, cid, t, c) for part, (cid, t, c) in zip(sliced, comparisons, strict=True)]
    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_section_task, tasks, chunksize=1))


def _comparison(data: RunData, cid: int, treatment: str, comparator: str) -> str:
    labels = (treatment, comparator)
    sid = f"comparison-{cid}"
    nav = " | ".join(f'<a href="#{sid}-{key}">{name}</a>' for key, name in SUBSECTIONS)
    parts = [f'<section id="{sid}" class="comparison">',
             f"<h2>{esc(treatment)} vs {esc(comparator)}</h2>",
             f'<p class="subnav">comparison {cid}: {nav} | <a href="#toc">contents</a></p>',
             _attrition(data, cid, labels, sid), _preference(data, cid, labels, sid),
             _balance(data, cid, sid), _calibration(data, cid, sid),
             _km(data, cid, labels, sid), _diagnostics(data, cid, labels, sid), "</section>"]
    return "".join(parts)


def _subsection(sid: str, key: str, content: str) -> str:
    name = dict(SUBSECTIONS)[key]
    return f'<section id="{sid}-{key}" class="sub"><h3>{name}</h3>{content}</section>'


def _shown_attrition(rows: pd.DataFrame, min_cell_count: int) -> pd.DataFrame:
    """Attrition rows as shown: masked against small counts and differencing, in their order,
    numbers with thousands separators."""
    shown = mask_attrition_steps(rows, min_cell_count).loc[rows.index]
    for column in ATTRITION_PERSONS:
        shown[column] = shown[column].map(_shown_count)
    return shown


def _attrition(data: RunData, cid: int, labels: tuple[str, str], sid: str) -> str:
    mcc = data.min_cell_count
    rows = data.attrition[data.attrition["comparison_id"] == cid]
    if rows.empty:
        return _subsection(sid, "attrition", note("No attrition recorded for this comparison."))
    common = rows[rows["outcome"].isna()].sort_values("step_index")
    interest = data.interest
    per_outcome = rows[rows["outcome"].isin(interest)].sort_values(["step_index", "outcome"])
    controls = rows[rows["outcome"].notna() & ~rows["outcome"].isin(interest)]
    shown = _shown_attrition(pd.concat([common, per_outcome]), mcc)
    body = [[esc(r.step_index), esc(r.step) + ("" if pd.isna(r.outcome)
                                                 else f": {esc(r.outcome)}"),
             esc(r.description), r.treated_persons, r.comparator_persons]
            for r in shown.itertuples()]
    content = [table(["#", "step", "description", f"{esc(labels[0])} persons",
                      f"{esc(labels[1])} persons"], body, counts={3, 4}, wrap={2})]
    if len(controls):
        content.append(note(f"The per-outcome step for {controls['outcome'].nunique()} control "
                            "outcomes is in the store (table attrition)."))
    if len(common):
        hidden = mask_attrition_steps(common, mcc)  # steps hidden against differencing: no bar
        treated, comparator = (common[c].astype(float).where(~hidden[c].str.endswith("removed"))
                               for c in ATTRITION_PERSONS)
        content.append(figure(plots.attrition_plot(
            list(common["step"].astype(str)), treated, comparator, mcc, labels),
            "attrition diagram", "attrition"))
    return _subsection(sid, "attrition", "".join(content))


def _preference(data: RunData, cid: int, labels: tuple[str, str], sid: str) -> str:
    ps = data.ps[data.ps["comparison_id"] == cid]
    if ps.empty:
        why = ("this run estimated crude hazard ratios only (no propensity model)"
               if set(data.estimators) <= {"crude"} else
               "the propensity model could not be fitted for this comparison")
        return _subsection(sid, "ps", note(f"No preference-score distribution: {why}."))
    mcc = data.min_cell_count
    pooled = shareable_histogram(ps, mcc)
    densities = []
    for arm in ("treated", "comparator"):
        rows = pooled[pooled["arm"] == arm]
        if rows.empty:  # fewer than min_cell_count persons
            densities.append(None)
            continue
        lows, highs = rows["bin_low"].to_numpy(float), rows["bin_high"].to_numpy(float)
        n = rows["persons"].to_numpy(float)
        densities.append((np.append(lows, highs[-1]), n / n.sum() / (highs - lows)))
    diag = data.diagnostics[data.diagnostics["comparison_id"] == cid]
    equipoise = diag["equipoise"].dropna()
    auc = diag["ps_auc"].dropna()
    png = plots.preference_plot(densities[0], densities[1], labels,
                                float(equipoise.iloc[0]) if len(equipoise) else None)
    text = (f"Preference score (the propensity score adjusted for the arms' sizes) of both "
            f"arms, as densities; PS model AUC {num(auc.iloc[0], 3) if len(auc) else '-'}, "
            f"equipoise (share of persons with preference 0.3-0.7) "
            f"{num(equipoise.iloc[0], 3) if len(equipoise) else '-'}. Neighbouring bins are "
            f"merged until each bar holds at least {mcc} persons of its arm, so no small count "
            "can be read off the plot.")
    if any(d is None for d in densities):
        text += f" An arm with fewer than {mcc} persons is not drawn."
    return _subsection(sid, "ps", figure(png, "preference score distribution", "ps")
                       + note(text))


def _arm_sizes(data: RunData, cid: int) -> tuple[float, float]:
    rows = data.attrition[(data.attrition["comparison_id"] == cid)
                          & data.attrition["outcome"].isna()].sort_values("step_index")
    if rows.empty:
        return math.nan, math.nan
    last = rows.iloc[-1]
    return float(last["treated_persons"]), float(last["comparator_persons"])


def _mean(value: float, persons: float, mcc: int) -> str:
    """A covariate mean, masked when it stands for fewer than min_cell_count persons."""
    if value is None or not np.isfinite(value):
        return "-"
    if persons > 0 and 0 < value * persons < mcc:
        return f"&lt;{min(math.ceil(mcc / persons * 1000) / 1000, 1.0):.3f}"
    return f"{value:.3f}"


def _balance(data: RunData, cid: int, sid: str) -> str:
    mcc = data.min_cell_count
    balance = data.balance[data.balance["comparison_id"] == cid]
    if balance.empty:
        return _subsection(sid, "balance", note(
            "No covariate balance after adjustment: no propensity-score adjustment was made "
            "for this comparison (crude only, or the propensity model failed)."))
    adjustments = list(dict.fromkeys(balance["adjustment"]))
    adjustment = "iptw" if "iptw" in adjustments else adjustments[0]
    mine = balance[balance["adjustment"] == adjustment]
    diag = data.diagnostics[data.diagnostics["comparison_id"] == cid]
    thresholds = diag["max_smd_threshold"].dropna()
    threshold = float(thresholds.iloc[0]) if len(thresholds) else 0.1
    png = plots.balance_plot(mine["smd_before"].to_numpy(float),
                             mine["smd_after"].to_numpy(float), threshold, adjustment)
    n_t, n_c = _arm_sizes(data, cid)
    top = mine.assign(abs_after=mine["smd_after"].abs()).sort_values(
        "abs_after", ascending=False).head(10)
    rows = [[esc(r.covariate_name), _mean(r.mean_treated_before, n_t, mcc),
             _mean(r.mean_comparator_before, n_c, mcc), num(r.smd_before, 3),
             _mean(r.mean_treated_after, n_t, mcc), _mean(r.mean_comparator_after, n_c, mcc),
             num(r.smd_after, 3)] for r in top.itertuples()]
    over = int((mine["smd_after"].abs() > threshold).sum())
    text = (f"{len(mine):,} covariates; {over} with |SMD| above {threshold:g} after "
            f"{esc(adjustment)}; max |SMD| before {num(mine['smd_before'].abs().max(), 3)}, "
            f"after {num(mine['smd_after'].abs().max(), 3)}.")
    return _subsection(sid, "balance", (
        '<div class="row">' + figure(png, "covariate balance scatter", "balance")
        + '<div class="grow"><h4>Top 10 covariates by |SMD| after '
        + f"{esc(adjustment)}</h4>"
        + table(["covariate", "treated before", "comparator before", "SMD before",
                 "treated after", "comparator after", "SMD after"], rows, wrap={0})
        + note(text) + "</div></div>"))


def _calibration(data: RunData, cid: int, sid: str) -> str:
    primary = data.primary
    est = data.estimates[(data.estimates["comparison_id"] == cid)
                         & (data.estimates["estimator"] == primary)
                         & (data.estimates["status"] == "ok")]
    usable = est["se"].notna() & (est["estimate"] > 0) & np.isfinite(est["se"])
    negative = est[(est["role"] == "negative_control") & usable]
    positive = est[(est["role"] == "positive_control") & usable]
    diag = data.diagnostics[(data.diagnostics["comparison_id"] == cid)
                            & (data.diagnostics["estimator"] == primary)]
    nulls = diag[["null_mean", "null_sd"]].dropna()
    notes = diag["calibration_note"].dropna()
    why = mask_text(notes.iloc[0], data.min_cell_count) if len(notes) else ""
    if negative.empty:
        text = ("No calibration plot: this run has no negative-control estimates for this "
                "comparison, so the empirical null could not be estimated"
                + (f" ({why})." if why else "."))
        return _subsection(sid, "calibration", note(text))
    if nulls.empty:
        text = (f"No calibration plot: the empirical null could not be fitted from "
                f"{len(negative)} negative control(s)" + (f" ({why})." if why else "."))
        return _subsection(sid, "calibration", note(text))
    null_mean, null_sd = (float(v) for v in nulls.iloc[0])
    png = plots.calibration_plot(negative, positive, null_mean, null_sd, primary)
    ease = diag["ease"].dropna()
    text = (f"{len(negative)} negative and {len(positive)} synthetic positive controls "
            f"({esc(primary)}). Shaded: estimates whose calibrated p-value would be >= 0.05 "
            f"under the empirical null; dashed: uncalibrated p = 0.05. EASE "
            f"{num(ease.iloc[0], 3) if len(ease) else '-'}. {why}")
    return _subsection(sid, "calibration", figure(png, "calibration effect plot",
                                                  "calibration") + note(text))


def _km(data: RunData, cid: int, labels: tuple[str, str], sid: str) -> str:
    mine = data.estimates[data.estimates["comparison_id"] == cid]
    interest = sorted(mine.loc[mine["role"] == "outcome", "outcome"].unique())
    if not interest:
        return _subsection(sid, "km", note("No outcomes of interest in this comparison."))
    stored = data.km[data.km["comparison_id"] == cid]
    km = shareable_curves(stored, arm_events(mine), data.min_cell_count)
    shown = interest
    if len(interest) > KM_MAX_PANELS:  # a figure of dozens of panels is slow and unreadable
        rows = mine[mine["outcome"].isin(interest)]
        events = (rows["events_treated"].fillna(0) + rows["events_comparator"].fillna(0)
                  ).groupby(rows["outcome"]).max()
        top = set(events.sort_values(ascending=False, kind="stable").index[:KM_MAX_PANELS])
        shown = [o for o in interest if o in top]
    panels = [(str(o), km[km["outcome"] == o]) for o in shown]
    png = plots.km_plot(panels, labels, sorted(set(km["adjustment"])) or ["crude"])
    mcc = data.min_cell_count
    text = ("Kaplan-Meier survival per outcome of interest; solid: IPTW-weighted, dashed: "
            f"crude. An arm with fewer than {mcc} events shows no curve, and each curve ends "
            f"where fewer than {mcc} persons of its arm remain at risk.")
    if len(stored) and stored["at_risk"].isna().all():
        text += (" This run was stored before cohortflow recorded persons at risk, so its "
                 "curves are not drawn; run it again to draw them.")
    if len(shown) < len(interest):
        text += (f" Shown: the {len(shown)} of {len(interest)} outcomes of interest with the "
                 "most events; every outcome's curves are in the store's km_curves table.")
    return _subsection(sid, "km", figure(png, "Kaplan-Meier curves", "km") + note(text))


def _diagnostics(data: RunData, cid: int, labels: tuple[str, str], sid: str) -> str:
    mcc = data.min_cell_count
    est = data.estimates[(data.estimates["comparison_id"] == cid)
                         & (data.estimates["role"] == "outcome")]
    if est.empty:
        return _subsection(sid, "diagnostics", note("No estimates for this comparison."))
    diag = data.diagnostics[data.diagnostics["comparison_id"] == cid].drop(
        columns=["n_treated", "n_comparator", "treatment", "comparator"])
    merged = est.merge(diag, on=["comparison_id", "outcome", "estimator"], how="left")
    order = {e: i for i, e in enumerate(data.estimators)}
    merged = merged.assign(_o=merged["estimator"].map(order)).sort_values(["outcome", "_o"])
    shown = masked_counts(merged, ESTIMATE_COUNTS, mcc)
    gates = [("equipoise", "equipoise", "min_equipoise_threshold", "equipoise_pass", "&ge;", 2),
             ("max |SMD| after", "max_abs_smd_after", "max_smd_threshold", "smd_pass", "&le;",
              3),
             ("MDRR", "mdrr", "max_mdrr_threshold", "mdrr_pass", "&le;", 2),
             ("EASE", "ease", "max_ease_threshold", "ease_pass", "&le;", 3)]
    headers = ["outcome", "estimator", "HR (95% CI)", "calibrated HR", "persons T / C",
               "events T / C"]
    shared = {}
    for title, _, threshold, _, sign, _ in gates:
        values = merged[threshold].dropna().unique()
        shared[threshold] = len(values) <= 1
        headers.append(f"{title} ({sign}{num(values[0], 3, 'g')})"
                       if len(values) == 1 else title)
    headers.append("verdict and reasons")
    rows = []
    for r in shown.itertuples():
        if r.status == "ok":
            estimate = hr_ci(r.estimate, r.ci_low, r.ci_high)
        else:
            estimate = f'<span class="fail">failed</span>: {mask_text(r.message, mcc)}'
        row = [esc(r.outcome), esc(r.estimator), estimate,
               hr_ci(r.calibrated_estimate, r.calibrated_ci_low, r.calibrated_ci_high),
               f"{r.n_treated} / {r.n_comparator}", f"{r.events_treated} / {r.events_comparator}"]
        for _, value, threshold, passed, sign, digits in gates:
            limit = "" if shared[threshold] else (
                f" ({sign}{num(getattr(r, threshold), 3, 'g')})")
            row.append(f"{num(getattr(r, value), digits)}{limit} {verdict(getattr(r, passed))}")
        reasons = f": {mask_text(r.reasons, mcc)}" if isinstance(r.reasons, str) else ""
        row.append(verdict(r.passed) + reasons)
        rows.append(row)
    content = table(headers, rows, counts={4, 5}, css="diagnostics", wrap={2, len(headers) - 1})
    first = merged.iloc[0]
    text = (f"Per outcome of interest and estimator (T: {esc(labels[0])}, C: "
            f"{esc(labels[1])}): each gate's value and verdict, thresholds in the headers; a "
            "gate that cannot be assessed (n/a) does not fail. Propensity model AUC "
            f"{num(first['ps_auc'], 3)}, max |SMD| before adjustment "
            f"{num(first['max_abs_smd_before'], 3)} over {esc(first['n_covariates'])} "
            "covariates.")
    if merged.get("ps_note", pd.Series(dtype=object)).notna().any():
        text += f" {esc(merged['ps_note'].dropna().iloc[0])}."
    controls = data.estimates[(data.estimates["comparison_id"] == cid)
                              & (data.estimates["role"] != "outcome")]
    failed = controls[controls["status"] != "ok"]
    if len(failed):
        groups = list(failed.groupby(["role", "outcome"]))
        reasons = "; ".join(
            f"{esc(role.replace('_', ' '))} {esc(outcome)} ({esc(', '.join(group['estimator']))})"
            f": {mask_text(group['message'].iloc[0], mcc)}"
            for (role, outcome), group in groups[:10])
        more = f"; and {len(groups) - 10} more" if len(groups) > 10 else ""
        text += f" {len(failed)} of {len(controls)} control estimates failed: {reasons}{more}."
    return _subsection(sid, "diagnostics", '<div class="scroll">' + content + "</div>"
                       + note(text))


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a1a1a;
margin:0 auto;max-width:1320px;padding:0 24px 40px;background:#fff}
header{border-bottom:2px solid #08306b;margin-bottom:12px}
h1{font-size:24px;margin:18px 0 2px}h2{font-size:20px;margin:28px 0 8px;color:#08306b;
border-bottom:1px solid #c6dbef;padding-bottom:3px}h3{font-size:16px;margin:18px 0 6px}
h4{font-size:14px;margin:4px 0 6px}.sub{margin-left:4px}.sub>p{max-width:980px}
.subnav,.sub .note,.note{color:#555;font-size:13px}code{font-size:12px;background:#f3f3f3;
padding:1px 3px;border-radius:3px}nav#toc{background:#f7fbff;border:1px solid #c6dbef;
padding:4px 18px;display:inline-block;min-width:380px}nav#toc h2{border:0;margin:8px 0 4px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:#eef3f8;cursor:pointer;user-select:none;vertical-align:bottom}
td{white-space:nowrap}td.wrap{white-space:normal}
thead th[data-dir=asc]::after{content:" \\25B2"}thead th[data-dir=desc]::after{content:" \\25BC"}
td.count{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.facts th{background:#f7f7f7;width:270px;cursor:default}table.facts td{white-space:normal}
tbody tr:nth-child(even){background:#fafafa}
.pass{color:#1b7837;font-weight:600}.fail{color:#b2182b;font-weight:600}.na{color:#888}
figure{margin:6px 0}img{max-width:100%;height:auto;display:block}
.row{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}.grow{flex:1;min-width:420px}
.scroll{overflow-x:auto}table.diagnostics{font-size:12px}table.diagnostics td{padding:3px 5px}
table.diagnostics td:nth-child(3){min-width:120px}table.diagnostics td:last-child{min-width:200px}
details.warnings{max-width:1100px;font-size:13px}#js-errors:empty{display:none}
#js-errors{background:#fee;border:1px solid #b2182b;padding:6px;color:#b2182b}
footer{margin-top:36px;color:#777;font-size:12px;border-top:1px solid #ddd;padding-top:8px}
"""

ERROR_JS = """window.onerror=function(m,s,l){var d=document.getElementById('js-errors');
if(d){d.appendChild(document.createTextNode('JS error: '+m+' (line '+l+') '));}};"""

SORT_JS = """(function(){
function key(c){var t=c.textContent.trim(),v=parseFloat(t.replace(/,/g,'').replace(/^</,''));
return isNaN(v)?[1,t.toLowerCase()]:[0,v];}
function cmp(a,b){if(a[0]!==b[0])return a[0]-b[0];return a[1]<b[1]?-1:a[1]>b[1]?1:0;}
document.querySelectorAll('table.sortable thead th').forEach(function(th){
th.addEventListener('click',function(){var tb=th.closest('table').tBodies[0],
i=Array.prototype.indexOf.call(th.parentNode.children,th),asc=th.dataset.dir!=='asc';
th.parentNode.querySelectorAll('th').forEach(function(o){delete o.dataset.dir;});
th.dataset.dir=asc?'asc':'desc';var rows=Array.prototype.slice.call(tb.rows);
rows.sort(function(a,b){return cmp(key(a.cells[i]),key(b.cells[i]))*(asc?1:-1);});
rows.forEach(function(r){tb.appendChild(r);});});});
window.addEventListener('load',function(){var im=document.images,ok=0;
for(var k=0;k<im.length;k++){if(im[k].complete&&im[k].naturalWidth>0)ok++;}
document.body.setAttribute('data-images-loaded',ok+'/'+im.length);});
})();"""
