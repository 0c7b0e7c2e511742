"""A terminal progress bar for long stages, silent when output is not a terminal."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Counts completed units of work on stderr with a bar (only on a terminal)."""

    def __init__(self, total: int, label: str, *, enabled: bool = True) -> None:
        self._enabled = enabled and sys.stderr.isatty()
        self._total = total
        self._label = label
        self._bar: RichProgress | None = None

    def __enter__(self) -> Progress:
        if self._enabled:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=self._total)
        return self

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
