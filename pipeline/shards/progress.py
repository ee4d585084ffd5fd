"""The progress loop shared by every stage that runs shard jobs on Ray (generate, extract-features, repair)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pipeline.console import report_interrupt
from pipeline.progress import RateBar
from pipeline.shards.cluster import ActorPlan
from pipeline.shards.runner import Progress, RunSummary, run_shards
from stores.manifest import ShardJob


def run_with_progress(label: str, unit: str, jobs: Sequence[ShardJob], factory: Callable, actors: ActorPlan,
                      max_attempts: int, record: Callable[[ShardJob, Any], None],
                      on_progress: Callable[[Progress], None] | None = None, poll_seconds: float = 0.5,
                      kept: Callable[[], str] | None = None) -> RunSummary:
    """run_shards with a bar: items/s, ETA and each worker's state; warnings (retries, replaced workers) above it.

    On Ctrl-C the bar goes, `kept()` (what is kept and how to resume, asked for then) is reported as the one
    interrupt line, and the KeyboardInterrupt goes on."""
    with RateBar(label, unit, total=sum(j.count for j in jobs)) as bar:
        def progress(p: Progress) -> None:
            bar.advance(p.items_done - bar.done, " | ".join(w.describe() for w in p.workers))
            if on_progress:
                on_progress(p)
        try:
            return run_shards(jobs, factory, actors, max_attempts=max_attempts, record=record, on_progress=progress,
                              poll_seconds=poll_seconds,
                              on_event=lambda message: bar.console.print(f"warning: {message}", highlight=False))
        except KeyboardInterrupt:
            bar.close()
            if kept:
                report_interrupt(kept())
            raise
        finally:
            bar.close()
