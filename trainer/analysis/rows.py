"""Row stores the probes and autoencoders read mini-batches from: a tensor held whole (tests, small splits), a
float32 memory-mapped file filled batch by batch (a split's features never held in memory), or a PCA projection
of another store."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TensorRows:
    """Rows of a tensor (N, D) held in memory."""

    def __init__(self, data: torch.Tensor):
        self.data = data.float().reshape(len(data), -1)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def dims(self) -> int:
        return self.data.shape[1]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.data[index]


class FileRows:
    """(n, dims) float32 rows in a memory-mapped file under `folder`, written with `put` batch by batch."""

    def __init__(self, folder: Path, name: str, n: int, dims: int):
        self.path = Path(folder) / f"{name}.f32"
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(n, dims))

    def put(self, lo: int, rows: torch.Tensor) -> None:
        self.array[lo:lo + len(rows)] = rows.detach().float().cpu().reshape(len(rows), -1).numpy()

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def dims(self) -> int:
        return self.array.shape[1]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        order = np.asarray(index, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.array[order]))


class ProjectedRows:
    """(rows - mean) @ basis: each row's coordinates on the first principal components."""

    def __init__(self, rows, mean: torch.Tensor, basis: torch.Tensor):
        self.rows, self.mean, self.basis = rows, mean.float(), basis.float()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dims(self) -> int:
        return self.basis.shape[1]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return (self.rows[index] - self.mean) @ self.basis


def batches(rows, batch: int):
    """(lo, rows[lo:lo + batch]) in order."""
    for lo in range(0, len(rows), batch):
        yield lo, rows[torch.arange(lo, min(lo + batch, len(rows)))]
