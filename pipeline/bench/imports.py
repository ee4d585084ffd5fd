"""`dra-pipe bench import`: `import imagenet`'s Ray decode pass against a bare decode + centre-crop loop, one run.

bare      stages.imagenet.decode over the files in this process: read, decode, convert, crop, LANCZOS resize.
pipeline  the import's first pass on a local Ray (ray.num_cpus, ray.cpu_actors): chunks of the sorted file list,
          each file hashed, decoded and cropped, chunks staged (npz, fsync, rename). Timed from the first chunk
          handed out to the last one recorded; then the second pass (the driver writes the shards) on its own.
ratio     pipeline / (bare x workers). Goal: >= 0.9. The folder holds generated JPEGs of ImageNet-like sizes
          (uniform 300..500 x 250..450, about 400 x 350 on average), made in a temporary folder.
The projection for 1.28M images on 16 cores is arithmetic on the measured per-worker and driver rates.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from pipeline.config import Config

IMAGENET_TRAIN, PROJECTION_CORES = 1_281_167, 16


def make_jpegs(folder: Path, n: int, classes: int = 4, seed: int = 0) -> None:
    """n JPEGs in `classes` synset folders, sizes about 400 x 350, smooth content with noise (quality 90)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(300, 501)), int(rng.integers(250, 451))
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR)).astype(np.int16)
        pixels = np.clip(smooth + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        synset = folder / "train" / f"n{i % classes:08d}"
        synset.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(synset / f"img_{i:07d}.JPEG", quality=90)


def bare_rate(files: list[Path], resolution: int) -> float:
    from stages.imagenet import decode
    started = time.perf_counter()
    for f in files:
        decode(f, resolution)
    return len(files) / (time.perf_counter() - started)


def bench_import(cfg: Config, images: int, resolution: int, console: Console) -> dict:
    from pipeline.imagenet_import import decode_chunks, listing_hash, split_identity_of, write_set_from_chunks
    from stages import imagenet
    from stages.imagenet_chunks import read_chunk
    from stores.manifest import ShardJob
    work = Path(tempfile.mkdtemp(prefix="bench-import-"))
    try:
        make_jpegs(work / "in", images)
        ids = imagenet.synsets(work / "in")
        split = imagenet.train_split(work / "in", ids)
        before = bare_rate(split.files, resolution)
        staging, chunk = work / "staging", max(1, images // (4 * max(cfg.ray.cpu_actors, 1)))
        staging.mkdir()
        jobs = [ShardJob(i, lo, min(chunk, images - lo)) for i, lo in enumerate(range(0, images, chunk))]
        summary, actors = decode_chunks(cfg, split, staging, jobs, resolution)
        after = bare_rate(split.files, resolution)
        chunks = [read_chunk(staging, j.index) for j in jobs]
        identity, provenance, _, _ = split_identity_of(work / "in", split, chunks, ids, None, resolution,
                                               listing_hash(split), cfg)
        started = time.perf_counter()
        write_set_from_chunks(work / "root", "bench-train", identity, provenance, sum(c.kept for c in chunks), staging,
                   [c.kept for c in chunks], False)
        write_rate = images / (time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _show(console, (before + after) / 2, summary.items / summary.seconds, actors, write_rate)


def _show(console: Console, bare: float, pipeline: float, actors, write_rate: float) -> dict:
    per_worker = pipeline / actors.actors
    ratio = per_worker / bare
    projected = IMAGENET_TRAIN / (per_worker * PROJECTION_CORES) + IMAGENET_TRAIN / write_rate
    table = Table("measure", "images/s (time)", "note", title="bench import (ratios, not absolute times)")
    table.add_row("bare decode+crop, 1 process", f"{bare:,.1f}", "mean of before and after")
    table.add_row(f"pipeline decode pass, {actors.describe()}", f"{pipeline:,.1f}",
                  f"{per_worker:,.1f} per worker = {ratio:.2f} x bare (goal >= 0.9)")
    table.add_row("pipeline write pass (driver)", f"{write_rate:,.1f}", "PNG + tar + fsync, one process")
    table.add_row(f"projection: {IMAGENET_TRAIN:,} images, {PROJECTION_CORES} cores", f"{projected / 60:,.1f} min",
                  f"N / (per-worker x {PROJECTION_CORES}) + N / write rate")
    console.print(table)
    return {"bare": bare, "pipeline": pipeline, "per_worker_ratio": ratio, "write": write_rate,
            "projected_minutes": projected / 60}
