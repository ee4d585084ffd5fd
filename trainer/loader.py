"""Streaming training batches: real and generated images mixed per batch, each with its cached target.

Each source (the real set, the generated set) is an endless sequence of epochs. In source-epoch e its shards
are put in a seeded order and their samples laid end to end; reader slot s of S (S = ranks x loader workers)
takes the s-th contiguous 1/S of that sequence, so no sample appears twice in an epoch's split and a slot reads
at most two shards beyond its share. Each shard is shuffled as a whole (the shuffle buffer), and a slot's
samples run on across epoch boundaries. A loader worker yields mixed batches: `real` rows from its slot of the
real source, then `generated` rows from its slot of the generated source (DM-AT's `unsup_fraction`).

DataLoader takes batches from its workers round-robin, so a rank's loader position is one number, the batches
it has handed out (= the training step); a restarted loader skips there without reading what it skips.
Targets arrive with their images: ids are checked shard by shard, fingerprints when the source is opened.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import get_worker_info

from stores.errors import UserError
from stores.features import FeatureSet, view_array
from stores.handover import SLOT_KEY, SlotLoader, SlotStream
from stores.images import ImageSet
from stores.stream import PREFETCH_SHARDS, TAKE_MODE, PairedShardReader, check_pairing
from trainer.views import view_choices


@dataclass(frozen=True)
class Source:
    """One image set (with its feature set, or None) to stream: the ids below `stop` of its shards."""

    images: str                          # image-set folder
    features: str | None                 # feature-set folder, or None (no targets)
    shards: tuple                        # ((shard index, first id, count streamed), ...) in id order
    tag: int                             # 0 real, 1 generated: seeds the source's own shuffle

    @classmethod
    def open(cls, images: ImageSet, features: FeatureSet | None, tag: int, stop: int | None = None) -> Source:
        """Check the sets (complete, paired) and list the shards holding ids [0, stop)."""
        stop = images.n if stop is None else stop
        images.require_complete("rerun the stage that writes it")
        shards = tuple((p.index, p.first_id, min(p.count, stop - p.first_id)) for p in images.plan()
                       if p.first_id < stop)
        if features is not None:
            check_pairing(images, features)
            missing = features.missing_shards([s[0] for s in shards])
            if missing:
                raise UserError(f"feature set {features.key} lacks {len(missing)} of the {len(shards)} shards of "
                                f"{images.name}; rerun extract-features to complete it")
        return cls(str(images.path), str(features.path) if features else None, shards, tag)

    @property
    def n(self) -> int:
        return sum(s[2] for s in self.shards)


def epoch_pieces(source: Source, seed: int, epoch: int, slot: int, slots: int) -> list[tuple[int, int, int]]:
    """Slot `slot`'s share of one source-epoch: [(shard index, lo, hi)] = rows lo..hi of the shuffled shard."""
    order = np.random.default_rng([seed, source.tag, epoch]).permutation(len(source.shards))
    begin, end = slot * source.n // slots, (slot + 1) * source.n // slots
    pieces, pos = [], 0
    for i in order:
        index, _, count = source.shards[i]
        lo, hi = max(begin - pos, 0), min(end - pos, count)
        if lo < hi:
            pieces.append((index, lo, hi))
        pos += count
    return pieces


def shard_permutation(source: Source, seed: int, epoch: int, index: int, count: int) -> np.ndarray:
    """The shuffle of one shard's streamed rows in one source-epoch (the same in every slot)."""
    return np.random.default_rng([seed, source.tag, epoch, index]).permutation(count)


class SlotReader:
    """One slot's endless sample sequence from one source, from sample position `start` on."""

    def __init__(self, source: Source, seed: int, slot: int, slots: int, start: int = 0):
        self.source, self.seed, self.slot, self.slots = source, seed, slot, slots
        self.per_epoch = (slot + 1) * source.n // slots - slot * source.n // slots
        if self.per_epoch == 0:
            raise UserError(f"{Path(source.images).name}: {source.n} samples cannot feed {slots} readers "
                            f"(ranks x loader workers); use fewer loader workers")
        self.reader = PairedShardReader(Path(source.images), Path(source.features) if source.features else None)
        self.epoch, offset = divmod(start, self.per_epoch)
        self._start_epoch(offset)

    def _start_epoch(self, offset: int) -> None:
        """Position at `offset` samples into this slot's share of self.epoch (skipped without reading)."""
        self.pieces = epoch_pieces(self.source, self.seed, self.epoch, self.slot, self.slots)
        self.piece, self.row = 0, 0
        while offset >= self.pieces[self.piece][2] - self.pieces[self.piece][1]:
            offset -= self.pieces[self.piece][2] - self.pieces[self.piece][1]
            self.piece += 1
        self.row = offset
        self._loaded: tuple | None = None          # (epoch, shard index) whose rows self.rows holds

    def fill(self, out: dict[str, np.ndarray], views: np.ndarray | None = None) -> None:
        """Copy the next len(out['ids']) samples into the arrays of `out` (ids, images, labels[, targets...]).

        views (n,): with it, out['targets'] gets each sample's chosen stored view and out['views'] the choice.
        """
        n, done = len(out["ids"]), 0
        while done < n:
            index, lo, hi = self.pieces[self.piece]
            shard, rows = self._shard(index)
            take = min(n - done, hi - lo - self.row)
            pick = rows[lo + self.row:lo + self.row + take]
            for key, array in out.items():
                if views is not None and key in ("targets", "views"):
                    _fill_views(array[done:done + take], key, shard, pick, views[done:done + take])
                    continue
                np.take(shard[key], pick, axis=0, out=array[done:done + take], mode=TAKE_MODE)
            done += take
            self.row += take
            if self.row == hi - lo:
                self._next_piece()

    def _next_piece(self) -> None:
        self.piece, self.row = self.piece + 1, 0
        if self.piece == len(self.pieces):
            loaded = self._loaded
            self.epoch += 1
            self._start_epoch(0)
            self._loaded = loaded                   # same shard across the boundary: no re-read, new shuffle

    def _shard(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if self._loaded is None or self._loaded[1] != index:
            self.data = self.reader.read(index, self._upcoming(index))
        if self._loaded != (self.epoch, index):
            count = next(c for i, _, c in self.source.shards if i == index)
            self.rows = shard_permutation(self.source, self.seed, self.epoch, index, count)
            self._loaded = (self.epoch, index)
        return self.data, self.rows

    def _upcoming(self, current: int) -> list[int]:
        """The next shards this slot reads in this epoch, in order: on an object-store root the reader downloads
        them while this one is decoded (stores.stream.ShardPrefetch)."""
        ahead: list[int] = []
        for index, _, _ in self.pieces[self.piece + 1:]:
            if len(ahead) == PREFETCH_SHARDS:
                break
            if index != current and index not in ahead:
                ahead.append(index)
        return ahead


def _fill_views(out: np.ndarray, key: str, shard: dict, pick: np.ndarray, views: np.ndarray) -> None:
    if key == "views":
        out[:] = views
        return
    for v in np.unique(views):
        rows = np.flatnonzero(views == v)
        out[rows] = shard[view_array(int(v))][pick[rows]]


@dataclass(frozen=True)
class MixPlan:
    """What one rank's loader streams: sources, rows of each per batch, reader layout, start position."""

    real: Source
    generated: Source | None
    real_rows: int                       # rows of a rank's batch from the real source
    generated_rows: int                  # rows from the generated source
    seed: int
    rank: int = 0
    world_size: int = 1
    loader_workers: int = 0
    start: int = 0                       # batches this rank has already consumed
    keys: tuple = ("ids", "images", "labels")   # plus "targets"[, "targets_v1"] or "targets", "views" with DRA
    view_counts: tuple = (0, 0)          # views mode: stored views per image of the real, generated source

    @property
    def batch_size(self) -> int:
        return self.real_rows + self.generated_rows


def split_batch(batch_size: int, unsup_fraction: float, world_size: int) -> tuple[int, int]:
    """(real rows, generated rows) of one rank's batch; the global batch must divide over the ranks."""
    if not 0 <= unsup_fraction < 1:
        raise UserError(f"unsup_fraction {unsup_fraction} must lie in [0, 1): at least one real image per batch")
    if batch_size % world_size:
        raise UserError(f"batch size {batch_size} does not divide over {world_size} workers; pick a multiple")
    per_rank = batch_size // world_size
    generated = int(round(per_rank * unsup_fraction))
    if generated == per_rank:
        generated -= 1
    return per_rank - generated, generated


class MixedStream(SlotStream):
    """Endless mixed batches for one rank: ids (B,), images (B, H, W, C) uint8, labels (B,), generated (B,) bool,
    and with targets targets (B, C, h, w) in the stored dtype (float16 or float32) [, targets_v1 (view 1)]; in
    views mode targets is each row's drawn stored view and views (B,) int64 says which
    (trainer.views.view_choices). Pass to DataLoader(batch_size=None).

    recycle: workers fill a few shared batch buffers again and again (stores.handover) and tag each batch with
    its slot; the consumer (TrainLoader) frees the slot."""

    def __init__(self, plan: MixPlan, recycle: bool = False):
        self.plan = plan
        super().__init__(recycle)

    def __iter__(self):
        p = self.plan
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        step = p.start + worker                                   # the training step of this process's next batch
        worker = (p.start + worker) % workers                     # batch `start` comes from this process's first
        slot, slots = p.rank * workers + worker, p.world_size * workers
        done = max(0, -(-(p.start - worker) // workers))          # batches of this slot already consumed
        real = SlotReader(p.real, p.seed, slot, slots, done * p.real_rows)
        gen = SlotReader(p.generated, p.seed, slot, slots, done * p.generated_rows) if p.generated_rows else None
        layout = {k: ((p.batch_size, *shape), dtype) for k, (shape, dtype) in self._shapes(real).items()}
        batches = self.empty_batches()
        while True:
            batch = batches.take(layout)
            arrays = {k: t.numpy() for k, t in batch.items() if k != SLOT_KEY}
            views = self._views(step)
            real.fill({k: a[:p.real_rows] for k, a in arrays.items() if k != "generated"},
                      None if views is None else views[:p.real_rows])
            if gen is not None:
                gen.fill({k: a[p.real_rows:] for k, a in arrays.items() if k != "generated"},
                         None if views is None else views[p.real_rows:])
            arrays["generated"][:] = np.arange(p.batch_size) >= p.real_rows
            step += workers
            yield batch

    def _views(self, step: int) -> np.ndarray | None:
        """Views mode: the stored view of every row of batch `step` (real rows first)."""
        p = self.plan
        if "views" not in p.keys:
            return None
        counts = np.array([p.view_counts[0]] * p.real_rows + [p.view_counts[1]] * p.generated_rows)
        return view_choices(p.seed, p.rank, step, counts)

    def _shapes(self, real: SlotReader) -> dict[str, tuple[tuple, torch.dtype]]:
        first = real.reader.images
        out = {"ids": ((), torch.int64), "images": ((first.resolution, first.resolution, first.channels), torch.uint8),
               "labels": ((), torch.int64), "generated": ((), torch.bool)}
        if real.reader.features is not None:
            for key in self.plan.keys:
                if key.startswith("targets"):
                    out[key] = (tuple(real.reader.features.shape), target_dtype(real.reader.features))
        if "views" in self.plan.keys:
            out["views"] = ((), torch.int64)
        return out


def target_dtype(features: FeatureSet) -> torch.dtype:
    """The torch dtype of a feature set's stored targets (the step casts them to float32)."""
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[features.dtype]


class TrainLoader(SlotLoader):
    """The rank's endless batches from MixedStream in `plan.loader_workers` DataLoader processes.

    borrow=False: every batch is the caller's own memory. borrow=True (the training loop): a batch stays valid only
    until the next one is drawn, and nothing is copied. pin_memory: see SlotLoader. Iterating twice restarts the
    workers at plan.start.
    """

    def __init__(self, plan: MixPlan, pin_memory: bool = False, borrow: bool = False):
        workers = plan.loader_workers
        # its own generator: creating the iterator must not draw from torch's global RNG (exact resume)
        super().__init__(MixedStream(plan, recycle=workers > 0), workers, borrow=borrow, pin_memory=pin_memory,
                         prefetch=PREFETCH, seed=plan.seed)


PREFETCH = 4                             # batches each worker keeps ready (stores.handover keeps slots for them)


def make_loader(plan: MixPlan, pin_memory: bool = False, borrow: bool = False) -> TrainLoader:
    """The rank's loader over MixedStream; iterate it for as many steps as needed (it never ends).

    pin_memory: hand batches over in page-locked memory, so the step's `.to(device, non_blocking=True)` copies
    overlap with compute (on CUDA; on the CPU it only costs a copy). borrow: see TrainLoader."""
    return TrainLoader(plan, pin_memory, borrow)
