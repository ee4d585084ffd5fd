"""What a training step aligns with (`train.dra_targets`), and the augmentation that goes with it.

- views (default, exact): the loader draws per sample one of the image's stored views (`view_choices`, seeded by
  (train seed, rank, step), so a resumed run draws the same); the step applies exactly that view's augmentation
  (stores/views.py, the function extract-features used) and aligns with that view's stored target. No shift,
  no mask.
- online (exact, the reference): the step draws a random crop/flip as without DRA and asks the frozen teacher
  (a callable the pipeline builds: teacher(views_uint8, ids, labels, generated) -> targets) for the target of that very
  augmented image.
- shifted (an approximation): the un-augmented target moved by whole cells (trainer/augment.py); at a U-Net
  bottleneck 60-80% wrong against the true target of the cropped image.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from stores.views import apply_views, distinct_augmentations, view_augmentations
from trainer.augment import apply_augment, draw_params

Teacher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (views uint8, ids, labels, generated) -> targets


@dataclass
class Aligned:
    """A step's inputs: x (B, C, H, W) in [0, 1], targets (B, Ct, h, w) or None, mask (B, h, w) or None, and the
    augmentation applied (flips (B,), shifts (B, 2))."""

    x: torch.Tensor
    targets: torch.Tensor | None
    mask: torch.Tensor | None
    flips: torch.Tensor
    shifts: torch.Tensor


def view_choices(seed: int, rank: int, step: int, counts: np.ndarray) -> np.ndarray:
    """(B,) int64: which stored view row b of batch `step` on `rank` uses, uniform over its image's counts[b] views."""
    u = np.random.default_rng([seed, rank, step, 3]).random(len(counts))
    return np.minimum((u * counts).astype(np.int64), np.asarray(counts) - 1)


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div_(255)


def align(mode: str | None, batch: dict, pad: int, flip: bool, generator: torch.Generator,
          view_seed: int | None = None, teacher: Teacher | None = None, draw: tuple | None = None,
          host: dict | None = None) -> Aligned:
    """The augmented images and what they align with. mode None: no DRA (a random crop/flip, no targets).
    pad, flip: the run's augmentation (train.crop_pad, train.flip).

    draw: (flips, shifts) to use instead of the generator's draw (online and no-DRA modes; for tests).
    host: the same batch on the CPU, to look its views up without waiting for the device.
    """
    images = batch["images"]
    if mode == "views":
        index = host if host is not None else batch
        flips, shifts = view_augmentations(view_seed, index["ids"], index["views"], pad, flip)
        return Aligned(to_unit(apply_views(images, flips, shifts)), batch["targets"], None, flips, shifts)
    flips, shifts = draw if draw is not None else draw_params(images.shape[0], generator, pad, flip)
    if mode == "online":
        viewed = apply_views(images, flips, shifts)                                     # (B, H, W, C) uint8
        with torch.no_grad():
            index = host if host is not None else batch
            targets = teacher(viewed, index["ids"], index["labels"], index["generated"]).to(images.device)
        return Aligned(to_unit(viewed), targets, None, flips, shifts)
    if mode == "shifted":
        x, t, mask = _shifted(batch, flips, shifts)
        return Aligned(x, t, mask, flips, shifts)
    return Aligned(to_unit(apply_views(images, flips, shifts)), None, None, flips, shifts)


def _shifted(batch: dict, flips: torch.Tensor, shifts: torch.Tensor):
    """View 1 is the mirror in a set made with flips; without it, torch.flip of the target stands in."""
    return apply_augment(batch["images"], batch["targets"], batch.get("targets_v1"), flips, shifts)


def expected_distinct(choices: int, visits: float) -> float:
    """Expected number of distinct values among `visits` uniform draws from `choices`."""
    return choices * (1 - (1 - 1 / choices) ** visits) if choices else 0.0


def views_seen(job, step: int) -> dict:
    """Per source: visits per image so far, and the distinct views an image was seen under on average (expected:
    uniform draws) with the stored views, next to what online augmentation's draws would have given."""
    s = job.settings
    pad, flip = s.crop_pad, s.flip
    real_rows, gen_rows = job.mix()
    out = {}
    for name, source, rows, count in (("real", job.real, real_rows, job.view_counts[0]),
                                      ("generated", job.generated, gen_rows, job.view_counts[1])):
        if source is None or not rows:
            continue
        visits = step * rows * s.workers / source.n
        online = expected_distinct(distinct_augmentations(pad, flip), visits)
        out[f"visits_{name}"] = visits
        out[f"views_seen_{name}"] = expected_distinct(count, visits) if job.dra_targets == "views" else online
        out[f"views_seen_{name}_online"] = online
    return out

