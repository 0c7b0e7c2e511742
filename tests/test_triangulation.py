"""Triangulation across data sources: one study on two synthetic CDMs, meta-analysed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cohort.synthetic import generate_demo_cdm
from results.store import open_store
from tests.plain_run import run_study_plain

STUDY = """\
study: two_sources
source: {source}
concept_sets:
  comparator_drug: {{include: [2000000100]}}
  drug_a: {{include: [2000000101]}}
  drug_c: {{include: [2000000103]}}
  outcome_1: {{include: [2000001001]}}
  outcome_4: {{include: [2000001004]}}
treatments: [drug_a, drug_c]
comparator: {{active: comparator_drug}}
outcomes: [outcome_1, outcome_4]
follow_up: {{start_day: 1}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("triangulation")
    results = out / "results.duckdb"
    runs = []
    for seed in (11, 12):
        generate_demo_cdm(out / f"cdm{seed}", persons=20_000, seed=seed)
        study = out / f"study{seed}.yaml"
        study.write_text(STUDY.format(source=f"cdm{seed}"))
        runs.append(run_study_plain(study, results, out / "data"))
    with open_store(results, read_only=True) as con:
        yield con, runs


def test_meta_analysis_matches_hand_computation(store):
    con, runs = store
    rows = con.execute(
        "SELECT estimate, se FROM estimates WHERE treatment = 'drug_a' AND outcome = "
        "'outcome_1' AND estimator = 'iptw' ORDER BY run_id").fetchall()
    assert len(rows) == 2
    y = np.log([r[0] for r in rows])
    v = np.array([r[1] for r in rows]) ** 2
    w = 1 / v
    fixed = (w * y).sum() / w.sum()
    q = (w * (y - fixed) ** 2).sum()
    tau2 = max(0.0, (q - 1) / (w.sum() - (w ** 2).sum() / w.sum()))
    w_star = 1 / (v + tau2)
    pooled = (w_star * y).sum() / w_star.sum()
    se = math.sqrt(1 / w_star.sum())
    meta = con.execute(
        "SELECT pooled_hr, ci_low, ci_high, se, tau2, q, k_sources, calibrated, run_id "
        "FROM meta_analysis WHERE treatment = 'drug_a' AND outcome = 'outcome_1' AND "
        "estimator = 'iptw'").fetchall()
    assert len(meta) == 1
    hr, low, high, meta_se, meta_tau2, meta_q, k, calibrated, run_id = meta[0]
    assert (k, calibrated, run_id) == (2, False, runs[-1]["run_id"])
    assert hr == pytest.approx(math.exp(pooled), rel=1e-12)
    assert meta_se == pytest.approx(se, rel=1e-12)
    assert meta_tau2 == pytest.approx(tau2, abs=1e-15) and meta_q == pytest.approx(q)
    assert low == pytest.approx(math.exp(pooled - 1.959963984540054 * se), rel=1e-9)
    assert low < 0.5 < high or abs(math.log(hr / 0.5)) < 0.3   # planted HR 0.5


def test_triangulation_view_summarises_methods_and_sources(store):
    con, _ = store
    row = con.execute(
        "SELECT * FROM triangulation WHERE treatment = 'drug_c' AND outcome = 'outcome_4'"
    ).df().iloc[0]
    assert row["n_sources"] == 2 and row["n_estimates"] == 4      # iptw + ps_strata, 2 CDMs
    assert list(row["method_families"]) == ["stratification/matching", "weighting"]
    assert row["agreement"] == "agree: harmful, all significant"  # planted HR 4
    assert row["meta_estimator"] == "iptw" and row["meta_k_sources"] == 2
    assert row["meta_ci_low"] > 1 and 2000000103 in list(row["treatment_concept_ids"])
    assert con.execute("SELECT count(*) FROM triangulation").fetchall()[0][0] == 4
