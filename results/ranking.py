"""What a ranking needs, computed once per run: E-values, q-values and the evidence order.

Only outcomes of interest whose diagnostics pass are ranked. Within a run, outcome and
estimator, candidates get Benjamini-Hochberg q-values across treatments (from calibrated
p-values where calibration was possible) and are ordered by the CI bound nearest the null:
the most conservative reading of each candidate's effect.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from estimators.sensitivity import benjamini_hochberg, e_value_hr
from results.store import open_store
from results.summary import mask_counts

RARE_OUTCOME = 0.15  # VanderWeele: an HR approximates an RR when the outcome stays below 15%


def best_available(estimates: pd.DataFrame) -> pd.DataFrame:
    """Estimate, CI and p-value to rank on: calibrated where available, else as estimated."""
    calibrated = estimates["calibrated_estimate"].notna()
    return pd.DataFrame({
        "hr": estimates["calibrated_estimate"].where(calibrated, estimates["estimate"]),
        "ci_low": estimates["calibrated_ci_low"].where(calibrated, estimates["ci_low"]),
        "ci_high": estimates["calibrated_ci_high"].where(calibrated, estimates["ci_high"]),
        "p": estimates["calibrated_p_value"].where(calibrated, estimates["p_value"]),
        "calibrated": calibrated,
    }, index=estimates.index)


def rank_estimates(estimates: pd.DataFrame, diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Add e_value, e_value_ci, q_value and rank columns (NULL where not ranked)."""
    keys = ["comparison_id", "outcome", "estimator"]
    passed = diagnostics.set_index(keys)["passed"]
    estimates = estimates.copy()
    in_ranking = (
        (estimates["role"] == "outcome") & (estimates["status"] == "ok")
        & estimates.set_index(keys).index.map(passed).fillna(False).to_numpy(dtype=bool)
    )
    best = best_available(estimates)
    events = estimates["events_treated"] + estimates["events_comparator"]
    persons = estimates["n_treated"] + estimates["n_comparator"]
    rare = (events / persons.where(persons > 0)) < RARE_OUTCOME
    values = [
        e_value_hr(h, lo, hi, rare=bool(r)) if ok else (math.nan, math.nan)
        for h, lo, hi, r, ok in zip(best["hr"], best["ci_low"], best["ci_high"], rare,
                                    estimates["status"] == "ok", strict=True)
    ]
    estimates["e_value"] = [v[0] for v in values]
    estimates["e_value_ci"] = [v[1] for v in values]
    nearest = np.where(best["hr"] < 1, best["ci_high"], best["ci_low"])
    excludes_null = (best["ci_high"] < 1) | (best["ci_low"] > 1)
    estimates["evidence"] = np.where(excludes_null, np.abs(np.log(nearest)), 0.0)
    estimates["q_value"] = np.nan
    estimates["rank"] = pd.array([pd.NA] * len(estimates), dtype="Int64")
    ranked = estimates[in_ranking]
    for _, rows in ranked.groupby(["outcome", "estimator"]).groups.items():
        estimates.loc[rows, "q_value"] = benjamini_hochberg(best.loc[rows, "p"])
        order = (estimates.loc[rows]
                 .assign(strength=np.abs(np.log(best.loc[rows, "hr"])))
                 .sort_values(["evidence", "strength"], ascending=False).index)
        estimates.loc[order, "rank"] = np.arange(1, len(order) + 1)
    return estimates.drop(columns=["evidence"])


def ranked_candidates(
    results: Path, *, study: str | None = None, outcome: str | None = None,
    direction: str | None = None, estimator: str | None = None, top: int | None = None,
    run_id: str | None = None,
) -> pd.DataFrame:
    """Rows of the `rankings` view for the latest run of each study (or one run), filtered.

    Counts below each run's min_cell_count are masked ("<5"): the output is safe to share.
    """
    where, params = [], []
    if run_id is None:
        where.append("""r.run_id IN (
            SELECT arg_max(run_id, finished_at) FROM runs WHERE status = 'completed'
            GROUP BY study)""")
    else:
        where.append("r.run_id = ?")
        params.append(run_id)
    for column, value in (("r.study", study), ("r.outcome", outcome),
                          ("r.estimator", estimator)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if direction == "protective":
        where.append("r.hr < 1")
    elif direction == "harmful":
        where.append("r.hr > 1")
    with open_store(results, read_only=True) as con:
        frame = con.execute(f"""
            SELECT r.study, r.outcome, r.estimator, r.rank, r.treatment, r.comparator,
                   r.hr, r.ci_low, r.ci_high, r.p_value, r.q_value, r.calibrated,
                   r.uncalibrated_hr, r.e_value, r.e_value_ci, r.n_treated, r.n_comparator,
                   r.events_treated, r.events_comparator, r.ps_note, r.run_id,
                   json_extract(u.config_json, '$.min_cell_count')::INTEGER AS min_cell_count
            FROM rankings r JOIN runs u USING (run_id)
            WHERE {" AND ".join(where)}
            ORDER BY r.study, r.outcome, r.estimator, r.rank
        """, params).df()
    if top is not None:
        frame = frame.groupby(["study", "outcome", "estimator"]).head(top)
    counts = ["n_treated", "n_comparator", "events_treated", "events_comparator"]
    masked = [mask_counts(part, counts, int(cells))
              for cells, part in frame.groupby("min_cell_count", dropna=False)] or [frame]
    return pd.concat(masked).sort_values(["study", "outcome", "estimator", "rank"]).drop(
        columns=["min_cell_count"]).reset_index(drop=True)
