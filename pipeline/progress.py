"""Progress on long work: a rich bar (count, rate, ETA) that appears only once work starts.

Starting lazily keeps validation errors to exactly one line on stderr.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class RateBar:
    def __init__(self, label: str, unit: str, total: int | None = None, console: Console | None = None):
        self.label, self.unit, self.total = label, unit, total
        self.console = console or Console(stderr=True)
        self.started = time.perf_counter()
        self.done = 0
        self._bar: Progress | None = None

    def advance(self, count: int, status: str = "") -> None:
        if self._bar is None:
            self._bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                 console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="", status="")
        self.done += count
        self._bar.update(self._task, advance=count, rate=f"{self.rate:,.0f} {self.unit}/s", status=status)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        return self.done / max(self.seconds, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "RateBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
