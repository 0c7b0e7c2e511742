"""The report's screen section: every candidate's account and the candidate-level forest plot.

A screen's unit of evidence is the candidate (its battery of trials pooled per comparator
strategy), not the single comparison, so this section leads the report of a screen and the
per-comparison sections that follow are limited to the trials of the best-ranked candidates.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from results import report_plots as plots
from results.account import candidate_account
from results.report import esc, figure, hr_ci, note, num, pvalue, table
from results.store import open_store

MAX_TRIAL_SECTIONS = 30
"""A screen's report draws the per-trial sections of at most this many comparisons."""


def candidate_rows(results: Path, run_id: str, estimator: str) -> pd.DataFrame:
    """The run's pooled candidate evidence for one estimator (outcomes of interest)."""
    with open_store(results, read_only=True) as con:
        return con.execute("""
            SELECT * FROM candidate_evidence
            WHERE run_id = ? AND estimator = ? AND role = 'outcome'
            ORDER BY outcome, strategy, rank NULLS LAST, treatment""",
                           [run_id, estimator]).df()


def screen_section(results: Path, run_id: str, estimator: str) -> str:
    """HTML: the candidate ranking per outcome and strategy, its forest plot, the account."""
    pooled = candidate_rows(results, run_id, estimator)
    account = candidate_account(results, run_id=run_id, estimator=estimator)
    parts = ['<section id="candidates"><h2>Candidates</h2>',
             note(f"Each candidate is emulated in a battery of trials (one comparator drug "
                  f"each); a trial counts when its {esc(estimator)} estimate passes every "
                  "diagnostic. The pooled hazard ratio is over the balanced trials, with a "
                  "confidence interval that allows for the trials sharing the candidate's "
                  "treated persons. Identified: beneficial at the false-discovery rate under "
                  "every comparator strategy.")]
    ranked = pooled[pooled["rank"].notna()]
    elsewhere = _ranked_by_other_estimators(results, run_id, estimator)
    if ranked.empty:
        parts.append(note(f"No candidate is ranked with {esc(estimator)}: see the account below "
                          f"for why.{elsewhere}"))
    elif elsewhere:
        parts.append(note(elsewhere.strip()))
    else:
        rows = [[esc(r.outcome), esc(r.strategy), esc(int(r.rank)), esc(r.treatment),
                 hr_ci(r.estimate, r.ci_low, r.ci_high), pvalue(r.p_value), pvalue(r.q_value),
                 f"{int(r.trials_balanced)}/{int(r.trials_run)}", num(r.share_protective),
                 num(r.share_harmful), "yes" if r.identified else "no"]
                for r in ranked.itertuples()]
        parts.append(table(["outcome", "strategy", "rank", "candidate", "pooled HR (95% CI)",
                            "p", "q", "trials balanced", "share protective",
                            "share harmful", "identified"], rows))
    forest = _forest(pooled)
    if len(forest):
        parts.append(figure(plots.forest_plot(forest, f"{estimator}: pooled hazard ratio per "
                                              "candidate and comparator strategy"),
                            "candidate forest plot", "forest"))
        parts.append(note("Dark: reported (enough balanced trials); grey: not. Filled squares "
                          "pool calibrated trial estimates."))
    parts.append("<h3>Account of every candidate</h3>")
    rows = [[esc(r.treatment), _eligible(r.eligible_new_users), _trials(r),
             esc(r.by_strategy or ""), esc(r.status)] for r in account.itertuples()]
    parts.append(table(["candidate", "eligible new users", "trials run / both arms / "
                        "estimable / balanced", "pooled by strategy", "what became of it"],
                       rows, counts={1}))
    parts.append("</section>")
    return "".join(parts)


def _ranked_by_other_estimators(results: Path, run_id: str, estimator: str) -> str:
    """' Ranked with other estimators: overlap 3, ...' (cohortflow rank shows them), or ''."""
    with open_store(results, read_only=True) as con:
        counts = con.execute("""
            SELECT estimator, count(DISTINCT treatment) FROM candidate_evidence
            WHERE run_id = ? AND estimator <> ? AND rank IS NOT NULL AND role = 'outcome'
            GROUP BY estimator ORDER BY estimator""", [run_id, estimator]).fetchall()
    if not counts:
        return ""
    listed = ", ".join(f"{esc(name)} {n}" for name, n in counts)
    return (f" Candidates ranked with other estimators: {listed} (cohortflow rank --estimator "
            "NAME).")


def _eligible(value) -> str:
    """Eligible new users as shown; '-' where the screen did not count them (fewer exposed
    persons than its minimum)."""
    return "-" if pd.isna(value) or str(value) in ("<NA>", "nan") else esc(value)


def _trials(row) -> str:
    if pd.isna(row.trials_run):
        return "-"
    return (f"{int(row.trials_run)} / {int(row.trials_with_both_arms)} / "
            f"{int(row.trials_estimable)} / {int(row.trials_balanced)}")


def _forest(pooled: pd.DataFrame) -> pd.DataFrame:
    """forest_plot rows: one per candidate with a pooled estimate, grouped by outcome/strategy."""
    shown = pooled[pooled["estimate"].notna()]
    return pd.DataFrame({
        "outcome": shown["outcome"].astype(str) + " vs " + shown["strategy"].astype(str),
        "label": shown["treatment"].astype(str),
        "hr": shown["estimate"].astype(float),
        "ci_low": shown["ci_low"].astype(float),
        "ci_high": shown["ci_high"].astype(float),
        "passed": shown["reported"].fillna(False).astype(bool),
        "calibrated": shown["calibrated"].fillna(False).astype(bool),
        "ok": True,
    }).sort_values(["outcome", "hr"]).head(60)


def trial_sections_to_draw(comparisons: pd.DataFrame, pooled: pd.DataFrame) -> list[int]:
    """The comparison ids whose sections a screen's report draws: the trials of the best-ranked
    candidates first, at most MAX_TRIAL_SECTIONS."""
    order = (pooled[pooled["rank"].notna()].sort_values("rank")["treatment"]
             .drop_duplicates().tolist())
    chosen = comparisons[comparisons["treatment"].isin(order)].assign(
        _order=lambda f: f["treatment"].map({t: i for i, t in enumerate(order)}))
    return chosen.sort_values(["_order", "comparison_id"])["comparison_id"].head(
        MAX_TRIAL_SECTIONS).astype(int).tolist()
