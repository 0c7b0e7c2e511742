"""A battery screen on the screen simulator ranks what was planted (cohort.synthetic_screen).

The demo study (configs/screen_demo.yaml) on 40,000 persons, restricted to the five ATC classes
that hold the planted drugs (C10: protective HR 0.5; A10: protective 0.7; N05: harmful 1.5;
R03: harmful 2.0; M01: the decoy, a null drug whose mostly unrecorded indication lowers the risk
of dementia), 3 random-drug trials per candidate and every same-class drug: 25 candidates, 175
trials, run through the pipeline's plain functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cohort.synthetic_screen import SCREEN_ATC_CLASSES, SCREEN_PLANTED, generate_screen_cdm
from results.store import open_store
from tests.plain_run import run_study_plain

ROOT = Path(__file__).parents[1]
LEFT_OUT = ("A02", "C07", "C08", "C09", "N06")
PROTECTIVE = {d for d, (_, kind) in SCREEN_PLANTED.items() if kind == "protective"}
HARMFUL = {d for d, (_, kind) in SCREEN_PLANTED.items() if kind == "harmful"}
DECOY = next(d for d, (_, kind) in SCREEN_PLANTED.items() if kind == "decoy")


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    out = tmp_path_factory.mktemp("screen")
    generate_screen_cdm(out / "cdm", persons=40_000, seed=1)
    excluded = ", ".join(str(SCREEN_ATC_CLASSES[code]) for code in LEFT_OUT)
    text = (ROOT / "configs" / "screen_demo.yaml").read_text()
    text = text.replace("source: ../data/screen_demo/cdm", "source: cdm")
    text = text.replace("screen: {level: ingredient, min_new_users: 100}",
                        f"screen: {{level: ingredient, min_new_users: 100, exclude: [{excluded}]}}")
    text = text.replace("battery: {random: 5,", "battery: {random: 3,")
    assert "random: 3" in text and "exclude: [" in text
    study = out / "screen.yaml"
    study.write_text(text)
    results = out / "results.duckdb"
    run = run_study_plain(study, results, out / "data")
    with open_store(results, read_only=True) as con:
        candidates = con.execute("SELECT * FROM candidate_evidence WHERE estimator = 'iptw'"
                                 ).df()
        controls = con.execute("""
            SELECT e.strategy, e.estimate, d.passed FROM estimates e
            JOIN diagnostics d USING (run_id, comparison_id, outcome, estimator)
            WHERE e.role = 'negative_control' AND e.estimator = 'iptw' AND e.status = 'ok'
        """).df()
        account = con.execute("SELECT * FROM candidate_account WHERE estimator = 'iptw'").df()
    return run, candidates, controls, account


def ranked(candidates: pd.DataFrame, strategy: str) -> pd.DataFrame:
    rows = candidates[(candidates["strategy"] == strategy) & (candidates["role"] == "outcome")]
    return rows[rows["rank"].notna()].sort_values("rank")


def test_planted_effects_rank_first_against_same_class_drugs(screen):
    _, candidates, _, _ = screen
    same_class = ranked(candidates, "same_class")
    protective = same_class[same_class["estimate"] < 1]["treatment"].head(2)
    harmful = same_class[same_class["estimate"] > 1]["treatment"].head(2)
    assert set(protective) == PROTECTIVE
    assert set(harmful) == HARMFUL
    assert (same_class.set_index("treatment").loc[sorted(PROTECTIVE), "q_value"] < 0.05).all()
    # the pooled CIs cover the planted hazard ratios
    for drug, (true_hr, _) in SCREEN_PLANTED.items():
        row = same_class.set_index("treatment").loc[drug]
        assert row["ci_low"] <= true_hr <= row["ci_high"], (drug, row["estimate"])


def test_the_decoy_is_not_identified(screen):
    _, candidates, _, _ = screen
    decoy = candidates[(candidates["treatment"] == DECOY) & (candidates["role"] == "outcome")]
    assert not decoy["identified"].fillna(False).any()
    same_class = decoy[decoy["strategy"] == "same_class"].iloc[0]
    assert same_class["q_value"] >= 0.05 and same_class["ci_low"] < 1 < same_class["ci_high"]


def test_same_class_trials_leave_less_residual_confounding_than_random_ones(screen):
    """On the negative controls (true HR 1): the spread of log HR around 0 and the share of
    trials that balance, per strategy."""
    _, _, controls, _ = screen
    error = controls.assign(abs_log=np.abs(np.log(controls["estimate"])))
    by_strategy = error.groupby("strategy").agg(mean_abs_log_hr=("abs_log", "mean"),
                                                balanced=("passed", "mean"))
    assert (by_strategy.loc["random", "mean_abs_log_hr"]
            > 1.2 * by_strategy.loc["same_class", "mean_abs_log_hr"])
    assert by_strategy.loc["same_class", "balanced"] > by_strategy.loc["random", "balanced"]


def test_the_account_explains_every_candidate(screen):
    run, _, _, account = screen
    screened = account[account["selected"]]
    assert len(screened) == 25 and screened["status"].notna().all()
    assert set(account.loc[account["rank"].notna(), "treatment"]) >= PROTECTIVE | HARMFUL
    assert run["n_comparisons"] == 25 * 3 + 25 * 4
