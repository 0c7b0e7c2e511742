"""The demo study on the synthetic CDM: planted confounding biases the crude estimate, and the
propensity-adjusted estimates recover the planted hazard ratios.

Runs the pipeline's plain functions (the Prefect path is covered by the GiBleed test).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cohort.synthetic import generate_demo_cdm
from flows import pipeline
from flows.config import load_study
from flows.demo import add_truth
from results.store import open_store
from results.summary import run_summary, wide_summary

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    truth_path = generate_demo_cdm(out / "cdm", persons=50_000, seed=0)
    study_file = out / "demo.yaml"
    text = (ROOT / "configs" / "demo.yaml").read_text()
    study_file.write_text(text.replace("source: ../data/demo/cdm", "source: cdm"))
    study = load_study(study_file)
    paths = pipeline.new_run(study, out / "results.duckdb", out / "data")
    prepared = pipeline.prepare(str(study_file), str(paths.workspace))
    analyses = [pipeline.analyze(str(study_file), str(paths.workspace), cid)
                for cid in prepared["comparison_ids"]]
    started = pd.Timestamp.now(tz="UTC").to_pydatetime()
    run = pipeline.finalize(str(study_file), paths, prepared, analyses, started, {})
    with open_store(paths.results, read_only=True) as con:
        estimates = con.execute("SELECT * FROM estimates").df()
        diagnostics = con.execute("SELECT * FROM diagnostics").df()
    truth = pd.read_csv(truth_path)
    truth["outcome"] = np.where(truth["role"] == "outcome", truth["outcome"],
                                "concept_" + truth["outcome_concept_id"].astype(str))
    merged = estimates.merge(truth[["treatment", "outcome", "true_hr"]],
                             on=["treatment", "outcome"], validate="many_to_one")
    merged["covers"] = (merged["ci_low"] <= merged["true_hr"]) & (
        merged["true_hr"] <= merged["ci_high"])
    merged["log_error"] = np.log(merged["estimate"] / merged["true_hr"])
    return run, paths, merged, diagnostics, out / "cdm"


def test_every_pair_estimated(demo_run):
    run, _, merged, _, _ = demo_run
    assert run["n_comparisons"] == 4 and run["n_outcomes"] == 16
    assert len(merged) == 4 * 16 * 3 and (merged["status"] == "ok").all()


def test_crude_is_biased_by_planted_confounding(demo_run):
    _, _, merged, _, _ = demo_run
    effects = merged[merged["true_hr"] != 1]
    crude = effects[effects["estimator"] == "crude"]
    assert crude["covers"].mean() <= 0.5
    assert crude["log_error"].abs().mean() > 0.2


@pytest.mark.parametrize("estimator", ["iptw", "ps_strata"])
def test_adjusted_estimates_recover_the_truth(demo_run, estimator):
    _, _, merged, _, _ = demo_run
    mine = merged[merged["estimator"] == estimator]
    crude = merged[merged["estimator"] == "crude"]
    assert mine["covers"].mean() >= 0.85                      # all 64 pairs
    assert mine.loc[mine["role"] == "outcome", "covers"].mean() >= 0.85
    effects = mine["true_hr"] != 1
    assert (mine.loc[effects, "log_error"].abs().mean()
            < 0.6 * crude.loc[crude["true_hr"] != 1, "log_error"].abs().mean())
    assert mine["covers"].mean() > crude["covers"].mean()


def test_adjustment_balances_covariates(demo_run):
    _, _, _, diagnostics, _ = demo_run
    by = diagnostics.groupby("estimator")
    assert (by.get_group("crude")["max_abs_smd_after"] > 0.2).all()
    assert (by.get_group("iptw")["max_abs_smd_after"] < 0.1).all()
    assert (by.get_group("iptw")["equipoise"] > 0.5).all()
    assert by.get_group("crude")["passed"].sum() == 0
    assert by.get_group("crude")["reasons"].str.contains("covariate imbalance").all()


def test_printed_summary_ranks_and_shows_truth(demo_run):
    run, paths, _, _, cdm = demo_run
    wide = add_truth(wide_summary(run_summary(paths.results, run["run_id"]), 5), cdm)
    assert len(wide) == 4 * 16
    first = wide.iloc[0]
    assert first["outcome"] == "outcome_1" and first["treatment"] == "drug_a"  # HR 0.5 planted
    assert math.isclose(first["true_hr"], 0.5)
    assert list(wide["role"].iloc[:24].unique()) == ["outcome"]
    assert wide["true_hr"].notna().all()
