"""Random crop (zero padding) + horizontal flip on uint8 batches; `train.dra_targets: shifted` moves a cached target.

The exact modes (`views`: stored targets of stored augmentations, `online`: the teacher in the step; see
trainer/views.py) use only the pixel part here. The rest of this module is the whole-cell shift approximation,
kept as `train.dra_targets: shifted`: at a U-Net bottleneck its target is 60-80% wrong (relative error against
the true target of the cropped image, tests/trainer/test_augment.py).

A cached target was computed once on the un-augmented image; the augmented image needs the target of the
augmented image. The rule, per sample (image H x W, target grid h x w, cell size H/h x W/w pixels):

1. Flip (probability 1/2 when `flip`): the image is mirrored left-right. The target becomes `targets_flip`,
   view 1 of a feature set made with flips, the cached target of the mirrored image: exact. Without it,
   `torch.flip(targets, [-1])` stands in: an approximation (the diffusion network is not mirror-equivariant).
2. Crop: the (flipped) image is zero-padded by `pad` on every side and an H x W window taken at offset
   (oy, ox) in [0, 2 pad]^2, i.e. shifted by (dy, dx) = (oy - pad, ox - pad) pixels: out[i, j] = in[i + dy,
   j + dx], zero outside. The target grid is shifted by whole cells (cy, cx) = (round(dy h / H),
   round(dx w / W)), halves rounded away from zero: adjusted[a, b] = target[a + cy, b + cx]. The crop offsets
   are the standard ones, not multiples of the cell size, so a shift that is not a whole number of cells is
   approximated by the nearest whole-cell shift.
3. Mask (True = use the token): a cell is masked out if its source cell (a + cy, b + cx) lies outside the
   grid, or if any pixel of the cell came from the zero padding. With `margin` = m > 0, along every axis with
   a nonzero pixel shift, also the m cells next to those and the m cells at both grid edges (where the
   network's receptive field now sees padding or lost content). Masked cells of `targets_adj` hold zeros.

Only the flip with a stored variant is exact. The shift is exact for a local feature (one conv, margin 1) but
not for a deep U-Net layer: GroupNorm statistics, attention and receptive fields span the whole image, so the
shifted target approximates the target of the cropped image (tests/test_augment.py measures how well).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stores.views import apply_views, largest_shift, shift_images


def draw_params(batch: int, generator: torch.Generator, pad: int = 4, flip: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (flips (B,) bool, shifts (B, 2) int64 (dy, dx) in [-pad, pad]) from `generator`.

    Always draws flips then offsets, so the stream does not depend on `flip`.
    """
    device = generator.device
    flips = torch.rand(batch, generator=generator, device=device) < 0.5
    shifts = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator, device=device) - pad
    return flips & flip, shifts


def cell_shifts(shifts: torch.Tensor, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel shifts (B, 2) -> whole-cell shifts (B, 2): round(d * h / H), halves away from zero."""
    scale = torch.tensor([grid_hw[0] / image_hw[0], grid_hw[1] / image_hw[1]], dtype=torch.float64)
    cells = shifts.double() * scale.to(shifts.device)
    return (cells.sign() * torch.floor(cells.abs() + 0.5)).long()


def _axis_valid(d: torch.Tensor, c: torch.Tensor, size: int, cells: int, margin: int) -> torch.Tensor:
    """(B, cells) bool along one axis: source cell inside the grid, no padded pixel, `margin` cells off the edges.

    d: pixel shifts (B,), c: cell shifts (B,). The margin is applied only where d != 0.
    """
    a = torch.arange(cells, device=d.device)
    lo = torch.floor(a * size / cells).long()                                  # first pixel of each cell
    hi = torch.ceil((a + 1) * size / cells).long() - 1                         # last pixel of each cell
    ok = (lo[None] + d[:, None] >= 0) & (hi[None] + d[:, None] <= size - 1)     # no padding pixel
    ok &= (a[None] + c[:, None] >= 0) & (a[None] + c[:, None] < cells)         # source cell on the grid
    if margin > 0:
        bad = F.max_pool1d((~ok).float()[:, None], 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
        edge = (a < margin) | (a >= cells - margin)                            # grid edge: cut-away content
        ok = torch.where((d != 0)[:, None], ok & ~bad & ~edge[None], ok)
    return ok


def adjust_targets(targets: torch.Tensor, targets_flip: torch.Tensor | None, flips: torch.Tensor,
                   shifts: torch.Tensor, image_hw: tuple[int, int], margin: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets_adj (B, Ct, h, w), mask (B, h, w) bool) for images flipped by `flips` then shifted by `shifts`."""
    h, w = targets.shape[-2:]
    device = targets.device
    cells = cell_shifts(shifts, image_hw, (h, w))                  # (B, 2), where the shifts are (no GPU read)
    pad = largest_shift(cells)
    flips, shifts, cells = flips.to(device), shifts.to(device), cells.to(device)
    mirrored = targets_flip if targets_flip is not None else torch.flip(targets, [-1])
    if mirrored.shape != targets.shape:
        raise ValueError(f"targets_flip {tuple(mirrored.shape)} differs from targets {tuple(targets.shape)}")
    chosen = torch.where(flips[:, None, None, None], mirrored.to(device), targets)                # (B, Ct, h, w)
    moved = shift_images(chosen.permute(0, 2, 3, 1), cells, pad).permute(0, 3, 1, 2)               # (B, Ct, h, w)
    rows = _axis_valid(shifts[:, 0], cells[:, 0], image_hw[0], h, margin)                          # (B, h)
    cols = _axis_valid(shifts[:, 1], cells[:, 1], image_hw[1], w, margin)                          # (B, w)
    mask = rows[:, :, None] & cols[:, None, :]                                                     # (B, h, w)
    return moved * mask[:, None].to(moved.dtype), mask


def apply_augment(images: torch.Tensor, targets: torch.Tensor | None, targets_flip: torch.Tensor | None,
                  flips: torch.Tensor, shifts: torch.Tensor, margin: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A random crop and flip, applied: per-sample flips (B,) bool and pixel shifts (B, 2) (dy, dx) from draw_params."""
    H, W = images.shape[1:3]
    x = apply_views(images, flips, shifts).permute(0, 3, 1, 2).float().div_(255)                   # (B, C, H, W)
    if targets is None:
        return x, None, None
    targets_adj, mask = adjust_targets(targets, targets_flip, flips, shifts, (H, W), margin)
    return x, targets_adj, mask
