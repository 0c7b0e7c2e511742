"""Load one comparison from the run workspace as arrays for the estimators.

ComparisonData is the hand-over between `cohort` (which knows OMOP, dates and SQL) and
`estimators` (which knows only arrays): a sparse covariate matrix, the treatment indicator, and
per outcome the survival time (days), the event flag and the prior-outcome flag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import scipy.sparse as sp

FIRST_VALUE_ANALYSIS = 900  # = cohort.covariates.FIRST_VALUE_ANALYSIS: concept analyses below


@dataclass(frozen=True)
class OutcomeArrays:
    """Time to first event or censoring (days at risk), event flag, prior-outcome flag."""

    time: np.ndarray
    event: np.ndarray
    prior: np.ndarray


@dataclass(frozen=True)
class ComparisonData:
    """One treatment-comparator comparison as arrays, rows ordered by row_id."""

    comparison_id: int
    treated: np.ndarray          # int8, 1 = treatment arm
    days_at_risk: np.ndarray     # int32
    X: sp.csr_matrix             # binary covariates, rows x len(covariate_ids)
    covariate_ids: np.ndarray    # int64, column -> covariate id
    outcomes: dict[int, OutcomeArrays]

    @property
    def n(self) -> int:
        return int(self.treated.shape[0])


def _partition(workspace: Path, folder: str, comparison_id: int) -> str | None:
    path = workspace / folder / f"comparison_id={comparison_id}"
    return str(path / "*.parquet") if path.is_dir() else None


def load_comparison(
    workspace: Path, comparison_id: int, outcome_ids: list[int]
) -> ComparisonData:
    """Read the comparison's partitions and build its arrays."""
    con = duckdb.connect()
    try:
        cohort_glob = _partition(workspace, "cohort", comparison_id)
        if cohort_glob is None:
            empty = np.zeros(0, dtype=np.int8)
            return ComparisonData(
                comparison_id, empty, np.zeros(0, np.int32), sp.csr_matrix((0, 0)),
                np.zeros(0, np.int64),
                {o: OutcomeArrays(np.zeros(0), np.zeros(0, np.int8), np.zeros(0, bool))
                 for o in outcome_ids},
            )
        cohort = con.read_parquet(cohort_glob).order("row_id").select(
            "treated::TINYINT AS treated, days_at_risk").fetchnumpy()
        treated = cohort["treated"].astype(np.int8)
        days = cohort["days_at_risk"].astype(np.int32)
        n = treated.shape[0]
        X, covariate_ids = _covariates(con, workspace, comparison_id, n)
        outcomes = _outcomes(con, workspace, comparison_id, days, outcome_ids)
        return ComparisonData(comparison_id, treated, days, X, covariate_ids, outcomes)
    finally:
        con.close()


def _covariates(
    con: duckdb.DuckDBPyConnection, workspace: Path, comparison_id: int, n: int
) -> tuple[sp.csr_matrix, np.ndarray]:
    """The comparison's covariate matrix from the entry-level covariates: its rows' entries,
    less the concepts of its own arms, less covariates in fewer than max(1, min_prevalence * n)
    of its rows (the same rules as cohort.covariates' cf_covariate view)."""
    cohort_glob = _partition(workspace, "cohort", comparison_id)
    entry_file = workspace / "entry_covariate.parquet"
    if cohort_glob is None or not entry_file.exists():
        return sp.csr_matrix((n, 0), dtype=np.float64), np.zeros(0, np.int64)
    pairs = con.execute(
        "SELECT h.row_id, e.covariate_id FROM read_parquet($cohort) h "
        "JOIN read_parquet($entries) e USING (entry_id)",
        {"cohort": cohort_glob, "entries": str(entry_file)}).fetchnumpy()
    excluded = con.execute(
        "SELECT concept_id FROM read_parquet($file) WHERE comparison_id = $id",
        {"file": str(workspace / "arm_exclusion.parquet"), "id": comparison_id},
    ).fetchnumpy()["concept_id"]
    ids = pairs["covariate_id"].astype(np.int64)
    keep = (ids % 1000 >= FIRST_VALUE_ANALYSIS) | ~np.isin(ids // 1000, excluded)
    covariate_ids, columns = np.unique(ids[keep], return_inverse=True)
    X = sp.csr_matrix(
        (np.ones(columns.shape[0], dtype=np.float64),
         (pairs["row_id"][keep].astype(np.int64), columns)),
        shape=(n, covariate_ids.shape[0]),
    )
    X.sum_duplicates()
    X.data[:] = 1.0
    meta = json.loads((workspace / "prepared.json").read_text()) if (
        workspace / "prepared.json").exists() else {}
    floor = max(1.0, float(meta.get("covariate_min_prevalence", 0.0)) * n)
    prevalent = np.flatnonzero(np.asarray(X.sum(axis=0)).ravel() >= floor)
    return X[:, prevalent].tocsr(), covariate_ids[prevalent].astype(np.int64)


def _outcomes(
    con: duckdb.DuckDBPyConnection, workspace: Path, comparison_id: int,
    days_at_risk: np.ndarray, outcome_ids: list[int],
) -> dict[int, OutcomeArrays]:
    n = days_at_risk.shape[0]
    result = {}
    glob = _partition(workspace, "outcome_time", comparison_id)
    table = (
        con.read_parquet(glob).order("outcome_id")
        .select("row_id, outcome_id, event_time, prior_outcome").fetchnumpy() if glob else None
    )
    for outcome_id in outcome_ids:
        time = days_at_risk.astype(np.float64).copy()
        event = np.zeros(n, dtype=np.int8)
        prior = np.zeros(n, dtype=bool)
        if table is not None:
            mine = slice(*np.searchsorted(table["outcome_id"], [outcome_id, outcome_id + 1]))
            rows = table["row_id"][mine].astype(np.int64)
            event_time = np.ma.getdata(table["event_time"][mine])
            has_event = ~np.ma.getmaskarray(table["event_time"][mine])
            time[rows[has_event]] = event_time[has_event]
            event[rows[has_event]] = 1
            prior[rows] = np.ma.filled(table["prior_outcome"][mine], False)
        result[outcome_id] = OutcomeArrays(time, event, prior)
    return result
