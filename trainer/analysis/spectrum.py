"""Effective rank and the normalised singular-value spectrum (Roy & Vetterli 2007), of a matrix held whole or of
one streamed in batches through its second moments (`Moments`)."""
from __future__ import annotations

import torch


def singular_distribution(features: torch.Tensor, center: bool = True) -> torch.Tensor:
    """p_i = sigma_i / sum_j sigma_j over the singular values of `features` (N, D), descending (float64)."""
    m = features.double()
    if center:
        m = m - m.mean(dim=0, keepdim=True)
    return _normalised(torch.linalg.svdvals(m))


def _normalised(s: torch.Tensor) -> torch.Tensor:
    total = s.sum()
    return s / total if total > 0 else torch.zeros(0, dtype=torch.float64)


def entropy_rank(p: torch.Tensor) -> float:
    """exp(H(p)) of a distribution p (0 for an empty one)."""
    if len(p) == 0:
        return 0.0
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def effective_rank(features: torch.Tensor, center: bool = True) -> float:
    """Effective rank (Roy & Vetterli 2007) exp(H(p)), p_i = sigma_i / sum_j sigma_j, of `features` (N, D).

    Centred variant by default: the column means are subtracted first, so the shared mean feature (large after
    SiLU/ReLU) does not count as a direction. With center=False it is Roy & Vetterli's definition on the raw
    matrix (the identity of size n then has effective rank n). A zero matrix has effective rank 0.
    """
    return entropy_rank(singular_distribution(features, center))


class Moments:
    """Row count, column sums and X^T X (float64) of a matrix X (N, D) added in batches of rows.

    The singular values of the centred X are the square roots of the eigenvalues of X^T X - N m m^T (m the column
    means), so the effective rank of a split streamed batch by batch needs D x D memory, not N x D.
    """

    def __init__(self, dims: int):
        self.n = 0
        self.sum = torch.zeros(dims, dtype=torch.float64)
        self.gram = torch.zeros(dims, dims, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        x = rows.detach().double().cpu().reshape(len(rows), -1)
        self.n += len(x)
        self.sum += x.sum(0)
        self.gram += x.T @ x

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    def covariance(self) -> torch.Tensor:
        """X_c^T X_c of the centred rows (not divided by N)."""
        return self.gram - self.n * torch.outer(self.mean, self.mean)

    def principal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues descending, eigenvectors as columns) of the centred X^T X; tiny negatives set to 0."""
        values, vectors = torch.linalg.eigh(self.covariance())
        values, vectors = values.flip(0), vectors.flip(1)
        floor = values[:1].abs().clamp_min(0) * values.numel() * torch.finfo(torch.float64).eps
        return torch.where(values > floor, values, torch.zeros_like(values)), vectors

    def spectrum(self) -> torch.Tensor:
        """The normalised singular values p_i of the centred rows, descending."""
        return _normalised(self.principal()[0].sqrt())

    def effective_rank(self) -> float:
        """Centred effective rank of the rows added so far (equals effective_rank of the stacked rows)."""
        return entropy_rank(self.spectrum())
