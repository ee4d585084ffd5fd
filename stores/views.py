"""Augmentation views: the contract between extract-features (which stores a view's target) and the trainer
(which applies exactly that view's augmentation to the image before aligning with the stored target).

A view is one augmentation of an image: a horizontal flip bit, then a crop of the zero-padded image, i.e. a
pixel shift (dy, dx) in [-pad, pad]^2: out[i, j] = in[i + dy, j + dx], zero outside. The augmentations that
exist for settings (pad, flip) are (2 if flip else 1) x (2 pad + 1)^2. View v of image `id` is a pure function
of (view seed, id, v, pad, flip):

- view 0 is the image itself (no flip, no shift); with flips, view 1 is its mirror (no shift);
- views 2.. (1.. without flips) are the remaining augmentations in an order drawn per image from a hash of
  (view seed, id), so an image's views never repeat and view v does not depend on how many views are stored.

Images are uint8 (B, H, W, C) tensors throughout; padding pixels are 0, exactly as the trainer's random crop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stores.errors import UserError

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class ViewSpec:
    """What a feature set's views were made for: V views under crop padding `pad` and flips on/off."""

    count: int
    pad: int
    flip: bool
    seed: int = 0

    def identity(self) -> dict:
        return {"count": self.count, "pad": self.pad, "flip": self.flip, "seed": self.seed}

    @classmethod
    def from_identity(cls, d: dict | None) -> ViewSpec:
        """Sets made before views stored the image itself only: one view, made for no augmentation."""
        d = d or {"count": 1, "pad": 0, "flip": False, "seed": 0}
        return cls(int(d["count"]), int(d["pad"]), bool(d["flip"]), int(d.get("seed", 0)))

    def label(self) -> str:
        return f"{self.count} view(s) for crop pad {self.pad}, flip {'on' if self.flip else 'off'}"


def distinct_augmentations(pad: int, flip: bool) -> int:
    return (2 if flip else 1) * (2 * pad + 1) ** 2


def check_views(count: int, pad: int, flip: bool, what: str = "--views") -> ViewSpec:
    """Refuse a view count below 1 or above the number of distinct augmentations (UserError, one line)."""
    most = distinct_augmentations(pad, flip)
    if count < 1:
        raise UserError(f"{what} {count} must be at least 1 (view 0 is the image itself)")
    if count > most:
        raise UserError(f"{what} {count} is more than the {most} distinct augmentations of crop pad {pad} with flips "
                        f"{'on' if flip else 'off'} ((2 if flip else 1) x (2 pad + 1)^2); use at most {most}")
    return ViewSpec(count, pad, flip)


def _augmentations(pad: int, flip: bool) -> np.ndarray:
    """(A, 3) int64 rows (flip, dy, dx): identity first, then its mirror with flips, then the rest in a fixed order."""
    shifts = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1) if (dy, dx) != (0, 0)]
    rows = [(0, 0, 0)] + ([(1, 0, 0)] if flip else [])
    rows += [(f, dy, dx) for f in ((0, 1) if flip else (0,)) for dy, dx in shifts]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def view_augmentations(seed: int, ids, views, pad: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (flips (B,) bool, shifts (B, 2) int64 (dy, dx)) of view views[b] of image ids[b]."""
    ids = np.asarray(torch.as_tensor(ids).cpu(), dtype=np.int64).reshape(-1)
    views = np.asarray(torch.as_tensor(views).cpu(), dtype=np.int64).reshape(-1)
    table = _augmentations(pad, flip)
    fixed = 2 if flip else 1                                     # views with a fixed augmentation
    if views.size and (views.min() < 0 or views.max() >= len(table)):
        raise ValueError(f"view index outside [0, {len(table)}) for crop pad {pad}, flip {flip}")
    rows = np.minimum(views, fixed - 1)
    drawn = views >= fixed
    if drawn.any():
        rest = len(table) - fixed
        base = _splitmix64(_splitmix64(np.uint64(seed) ^ np.uint64(0x5EED)) ^ ids[drawn].astype(np.uint64))   # (n,)
        keys = _splitmix64(base[:, None] ^ (np.arange(rest, dtype=np.uint64)[None] * np.uint64(0xD1B54A32D192ED03)))
        order = np.argsort(keys, axis=1, kind="stable")          # (n, rest): this image's order of the rest
        rows[drawn] = fixed + order[np.arange(int(drawn.sum())), views[drawn] - fixed]
    chosen = table[rows]                                         # (B, 3)
    return torch.from_numpy(chosen[:, 0] == 1), torch.from_numpy(chosen[:, 1:].copy())


def all_views(spec: ViewSpec, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(flips (B, V) bool, shifts (B, V, 2)) of every stored view of each image."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    flips, shifts = view_augmentations(spec.seed, np.repeat(ids, spec.count), np.tile(np.arange(spec.count), len(ids)),
                                       spec.pad, spec.flip)
    return flips.reshape(len(ids), spec.count), shifts.reshape(len(ids), spec.count, 2)


def largest_shift(shifts: torch.Tensor) -> int:
    """max |shift|: read it where the shifts were drawn (the CPU), since reading a GPU tensor waits for the GPU."""
    return int(shifts.abs().max()) if shifts.numel() else 0


def shift_images(images: torch.Tensor, shifts: torch.Tensor, pad: int | None = None) -> torch.Tensor:
    """out[b, i, j] = images[b, i + dy_b, j + dx_b], zero outside. images (B, H, W, ...), shifts (B, 2);
    pad: at least largest_shift(shifts), if the caller knows it (no read of device-side shifts)."""
    B, H, W = images.shape[:3]
    p = largest_shift(shifts) if pad is None else pad
    padded = F.pad(images.movedim((1, 2), (-2, -1)), (p, p, p, p)).movedim((-2, -1), (1, 2))   # (B, H+2p, W+2p, ...)
    rows = torch.arange(H, device=images.device)[None, :] + shifts[:, :1].to(images.device) + p    # (B, H)
    cols = torch.arange(W, device=images.device)[None, :] + shifts[:, 1:].to(images.device) + p    # (B, W)
    b = torch.arange(B, device=images.device)[:, None, None]
    return padded[b, rows[:, :, None], cols[:, None, :]]                                           # (B, H, W, ...)


def apply_views(images: torch.Tensor, flips: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The augmented images: mirrored where flips[b], then shifted by shifts[b]. (B, H, W, C) -> (B, H, W, C).
    Images on a GPU with flips and shifts on the CPU (the training step): nothing waits for the GPU."""
    pad = largest_shift(shifts)
    flips, shifts = flips.to(images.device), shifts.to(images.device)
    mirrored = torch.where(flips[:, None, None, None], torch.flip(images, [2]), images)
    return shift_images(mirrored, shifts, pad)
