"""The result store: whole runs in one transaction, read-only queries, masking, one writer."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from flows.cli import main
from results.store import StoreError, columns, open_store, query, write_run
from results.summary import mask_counts

ROOT = Path(__file__).parents[1]


def estimates(run_id: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({"comparison_id": range(n), "treatment": "t", "comparator": "c",
                         "outcome": "o", "estimator": "crude", "estimate": 1.5,
                         "status": "ok", "run_id": "ignored"})


def test_write_run_replaces_a_run_whole(tmp_path):
    path = tmp_path / "r.duckdb"
    write_run(path, {"run_id": "a", "status": "completed", "timings": {"x": 1}},
              {"estimates": estimates("a", 3)})
    write_run(path, {"run_id": "b", "status": "completed"}, {"estimates": estimates("b", 2)})
    write_run(path, {"run_id": "a", "status": "completed"}, {"estimates": estimates("a", 1)})
    counts = dict(query(path, "SELECT run_id, count(*) FROM estimates GROUP BY 1").values)
    assert counts == {"a": 1, "b": 2}
    assert query(path, "SELECT count(*) AS n FROM runs")["n"][0] == 2
    assert list(query(path, "SELECT * FROM estimates LIMIT 0").columns) == columns("estimates")


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "r.duckdb"
    write_run(path, {"run_id": "a", "status": "completed"}, {"estimates": estimates("a", 2)})
    bad = estimates("b", 2).assign(comparison_id=["not", "integers"])
    with pytest.raises(duckdb.Error):
        write_run(path, {"run_id": "b", "status": "completed"}, {"estimates": bad})
    assert query(path, "SELECT DISTINCT run_id FROM runs")["run_id"].tolist() == ["a"]
    assert query(path, "SELECT count(*) AS n FROM estimates")["n"][0] == 2


def test_query_is_read_only(tmp_path, capsys):
    path = tmp_path / "r.duckdb"
    write_run(path, {"run_id": "a", "status": "completed"}, {})
    assert main(["query", "DROP TABLE runs", "--results", str(path)]) == 2
    assert "read-only" in capsys.readouterr().err
    assert main(["query", "SELECT run_id FROM runs", "--results", str(path),
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["run_id", "a"]
    assert main(["query", "SELECT 1", "--results", str(tmp_path / "none.duckdb")]) == 2
    assert "no result store here yet" in capsys.readouterr().err


def test_mask_counts():
    frame = pd.DataFrame({"n": [0, 3, 5, 120], "other": [1, 2, 3, 4]})
    masked = mask_counts(frame, ["n"], 5)
    assert masked["n"].tolist() == ["0", "<5", "5", "120"]
    assert masked["other"].tolist() == [1, 2, 3, 4]


def test_writer_waits_for_the_lock(tmp_path):
    path = tmp_path / "r.duckdb"
    with open_store(path):
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, time, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
         " time.sleep(2); c.close()", str(path)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    write_run(path, {"run_id": "late", "status": "completed"}, {})
    waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert waited > 0.5
    assert query(path, "SELECT run_id FROM runs")["run_id"].tolist() == ["late"]
    with pytest.raises(StoreError, match="cannot open"):
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import duckdb, time, sys; c = duckdb.connect(sys.argv[1]); print('held',"
             " flush=True); time.sleep(3)", str(path)], stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
        try:
            with open_store(path, wait_seconds=0.3):
                pass
        finally:
            holder.kill()


def test_exports_and_rankings_mask_small_counts(tmp_path, capsys):
    path = tmp_path / "r.duckdb"
    rows = estimates("a", 2).assign(
        role="outcome", treatment=["t1", "t2"], n_treated=[3, 400], n_comparator=[250, 2],
        events_treated=[1, 40],
        events_comparator=[0, 7], rank=[1, 2], estimate=[0.5, 2.0], ci_low=[0.3, 1.2],
        ci_high=[0.8, 3.1], p_value=[0.01, 0.02])
    write_run(path, {"run_id": "a", "study": "s", "status": "completed",
                     "finished_at": pd.Timestamp("2026-01-01"),
                     "config_json": {"min_cell_count": 5}}, {"estimates": rows})
    for suffix in (".parquet", ".csv", ".json"):
        out = tmp_path / f"e{suffix}"
        assert main(["export", "estimates", "--out", str(out), "--results", str(path)]) == 0
        text = out.read_bytes()
        assert b"<5" in text
        frame = {".parquet": pd.read_parquet, ".csv": pd.read_csv,
                 ".json": pd.read_json}[suffix](out)
        assert frame["n_treated"].astype(str).tolist() == ["<5", "400"]
        assert frame["events_comparator"].astype(str).tolist() == ["0", "7"]
    capsys.readouterr()
    assert main(["rank", "--results", str(path), "--format", "csv"]) == 0
    ranked = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert ranked["n_treated"].astype(str).tolist() == ["<5", "400"]
    assert ranked["n_comparator"].astype(str).tolist() == ["250", "<5"]
    assert main(["export", "estimates", "--out", str(tmp_path / "x.xlsx"),
                 "--results", str(path)]) == 2
    assert "expected a file ending in .parquet, .csv, .json" in capsys.readouterr().err


def test_readers_get_no_file_or_network_access(tmp_path, capsys):
    path = tmp_path / "r.duckdb"
    write_run(path, {"run_id": "a", "status": "completed"}, {})
    leak = tmp_path / "leak.csv"
    for sql in (f"COPY (SELECT * FROM runs) TO '{leak}'",
                f"SELECT * FROM read_csv('{path}')", "INSTALL httpfs"):
        assert main(["query", sql, "--results", str(path)]) == 2, sql
        assert capsys.readouterr().err.count("\n") == 1
    assert not leak.exists()


def test_readme_documents_every_store_table_and_column(tmp_path):
    """The README's result-store reference names every table, view and column a store has."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The result store\n"):readme.index("## Orchestration\n")]
    documented = set(re.findall(r"`([a-z_0-9]+)`", section))
    with open_store(tmp_path / "r.duckdb") as con:
        relations = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_name <> 'schema_info'"
        ).fetchall()]
        missing = {f"{rel}.{column}" for rel in relations
                   for (column, *_rest) in con.execute(f"DESCRIBE {rel}").fetchall()
                   if column not in documented}
    assert set(relations) >= {"runs", "estimates", "km_curves", "rankings", "triangulation"}
    assert set(relations) <= documented
    assert missing == set()


def test_a_screens_end_of_run_summary_shows_the_ranked_then_the_strongest_rows(monkeypatch):
    from flows import cli
    from flows.cli import SUMMARY_ROWS, _strongest_rows

    rng = np.random.default_rng(0)
    rows = [(f"drug_{i:02d}", "comparator", outcome, rng.random(), i % 9 == 0)
            for outcome in ("o1", "o2") for i in range(40)]
    summary = pd.DataFrame(rows, columns=["treatment", "comparator", "outcome", "p_value",
                                          "ranked"]).assign(estimator="iptw")
    ranks = summary.groupby("outcome")["ranked"].cumsum().where(summary["ranked"])
    wide = summary.assign(rank=ranks.astype(float)).drop(
        columns=["p_value", "ranked", "estimator"]).sample(frac=1.0, random_state=1)
    shown = _strongest_rows(wide, pd.concat([summary, summary.assign(estimator="crude",
                                                                     p_value=0.0)]), "iptw")
    per_outcome = SUMMARY_ROWS // 2
    assert list(shown.index) == [i for i in wide.index if i in set(shown.index)]  # order kept
    for outcome in ("o1", "o2"):
        mine = summary[summary["outcome"] == outcome]
        picked = set(shown.loc[shown["outcome"] == outcome, "treatment"])
        assert len(picked) == per_outcome
        assert set(mine.loc[mine["ranked"], "treatment"]) <= picked
        unranked = mine[~mine["ranked"]]
        cut = unranked[unranked["treatment"].isin(picked)]["p_value"].max()
        assert (unranked[~unranked["treatment"].isin(picked)]["p_value"] >= cut).all()
    monkeypatch.setattr(cli, "SUMMARY_ROWS", 4)   # fewer places than ranked rows: best ranks
    few = _strongest_rows(wide, summary, "iptw")
    assert sorted(few.groupby("outcome")["rank"].apply(list).sum()) == [1, 1, 2, 2, 3, 3]
