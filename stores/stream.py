"""Streaming batches of (id, image, label[, targets of each stored view]) from an image set and its feature set.

Shards are split across ranks and DataLoader workers (each shard read by exactly one of them), shuffled by
shard order and within each shard, and decoded into reused buffers. Targets are matched to images by id:
a feature set built from other images is refused, naming both fingerprints.

Handing batches from workers to the main process is the expensive part on this machine kind: ShardLoader hands
them over through recycled shared buffers (stores.handover), as the trainer's loader does.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import get_worker_info

from stores import remote
from stores.errors import IntegrityError, UserError
from stores.features import FeatureSet
from stores.handover import EmptyBatches, SlotLoader, SlotStream
from stores.images import ImageSet
from stores.tarshard import ShardBuffer, shard_name

PREFETCH_SHARDS = 2      # shards downloaded ahead of the one being decoded, when the sets live in a bucket's mirror


def check_pairing(images: ImageSet, features: FeatureSet) -> None:
    """The feature set must have been computed from exactly this image set."""
    expected = features.identity.get("image_set")
    if expected != images.fingerprint:
        raise UserError(f"feature set {features.key} was computed from image set {str(expected)[:12]}, not from "
                        f"{images.name} ({images.fingerprint[:12]}); extract features for {images.name} first")


class ShardPrefetch:
    """Downloads the files of the next shards (image tar, every feature array) into the mirror's cache
    (stores.remote) in one background thread, while the reader decodes the current one: the loader does not wait
    for GETs. Only downloads run ahead; decoding stays in the reader. Every download of the reader's shards runs in
    this one thread, so no file is downloaded twice at once; a failed download raises where its shard is read."""

    def __init__(self, images: ImageSet, features: FeatureSet | None, window: int):
        self.images, self.features, self.window = images, features, window
        self.pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None       # started on first use: readers are made before forks

    @classmethod
    def for_sets(cls, images: ImageSet, features: FeatureSet | None, window: int) -> ShardPrefetch | None:
        """A prefetcher when the image set lives in a mirror, else None (a local root reads as it always did). The
        window shrinks so that it and the shard being read fit in `store.cache_gb` together."""
        found = remote.mirror_of(images.path)
        if found is None:
            return None
        prefetch = cls(images, features, window)
        cache = found[0].cache_bytes
        if cache is not None:
            largest = max((sum(size for _, size, _ in prefetch.files(i)) for i in images.records), default=1)
            prefetch.window = min(window, cache // max(largest, 1) - 1)
        return prefetch if prefetch.window > 0 else None

    def files(self, index: int) -> list[tuple[Path, int, str]]:
        """(path, bytes, sha256) of every recorded file of shard `index`."""
        record = self.images.records.get(index)
        out = [(self.images.path / shard_name(index), record.bytes, record.sha256)] if record else []
        slab = self.features.records.get(index) if self.features is not None else None
        if slab is not None:
            out += [(self.features.file_path(name, index), slab.files[name]["bytes"], slab.files[name]["sha256"])
                    for name in self.features.array_names()]
        return out

    def ready(self, index: int, upcoming: Sequence[int]) -> None:
        """Queue shard `index` and the next `window` of `upcoming`, then wait until `index`'s files are here."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dra-prefetch")
        for i in [index, *upcoming[:self.window]]:
            if i not in self.pending:
                self.pending[i] = self._pool.submit(self._fetch, i)
        self.pending.pop(index).result()

    def _fetch(self, index: int) -> None:
        for path, size, sha256 in self.files(index):
            remote.fetch(path, size, sha256)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self.pending = None, {}


class PairedShardReader:
    """One process's reader: decodes a shard's images and its target slab into reused buffers. On an object-store
    root it downloads the shards named as upcoming ahead (ShardPrefetch, `prefetch` shards); close() ends that."""

    def __init__(self, image_path: Path, feature_path: Path | None = None, prefetch: int = PREFETCH_SHARDS):
        self.images = ImageSet(image_path)
        self.features = FeatureSet(feature_path) if feature_path else None
        if self.features is not None:
            check_pairing(self.images, self.features)
        self._buffer = ShardBuffer()
        self._targets: dict[str, np.ndarray] = {}
        self.prefetch = ShardPrefetch.for_sets(self.images, self.features, prefetch)

    def read(self, index: int, upcoming: Sequence[int] = ()) -> dict[str, np.ndarray]:
        """Shard `index`, decoded; `upcoming`: the shards this reader will read next, in order (to prefetch)."""
        if self.prefetch is not None:
            self.prefetch.ready(index, upcoming)
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

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()

    def _target_buffer(self, name: str) -> np.ndarray:
        shape = (self.images.shard_size, *self.features.shape)
        if name not in self._targets:
            self._targets[name] = np.empty(shape, dtype=self.features.dtype)
        return self._targets[name]


class ShardStream(SlotStream):
    """Iterable of batches; pass to DataLoader(batch_size=None), or read it with ShardLoader. One pass = one epoch
    over the given shards. recycle: see SlotStream (ShardLoader sets it: it frees the slots)."""

    def __init__(self, image_path: Path, feature_path: Path | None, shards: list[int], batch_size: int,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 recycle: bool = False):
        self.image_path, self.feature_path = Path(image_path), feature_path
        self.shards, self.batch_size, self.seed, self.shuffle = list(shards), batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        super().__init__(recycle)

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
        try:
            yield from self._batches(reader)
        finally:
            reader.close()

    def _batches(self, reader: PairedShardReader):
        batches = self.empty_batches()
        pending: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
        held = 0
        order = self.my_shards()
        for k, index in enumerate(order):
            pending = _detach(pending)               # the reader is about to reuse its buffers
            shard = reader.read(index, order[k + 1:k + 1 + PREFETCH_SHARDS])
            n = len(shard["ids"])
            perm = (np.random.default_rng([self.seed, self.epoch, index]).permutation(n) if self.shuffle
                    else np.arange(n))
            start = 0
            while start < n:
                take = min(self.batch_size - held, n - start)
                pending.append((shard, perm[start:start + take]))
                held += take
                start += take
                if held == self.batch_size:
                    yield _gather(pending, held, batches)
                    pending, held = [], 0
        if pending and not self.drop_last:
            yield _gather(pending, held, batches)


def _detach(parts: list[tuple[dict[str, np.ndarray], np.ndarray]]) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Copy the rows a partial batch still needs out of the reader's buffers."""
    return [({k: v[rows] for k, v in shard.items()}, np.arange(len(rows))) for shard, rows in parts]


def _gather(parts: list[tuple[dict[str, np.ndarray], np.ndarray]], size: int,
            batches: EmptyBatches) -> dict[str, torch.Tensor]:
    """One batch from (shard, rows) parts, gathered straight into the tensors `batches` hands out (a recycled
    slot's in a recycling worker; its number then travels as batch[SLOT_KEY]).

    images (B, H, W, C) uint8, labels (B,), ids (B,), targets (B, C, h, w) in the stored dtype. Parts must be consumed
    before the reader decodes its next shard (its buffers are reused): this function copies.
    """
    layout = {key: ((size, *value.shape[1:]), _TORCH_DTYPES[value.dtype]) for key, value in parts[0][0].items()}
    batch = batches.take(layout)
    for key in layout:
        target, row = batch[key].numpy(), 0
        for shard, rows in parts:
            np.take(shard[key], rows, axis=0, out=target[row:row + len(rows)], mode=TAKE_MODE)
            row += len(rows)
    return batch


class ShardLoader(SlotLoader):
    """Batches of a ShardStream read by `workers` DataLoader processes that recycle their shared buffers.

    borrow=False: each batch is the caller's own memory, to keep as long as wanted; borrow=True: a batch is valid
    only until the next one is drawn, and nothing is copied (SlotLoader). workers=0 reads in this process.
    """

    def __init__(self, image_path: Path, feature_path: Path | None, shards: list[int], batch_size: int,
                 workers: int = 2, borrow: bool = False, **stream_options):
        stream = ShardStream(image_path, feature_path, shards, batch_size, recycle=workers > 0, **stream_options)
        super().__init__(stream, workers, borrow=borrow)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


# Rows are permutations of a shard's own range, so never out of bounds. numpy buffers `out` under the default
# mode="raise" (see numpy.take): "clip" gathers 2-6x faster here (9 GB/s into a fresh tensor instead of 1.5).
TAKE_MODE = "clip"

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int64): torch.int64, np.dtype(np.float16): torch.float16,
                 np.dtype(np.float32): torch.float32}
