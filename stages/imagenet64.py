"""Downsampled ImageNet 64x64 (Chrabaszcz, Loshchilov, Hutter 2017) into image sets: `import imagenet64`.

DIR holds the pickled batches `train_data_batch_1` .. `train_data_batch_10` and `val_data`; each is a dict with
`data` (N, 12288) uint8 rows, channel-planar (3x64x64), and `labels`, 1-based class indices (1..1000), stored
0-based. Batches are unpickled by the caller's numpy-only unpickler (stages.importers: hostile pickles are
refused, never executed), validated up front for their counts, and read again one batch at a time, so the
15.7 GB training split is never held whole.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np

from stages.sources import SplitSource, class_labels
from stores.errors import IntegrityError, UserError
from stores.identity import file_sha256

RESOLUTION, CHANNELS, CLASSES = 64, 3, 1000
ROW_BYTES = CHANNELS * RESOLUTION * RESOLUTION
TRAIN_FILES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
VAL_FILE = "val_data"


def batch_files(folder: Path) -> dict[str, list[Path]]:
    """The split -> files map of DIR; UserError (one line) naming what is expected when a file is missing."""
    if not folder.is_dir():
        raise UserError(f"{folder}: import imagenet64 reads a folder holding {TRAIN_FILES[0]}..{TRAIN_FILES[-1]} "
                        f"and {VAL_FILE}; check --from")
    missing = [f for f in (*TRAIN_FILES, VAL_FILE) if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder}: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} missing; import "
                        f"imagenet64 expects the Downsampled-ImageNet 64x64 pickles {TRAIN_FILES[0]}.."
                        f"{TRAIN_FILES[-1]} and {VAL_FILE} in DIR")
    return {"train": [folder / f for f in TRAIN_FILES], "val": [folder / VAL_FILE]}


def checksum(folder: Path) -> str:
    """sha256 over the batch files' names and sha256s, in split order."""
    h = hashlib.sha256()
    for files in batch_files(folder).values():
        for f in files:
            h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def load_batch(path: Path, unpickler: type[pickle.Unpickler]) -> tuple[np.ndarray, np.ndarray]:
    """(rows (N, 12288) uint8, labels (N,) 0-based int64); IntegrityError (exit 1) when the file is damaged."""
    try:
        data = unpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise IntegrityError(f"{path}: not a readable Downsampled-ImageNet batch ({str(exc)[:120]}); "
                             f"download it again") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path}: holds a {type(data).__name__}, not a batch dict; download it again")
    data = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
    if "data" not in data or "labels" not in data:
        raise IntegrityError(f"{path}: the batch lacks 'data' or 'labels'; download it again")
    rows = np.asarray(data["data"])
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != ROW_BYTES:
        raise IntegrityError(f"{path}: 'data' is {rows.dtype} {rows.shape}, expected uint8 (N, {ROW_BYTES}) "
                             f"(3x64x64 channel-planar rows); is this the 64x64 version?")
    try:
        labels = class_labels(data["labels"], str(path)) - 1           # 1-based on disk
    except UserError as exc:
        raise IntegrityError(str(exc)) from None
    if len(labels) != len(rows):
        raise IntegrityError(f"{path}: {len(rows)} rows but {len(labels)} labels; download it again")
    bad = np.flatnonzero((labels < 0) | (labels >= CLASSES))
    if bad.size:
        raise IntegrityError(f"{path}: label {int(labels[bad[0]]) + 1} of row {int(bad[0])} is outside 1..{CLASSES}; "
                             f"download it again")
    return rows, labels


def to_hwc(rows: np.ndarray) -> np.ndarray:
    """(N, 12288) channel-planar rows -> (N, 64, 64, 3) uint8."""
    return np.ascontiguousarray(rows.reshape(-1, CHANNELS, RESOLUTION, RESOLUTION).transpose(0, 2, 3, 1))


def splits(folder: Path, unpickler: type[pickle.Unpickler]) -> list[SplitSource]:
    """The train and val splits, every batch validated (and counted) before anything is written."""
    return [_split(name, files, unpickler) for name, files in batch_files(folder).items()]


def _split(name: str, files: list[Path], unpickler) -> SplitSource:
    counts = [len(load_batch(f, unpickler)[1]) for f in files]
    starts = np.concatenate([[0], np.cumsum(counts)])
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def batch(k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in cache:
            cache.clear()                                  # one batch (about 1.6 GB) in memory at a time
            cache[k] = load_batch(files[k], unpickler)
        return cache[k]

    def read(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        pos, stop = start, start + count
        while pos < stop:
            k = int(np.searchsorted(starts, pos, side="right") - 1)
            rows, labs = batch(k)
            lo, hi = pos - starts[k], min(stop, starts[k + 1]) - starts[k]
            images.append(to_hwc(rows[lo:hi]))
            labels.append(labs[lo:hi])
            pos = starts[k] + hi
        return np.concatenate(images), np.concatenate(labels)

    return SplitSource(name, int(starts[-1]), RESOLUTION, CHANNELS, CLASSES, None, read, tuple(counts))
