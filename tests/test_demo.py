"""The demo study on the synthetic CDM (50,000 persons, seed 0): planted confounding biases the
crude estimate; propensity adjustment recovers most planted effects; an unrecorded confounder
leaves systematic error that the 40 negative (and 120 synthetic positive) controls expose and
empirical calibration removes; the ranking puts the planted protective drugs first.

Runs the pipeline's plain functions (the Prefect path is covered by the GiBleed test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cohort.synthetic import generate_demo_cdm
from flows.demo import add_truth
from results.ranking import ranked_candidates
from results.store import open_store
from results.summary import run_summary, wide_summary
from tests.plain_run import run_study_plain

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    truth_path = generate_demo_cdm(out / "cdm", persons=50_000, seed=0)
    study_file = out / "demo.yaml"
    text = (ROOT / "configs" / "demo.yaml").read_text()
    study_file.write_text(text.replace("source: ../data/demo/cdm", "source: cdm"))
    results = out / "results.duckdb"
    run = run_study_plain(study_file, results, out / "data")
    with open_store(results, read_only=True) as con:
        estimates = con.execute("SELECT * FROM estimates").df()
        diagnostics = con.execute("SELECT * FROM diagnostics").df()
    truth = pd.read_csv(truth_path)
    truth["outcome"] = np.where(truth["role"] == "outcome", truth["outcome"],
                                "concept_" + truth["outcome_concept_id"].astype(str))
    merged = estimates.merge(truth[["treatment", "outcome", "true_hr"]], how="left",
                             on=["treatment", "outcome"], validate="many_to_one")
    merged["truth"] = merged["true_hr"].fillna(merged["true_effect_size"])
    for prefix in ("", "calibrated_"):
        merged[f"{prefix}covers"] = (merged[f"{prefix}ci_low"] <= merged["truth"]) & (
            merged["truth"] <= merged[f"{prefix}ci_high"])
    merged["log_error"] = np.log(merged["estimate"] / merged["truth"])
    return run, results, merged, diagnostics, out / "cdm"


def test_every_pair_and_control_estimated(demo_run):
    run, _, merged, _, _ = demo_run
    assert run["n_comparisons"] == 4 and run["n_outcomes"] == 46
    roles = merged.groupby("role").size().to_dict()
    assert roles == {"outcome": 4 * 6 * 3, "negative_control": 4 * 40 * 3,
                     "positive_control": 4 * 40 * 3 * 3}
    assert (merged["status"] == "ok").all() and merged["truth"].notna().all()


def test_crude_is_biased_by_planted_confounding(demo_run):
    _, _, merged, _, _ = demo_run
    effects = merged[(merged["role"] == "outcome") & (merged["true_hr"] != 1)]
    crude = effects[effects["estimator"] == "crude"]
    assert crude["covers"].mean() <= 0.5
    assert crude["log_error"].abs().mean() > 0.2


@pytest.mark.parametrize("estimator", ["iptw", "ps_strata"])
def test_adjustment_recovers_most_planted_effects(demo_run, estimator):
    _, _, merged, _, _ = demo_run
    pairs = merged[merged["role"] != "positive_control"]
    mine, crude = (pairs[pairs["estimator"] == e] for e in (estimator, "crude"))
    assert mine["covers"].mean() > 0.5                       # most pairs, before calibration
    assert mine["covers"].mean() > crude["covers"].mean()
    effects = mine["true_hr"] != 1
    assert (mine.loc[effects, "log_error"].abs().mean()
            < 0.6 * crude.loc[crude["true_hr"] != 1, "log_error"].abs().mean())


@pytest.mark.parametrize("estimator", ["iptw", "ps_strata"])
def test_calibration_restores_coverage_of_the_controls(demo_run, estimator):
    _, _, merged, _, _ = demo_run
    controls = merged[(merged["estimator"] == estimator)
                      & merged["role"].isin(["negative_control", "positive_control"])]
    for _, group in controls.groupby("role"):
        assert group["calibrated_covers"].mean() >= 0.90
        assert group["covers"].mean() <= 0.85                # visibly fewer uncalibrated
    interest = merged[(merged["estimator"] == estimator) & (merged["role"] == "outcome")]
    assert interest["calibrated_covers"].mean() > interest["covers"].mean()


def test_diagnostics_and_systematic_error(demo_run):
    _, _, _, diagnostics, _ = demo_run
    by = diagnostics.groupby("estimator")
    assert (by.get_group("crude")["max_abs_smd_after"] > 0.2).all()
    assert (by.get_group("iptw")["max_abs_smd_after"] < 0.1).all()
    assert by.get_group("crude")["reasons"].str.contains("covariate imbalance").all()
    iptw = by.get_group("iptw")
    assert (iptw["n_negative_controls"] == 40).all() and (iptw["n_positive_controls"] == 120).all()
    assert iptw["ease"].between(0.03, 0.25).all() and iptw["ease_pass"].all()
    assert iptw.groupby("comparison_id")["null_mean"].first().abs().max() > 0.1


def test_top_of_the_protective_ranking_is_the_planted_protective_drugs(demo_run):
    _, results, _, _, _ = demo_run
    ranked = ranked_candidates(results, estimator="iptw", direction="protective")
    top = ranked[ranked["rank"] == ranked.groupby("outcome")["rank"].transform("min")]
    firsts = dict(zip(top["outcome"], top["treatment"], strict=True))
    assert firsts["outcome_1"] == "drug_a"                   # planted HR 0.5
    assert firsts["outcome_2"] == "drug_a"                   # planted HR 0.67
    assert firsts["outcome_5"] == "drug_c"                   # planted HR 0.67
    assert (ranked["q_value"] >= ranked["p_value"]).all()
    assert ranked["calibrated"].all()


def test_printed_summary_shows_truth_in_rank_order(demo_run):
    run, results, _, _, cdm = demo_run
    summary = run_summary(results, run["run_id"])
    wide = add_truth(wide_summary(summary[summary["role"] == "outcome"], 5), cdm)
    assert len(wide) == 4 * 6 and wide["true_hr"].notna().all()
    outcome_4 = wide[wide["outcome"] == "outcome_4"]
    assert outcome_4.iloc[0]["treatment"] == "drug_c" and outcome_4.iloc[0]["true_hr"] == 4.0
    assert list(outcome_4["rank"]) == [1, 2, 3, 4]


def test_no_person_level_data_leaves_the_workspace(demo_run, tmp_path):
    _, results, _, _, _ = demo_run
    with open_store(results, read_only=True) as con:
        columns = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns").fetchall()
    assert not [c for c in columns if "person_id" in c[1].lower()]
    from results.export import EXPORTS, export

    for what in EXPORTS:
        out = tmp_path / f"{what}.parquet"
        export(results, what, out)
        assert not [c for c in pd.read_parquet(out).columns if "person_id" in c.lower()]
