"""An account of every screened candidate: what became of it, and why it has no rank if not.

Read from the `candidate_account` view (results.store): per ingredient the screen counted, its
eligible new users, its battery, trials run / with both arms / estimable / balanced, the
commonest reason a trial failed, the propensity models that selected no covariate, the pooled
evidence per comparator strategy and its rank. Person counts below the run's min_cell_count
are masked, so the account is safe to show and share.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from results.store import open_store
from results.summary import latest_run_id, mask_counts

ACCOUNT_COUNTS = ["eligible_new_users"]


def candidate_account(results: Path, *, run_id: str | None = None, study: str | None = None,
                      outcome: str | None = None, estimator: str | None = None) -> pd.DataFrame:
    """The account of one run's screen (the latest run of `study` by default), masked.

    Without `estimator`, the run's primary estimator (iptw when the study ran it) is shown.
    Candidates with a rank come first, then by eligible new users.
    """
    run_id = run_id or latest_run_id(results, study)
    with open_store(results, read_only=True) as con:
        config = con.execute("SELECT json_extract(config_json, '$.min_cell_count')::INTEGER, "
                             "json_extract(config_json, '$.estimators') FROM runs "
                             "WHERE run_id = ?", [run_id]).fetchone()
        frame = con.execute("SELECT * FROM candidate_account WHERE run_id = ?",
                            [run_id]).df()
    if frame.empty:
        raise LookupError(f"{results}: run {run_id} is not a screen (no screened candidates)")
    min_cell_count = int(config[0]) if config and config[0] is not None else 5
    estimator = estimator or primary_estimator(config[1] if config else None)
    keep = frame["estimator"].isna() | (frame["estimator"] == estimator)
    if outcome is not None:
        keep &= frame["outcome"].isna() | (frame["outcome"] == outcome)
    frame = frame[keep].sort_values(
        ["rank", "selected", "eligible_new_users", "treatment"],
        ascending=[True, False, False, True], na_position="last")
    return mask_counts(frame, ACCOUNT_COUNTS, min_cell_count).reset_index(drop=True)


def primary_estimator(estimators: object) -> str:
    """The estimator a run's summaries lead with: iptw when the study ran it, else its first
    (the one rule the terminal summary, the report and the account share)."""
    names = json.loads(estimators) if isinstance(estimators, str) else (estimators or [])
    names = [n if isinstance(n, str) else next(iter(n)) for n in names]
    return "iptw" if "iptw" in names or not names else names[0]


def account_lines(account: pd.DataFrame) -> list[str]:
    """One readable line per screened candidate (and outcome): counts, trials and what became of
    it; the ingredients below the screen's minimum share one closing line."""
    lines = []
    screened = account[account["selected"].fillna(False).astype(bool)]
    for row in screened.itertuples():
        trials = ("" if pd.isna(row.trials_run) else
                  f"; trials {int(row.trials_run)} run, {int(row.trials_with_both_arms)} with "
                  f"both arms, {int(row.trials_estimable)} estimable, "
                  f"{int(row.trials_balanced)} balanced")
        ps = ("" if pd.isna(row.trials_ps_without_covariates)
              or not row.trials_ps_without_covariates else
              f"; {int(row.trials_ps_without_covariates)} propensity model(s) selected no "
              "covariate (adjusted = crude)")
        rank = "" if pd.isna(row.rank) else f"rank {int(row.rank)} ({row.rank_strategy}): "
        pooled = "" if not isinstance(row.by_strategy, str) else f"; {row.by_strategy}"
        outcome = "" if not isinstance(row.outcome, str) else f" [{row.outcome}]"
        lines.append(f"{rank}{row.treatment}{outcome}: {row.eligible_new_users} eligible new "
                     f"users{trials}{ps}{pooled} -> {row.status}")
    below = account.loc[~account["selected"].fillna(False).astype(bool), "treatment"]
    if len(below):
        shown = ", ".join(below.head(12))
        lines.append(f"not screened (fewer eligible new users than the screen's minimum): "
                     f"{len(below)} ingredient(s): {shown}{', ...' if len(below) > 12 else ''}"
                     " (cohortflow account --format csv lists each)")
    return lines


def screen_runs(results: Path, *, study: str | None = None,
                run_id: str | None = None) -> list[str]:
    """The runs to rank at the candidate level: the given run, or each study's latest, when
    they are screens (their candidates have pooled evidence)."""
    with open_store(results, read_only=True) as con:
        rows = con.execute("""
            SELECT r.run_id FROM runs r
            WHERE EXISTS (SELECT 1 FROM candidate_evidence c WHERE c.run_id = r.run_id)
              AND (($run_id::VARCHAR IS NOT NULL AND r.run_id = $run_id)
                   OR ($run_id::VARCHAR IS NULL AND r.run_id IN (
                        SELECT arg_max(run_id, finished_at) FROM runs
                        WHERE status = 'completed' AND ($study::VARCHAR IS NULL OR study = $study)
                        GROUP BY study)))
            ORDER BY r.run_id
        """, {"run_id": run_id, "study": study}).fetchall()
    return [row[0] for row in rows]


def screen_ranking(results: Path, run_id: str, *, outcome: str | None = None,
                   estimator: str | None = None, direction: str | None = None,
                   top: int | None = None) -> pd.DataFrame:
    """A screen's ranked candidates per outcome, comparator strategy and estimator: the pooled
    HR over the balanced trials, q-value, and whether IBM's rule identifies the candidate."""
    where, params = ["c.run_id = ?", "c.rank IS NOT NULL"], [run_id]
    for column, value in (("c.outcome", outcome), ("c.estimator", estimator)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if direction is not None:
        where.append("c.estimate < 1" if direction == "protective" else "c.estimate > 1")
    with open_store(results, read_only=True) as con:
        frame = con.execute(f"""
            SELECT r.study, c.outcome, c.strategy, c.estimator, c.rank, c.treatment,
                   c.estimate AS hr, c.ci_low, c.ci_high, c.p_value, c.q_value, c.identified,
                   c.trials_balanced, c.trials_run, c.balanced_rate, c.share_protective,
                   c.share_harmful, c.calibrated, c.run_id
            FROM candidate_evidence c JOIN runs r USING (run_id)
            WHERE {" AND ".join(where)}
            ORDER BY c.outcome, c.strategy, c.estimator, c.rank
        """, params).df()
    if top is not None:
        frame = frame.groupby(["outcome", "strategy", "estimator"]).head(top)
    return frame.reset_index(drop=True)
