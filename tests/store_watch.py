"""Read a result store while other processes write it: no reader may ever see half a run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import duckdb


def watch_while_writing(store: Path, writers: list[subprocess.Popen], rows_per_run: int) -> int:
    """Poll estimates per run until the writers exit; assert every run seen is whole.

    Returns how many reads succeeded (a writer holding the file makes readers wait their turn).
    """
    reads = 0
    while any(w.poll() is None for w in writers):
        try:
            con = duckdb.connect(str(store), read_only=True)
        except duckdb.IOException:
            time.sleep(0.05)
            continue
        try:
            for run_id, n in con.execute("SELECT run_id, count(*) FROM estimates "
                                         "GROUP BY run_id").fetchall():
                assert n == rows_per_run, f"a reader saw half of run {run_id}"
            reads += 1
        finally:
            con.close()
        time.sleep(0.05)
    return reads
