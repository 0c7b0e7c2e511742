"""An ingredient screen on the real Eunomia GiBleed CDM, end to end (configs/gibleed_screen.yaml):
every ingredient with at least 50 eligible new users against new users of the other candidates.

The screen's counts are checked against an independent hand-written DuckDB query over the raw
Parquet files; the run must finish with an estimate per candidate (or a recorded reason).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from tests.plain_run import run_study_plain
from tests.shared_data import GIBLEED, needs_gibleed

ROOT = Path(__file__).parents[1]
pytestmark = needs_gibleed

# Per ingredient: persons whose first exposure (any product rolling up to it) is inside an
# observation period with 365 days before it, aged 18 or more, with a person row.
ELIGIBLE = """
WITH ingredient AS (
    SELECT concept_id, concept_name FROM '{d}/concept.parquet'
    WHERE concept_class_id = 'Ingredient' AND standard_concept = 'S' AND domain_id = 'Drug'),
exposure AS (
    SELECT i.concept_name, e.person_id, min(e.drug_era_start_date) AS t0
    FROM '{d}/drug_era.parquet' e
    JOIN '{d}/concept_ancestor.parquet' a ON a.descendant_concept_id = e.drug_concept_id
    JOIN ingredient i ON i.concept_id = a.ancestor_concept_id
    GROUP BY ALL)
SELECT x.concept_name, count(DISTINCT x.person_id) AS eligible
FROM exposure x
JOIN '{d}/person.parquet' p ON p.person_id = x.person_id
JOIN '{d}/observation_period.parquet' op ON op.person_id = x.person_id
     AND x.t0 BETWEEN op.observation_period_start_date AND op.observation_period_end_date
WHERE x.t0 - op.observation_period_start_date >= 365 AND year(x.t0) - p.year_of_birth >= 18
GROUP BY ALL
"""


@pytest.fixture(scope="module")
def screen_run(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("screen")
    run = run_study_plain(ROOT / "configs" / "gibleed_screen.yaml", root / "r.duckdb",
                          root / "data")
    return root / "r.duckdb", run["run_id"]


def test_screen_counts_match_an_independent_query(screen_run):
    results, run_id = screen_run
    with duckdb.connect(str(results), read_only=True) as con:
        screen = con.execute("SELECT ingredient, eligible_new_users, selected FROM screen "
                             "WHERE run_id = ?", [run_id]).df().set_index("ingredient")
    expected = dict(duckdb.sql(ELIGIBLE.format(d=GIBLEED)).fetchall())
    counted = screen[screen["eligible_new_users"].notna()]
    assert len(counted) >= 40
    for ingredient, row in counted.iterrows():
        assert row["eligible_new_users"] == expected.get(ingredient, 0), ingredient
        assert row["selected"] == (row["eligible_new_users"] >= 50)
    assert not screen.loc[screen["eligible_new_users"].isna(), "selected"].any()
    # the Book of OHDSI's celecoxib and diclofenac new users
    assert screen.loc["celecoxib", "eligible_new_users"] == 1800
    assert screen.loc["Diclofenac", "eligible_new_users"] == 830
    assert screen["selected"].sum() >= 30


def test_screen_runs_every_candidate_against_the_others(screen_run):
    results, run_id = screen_run
    with duckdb.connect(str(results), read_only=True) as con:
        selected = con.execute("SELECT count(*) FROM screen WHERE run_id = ? AND selected",
                               [run_id]).fetchone()[0]
        estimates = con.execute("SELECT * FROM estimates WHERE run_id = ? AND estimator = 'iptw'",
                                [run_id]).df()
        attrition = con.execute("SELECT * FROM attrition WHERE run_id = ? AND outcome IS NULL "
                                "ORDER BY comparison_id, step_index", [run_id]).df()
    assert len(estimates) == selected
    assert set(estimates["comparator"]) == {"other_candidates"}
    assert (estimates["status"] == "ok").sum() >= selected // 2
    failed = estimates[estimates["status"] != "ok"]
    assert failed["message"].str.len().gt(0).all()  # every failure says why
    for _, steps in attrition.groupby("comparison_id"):
        for arm in ("treated_persons", "comparator_persons"):
            assert steps[arm].is_monotonic_decreasing
    celecoxib = estimates.set_index("treatment").loc["celecoxib"]
    assert celecoxib["estimate"] > 1.3 and celecoxib["ci_low"] > 1  # GiBleed's planted signal


def test_run_record_times_every_stage(screen_run):
    import json

    results, run_id = screen_run
    with duckdb.connect(str(results), read_only=True) as con:
        timings = json.loads(con.execute("SELECT timings FROM runs WHERE run_id = ?",
                                         [run_id]).fetchone()[0])
    assert {"screen", "cohorts", "covariates", "outcomes"} <= set(timings["prepare_stages"])
    assert {"load", "propensity", "adjustment", "outcome_models", "km_curves", "write"} <= set(
        timings["analyze_stages"])
    assert all(value >= 0 for value in timings["analyze_stages"].values())
    assert {"gather", "calibration_and_gates"} <= set(timings["finalize_stages"])
