"""Vision Transformers (ViT-S, ViT-B) as classifiers for adversarial training with DRA.

The contract is `trainer.classifiers.Classifier`'s: images in [0, 1], normalised inside with the buffers
`mean`/`std`; an ordered `stages` ModuleDict whose every output is a (B, C, h, w) grid, so `train.dra_layer` can
name any of them; global average pooling of the last stage (`penultimate`), then the linear layer `fc`.

Stages, for patch size p at resolution R (grid g = R / p, D = 384 for ViT-S, 768 for ViT-B):

- `embed`: the patch embedding (a p x p conv of stride p) plus the position embedding, D x g x g;
- `block1` .. `block12`: pre-norm transformer blocks (x + attn(LN(x)), then x + MLP(LN(x)), MLP ratio 4, GELU),
  each D x g x g: a block's patch tokens laid back on their grid (token i = row i // g, column i % g);
- `norm`: the closing LayerNorm, D x g x g, whose mean over the grid is what `fc` sees.

`auto` DRA layer: `block6`, the middle block (every block has the same grid, so it matches a target exactly
when any block does; REPA also aligns an early-middle block of its transformer).

Choices:
- Global average pooling, no class token: every token is then a patch token, so the grid DRA aligns is all the
  network has (no token to drop), and the head pools that grid exactly as the CNNs do. Plain ViTs trained from
  scratch on small data do as well or better with pooling (Beyer et al. 2022, "Better plain ViT baselines").
- Learned 2-D position embeddings: one D-vector per grid cell (a (1, D, g, g) parameter), initialised
  N(0, 0.02) as in ViT and DeiT, the models robust ViT training recipes start from. They are exempt from weight
  decay (trainer/optim.py). A model is built for one resolution.
- No BatchNorm (LayerNorm only), so the attack's forward passes see no batch statistics. No dropout, no drop-path.
- Attention through `scaled_dot_product_attention` (flash or memory-efficient kernels on a GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stores.errors import UserError
from trainer.classifiers import Classifier

MLP_RATIO = 4
LN_EPS = 1e-6
INIT_STD = 0.02


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B, h*w, D), row-major tokens (a view when the grid came from `_grid`)."""
    return grid.flatten(2).transpose(1, 2)


def _grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, D) -> (B, D, h, w), the inverse of `_tokens` (a view of contiguous tokens)."""
    b, _, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, h, w)


class _PatchEmbed(nn.Module):
    """p x p patches -> D channels, plus a learned position embedding per grid cell: (B, C, H, W) -> (B, D, g, g)."""

    def __init__(self, in_channels: int, dim: int, patch: int, grid: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, grid, grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.pos_embed                                        # (B, D, g, g)


class _Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, dh)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])                    # (B, heads, N, dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))                          # (B, N, D)


class _Block(nn.Module):
    """Pre-norm transformer block on a token grid: x + attn(LN(x)), then x + MLP(LN(x)); (B, D, h, w) in and out."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(), nn.Linear(MLP_RATIO * dim, dim))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        h, w = grid.shape[-2:]
        x = _tokens(grid)                                                               # (B, N, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return _grid(x, h, w)                                                           # (B, D, h, w)


class _GridNorm(nn.Module):
    """The closing LayerNorm over each token's channels, on the grid: (B, D, h, w) -> (B, D, h, w)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        h, w = grid.shape[-2:]
        return _grid(self.norm(_tokens(grid)), h, w)


class ViT(Classifier):
    """ViT with `depth` pre-norm blocks of width `dim` and `heads` heads on `patch` x `patch` patches.

    Stages: embed, block1 .. block<depth>, norm; `default_dra_layer` is the middle block.
    """

    def __init__(self, dim: int, depth: int, heads: int, patch: int, **common):
        super().__init__(**common)
        if self.resolution % patch:
            raise UserError(f"{self.arch} cuts {patch}x{patch} patches: the image resolution {self.resolution} "
                            f"must be a multiple of {patch}")
        if dim % heads or depth < 1:
            raise ValueError(f"need dim divisible by heads and depth >= 1, got {dim}, {heads}, {depth}")
        self.patch, self.grid = patch, self.resolution // patch
        self.stages["embed"] = _PatchEmbed(self.in_channels, dim, patch, self.grid)
        for i in range(1, depth + 1):
            self.stages[f"block{i}"] = _Block(dim, heads)
        self.stages["norm"] = _GridNorm(dim)
        self.fc = nn.Linear(dim, self.num_classes)
        self.default_dra_layer = f"block{max(1, depth // 2)}"
        self._init_weights()

    def _init_weights(self) -> None:
        """Linear, patch-embedding and position-embedding weights N(0, 0.02) (untruncated: torch's truncated
        sampler takes seconds for ViT-B's 85M weights on a CPU); biases 0; LayerNorm (1, 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.stages["embed"].pos_embed, std=INIT_STD)
