"""The planned shards of a set: contiguous id ranges, shard i = ids [i*S, min((i+1)*S, n)), computed on demand."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardPlan:
    index: int
    first_id: int
    count: int


class ShardPlans(Sequence):
    """Contiguous id ranges, shard i = ids [i*S, min((i+1)*S, n)), less the shards in `done`: computed on demand,
    so len() and `samples` are arithmetic and a plan of 10^10 samples costs no memory."""

    def __init__(self, n: int, shard_size: int, done: Iterable[int] = ()):
        self.n, self.shard_size = n, shard_size
        self.total = -(-n // shard_size)                       # ceil without floats
        self._done = sorted(i for i in set(done) if 0 <= i < self.total)

    def _plan(self, i: int) -> ShardPlan:
        return ShardPlan(i, i * self.shard_size, min(self.shard_size, self.n - i * self.shard_size))

    def _shard_index(self, k: int) -> int:
        """The index of the k-th remaining shard: skip every done shard at or below it."""
        i = k
        for d in self._done:
            if d > i:
                break
            i += 1
        return i

    def __len__(self) -> int:
        return self.total - len(self._done)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._plan(self._shard_index(k))

    def __iter__(self) -> Iterator[ShardPlan]:
        done = set(self._done)
        return (self._plan(i) for i in range(self.total) if i not in done)

    def __eq__(self, other) -> bool:
        """Equal to any list or tuple of the same plans, as the list it stands for would be."""
        if not isinstance(other, (list, tuple, ShardPlans)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    @property
    def samples(self) -> int:
        """Samples in the remaining shards."""
        return self.n - sum(self._plan(d).count for d in self._done)


def plan_shards(n: int, shard_size: int) -> ShardPlans:
    """Contiguous id ranges: shard i holds ids [i*S, min((i+1)*S, n))."""
    return ShardPlans(n, shard_size)


def part_ranges(first_id: int, count: int, parts: int, align: int) -> list[tuple[int, int]]:
    """Split ids [first_id, first_id + count) into at most `parts` contiguous (first_id, count) ranges whose
    starts lie a multiple of `align` past first_id: a worker sampling a range in batches of `align` forms the
    very batches one worker sampling the whole range would, so every image is the same either way."""
    if parts < 1 or align < 1:
        raise ValueError("parts and align must be at least 1")
    blocks = -(-count // align)                                  # batches in the range
    parts = max(1, min(parts, blocks))
    per, extra = divmod(blocks, parts)
    ranges, start = [], first_id
    for k in range(parts):
        size = min((per + (k < extra)) * align, first_id + count - start)
        ranges.append((start, size))
        start += size
    return ranges
