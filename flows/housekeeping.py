"""`cohortflow clean`: remove what runs leave on disk once it is no longer needed.

A run keeps a person-level workspace (`<data-dir>/workspace/<run_id>/`: person ids, dates of
time zero, birth years, genders, covariate matrices) so that an interrupted run can resume, a
lock file beside it, and a masked HTML report (`<data-dir>/reports/<run_id>.html`). This removes
the workspaces of runs the result store holds as completed, workspaces of abandoned runs older
than a retention age, lock files nobody holds, and (when asked) old reports. A workspace whose
lock is held (a run in progress) is never touched.
"""

from __future__ import annotations

import fcntl
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from results.store import open_store

DAY = 86_400.0


@dataclass
class Cleaned:
    """What `clean` removed (or would remove, in a dry run), by kind."""

    finished: list[Path] = field(default_factory=list)
    abandoned: list[Path] = field(default_factory=list)
    locks: list[Path] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)
    busy: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per kind, for the terminal."""
        return [f"{label}: {len(paths)}" for label, paths in (
            ("workspaces of completed runs", self.finished),
            ("workspaces of abandoned runs", self.abandoned), ("stale lock files", self.locks),
            ("old reports", self.reports), ("skipped (a run holds its lock)", self.busy))]


def clean(data_dir: Path, results: Path, *, older_than_days: float = 7.0,
          reports_older_than_days: float | None = None, dry_run: bool = False) -> Cleaned:
    """Remove finished and abandoned workspaces, stale locks and (optionally) old reports."""
    done = Cleaned()
    completed = _completed_runs(results)
    cutoff = time.time() - older_than_days * DAY
    root = data_dir / "workspace"
    for workspace in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        if workspace.name in completed:
            kind = done.finished
        elif _last_change(workspace) < cutoff:
            kind = done.abandoned
        else:
            continue
        _remove_unlocked(workspace, kind, done.busy, dry_run)
    for lock in sorted(root.glob("*.lock")) if root.is_dir() else []:
        if not (root / lock.stem).exists():
            _remove_unlocked(lock.with_suffix(""), done.locks, done.busy, dry_run)
    if reports_older_than_days is not None:
        oldest = time.time() - reports_older_than_days * DAY
        for report in sorted((data_dir / "reports").glob("*.html")):
            if report.stat().st_mtime < oldest:
                done.reports.append(report)
                if not dry_run:
                    report.unlink(missing_ok=True)
    return done


def _completed_runs(results: Path) -> set[str]:
    """Run ids the store holds as completed (none when there is no store yet)."""
    if not results.is_file():
        return set()
    with open_store(results, read_only=True) as con:
        return {r for (r,) in con.execute(
            "SELECT run_id FROM runs WHERE status = 'completed'").fetchall()}


def _last_change(folder: Path) -> float:
    """The latest modification time of the folder or anything in it."""
    return max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.rglob("*"))])


def _remove_unlocked(workspace: Path, kind: list[Path], busy: list[Path], dry_run: bool) -> None:
    """Remove a workspace (if present) and its lock file while holding that lock; a lock
    another process holds means a run is using it: skip."""
    lock = workspace.with_name(f"{workspace.name}.lock")
    if dry_run and not lock.exists():
        kind.append(workspace)
        return
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy.append(workspace)
            return
        kind.append(workspace if workspace.exists() else lock)
        if not dry_run:
            shutil.rmtree(workspace, ignore_errors=True)
            lock.unlink(missing_ok=True)
