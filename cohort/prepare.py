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

from cohort.battery import battery_trials
from cohort.cohorts import EXPOSURE_COLUMNS, build_cohorts, comparator_of
from cohort.concepts import concept_set_labels, resolve_concept_sets
from cohort.covariates import build_covariates, domain_records
from cohort.design import CohortDesign
from cohort.outcomes import build_outcomes, outcome_attrition, outcome_requirements
from cohort.screen import screen_candidates, screen_concept_sets
from cohort.source import REQUIRED_COLUMNS, RecordSource, SourceError, scalar

PARTITIONED = {"cohort": "cf_cohort", "outcome_time": "cf_outcome_time"}
# Covariates once per cohort entry (entry_id, covariate_id), ordered by entry_id, and each
# comparison's concepts that are never its covariates (comparison_id, concept_id): the
# comparison-specific exclusion and prevalence floor apply when a comparison is loaded.
ENTRY_TABLES = {"entry_covariate.parquet": ("cf_entry_covariate", "entry_id, covariate_id"),
                "arm_exclusion.parquet": ("cf_arm_exclusion", "comparison_id, concept_id")}


@dataclass
class PreparedStudy:
    """What preparation produced: the workspace and the tables every later step needs."""

    workspace: Path
    comparisons: pd.DataFrame   # comparison_id, treatment, comparator, strategy, trial,
    #                             n_treated, n_comparator, cohort_note
    outcomes: pd.DataFrame      # outcome_id, outcome, role, concept_ids
    attrition: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    screen: pd.DataFrame | None = None  # the expanded treatment screen, with counts

    @classmethod
    def load(cls, workspace: Path) -> PreparedStudy:
        meta = json.loads((workspace / "prepared.json").read_text())
        return cls(
            workspace=workspace,
            comparisons=pd.read_parquet(workspace / "comparisons.parquet"),
            outcomes=pd.read_parquet(workspace / "outcomes.parquet"),
            attrition=pd.read_parquet(workspace / "attrition.parquet"),
            warnings=meta["warnings"], seconds=meta["seconds"],
            screen=(pd.read_parquet(workspace / "screen.parquet")
                    if (workspace / "screen.parquet").exists() else None),
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
    needs.update(outcome_requirements(source, design))
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
    check_usable_rows(source, design)
    warnings += data_warnings(source, design)
    lap("concept_sets")
    concept_sets, comparisons, screen = dict(design.concept_sets), list(design.comparisons), None
    comparator = comparator_of(design)
    trials = None  # a battery's (strategy, trial) per comparison
    if design.screen is not None:
        screen = screen_candidates(source, design)
        candidates = screen_concept_sets(screen)
        _check_screen(source, design, screen)
        concept_sets.update(candidates)
        comparisons = [(name, comparator.name or comparator.kind) for name in candidates]
        if comparator.kind == "battery":
            assert comparator.battery is not None
            trials, plan, notes = battery_trials(source, comparator.battery,
                                                 screen[screen["selected"]], comparator.seed)
            warnings += notes
            screen = screen.merge(plan, on="set_name", how="left")
            comparisons = list(zip(trials["treatment"], trials["comparator"], strict=True))
        lap("screen")
    if trials is None:  # one comparison per treatment, named by the comparator kind
        trials = pd.DataFrame({"strategy": [comparator.kind] * len(comparisons), "trial": None})
    _check_arms_have_concepts(source, design, comparisons)
    attrition = build_cohorts(source, design, comparisons)
    _check_cohorts(source, attrition)
    warnings += _cohort_warnings(source)
    losses = arm_losses(attrition)
    cohort_notes = arm_loss_notes(losses)
    warnings += arm_loss_warnings(losses, comparisons)
    lap("cohorts")
    outcomes = build_outcomes(source, design)
    _check_outcome_events(source, design)
    outcome_steps = outcome_attrition(source, design)
    outcome_steps["step_index"] = int(attrition["step_index"].max()) + 1
    attrition = pd.concat([attrition, outcome_steps], ignore_index=True)
    lap("outcomes")
    covariate_ref = build_covariates(source, design, warnings)
    lap("covariates")

    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    con = source.con
    for folder, table in PARTITIONED.items():
        con.table(table).write_parquet(
            str(workspace / folder), partition_by=["comparison_id"], overwrite=True
        )
    for file, (table, order) in ENTRY_TABLES.items():
        con.table(table).order(order).write_parquet(str(workspace / file))
    comparisons = con.execute("""
        SELECT c.comparison_id, c.treatment, c.comparator,
               count(h.row_id) FILTER (WHERE h.treated) AS n_treated,
               count(h.row_id) FILTER (WHERE NOT h.treated) AS n_comparator,
               (SELECT list(concept_id ORDER BY concept_id) FROM cf_concept_set s
                WHERE s.set_name = c.treatment) AS treatment_concept_ids,
               (SELECT list(DISTINCT a.concept_id ORDER BY a.concept_id) FROM cf_arm_concept a
                WHERE a.comparison_id = c.comparison_id AND NOT a.treated)
                   AS comparator_concept_ids
        FROM cf_comparison c LEFT JOIN cf_cohort h USING (comparison_id)
        GROUP BY ALL ORDER BY c.comparison_id
    """).df()
    outcomes = con.execute("""
        SELECT o.outcome_id, o.outcome, o.role,
               (SELECT list(concept_id ORDER BY concept_id) FROM cf_concept_set s
                WHERE s.set_name = o.outcome) AS concept_ids
        FROM cf_outcome o ORDER BY o.outcome_id
    """).df()
    comparisons["strategy"] = list(trials["strategy"])
    comparisons["trial"] = pd.array(list(trials["trial"]), dtype="Int64")
    comparisons["cohort_note"] = comparisons["comparison_id"].map(cohort_notes)
    labels = concept_set_labels(source, concept_sets).set_index("set_name")
    for frame, name_column, prefix in ((comparisons, "treatment", "treatment_"),
                                       (comparisons, "comparator", "comparator_"),
                                       (outcomes, "outcome", "")):
        for label in ("codes", "names", "atc"):  # comparator kinds and `death` have no set
            lookup = labels[label].to_dict()
            frame[f"{prefix}{label}"] = [lookup.get(name, []) for name in frame[name_column]]
    comparisons.to_parquet(workspace / "comparisons.parquet")
    outcomes.to_parquet(workspace / "outcomes.parquet")
    attrition.to_parquet(workspace / "attrition.parquet")
    if screen is not None:
        screen.to_parquet(workspace / "screen.parquet")
    covariate_ref.to_parquet(workspace / "covariate_ref.parquet")
    lap("write_workspace")
    (workspace / "prepared.json").write_text(
        json.dumps({"warnings": warnings, "seconds": seconds,
                    "covariate_min_prevalence": design.min_prevalence}, indent=1)
    )
    return PreparedStudy(workspace, comparisons, outcomes, attrition, warnings, seconds, screen)


def _check_arms_have_concepts(source: RecordSource, design: CohortDesign,
                              comparisons: list[tuple[str, str]]) -> None:
    """A treatment or comparator whose concept set resolves to nothing is an input error."""
    arms = [name for pair in comparisons for name in pair
            if name not in ("other_candidates", "non_users")]
    empty = source.con.execute(
        "SELECT name FROM (SELECT DISTINCT unnest($names) AS name) n "
        "WHERE name NOT IN (SELECT set_name FROM cf_concept_set) ORDER BY name",
        {"names": arms + [o.name for o in design.outcomes if o.name in design.concept_sets]},
    ).fetchall()
    if empty:
        raise SourceError(
            f"{source.path}: concept set(s) {', '.join(r[0] for r in empty)} resolve to no "
            "concepts (every included id is also excluded)"
        )


def _check_screen(source: RecordSource, design: CohortDesign, screen: pd.DataFrame) -> None:
    """A screen that selects no ingredient (or, against other candidates, only one) says why."""
    assert design.screen is not None
    chosen = int(screen["selected"].sum())
    kind = comparator_of(design).kind
    other_candidates = kind in ("other_candidates", "battery")
    if chosen >= (2 if other_candidates else 1):
        return
    top = screen.sort_values("eligible_new_users", ascending=False).head(3)
    largest = ", ".join(f"{r.ingredient} {r.eligible_new_users}" for r in top.itertuples())
    raise SourceError(
        f"{source.path}: treatments screen: {chosen} ingredient(s) have at least "
        f"{design.screen.min_new_users} eligible new users"
        + (f" ({kind} needs two)" if other_candidates else "")
        + f"; the largest: {largest or 'none'}")


def check_usable_rows(source: RecordSource, design: CohortDesign) -> None:
    """An empty person, observation_period, exposure or condition table is an input error.

    Cheap (one EXISTS per table): `flows.pipeline.preflight` can call it too.
    """
    exposure, _, start, _ = EXPOSURE_COLUMNS[design.exposure_table]
    needs = {"person": "person_id", "observation_period": "observation_period_start_date",
             exposure: start, "condition_occurrence": "condition_start_date"}
    problems = []
    for table, column in needs.items():  # constant names only reach the SQL
        if not source.has_rows(table):
            problems.append(f"table {table} has no rows")
        elif not scalar(source.con, f"SELECT EXISTS (SELECT 1 FROM {table} "
                                    f"WHERE {column} IS NOT NULL)"):
            problems.append(f"table {table} has no rows with a {column}")
    if problems:
        raise SourceError(f"{source.path}: {'; '.join(problems)}")


def data_warnings(source: RecordSource, design: CohortDesign) -> list[str]:
    """Records the cohort rules skip or repair, counted for the run record (never silent)."""
    exposure, _, start, end = EXPOSURE_COLUMNS[design.exposure_table]
    op_start, op_end = "observation_period_start_date", "observation_period_end_date"
    checks = [  # (table, SQL count over the table, what happens to those rows)
        (exposure, f"count(*) FILTER (WHERE {start} IS NULL)", f"row(s) without {start} "
         "(ignored)"),
        (exposure, f"count(*) FILTER (WHERE {end} < {start})", "row(s) ending before they "
         "start (counted as one-day exposures)"),
        ("observation_period", f"count(*) FILTER (WHERE {op_start} IS NULL OR {op_end} IS NULL)",
         "row(s) without a start or end date (ignored)"),
        ("observation_period", f"count(*) FILTER (WHERE {op_end} < {op_start})",
         "row(s) ending before they start (ignored)"),
        ("condition_occurrence", "count(*) FILTER (WHERE condition_start_date IS NULL)",
         "row(s) without condition_start_date (ignored)"),
        ("person", "count(person_id) - count(DISTINCT person_id)", "duplicate person_id "
         "row(s) (the lowest year_of_birth and gender_concept_id are used)"),
    ]
    checks += _null_checks(source, design)
    warnings = []
    for table, count, consequence in checks:  # constant SQL only
        found = scalar(source.con, f"SELECT {count} FROM {table}")
        if found:
            warnings.append(f"{table}: {found} {consequence}")
    overlapping = scalar(source.con, f"""
        SELECT count(DISTINCT person_id) FROM (
            SELECT person_id, {op_start} AS period_start,
                   max({op_end}) OVER (PARTITION BY person_id ORDER BY {op_start}
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_end
            FROM observation_period WHERE {op_end} >= {op_start})
        WHERE period_start <= earlier_end
    """)
    if overlapping:
        warnings.append(f"observation_period: {overlapping} person(s) with overlapping periods "
                        "(overlapping or abutting periods are combined into one stretch of "
                        "observation)")
    return warnings


def _null_checks(source: RecordSource, design: CohortDesign) -> list[tuple[str, str, str]]:
    """(table, count, consequence) for NULLs the cohort rules skip or work around: person_id in
    every table the study reads, the exposure's end date, year_of_birth."""
    exposure, _, _, end = EXPOSURE_COLUMNS[design.exposure_table]
    ending = ("its end from days_supply, else a one-day exposure"
              if design.exposure_table == "drug_exposure" else "counted as one-day exposures")
    checks = [(table, "count(*) FILTER (WHERE person_id IS NULL)",
               "row(s) without person_id (ignored)")
              for table in sorted(source_requirements(source, design))
              if "person_id" in source.tables.get(table, [])]
    return [
        *checks,
        (exposure, f"count(*) FILTER (WHERE {end} IS NULL)", f"row(s) without {end} ({ending})"),
        ("person", "count(*) FILTER (WHERE year_of_birth IS NULL AND person_id IS NOT NULL)",
         "row(s) without year_of_birth (such persons fail any age criterion and get no age "
         "covariate)"),
    ]


def _check_cohorts(source: RecordSource, attrition: pd.DataFrame) -> None:
    """When no comparison keeps persons in both arms there is nothing to estimate: say why."""
    steps = attrition.sort_values(["comparison_id", "step_index"])
    final = steps.groupby("comparison_id").last()
    if ((final["treated_persons"] > 0) & (final["comparator_persons"] > 0)).any():
        return
    names = dict(source.con.execute(
        "SELECT comparison_id, treatment || ' vs ' || comparator FROM cf_comparison").fetchall())
    details = []
    for comparison_id, rows in steps.groupby("comparison_id"):
        empty = rows[(rows["treated_persons"] == 0) | (rows["comparator_persons"] == 0)].iloc[0]
        arms = " and ".join(arm for arm, column in (("treated", "treated_persons"),
                                                    ("comparator", "comparator_persons"))
                            if empty[column] == 0)
        details.append(f"{names[int(comparison_id)]}: no {arms} persons left after step "
                       f"{empty['step']} ({empty['description']})")
    raise SourceError(f"{source.path}: no comparison has persons in both arms; "
                      f"{'; '.join(details)}")


# Steps that depend on the comparison, not on the person alone: losing most of a candidate's
# eligible new users at one of them is a design choice biting, worth a warning.
COMPARISON_STEPS = ("not_exposed", "washout", "not_in_both", "common_period", "at_risk")


def arm_losses(attrition: pd.DataFrame) -> dict[int, list[str]]:
    """comparison_id -> the comparison rules that removed more than half of an arm's persons
    (or emptied it), in words without counts (those are in attrition)."""
    steps = attrition[attrition["outcome"].isna()].sort_values(["comparison_id", "step_index"])
    losses: dict[int, list[str]] = {}
    for arm, column in (("treated", "treated_persons"), ("comparator", "comparator_persons")):
        before = steps.groupby("comparison_id")[column].shift(1)
        hit = steps[steps["step"].isin(COMPARISON_STEPS) & (before > 0)
                    & (steps[column] < 0.5 * before)]
        for row in hit.itertuples():
            what = "emptied" if getattr(row, column) == 0 else "removed more than half of"
            losses.setdefault(int(row.comparison_id), []).append(
                f"rule {row.step} {what} the {arm} arm")
    return losses


def arm_loss_notes(losses: dict[int, list[str]]) -> dict[int, str]:
    """comparison_id -> its arm losses as one note (the comparisons table's cohort_note)."""
    return {cid: "; ".join(rules) for cid, rules in losses.items()}


def arm_loss_warnings(losses: dict[int, list[str]],
                      comparisons: list[tuple[str, str]]) -> list[str]:
    """One run warning per rule that shrank arms, naming up to five comparisons it hit."""
    by_rule: dict[str, list[str]] = {}
    for cid, rules in losses.items():
        treatment, comparator = comparisons[cid - 1]
        for rule in rules:
            by_rule.setdefault(rule, []).append(f"{treatment} vs {comparator}")
    return [f"{rule} in {', '.join(hit[:5])}"
            + (f" and {len(hit) - 5} more comparison(s)" if len(hit) > 5 else "")
            + " (see attrition)" for rule, hit in by_rule.items()]


def _cohort_warnings(source: RecordSource) -> list[str]:
    """Cohort members whose data contradict themselves (kept, but reported)."""
    before_birth = scalar(source.con, "SELECT count(DISTINCT person_id) FROM cf_cohort "
                                      "WHERE year(index_date) < year_of_birth")
    if not before_birth:
        return []
    return [f"person: {before_birth} cohort member(s) with time zero before their year of "
            "birth (kept; population.min_age excludes them)"]


def _check_outcome_events(source: RecordSource, design: CohortDesign) -> None:
    """No event of any outcome in any comparison: every estimate would fail, so say why."""
    if scalar(source.con, "SELECT EXISTS (SELECT 1 FROM cf_outcome_time "
                          "WHERE event_time IS NOT NULL)"):
        return
    names = [o.name for o in design.outcomes]
    listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    tables = " or ".join(outcome_requirements(source, design))
    raise SourceError(
        f"{source.path}: no outcome events: no outcome ({listed}) has a record in {tables} "
        "during follow-up in any comparison"
    )
