"""Alignment and uniformity of L2-normalised features (Wang & Isola 2020, "Understanding Contrastive
Representation Learning through Alignment and Uniformity on the Hypersphere")."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||f(x) - f(x')||_2^alpha over positive pairs (row i of z1 with row i of z2), features L2-normalised first
    (Wang & Isola 2020, alpha 2). 0 when every pair maps to one point; at most 2^alpha."""
    a, b = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    return float(((a - b).norm(dim=1) ** alpha).mean())


def uniformity(z, t: float = 2.0, block: int = 1024) -> float:
    """log E_{i != j} exp(-t ||f(x_i) - f(x_j)||_2^2) over distinct pairs of L2-normalised rows (Wang & Isola
    2020, t 2): lower = spread more evenly over the sphere. z: a tensor (N, D) or a row store; computed block by
    block (never an N x N matrix), as a log-sum-exp so that no term underflows."""
    n = len(z)
    if n < 2:
        return float("nan")
    parts = []
    for lo in range(0, n, block):
        rows = _unit(z, lo, min(lo + block, n))
        for other in range(0, n, block):
            d2 = (2 - 2 * rows @ _unit(z, other, min(other + block, n)).T).clamp_min(0)    # (b, b') squared
            if other == lo:
                d2.fill_diagonal_(math.inf)                                           # leave out i == j
            parts.append(torch.logsumexp(-t * d2.reshape(-1), dim=0))
    return float(torch.logsumexp(torch.stack(parts), dim=0) - math.log(n * (n - 1)))


def _unit(z, lo: int, hi: int) -> torch.Tensor:
    return F.normalize(z[torch.arange(lo, hi)].double(), dim=1)


def augmented(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image x (B, C, H, W): mirrored with probability 1/2 when `flip`, then shifted by a
    crop of the zero-padded image at a uniform offset in [0, 2 pad] (the trainer's augmentation)."""
    b, _, h, w = x.shape
    if flip:
        mirror = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
