"""The speed benchmark at toy size: both paths (`cohortflow run` in a measured child and the naive
pandas/scikit-learn/lifelines baseline) on a 2,000-person scale CDM, 2 candidates x 2 outcomes.

Never asserts timings (machine-dependent). Asserts that the two paths agree and that every stage
the issue names is reported. Tolerances, and why:
  - counts (persons and events per arm) identical on every pair, and the same pairs estimable:
    both paths build the same new-user cohorts and outcomes from the same rules;
  - crude log HR within CRUDE_TOLERANCE: the same data and model; only the tie handling differs
    (lifelines: Efron, cohortflow: Breslow; with whole-day times and a few events, ~1e-4);
  - IPTW log HR within IPTW_TOLERANCE_SE of cohortflow's standard error: the propensity models
    differ on purpose (scikit-learn's LogisticRegressionCV grid and folds on the pair's
    population vs cohortflow's early-stopped path once per comparison), which moves the weights
    a little; 0.1 SE is far below what would change an inference.
"""

from __future__ import annotations

import pytest

from bench.speed import PREPARE_STAGES, markdown, run, study_concepts

CRUDE_TOLERANCE = 1e-3
IPTW_TOLERANCE_SE = 0.1
ISSUE_STAGES = ("read", "cohorts", "covariates", "PS fits", "outcome models", "calibration",
                "store")

pytestmark = pytest.mark.slow  # two child processes, one of them a Prefect flow (~30 s)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("speed")
    return run(None, (), baseline_persons=2_000, baseline_pairs=4, candidates=2, outcomes=2,
               negative_controls=0, out=out)


def test_the_study_file_names_the_sources_concepts():
    concepts = study_concepts(2, 2, 1)
    assert [name for name, _ in concepts["treatments"]] == ["candidate_099", "candidate_100"]
    assert [name for name, _ in concepts["outcomes"]] == ["outcome_01", "outcome_02"]
    assert len(concepts["negative_controls"]) == 1


def test_both_paths_agree(result):
    baseline = result["baseline"]
    agree = baseline["agreement"]
    assert baseline["baseline"]["pairs"] == agree["pairs"] == 4
    assert len({(r["treatment"], r["outcome"]) for r in agree["rows"]}) == 4  # distinct pairs
    assert agree["pairs_counts_identical"] == agree["pairs_with_counts"] == agree["pairs"]
    for estimator in ("crude", "iptw"):
        assert agree[estimator]["status_agrees"] == agree["pairs"]
        assert agree[estimator]["both_estimated"] >= 2  # enough to compare at this size
    assert agree["crude"]["max_abs_log_hr_diff"] <= CRUDE_TOLERANCE
    assert agree["iptw"]["max_abs_diff_in_se"] <= IPTW_TOLERANCE_SE
    assert baseline["speedup"] > 0 and baseline["baseline_seconds_extrapolated"] > 0


def test_every_stage_is_reported(result):
    ours = result["baseline"]["ours"]
    run_record = ours["run"]
    assert run_record["n_comparisons"] == 2
    estimators = result["estimators"]
    assert run_record["n_estimates"] == 2 * 2 * len(estimators)
    assert {"crude", "iptw", "ps_strata"} <= set(estimators)
    stages = ours["stages"]
    groups = {row["group"] for row in stages}
    assert set(ISSUE_STAGES) <= groups
    for row in stages:
        if row["group"] != "overhead":
            assert row["wall_seconds"] is not None and row["wall_seconds"] >= 0, row
    assert {f"prepare_study: {s}" for s in PREPARE_STAGES if s != "screen"} <= {
        row["stage"] for row in stages}
    total = sum(row["wall_seconds"] for row in stages)
    assert total == pytest.approx(ours["child"]["child_wall_seconds"], abs=0.05)
    child = ours["child"]
    assert child["not_measured"] == []  # every timed function still exists
    assert set(child["stage_memory"]) >= {"cohorts", "covariates", "analyze", "finalize"}
    assert child["peak_rss_mb"] > 0 and child["tree_peak_rss_mb_sampled"] > 0
    segments = {seg["segment"]: seg for seg in child["segments"]}
    assert {"startup", "cohorts", "analyze", "report", "exit"} <= set(segments)
    assert child["peak_rss_bound_mb"] >= child["peak_rss_mb"]
    assert ours["code"]["sources_sha"]
    assert len(child["loadavg_before"]) == 3 and len(child["loadavg_after"]) == 3


def test_markdown_has_every_table(result):
    ours = result["baseline"]["ours"]
    as_headline = {**result, "runs": {"2000": ours}, "headline_persons": 2000,
                   "scaling_persons": [2000]}
    text = markdown(as_headline)
    for heading in ("### End to end: 2,000 persons", "### Against the naive baseline",
                    "### Scaling", "| wall time <= 5 min, to the run in the store",
                    "| peak memory <= 8 GB |",
                    "faster**", "max abs log HR difference", "Largest IPTW differences"):
        assert heading in text
