"""Small jobs over many workers: a shard split into per-worker parts, sampled apart, written whole by the driver.

With fewer shards than workers (N below shard size x workers) the idle workers take parts of a shard: each part
is an id range starting a whole number of batches into the shard, so every batch, and so every image, is the one
a single worker would have sampled, and the shard the driver writes from the parts has the same bytes.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from stores.manifest import ShardJob
from stores.plans import part_ranges


def split_jobs(jobs: Sequence[ShardJob], workers: int, align: int) -> list[ShardJob]:
    """The jobs as they are when there are at least as many as workers; else each split into parts of whole
    `align`-sized batches, enough for every worker to get one."""
    if not jobs or len(jobs) >= workers:
        return list(jobs)
    parts = -(-workers // len(jobs))
    return [ShardJob(j.index, first, count, j.payload)
            for j in jobs for first, count in part_ranges(j.first_id, j.count, parts, align)]


class ComputeOnly:
    """A worker factory whose workers compute and hand the intermediate back (the driver writes the shard)."""

    def __init__(self, factory: Callable[[], Any]):
        self.factory = factory

    def __call__(self) -> _ComputeOnlyWorker:
        return _ComputeOnlyWorker(self.factory())


class _ComputeOnlyWorker:
    def __init__(self, inner):
        self.inner = inner

    def compute(self, job: ShardJob, progress: Callable[[int], None]) -> Any:
        return self.inner.compute(job, progress)

    def finish(self, job: ShardJob, intermediate: Any) -> Any:
        return intermediate


class ShardAssembler:
    """Driver side: collects each shard's parts and, once all are in, calls write(whole job, results in id order)."""

    def __init__(self, jobs: Sequence[ShardJob], parts: Sequence[ShardJob], write: Callable[[ShardJob, list], None]):
        self.whole = {j.index: j for j in jobs}
        self.expected = Counter(p.index for p in parts)
        self.write = write
        self.pending: dict[int, dict[int, Any]] = {}
        self.written = 0

    def record(self, part: ShardJob, result: Any) -> None:
        got = self.pending.setdefault(part.index, {})
        got[part.first_id] = result
        if len(got) == self.expected[part.index]:
            del self.pending[part.index]
            self.write(self.whole[part.index], [got[first] for first in sorted(got)])
            self.written += 1
