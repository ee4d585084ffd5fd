"""`import imagenet`, the worker side: a chunk (a slice of a split's sorted file list) decoded into a staging file.

Which files decode is known only after decoding them, and an image set's count must be known before its first
shard: so each chunk's kept images, their labels, every file's sha256 and the notes on converted and skipped files
go to `staging/chunk-NNNNNN.npz` (written under a temporary name, then renamed); the driver writes the set's shards
from the staged chunks once every chunk is there, and removes the staging folder.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.imagenet import decode
from stores import remote
from stores.manifest import ShardJob


@dataclass
class Chunk:
    """A staged chunk's records, as read back by the driver (its images are read by `chunk_images`)."""
    kept: int                # images that decoded
    sha256: list[str]        # one per file of the slice, in order
    notes: list[str]         # one per file: '' (kept as is), 'converted (...)' or 'skipped: ...'


def chunk_path(staging: Path, index: int) -> Path:
    return Path(staging) / f"chunk-{index:06d}.npz"


class ChunkWorker:
    """Decodes chunks of one split (files and labels given whole: each actor gets them once)."""

    def __init__(self, files: list[str], labels: np.ndarray, resolution: int, staging: str):
        self.files, self.labels, self.resolution, self.staging = files, labels, resolution, Path(staging)

    def compute(self, job: ShardJob, progress: Callable[[int], None]) -> tuple:
        images, kept, hashes, notes = [], [], [], []
        for offset in range(job.count):
            path = Path(self.files[job.first_id + offset])
            hashes.append(hashlib.sha256(path.read_bytes()).hexdigest())
            image, note = decode(path, self.resolution)
            notes.append(note or "")
            if image is not None:
                images.append(image)
                kept.append(int(self.labels[job.first_id + offset]))
            progress(1)
        r = self.resolution
        stack = np.stack(images) if images else np.empty((0, r, r, 3), np.uint8)
        return stack, np.array(kept, np.int64), hashes, notes

    def finish(self, job: ShardJob, decoded: tuple) -> int:
        images, labels, hashes, notes = decoded
        final = chunk_path(self.staging, job.index)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, sha256=np.array(hashes), notes=np.array(notes, dtype=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        remote.published(final)            # an object-store root: the driver's write pass may run on another node
        return len(labels)


def read_chunk(staging: Path, index: int) -> Chunk | None:
    """The staged chunk's records, or None when it is unreadable."""
    remote.fetch_file(chunk_path(staging, index))
    try:
        with np.load(chunk_path(staging, index), allow_pickle=False) as z:
            return Chunk(len(z["labels"]), [str(s) for s in z["sha256"]], [str(s) for s in z["notes"]])
    except (OSError, ValueError, KeyError, EOFError):
        return None


def chunk_images(staging: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (kept, R, R, 3) uint8, labels (kept,)) of a staged chunk."""
    with np.load(chunk_path(staging, index), allow_pickle=False) as z:
        return z["images"], z["labels"]
