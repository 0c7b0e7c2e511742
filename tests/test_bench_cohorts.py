"""The cohort-engine benchmark at toy size: generator shape and determinism, output sanity.

Never asserts timings (machine-dependent); asserts that every stage ran and the counts are
consistent with the design (100 candidates x 70 outcomes at full size; here a few candidates).
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from bench.cohorts import STAGES, bench_design, chosen_candidates, main, run_prepare
from bench.scale_cdm import (
    CANDIDATE_IDS,
    COMPARATOR_ID,
    NEGATIVE_CONTROL_IDS,
    OUTCOME_IDS,
    cached_cdm,
    generate_scale_cdm,
)

RECORD_TABLES = ("person", "observation_period", "condition_occurrence", "drug_era",
                 "procedure_occurrence", "measurement", "concept")


def checksums(folder: Path) -> dict[str, tuple[int, int]]:
    """Per table: rows and an order-independent checksum of their content."""
    con = duckdb.connect()
    out = {}
    for table in RECORD_TABLES:
        path = str(folder / f"{table}.parquet")
        out[table] = con.execute(
            f"SELECT count(*), sum(hash(t) % 1000000007) FROM '{path}' t").fetchall()[0]
    con.close()
    return out


@pytest.fixture(scope="module")
def small_cdm(tmp_path_factory) -> Path:
    folder, _info, generated = cached_cdm(tmp_path_factory.mktemp("bench"), persons=20_000,
                                          seed=3, threads=2)
    assert generated
    return folder


def test_generator_is_deterministic_and_shaped(tmp_path):
    a = generate_scale_cdm(tmp_path / "a", persons=3_000, seed=1, threads=1)
    generate_scale_cdm(tmp_path / "b", persons=3_000, seed=1, threads=2)
    generate_scale_cdm(tmp_path / "c", persons=3_000, seed=2, threads=2)
    assert checksums(tmp_path / "a") == checksums(tmp_path / "b")  # threads do not matter
    assert checksums(tmp_path / "a") != checksums(tmp_path / "c")  # the seed does
    rows = a["rows"]
    assert rows["person"] == 3_000
    # ~40 conditions and ~18.6 drug eras per person (the 60M of 1M persons)
    assert 30 < rows["condition_occurrence"] / 3_000 < 50
    assert 14 < rows["drug_era"] / 3_000 < 24
    assert rows["concept"] > 7_000
    con = duckdb.connect()
    concept = con.execute(
        f"SELECT domain_id, count(*) FROM '{tmp_path / 'a' / 'concept.parquet'}' "
        "WHERE concept_id IN (SELECT unnest($ids)) GROUP BY 1",
        {"ids": [*OUTCOME_IDS, *NEGATIVE_CONTROL_IDS]}).fetchall()
    assert concept == [("Condition", 70)]
    drugs = dict(con.execute(
        f"SELECT drug_concept_id, count(DISTINCT person_id) FROM "
        f"'{tmp_path / 'a' / 'drug_era.parquet'}' WHERE drug_concept_id IN "
        "(SELECT unnest($ids)) GROUP BY 1", {"ids": [COMPARATOR_ID, *CANDIDATE_IDS]}
    ).fetchall())
    assert 120 < drugs[COMPARATOR_ID] < 400  # ~8% of persons
    assert drugs[CANDIDATE_IDS[-1]] > drugs.get(CANDIDATE_IDS[0], 0)  # sizes rise with index
    bad = con.execute(
        f"SELECT count(*) FROM '{tmp_path / 'a' / 'drug_era.parquet'}' e JOIN "
        f"'{tmp_path / 'a' / 'observation_period.parquet'}' o USING (person_id) "
        "WHERE e.drug_era_end_date < e.drug_era_start_date "
        "OR e.drug_era_start_date NOT BETWEEN o.observation_period_start_date "
        "AND o.observation_period_end_date").fetchall()[0][0]
    assert bad == 0


def test_cache_is_reused(small_cdm):
    folder, info, generated = cached_cdm(small_cdm.parent, persons=20_000, seed=3)
    assert folder == small_cdm and not generated and info["persons"] == 20_000


def test_design_has_the_benchmark_shape():
    design = bench_design(100)
    assert len(design.comparisons) == 100
    assert {c for _, c in design.comparisons} == {"comparator"}
    roles = [o.role for o in design.outcomes]
    assert roles.count("outcome") == 20 and roles.count("negative_control") == 50
    assert design.covariate_windows == ((-365, -1), (-30, -1))
    assert chosen_candidates(3) == [CANDIDATE_IDS[0], CANDIDATE_IDS[50], CANDIDATE_IDS[99]]


def test_prepare_output_is_sane(small_cdm, tmp_path):
    result = run_prepare(small_cdm, tmp_path / "ws", candidates=5, threads=2,
                         memory_limit="2GB", temp_directory=str(tmp_path / "spill"))
    assert set(STAGES) <= set(result["stages"])
    assert set(STAGES) <= set(result["stage_memory"])
    counts = result["counts"]
    assert counts["comparisons"] == 5
    assert counts["comparisons_with_both_arms"] >= 3
    assert counts["outcomes"] == 70
    assert counts["outcome_roles"] == {"outcome": 20, "negative_control": 50}
    assert 0 < counts["cohort_treated_rows"] < counts["cohort_rows"]
    assert counts["cohort_rows"] >= counts["cohort_distinct_persons"]
    # ~7,000 concepts x 2 windows; a 0.1% prevalence floor keeps hundreds of them (the
    # reference names them all; it may also name ids found but too rare in every comparison)
    assert 300 < counts["distinct_covariate_ids"] <= counts["covariate_ref_rows"]
    assert counts["covariate_rows"] > 10 * counts["cohort_rows"]
    assert 0 < counts["outcome_events"] <= counts["outcome_rows"]
    assert counts["outcomes_with_rows"] == 70
    # 7 cohort steps at least, plus one outcome step per outcome, for each comparison
    assert counts["attrition_rows"] >= 5 * (7 + 70)
    assert result["duckdb_settings"]["threads"] == "2"


def test_cli_runs_in_a_child_and_records(tmp_path, capsys):
    record = main(["--persons", "5000", "--candidates", "3", "--memory-limit", "1GB",
                   "--threads", "1", "--out", str(tmp_path)])
    assert record["child_peak_rss_mb"] >= record["peak_rss_mb"] > 50
    assert record["child_peak_rss_mb"] >= record["last_segment_rss_mb"] > 50
    assert record["prepare_seconds"] > 0 and record["child_wall_seconds"] > 0
    assert set(STAGES) <= set(record["stages"])
    assert record["counts"]["comparisons"] == 3
    lines = (tmp_path / "cohorts.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["persons"] == 5000
    assert not (tmp_path / "workspace_cohorts_p5000_k3").exists()  # removed without --keep
    assert "| covariates |" in capsys.readouterr().out
