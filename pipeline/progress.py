"""Progress on long work: a rich bar (count, rate, ETA) that appears only once work starts.

Starting lazily keeps validation errors to exactly one line on stderr. Where stderr is not a terminal (a batch
job's log, CI, `nohup`), a transient bar would print nothing for minutes: there a plain line is written every
LOG_EVERY seconds instead.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

LOG_EVERY = 30.0                         # seconds between plain progress lines when stderr is not a terminal


class RateBar:
    def __init__(self, label: str, unit: str, total: int | None = None, console: Console | None = None):
        self.label, self.unit, self.total = label, unit, total
        self.console = console or Console(stderr=True)
        self.started = time.perf_counter()
        self.done = 0
        self._bar: Progress | None = None
        self._logged = self.started              # when the last plain line was written

    def advance(self, count: int, status: str = "") -> None:
        self.done += count
        if not self.console.is_terminal:
            self._log_line(status)
            return
        if self._bar is None:
            self._bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[status]}"), console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, rate="", status="")
        self._bar.update(self._task, advance=count, rate=f"{self.rate:,.0f} {self.unit}/s", status=status)

    def _log_line(self, status: str) -> None:
        now = time.perf_counter()
        if now - self._logged < LOG_EVERY:
            return
        self._logged = now
        of = f"/{self.total:,}" if self.total else ""
        left = (self.total - self.done) / self.rate if self.total and self.rate > 0 else None
        eta = f", about {left / 60:.1f} min left" if left is not None else ""
        self.console.print(f"{self.label}: {self.done:,}{of} {self.unit}, {self.rate:,.0f} {self.unit}/s{eta}"
                           + (f", {status}" if status else ""), highlight=False, soft_wrap=True)

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

    def __enter__(self) -> RateBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
