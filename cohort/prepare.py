"""Build every comparison's cohort, outcomes and covariates once, into a run workspace.

The workspace (a folder under data/) holds Parquet files partitioned by comparison, so each
analysis task reads only its own comparison. Person ids stay in the workspace.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cohort.cohorts import EXPOSURE_COLUMNS, build_cohorts
from cohort.concepts import concept_set_labels, resolve_concept_sets
from cohort.covariates import build_covariates, domain_records
from cohort.design import CohortDesign
from cohort.outcomes import build_outcomes, outcome_attrition
from cohort.source import REQUIRED_COLUMNS, RecordSource, SourceError

PARTITIONED = {"cohort": "cf_cohort", "covariate": "cf_covariate",
               "outcome_time": "cf_outcome_time"}


@dataclass
class PreparedStudy:
    """What preparation produced: the workspace and the tables every later step needs."""

    workspace: Path
    comparisons: pd.DataFrame   # comparison_id, treatment, comparator, n_treated, n_comparator
    outcomes: pd.DataFrame      # outcome_id, outcome, role, concept_ids
    attrition: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, workspace: Path) -> PreparedStudy:
        meta = json.loads((workspace / "prepared.json").read_text())
        return cls(
            workspace=workspace,
            comparisons=pd.read_parquet(workspace / "comparisons.parquet"),
            outcomes=pd.read_parquet(workspace / "outcomes.parquet"),
            attrition=pd.read_parquet(workspace / "attrition.parquet"),
            warnings=meta["warnings"], seconds=meta["seconds"],
        )


def source_requirements(source: RecordSource, design: CohortDesign) -> dict:
    """The tables and columns this design reads from the source."""
    needs = {t: REQUIRED_COLUMNS[t] for t in ("person", "observation_period",
                                              "condition_occurrence")}
    needs[design.exposure_table] = REQUIRED_COLUMNS[EXPOSURE_COLUMNS[design.exposure_table][0]]
    for domain in design.covariate_domains:
        if domain != "demographics":
            table = domain_records(source, domain)[1]
            needs[table] = REQUIRED_COLUMNS[table]
    return needs


def prepare_study(source: RecordSource, design: CohortDesign, workspace: Path) -> PreparedStudy:
    """Run the cohort SQL for all comparisons and write the workspace; return its summary."""
    source.require(source_requirements(source, design))
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 3)
        clock = now

    warnings = resolve_concept_sets(source, design.concept_sets)
    _check_arms_have_concepts(source, design)
    lap("concept_sets")
    attrition = build_cohorts(source, design)
    lap("cohorts")
    outcomes = build_outcomes(source, design)
    attrition = pd.concat([attrition, outcome_attrition(source, design)], ignore_index=True)
    lap("outcomes")
    covariate_ref = build_covariates(source, design)
    lap("covariates")

    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    con = source.con
    for folder, table in PARTITIONED.items():
        con.table(table).write_parquet(
            str(workspace / folder), partition_by=["comparison_id"], overwrite=True
        )
    comparisons = con.execute("""
        SELECT c.comparison_id, c.treatment, c.comparator,
               count(h.row_id) FILTER (WHERE h.treated) AS n_treated,
               count(h.row_id) FILTER (WHERE NOT h.treated) AS n_comparator,
               (SELECT list(concept_id ORDER BY concept_id) FROM cf_concept_set s
                WHERE s.set_name = c.treatment) AS treatment_concept_ids,
               (SELECT list(concept_id ORDER BY concept_id) FROM cf_concept_set s
                WHERE s.set_name = c.comparator) AS comparator_concept_ids
        FROM cf_comparison c LEFT JOIN cf_cohort h USING (comparison_id)
        GROUP BY ALL ORDER BY c.comparison_id
    """).df()
    outcomes = con.execute("""
        SELECT o.outcome_id, o.outcome, o.role,
               (SELECT list(concept_id ORDER BY concept_id) FROM cf_concept_set s
                WHERE s.set_name = o.outcome) AS concept_ids
        FROM cf_outcome o ORDER BY o.outcome_id
    """).df()
    labels = concept_set_labels(source, design.concept_sets).set_index("set_name")
    for frame, name_column, prefix in ((comparisons, "treatment", "treatment_"),
                                       (comparisons, "comparator", "comparator_"),
                                       (outcomes, "outcome", "")):
        for label in ("codes", "names", "atc"):
            frame[f"{prefix}{label}"] = frame[name_column].map(labels[label])
    comparisons.to_parquet(workspace / "comparisons.parquet")
    outcomes.to_parquet(workspace / "outcomes.parquet")
    attrition.to_parquet(workspace / "attrition.parquet")
    covariate_ref.to_parquet(workspace / "covariate_ref.parquet")
    lap("write_workspace")
    (workspace / "prepared.json").write_text(
        json.dumps({"warnings": warnings, "seconds": seconds}, indent=1)
    )
    return PreparedStudy(workspace, comparisons, outcomes, attrition, warnings, seconds)


def _check_arms_have_concepts(source: RecordSource, design: CohortDesign) -> None:
    """A treatment or comparator whose concept set resolves to nothing is an input error."""
    empty = source.con.execute(
        "SELECT name FROM (SELECT unnest($names) AS name) n "
        "WHERE name NOT IN (SELECT set_name FROM cf_concept_set) ORDER BY name",
        {"names": design.exposure_sets + [o.name for o in design.outcomes]},
    ).fetchall()
    if empty:
        raise SourceError(
            f"{source.path}: concept set(s) {', '.join(r[0] for r in empty)} resolve to no "
            "concepts (every included id is also excluded)"
        )
