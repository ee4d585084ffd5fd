"""`dra-pipe bench stores`: the streaming reader against its bare baselines, in one run.

Data: N samples of 32x32x3 uint8 images with 256x8x8 float16 targets (35.8 KB per sample), shards of 10,000.
Readers, each warm (after a warm-up pass) and cold (page cache dropped, root only):
  bare        sequential readinto of every shard file into one reused buffer (the disk's ceiling)
  per-sample  one .npy per image and per target, DataLoader(batch, workers) (fast-DiT's layout)
  ours-npy    ShardLoader over tar shards (raw .npy images) + zarr slabs: `workers` DataLoader processes that
              recycle their shared batch buffers, lent to the caller until it draws the next batch (borrow)
  ours-png    the same with PNG images (the default encoding), to show what PNG decoding costs
  trainer     the trainer's own loader (trainer.loader: MixedStream in `workers` DataLoader processes, real rows
              only, targets in views mode's layout), consumed as the training loop does: each batch is used
              before the next is drawn
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from stores.errors import UserError
from stores.features import FeatureSet, FeatureSetWriter, write_feature_shard
from stores.images import ImageSet, ImageSetWriter, make_identity, plan_shards
from stores.stream import ShardLoader

IMAGE_SHAPE = (32, 32, 3)
TARGET_SHAPE = (256, 8, 8)
SHARD = 10_000
BYTES_PER_SAMPLE = int(np.prod(IMAGE_SHAPE)) + 2 * int(np.prod(TARGET_SHAPE))


def bench_stores(work: Path, samples: int, batch: int, workers: int, cold: bool, console: Console) -> dict:
    work = Path(work)
    can_drop = cold and _can_drop_caches()
    if cold and not can_drop:
        console.print("cold passes skipped: dropping the page cache needs root (/proc/sys/vm/drop_caches)")
    console.print(f"building {samples:,} samples in {work} ...")
    paths = _build(work, samples, console)
    readers = {
        "bare": lambda: _bare_read(paths["files"], samples),
        "per-sample": lambda: _per_sample(paths["per_sample"], samples, batch, workers),
        "ours-npy": lambda: _ours(paths["npy"], paths["features"], batch, workers),
        "ours-png": lambda: _ours(paths["png"], paths["features_png"], batch, workers),
        "trainer": lambda: _trainer(paths["npy"], paths["features"], batch, workers, samples),
    }
    results = {}
    for name, run in readers.items():
        run()                                      # warm-up: pages in memory, workers' imports paid
        results[(name, "warm")] = _timed(run, samples)
        if can_drop:
            _drop_caches()
            results[(name, "cold")] = _timed(run, samples)
    _report(results, samples, can_drop, console)
    return {f"{k[0]}/{k[1]}": v for k, v in results.items()}


def _timed(run, samples: int) -> float:
    started = time.perf_counter()
    count = run()
    if count < samples:
        raise RuntimeError(f"reader returned {count} samples, expected {samples}")
    return count / (time.perf_counter() - started)


def _report(results: dict, samples: int, cold: bool, console: Console) -> None:
    table = Table("reader", "warm samples/s", "warm MB/s", "cold samples/s", "cold MB/s",
                  title=f"bench stores: {samples:,} samples, {BYTES_PER_SAMPLE / 1000:.1f} KB each")
    for name in ("bare", "per-sample", "ours-npy", "ours-png", "trainer"):
        warm, cold_rate = results[(name, "warm")], results.get((name, "cold"))
        table.add_row(name, f"{warm:,.0f}", f"{warm * BYTES_PER_SAMPLE / 1e6:,.0f}",
                      f"{cold_rate:,.0f}" if cold_rate else "-",
                      f"{cold_rate * BYTES_PER_SAMPLE / 1e6:,.0f}" if cold_rate else "-")
    console.print(table)
    ours, base = results[("ours-npy", "warm")], results[("per-sample", "warm")]
    for name in ("ours-npy", "trainer"):
        console.print(f"{name} / per-sample, warm: {results[(name, 'warm')] / base:.2f}x (goal >= 3x)")
        if cold:
            ours_c, base_c, bare_c = (results[(n, "cold")] for n in (name, "per-sample", "bare"))
            console.print(f"{name} / per-sample, cold: {ours_c / base_c:.2f}x (goal >= 5x)")
            console.print(f"{name} / bare read, cold: {ours_c / bare_c:.2f} (goal >= 0.5)")
    console.print(f"ours-png / ours-npy, warm: {results[('ours-png', 'warm')] / ours:.2f} (the cost of PNG decoding)")


# --- data ----------------------------------------------------------------------------------------------------

def _build(work: Path, samples: int, console: Console) -> dict:
    stamp = work / f"ready-{samples}"
    if not stamp.exists() and work.exists():            # half-built or of another size: built again
        if any(work.iterdir()) and not list(work.glob("ready-*")) and not (work / "images").exists():
            raise UserError(f"{work} is not a bench folder and not empty; pass --dir with a new or empty folder")
        shutil.rmtree(work)
    sets = {}
    for fmt in ("npy", "png"):
        identity = make_identity("generated", {"bench": samples}, 32, 3, 10, None, "train", SHARD, fmt)
        sets[fmt] = ImageSetWriter(work, f"bench-{fmt}", identity, samples)
    if not stamp.exists():
        rng = np.random.default_rng(0)
        for writer in sets.values():
            writer.begin()
        per_sample = work / "per-sample"
        per_sample.mkdir(parents=True)
        feature_writers = {}
        for fmt in ("npy", "png"):
            fp = ImageSet(sets[fmt].path).fingerprint
            feature_writers[fmt] = FeatureSetWriter(work, {"image_set": fp, "bench": True}, samples, SHARD,
                                                    TARGET_SHAPE, 1)
            feature_writers[fmt].begin()
        for plan in plan_shards(samples, SHARD):
            images = _smooth_images(rng, plan.count)
            labels = rng.integers(0, 10, plan.count)
            targets = rng.standard_normal((plan.count, *TARGET_SHAPE)).astype(np.float16)
            ids = np.arange(plan.first_id, plan.first_id + plan.count)
            for fmt in ("npy", "png"):
                sets[fmt].write(plan, images, labels)
                fw = feature_writers[fmt]
                fw.record(write_feature_shard(fw.path, plan.index, plan.first_id, ids, targets))
            for i in range(plan.count):
                np.save(per_sample / f"{plan.first_id + i}.img.npy", images[i])
                np.save(per_sample / f"{plan.first_id + i}.feat.npy", targets[i])
            console.print(f"  shard {plan.index} written")
        stamp.touch()
    npy, png = ImageSet(sets["npy"].path), ImageSet(sets["png"].path)
    fdirs = {fmt: next(p for p in (work / "features").iterdir() if _feature_of(p, s.fingerprint))
             for fmt, s in (("npy", npy), ("png", png))}
    files = [npy.path / f"shard-{i:06d}.tar" for i in npy.records] + sorted(
        p for p in fdirs["npy"].rglob("*") if p.is_file() and "/c/" in str(p))
    return {"npy": npy.path, "png": png.path, "features": fdirs["npy"], "features_png": fdirs["png"],
            "per_sample": work / "per-sample", "files": files}


def _feature_of(path: Path, fingerprint: str) -> bool:
    import json
    return json.loads((path / "meta.json").read_text())["identity"]["image_set"] == fingerprint


def _smooth_images(rng, n: int) -> np.ndarray:
    """Images with some structure (a random low-frequency pattern plus noise), so PNG sizes are realistic."""
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8).repeat(8, 1).repeat(8, 2)
    return (base + rng.integers(0, 16, (n, *IMAGE_SHAPE), dtype=np.uint8)).astype(np.uint8)


# --- readers -------------------------------------------------------------------------------------------------

def _bare_read(files: list[Path], samples: int) -> int:
    """Sequential readinto of every byte of the shards the stream reads, into one reused buffer."""
    view = memoryview(bytearray(64 << 20))
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return samples


class _PerSample:
    def __init__(self, folder: Path, n: int):
        self.folder, self.n = folder, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch
        return (torch.from_numpy(np.load(self.folder / f"{i}.img.npy")),
                torch.from_numpy(np.load(self.folder / f"{i}.feat.npy")))


def _per_sample(folder: Path, n: int, batch: int, workers: int) -> int:
    from torch.utils.data import DataLoader
    loader = DataLoader(_PerSample(folder, n), batch_size=batch, num_workers=workers, shuffle=False)
    return sum(len(images) for images, _ in loader)


def _ours(images: Path, features: Path, batch: int, workers: int) -> int:
    shards = sorted(ImageSet(images).records)
    return sum(len(b["ids"]) for b in ShardLoader(images, features, shards, batch, workers, borrow=True, shuffle=True))


def _trainer(images: Path, features: Path, batch: int, workers: int, samples: int) -> int:
    """ceil(samples / batch) batches of the trainer's loader over the real source alone (one epoch's worth)."""
    from trainer.loader import MixPlan, Source, make_loader
    source = Source.open(ImageSet(images), FeatureSet(features), tag=0)
    plan = MixPlan(real=source, generated=None, real_rows=batch, generated_rows=0, seed=0, loader_workers=workers,
                   keys=("ids", "images", "labels", "targets"))
    count, batches = 0, iter(make_loader(plan, borrow=True))
    for _ in range(-(-samples // batch)):
        count += len(next(batches)["ids"])
    return count


def _can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
