"""Diffusion Representation Alignment: projection head, token-wise cosine loss, grid matching.

The classifier feature (B, C_cls, h, w) goes through a REPA-style MLP applied to every spatial token and is
compared with the cached diffusion target (B, C_t, h, w) token by token: loss = mean over kept tokens of
1 - cos(projected, target). Total training loss = AT loss + lambda * DRA loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stores.errors import UserError


class ProjectionHead(nn.Module):
    """Per-token MLP C_cls -> C_t: `depth` Linear layers of width `hidden` with SiLU between (REPA's projector).

    depth=3 (default): Linear -> SiLU -> Linear -> SiLU -> Linear. Input (B, C_cls, h, w) -> (B, C_t, h, w).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 2048, depth: int = 3):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        widths = [in_channels] + [hidden] * (depth - 1) + [out_channels]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(nn.SiLU())
            layers.append(nn.Linear(cin, cout))
        self.mlp = nn.Sequential(*layers)
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        tokens = feature.permute(0, 2, 3, 1)                          # (B, h, w, C_cls)
        return self.mlp(tokens).permute(0, 3, 1, 2)                   # (B, C_t, h, w)


def dra_loss(projected: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over unmasked tokens of 1 - cosine similarity over channels, in float32.

    projected, targets: (B, C, h, w) (targets may be float16); mask: (B, h, w) bool, True = use the token,
    or None for all tokens. All tokens masked gives 0 (with zero gradient), never nan.
    """
    if projected.shape != targets.shape:
        raise ValueError(f"DRA projection {tuple(projected.shape)} and targets {tuple(targets.shape)} differ: "
                         "(B, C, h, w) must match (head output channels = target channels, same token grid)")
    per_token = 1 - F.cosine_similarity(projected.float(), targets.float(), dim=1, eps=1e-8)   # (B, h, w)
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise ValueError(f"DRA mask {tuple(mask.shape)} does not match the token grid {tuple(per_token.shape)}")
    mask = mask.to(device=per_token.device, dtype=torch.bool)
    kept = torch.where(mask, per_token, torch.zeros_like(per_token))
    return kept.sum() / mask.sum().clamp_min(1)


def match_grid(feature: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
    """Average-pool a classifier feature (B, C, H, W) onto the target token grid (h, w) -> (B, C, h, w).

    Allowed when H and W are integer multiples of h and w (each target token = mean of an (H/h) x (W/w)
    block); anything else is a UserError naming both grids.
    """
    H, W = feature.shape[-2:]
    h, w = (int(v) for v in target_hw)
    if (H, W) == (h, w):
        return feature
    if h < 1 or w < 1 or H % h or W % w:
        raise UserError(f"classifier feature grid {H}x{W} cannot be matched to the diffusion target grid {h}x{w}: "
                        "the classifier grid must be an integer multiple of the target grid; choose another "
                        "classifier layer or a target layer/pooling with a compatible grid")
    return F.avg_pool2d(feature, kernel_size=(H // h, W // w))
