"""What every real-data importer hands the image store: splits validated up front and read on demand."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stores.errors import UserError

# Reads `count` samples starting at `start` -> (images (count, H, W, C) uint8, labels (count,))
ReadFn = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class SplitSource:
    """One split of a source, validated and ready to stream."""

    split: str
    n: int
    resolution: int
    channels: int
    classes: int
    class_names: list[str] | None
    read: ReadFn
    file_counts: tuple[int, ...] = ()      # images per source file, in order, for sources read from several files


MAX_CLASSES = 100_000      # more would be a label mistake (a float scaled, an id column), not a data set


def class_labels(raw, where: str) -> np.ndarray:
    """Labels as int64 class indices; refuses floats (which would truncate), strings, objects and nesting."""
    labels = np.asarray(raw)
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise UserError(f"{where}: labels are {labels.dtype} {labels.shape}; "
                        "expected one integer class index per image")
    return labels.astype(np.int64)


def check_labels(labels: np.ndarray, classes: int, first_id: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        i = int(bad[0])
        raise UserError(f"label {int(labels[i])} of sample {first_id + i} is outside [0, {classes}); "
                        "fix the labels of the source")
