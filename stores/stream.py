"""Streaming batches of (id, image, label[, targets of each stored view]) from an image set and its feature set.

Shards are split across ranks and DataLoader workers (each shard read by exactly one of them), shuffled by
shard order and within each shard, and decoded into reused buffers. Targets are matched to images by id:
a feature set built from other images is refused, naming both fingerprints.

Handing batches from workers to the main process is the expensive part on this machine kind: a batch written
into fresh shared memory moves at 1-2 GB/s (the VM hands fresh pages over slowly), into memory written before at
about 10. ShardLoader therefore lets each worker recycle a few shared batch buffers (slots): the main process
copies each batch out into memory of its own, then frees the slot; a worker refills a slot only once freed.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stores.errors import IntegrityError, UserError
from stores.features import FeatureSet
from stores.images import ImageSet
from stores.tarshard import ShardBuffer


def check_pairing(images: ImageSet, features: FeatureSet) -> None:
    """The feature set must have been computed from exactly this image set."""
    expected = features.identity.get("image_set")
    if expected != images.fingerprint:
        raise UserError(f"feature set {features.key} was computed from image set {str(expected)[:12]}, not from "
                        f"{images.name} ({images.fingerprint[:12]}); extract features for {images.name} first")


class PairedShardReader:
    """One process's reader: decodes a shard's images and its target slab into reused buffers."""

    def __init__(self, image_path: Path, feature_path: Path | None = None):
        self.images = ImageSet(image_path)
        self.features = FeatureSet(feature_path) if feature_path else None
        if self.features is not None:
            check_pairing(self.images, self.features)
        self._buffer = ShardBuffer()
        self._targets: dict[str, np.ndarray] = {}

    def read(self, index: int) -> dict[str, np.ndarray]:
        shard = self.images.read_shard(index)
        out = {"ids": shard.ids, "images": shard.images, "labels": shard.labels}
        if self.features is None:
            return out
        for name in self.features.target_names():          # targets (view 0), targets_v1, ...
            out[name] = self.features.read_targets_fast(index, name, self._buffer, self._target_buffer(name))
        slab_ids = self.features.read_shard_ids(index)
        if not np.array_equal(slab_ids, shard.ids):
            raise IntegrityError(f"{self.features.path}: ids of shard {index} differ from the images' ids")
        return out

    def _target_buffer(self, name: str) -> np.ndarray:
        shape = (self.images.shard_size, *self.features.shape)
        if name not in self._targets:
            self._targets[name] = np.empty(shape, dtype=self.features.dtype)
        return self._targets[name]


class ShardStream(IterableDataset):
    """Iterable of batches; pass to DataLoader(batch_size=None). One pass = one epoch over the given shards."""

    def __init__(self, image_path: Path, feature_path: Path | None, shards: list[int], batch_size: int,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 recycle: bool = False):
        self.image_path, self.feature_path = Path(image_path), feature_path
        self.shards, self.batch_size, self.seed, self.shuffle = list(shards), batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        # recycle (ShardLoader only: it frees the slots): 1 = the slot's batch is not yet copied out
        self.busy = slot_flags() if recycle else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[int]:
        """This rank's and this worker's shards, in this epoch's order."""
        order = list(self.shards)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        return order[slot::slots]

    def __iter__(self):
        reader = PairedShardReader(self.image_path, self.feature_path)
        info = get_worker_info()
        shared = info is not None                    # in a worker: fill shared memory, so handing over is free
        slots = SlotPool(self.busy, info.id) if shared and self.busy is not None else None
        pending: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
        held = 0
        for index in self.my_shards():
            pending = _detach(pending)               # the reader is about to reuse its buffers
            shard = reader.read(index)
            n = len(shard["ids"])
            perm = np.random.default_rng([self.seed, self.epoch, index]).permutation(n) if self.shuffle else np.arange(n)
            start = 0
            while start < n:
                take = min(self.batch_size - held, n - start)
                pending.append((shard, perm[start:start + take]))
                held += take
                start += take
                if held == self.batch_size:
                    yield _gather(pending, held, shared, slots)
                    pending, held = [], 0
        if pending and not self.drop_last:
            yield _gather(pending, held, shared, slots)


def _detach(parts: list[tuple[dict[str, np.ndarray], np.ndarray]]) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Copy the rows a partial batch still needs out of the reader's buffers."""
    return [({k: v[rows] for k, v in shard.items()}, np.arange(len(rows))) for shard, rows in parts]


def _gather(parts: list[tuple[dict[str, np.ndarray], np.ndarray]], size: int, shared: bool,
            slots: "SlotPool | None" = None) -> dict[str, torch.Tensor]:
    """One batch from (shard, rows) parts, gathered straight into its output tensors (a recycled slot's, when
    there is a slot pool; its number travels as batch[SLOT_KEY]).

    images (B, H, W, C) uint8, labels (B,), ids (B,), targets (B, C, h, w) in the stored dtype. Parts must be consumed
    before the reader decodes its next shard (its buffers are reused): this function copies.
    """
    batch = {}
    slot, buffers = slots.take() if slots else (None, None)
    for key, value in parts[0][0].items():
        shape, dtype = (size, *value.shape[1:]), _TORCH_DTYPES[value.dtype]
        if slots:
            out = slots.buffer(buffers, key, shape, dtype)
        else:
            out = torch.empty(shape, dtype=dtype)
            if shared:
                out.share_memory_()
        target, row = out.numpy(), 0
        for shard, rows in parts:
            np.take(shard[key], rows, axis=0, out=target[row:row + len(rows)], mode=TAKE_MODE)
            row += len(rows)
        batch[key] = out
    if slot is not None:
        batch[SLOT_KEY] = torch.tensor(slot)
    return batch


SLOTS_PER_WORKER = 6                 # DataLoader keeps prefetch_factor (2 here, 4 in the trainer) batches per worker in
                                     # flight, plus the one the consumer holds and the one being filled
MAX_WORKERS = 64
SLOT_KEY = "_slot"


def slot_flags() -> torch.Tensor:
    """The shared busy flags of every worker's slots (1 = handed out, not yet freed by the consumer)."""
    return torch.zeros(MAX_WORKERS * SLOTS_PER_WORKER, dtype=torch.int32).share_memory_()


class SlotPool:
    """One worker's recycled shared batch buffers and its view of the shared busy flags."""

    def __init__(self, busy: torch.Tensor, worker: int):
        if worker >= MAX_WORKERS:
            raise ValueError(f"recycled batch slots support at most {MAX_WORKERS} loader workers")
        self.busy, self.first, self.next = busy, worker * SLOTS_PER_WORKER, 0
        self.buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(SLOTS_PER_WORKER)]
        busy[self.first:self.first + SLOTS_PER_WORKER] = 0          # a new pass: earlier batches are gone
        self.parent = os.getppid()

    def take(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The next slot, once the consumer has freed it (copied its batch out, or moved on from a borrowed one).

        A training step (or an epoch's evaluation) may hold a slot for long, so there is no time limit; the wait
        ends with an error only if the consumer's process is gone. Polling backs off to 5 ms so that a waiting
        worker does not take CPU from the step."""
        j, self.next = self.next, (self.next + 1) % SLOTS_PER_WORKER
        flag, pause = self.first + j, 0.0002
        while int(self.busy[flag]):
            if os.getppid() != self.parent:
                raise RuntimeError(f"batch slot {flag} is never freed: the process that consumes the batches is gone")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        self.busy[flag] = 1
        return flag, self.buffers[j]

    @staticmethod
    def buffer(buffers: dict[str, torch.Tensor], key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        held = buffers.get(key)
        if held is None or held.shape[1:] != shape[1:] or held.shape[0] < shape[0] or held.dtype != dtype:
            held = buffers[key] = torch.empty(shape, dtype=dtype).share_memory_()
        return held[:shape[0]]


class ShardLoader:
    """Batches of a ShardStream read by `workers` DataLoader processes that recycle their shared buffers.

    borrow=False: each batch is the caller's own memory (copied out of the worker's slot, which is then freed),
    so it may be kept as long as wanted. borrow=True: a batch is valid only until the next one is drawn (its slot
    then goes back to the worker), and nothing is copied. workers=0 reads in this process.
    """

    def __init__(self, image_path: Path, feature_path: Path | None, shards: list[int], batch_size: int,
                 workers: int = 2, borrow: bool = False, **stream_options):
        self.stream = ShardStream(image_path, feature_path, shards, batch_size, recycle=workers > 0, **stream_options)
        self.loader = DataLoader(self.stream, batch_size=None, num_workers=workers)
        self.borrow = borrow

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self):
        lent = None
        for batch in self.loader:
            if lent is not None:
                self.stream.busy[lent] = 0                         # the caller has moved on
                lent = None
            slot = batch.pop(SLOT_KEY, None)
            if slot is None:
                yield batch
            elif self.borrow:
                lent = int(slot)
                yield batch
            else:
                own = copy_batch(batch)
                del batch                                          # the slot's mapping goes before the slot is freed
                self.stream.busy[int(slot)] = 0
                yield own


def copy_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Private copies of a batch's tensors; numpy's single-threaded copy leaves the cores to the workers."""
    own = {}
    for key, t in batch.items():
        own[key] = torch.empty(t.shape, dtype=t.dtype)
        np.copyto(own[key].numpy(), t.numpy())
    return own


# Rows are permutations of a shard's own range, so never out of bounds. numpy buffers `out` under the default
# mode="raise" (see numpy.take): "clip" gathers 2-6x faster here (9 GB/s into a fresh tensor instead of 1.5).
TAKE_MODE = "clip"

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int64): torch.int64, np.dtype(np.float16): torch.float16,
                 np.dtype(np.float32): torch.float32}
