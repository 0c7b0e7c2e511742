"""A disease-cohort battery screen on the real Eunomia GiBleed CDM (configs/gibleed_battery.yaml
with 2 random-drug trials per candidate): it runs end to end, says that no same-class trial can
be formed (GiBleed's vocabulary has no ATC classes), and accounts for every candidate, through
`cohortflow account`, `rank` and `validate --arms`.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from flows.cli import main
from tests.plain_run import run_study_plain
from tests.shared_data import GIBLEED, needs_gibleed

ROOT = Path(__file__).parents[1]
pytestmark = needs_gibleed


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    out = tmp_path_factory.mktemp("battery")
    text = (ROOT / "configs" / "gibleed_battery.yaml").read_text()
    text = text.replace("source: ../../shared/data/eunomia_gibleed", f"source: {GIBLEED}")
    text = text.replace("battery: {random: 5,", "battery: {random: 2,")
    assert "random: 2" in text
    study = out / "battery.yaml"
    study.write_text(text)
    results = out / "results.duckdb"
    run = run_study_plain(study, results, out / "data")
    return run, results, study


def test_runs_end_to_end_and_says_what_cannot_be_formed(battery):
    run, results, _ = battery
    assert any("no ATC 2nd classes" in w for w in run["warnings"])
    with duckdb.connect(str(results), read_only=True) as con:
        strategies = con.sql("SELECT DISTINCT strategy FROM comparisons").fetchall()
        screened = con.sql("SELECT count(*) FROM screen WHERE selected").fetchall()[0][0]
        trials = con.sql("SELECT treatment, count(*) FROM comparisons GROUP BY ALL").fetchall()
        disease = con.sql("SELECT count(*) FROM attrition WHERE step = 'disease'").fetchall()
    assert strategies == [("random",)]
    assert len(trials) == screened and all(n == 2 for _, n in trials)
    assert disease[0][0] == 2 * screened  # the disease-cohort step in every trial


def test_the_account_explains_every_candidate(battery, capsys):
    _, results, _ = battery
    assert main(["account", "--results", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    with duckdb.connect(str(results), read_only=True) as con:
        screened = con.sql("SELECT set_name FROM screen WHERE selected").fetchall()
    for (name,) in screened:  # one line per screened candidate, with what became of it
        line = next(x for x in lines if x.split(" [")[0].split(": ")[-1] == name)
        assert "eligible new users" in line and " -> " in line
    celecoxib = next(x for x in lines if " celecoxib [" in f" {x}")
    # Eunomia starts celecoxib within 30 days of the osteoarthritis diagnosis: no overlap
    assert "separates the arms perfectly" in celecoxib
    assert lines[-1].startswith("not screened (fewer eligible new users")


def test_rank_of_a_screen_with_nothing_ranked_shows_the_account(battery, capsys):
    run, results, _ = battery
    assert main(["rank", "--results", str(results), "--study", run["study"]]) == 0
    out = capsys.readouterr().out
    assert "no candidate is ranked; the account of every candidate:" in out
    assert "celecoxib [gi_bleed]: 1800 eligible new users" in out


def test_validate_arms_shows_arm_sizes_before_anything_is_estimated(battery, capsys):
    _, _, study = battery
    assert main(["validate", str(study), "--arms"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("celecoxib"))
    assert "random" in row
    assert "warning: comparator battery: the vocabulary has no ATC 2nd classes" in out
