"""`dra-pipe bench stores --root s3://...`: streaming shards from a bucket against a bare GET of the same objects.

Data: the local bench's CIFAR-shaped set (32x32x3 raw images, 256x8x8 float16 targets, 35.8 KB per sample, shards
of 10,000), written through the node's cache of the bucket, so every shard is uploaded as a writer uploads it.
Readers, each timed once after an untimed pass that pays imports and connections:
  bare          ObjectStore.get of every shard object the stream reads (image tars, feature array files), one
                after another, into memory: what one reader can pull from this bucket
  ours cold     ShardLoader (`workers` DataLoader processes) with the node's cache emptied first: each shard is
                fetched (sha256 checked), the next two prefetched, decoded and batched
  ours warm     the same with the shards in the cache
  trainer cold  the trainer's loader (real rows only, targets in views mode's layout), cache emptied first
  trainer warm  the same with the shards in the cache
Goal: ours cold / bare >= 0.5.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.bench.stores import BYTES_PER_SAMPLE, SHARD, TARGET_SHAPE, _ours, _smooth_images, _timed, _trainer
from stores import remote
from stores.features import FeatureSet, FeatureSetWriter, list_feature_sets, write_feature_shard
from stores.images import ImageSet, ImageSetWriter, make_identity, plan_shards
from stores.stream import ShardPrefetch

READERS = ("ours", "trainer")


def bench_stores_remote(work: Path, samples: int, batch: int, workers: int, console: Console) -> dict:
    mirror, _ = remote.mirror_of(work)
    console.print(f"building {samples:,} samples in {remote.as_url(work)} (uploaded as they are written) ...")
    images, features = _build(work, samples, console)
    files = ShardPrefetch(images, features, 0)
    objects = [(mirror.key(path), size) for i in sorted(images.records) for path, size, _ in files.files(i)]
    results = {"bare": _bare_rate(mirror.store, objects, samples)}
    for name in READERS:
        run = (lambda: _ours(images.path, features.path, batch, workers)) if name == "ours" else \
              (lambda: _trainer(images.path, features.path, batch, workers, samples))
        run()                                            # imports, connections, worker start-up paid
        _empty_cache(images, features)
        results[f"{name}/cold"] = _timed(run, samples)
        results[f"{name}/warm"] = _timed(run, samples)
    _report(results, samples, sum(size for _, size in objects), console)
    return results


def _build(work: Path, samples: int, console: Console) -> tuple[ImageSet, FeatureSet]:
    """The npy set and its features (resumable: a writer finds its finished shards in the bucket)."""
    identity = make_identity("generated", {"bench": samples}, 32, 3, 10, None, "train", SHARD, "npy")
    writer = ImageSetWriter(work, f"bench-remote-{samples}", identity, samples)
    writer.begin()
    fp = ImageSet(writer.path).fingerprint
    fw = FeatureSetWriter(work, {"image_set": fp, "bench": True}, samples, SHARD, TARGET_SHAPE, 1)
    fw.begin()
    rng = np.random.default_rng(0)
    for plan in plan_shards(samples, SHARD):
        images, labels = _smooth_images(rng, plan.count), rng.integers(0, 10, plan.count)
        targets = rng.standard_normal((plan.count, *TARGET_SHAPE)).astype(np.float16)
        if plan.index in {p.index for p in writer.pending()}:
            writer.write(plan, images, labels)
        if plan.index in fw.pending([plan.index]):
            ids = np.arange(plan.first_id, plan.first_id + plan.count)
            fw.record(write_feature_shard(fw.path, plan.index, plan.first_id, ids, targets))
        console.print(f"  shard {plan.index} in the bucket")
    writer.close()
    fw.close()
    feature_dir = next(p for p in list_feature_sets(work) if FeatureSet(p).identity.get("image_set") == fp)
    return ImageSet(writer.path), FeatureSet(feature_dir)


def _bare_rate(store, objects: list[tuple[str, int]], samples: int) -> float:
    """Samples/s of a sequential whole-object GET of every shard object (after one untimed pass)."""
    def get_all() -> int:
        for key, size in objects:
            if len(store.get(key)) != size:
                raise RuntimeError(f"{key}: size differs from its record")
        return samples
    get_all()
    return _timed(get_all, samples)


def _empty_cache(images: ImageSet, features: FeatureSet) -> None:
    """Delete the node's cached copies of the sets' shard files: the next read fetches every one."""
    for index in images.records:
        for path, _, _ in ShardPrefetch(images, features, 0).files(index):
            path.unlink(missing_ok=True)


def _report(results: dict, samples: int, total_bytes: int, console: Console) -> None:
    table = Table("reader", "samples/s", "MB/s", title=f"bench stores, object store: {samples:,} samples, "
                  f"{BYTES_PER_SAMPLE / 1000:.1f} KB each ({total_bytes / 1e6:,.0f} MB of objects)")
    for name in ("bare", *(f"{r}/{s}" for r in READERS for s in ("cold", "warm"))):
        rate = results[name]
        table.add_row(name.replace("/", " "), f"{rate:,.0f}", f"{rate * total_bytes / samples / 1e6:,.0f}")
    console.print(table)
    for name in READERS:
        console.print(f"{name} cold / bare GET: {results[f'{name}/cold'] / results['bare']:.2f} (goal >= 0.5)")
    console.print("compare the trainer's rate with the step's "
                  "(`dra-pipe bench train`: 'step consumes')")
