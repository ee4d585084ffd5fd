"""`dra-pipe repair` of an imported ImageNet split: its damaged or missing shards decoded again from the folder.

The folder must list the files it listed at import (names, sizes, mtimes: the listing hash dataset.json records),
so the same files decode to the same bytes. Only the chunks of the sorted file list that the damaged shards' images
come from are decoded (on Ray workers, as the import does): a chunk's kept images are its files less the skipped
ones the set records, so the sample ids each chunk holds are known without decoding the others.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.imagenet_import import decode_chunks, listing_hash, write_set_from_chunks
from stages import imagenet
from stages.imagenet_chunks import chunk_path
from stores import remote
from stores.errors import UserError
from stores.images import ImageSet
from stores.manifest import ShardJob


def imagenet_split_of(images: ImageSet, source: Path) -> imagenet.FolderSplit:
    """The split of `source` that `images` was imported from; UserError (one line) when the folder differs."""
    if not source.is_dir():
        raise UserError(f"{source}: the ImageNet folder image set {images.name} was imported from is not there; pass "
                        f"--from DIR where it is now")
    ids = imagenet.synsets(source)
    split = imagenet.train_split(source, ids) if images.identity["split"] == "train" else \
        imagenet.val_split(source, ids)
    if split is None or listing_hash(split) != images.meta.get("provenance", {}).get("listing"):
        raise UserError(f"{source}: not the folder image set {images.name} was imported from (the names, sizes or "
                        f"dates of its {images.identity['split']} files differ); pass --from the original folder")
    return split


def repair_imagenet_split(cfg: Config, images: ImageSet, source: Path, split: imagenet.FolderSplit,
                          shards: list[int], wait: bool) -> int:
    """Decode the chunks that `shards` need and write those shards again; returns the images they hold."""
    chunk = images.shard_size                             # the import's chunks are data.shard_size files long
    skipped = set(images.identity["source"]["skipped"])
    kept_flags = np.array([str(f.relative_to(source)) not in skipped for f in split.files])
    jobs = [ShardJob(i, lo, min(chunk, len(split.files) - lo)) for i, lo in enumerate(range(0, len(split.files),
                                                                                             chunk))]
    kept = [int(kept_flags[j.first_id:j.first_id + j.count].sum()) for j in jobs]
    starts = np.concatenate([[0], np.cumsum(kept)])
    bad = [p for p in images.plan() if p.index in set(shards)]
    needed = [j for j in jobs if any(starts[j.index] < p.first_id + p.count and starts[j.index + 1] > p.first_id
                                     for p in bad)]
    staging = Path(cfg.root) / "images" / f".staging-{images.name}-repair"
    staging.mkdir(parents=True, exist_ok=True)
    decode_chunks(cfg, split, staging, [j for j in needed if not chunk_path(staging, j.index).exists()],
                  images.resolution)
    write_set_from_chunks(Path(cfg.root), images.name, images.identity, images.meta.get("provenance"), images.n,
                          staging, kept, wait)
    shutil.rmtree(staging, ignore_errors=True)
    remote.removed(staging)
    return sum(p.count for p in bad)
