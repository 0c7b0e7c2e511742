"""End to end on the real Eunomia GiBleed CDM: `cohortflow run configs/gibleed.yaml` through the
Prefect flow, checked against an independent hand-written DuckDB query and statsmodels' PHReg.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from statsmodels.duration.hazard_regression import PHReg

from tests.shared_data import GIBLEED, needs_gibleed

ROOT = Path(__file__).parents[1]
pytestmark = needs_gibleed

INDEPENDENT = """
WITH cel AS (SELECT descendant_concept_id AS id FROM '{d}/concept_ancestor.parquet'
             WHERE ancestor_concept_id = 1118084),
dic AS (SELECT descendant_concept_id AS id FROM '{d}/concept_ancestor.parquet'
        WHERE ancestor_concept_id = 1124300),
bleed AS (SELECT person_id, condition_start_date AS day
          FROM '{d}/condition_occurrence.parquet'
          WHERE condition_concept_id IN (SELECT descendant_concept_id
                FROM '{d}/concept_ancestor.parquet' WHERE ancestor_concept_id = 192671)),
era AS (SELECT person_id, drug_era_start_date AS s, drug_era_end_date AS e,
               CASE WHEN drug_concept_id IN (SELECT id FROM cel) THEN 1
                    WHEN drug_concept_id IN (SELECT id FROM dic) THEN 0 END AS arm
        FROM '{d}/drug_era.parquet'),
first AS (SELECT person_id, arm, min(s) AS t0 FROM era WHERE arm IS NOT NULL GROUP BY ALL),
eligible AS (
    SELECT f.person_id, f.arm, f.t0, op.observation_period_end_date AS op_end
    FROM first f
    JOIN '{d}/observation_period.parquet' op ON op.person_id = f.person_id
         AND f.t0 BETWEEN op.observation_period_start_date AND op.observation_period_end_date
    JOIN '{d}/person.parquet' p ON p.person_id = f.person_id
    WHERE f.t0 - op.observation_period_start_date >= 365
      AND year(f.t0) - p.year_of_birth >= 18
      AND NOT EXISTS (SELECT 1 FROM era x WHERE x.person_id = f.person_id AND x.arm = 1 - f.arm
                      AND x.s < f.t0 AND x.e >= f.t0 - 365)
),
single AS (SELECT * FROM eligible WHERE person_id IN (
    SELECT person_id FROM eligible GROUP BY person_id HAVING count(*) = 1))
SELECT s.person_id, s.arm,
       (SELECT min(day) FROM bleed b WHERE b.person_id = s.person_id
        AND b.day BETWEEN s.t0 AND s.op_end) - s.t0 + 1 AS event_time,
       s.op_end - s.t0 + 1 AS days_at_risk,
       EXISTS (SELECT 1 FROM bleed b WHERE b.person_id = s.person_id AND b.day < s.t0) AS prior
FROM single s ORDER BY s.person_id
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("gibleed")
    results = out / "results.duckdb"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "configs/gibleed.yaml", "--results",
         str(results), "--data-dir", str(out / "data"), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    con = duckdb.connect(str(results), read_only=True)
    yield con
    con.close()


@pytest.fixture(scope="module")
def independent():
    frame = duckdb.sql(INDEPENDENT.format(d=GIBLEED)).df()
    frame = frame[~frame["prior"]]
    event = frame["event_time"].notna().to_numpy()
    time = np.where(event, frame["event_time"].fillna(0), frame["days_at_risk"]).astype(float)
    return frame["arm"].to_numpy(), time, event.astype(int)


def estimate(store, estimator):
    return store.execute(
        "SELECT * FROM estimates WHERE estimator = ?", [estimator]
    ).df().iloc[0]


def test_counts_match_independent_query(store, independent):
    arm, _, event = independent
    crude = estimate(store, "crude")
    assert (crude.n_treated, crude.n_comparator) == ((arm == 1).sum(), (arm == 0).sum())
    assert (crude.events_treated, crude.events_comparator) == (
        event[arm == 1].sum(), event[arm == 0].sum())
    attrition = store.execute(
        "SELECT step, treated_persons, comparator_persons FROM attrition ORDER BY step_index"
    ).fetchall()
    assert attrition[0] == ("first_exposure", 1844, 850)  # celecoxib/diclofenac users (README)
    assert attrition[-1][1:] == ((arm == 1).sum(), (arm == 0).sum())


def test_crude_hazard_ratio_matches_statsmodels(store, independent):
    arm, time, event = independent
    fit = PHReg(time, arm.reshape(-1, 1).astype(float), status=event, ties="breslow").fit()
    crude = estimate(store, "crude")
    assert crude.status == "ok"
    assert crude.estimate == pytest.approx(math.exp(fit.params[0]), rel=1e-6)
    assert crude.se == pytest.approx(fit.bse[0], rel=1e-6)
    assert crude.ci_low < crude.estimate < crude.ci_high


def test_adjusted_estimates_diagnostics_and_balance(store):
    for estimator in ("iptw", "ps_strata"):
        row = estimate(store, estimator)
        assert row.status == "ok"
        assert all(math.isfinite(row[c]) for c in ("estimate", "ci_low", "ci_high", "se"))
        assert row.ci_low < row.estimate < row.ci_high
    diagnostics = store.execute("SELECT * FROM diagnostics").df().set_index("estimator")
    assert 0.5 < diagnostics.loc["iptw", "ps_auc"] < 1
    assert 0 <= diagnostics.loc["iptw", "equipoise"] <= 1
    assert (diagnostics.loc["iptw", "max_abs_smd_after"]
            < diagnostics.loc["iptw", "max_abs_smd_before"])
    balance = store.execute(
        "SELECT adjustment, count(*) AS n, bool_and(isfinite(smd_before)) AS finite_before, "
        "bool_and(isfinite(smd_after)) AS finite_after, count(covariate_name) AS named "
        "FROM balance GROUP BY adjustment ORDER BY adjustment"
    ).fetchall()
    assert [b[0] for b in balance] == ["iptw", "ps_strata"]
    for _, n, finite_before, finite_after, named in balance:
        assert n > 50 and finite_before and finite_after and named == n


def test_run_record(store):
    run = store.execute("SELECT * FROM runs").df().iloc[0]
    assert run.status == "completed" and run.n_comparisons == 1 and run.n_estimates == 3
    assert run.cdm_version == "v5.3.1" and len(run.source_sha256) == 64
    assert run.study == "gibleed_celecoxib_vs_diclofenac"


def test_input_error_found_inside_the_flow_is_one_line(tmp_path):
    """Zero eligible persons is only known once cohorts are built, inside the Prefect flow."""
    study = tmp_path / "old.yaml"
    text = (ROOT / "configs" / "gibleed.yaml").read_text()
    study.write_text(text.replace("min_age: 18", "min_age: 150").replace(
        "source: ../../shared/data/eunomia_gibleed", f"source: {GIBLEED}"))
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(study), "--results",
         str(tmp_path / "r.duckdb"), "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("cohortflow:")]
    assert len(lines) == 1 and "aged 150 or more at time zero" in lines[0]
    assert not (tmp_path / "r.duckdb").exists()
