"""The Job a training process runs: resolved settings, the stores it streams, the classifier's DRA layer.

`pipeline.plans.train.make_job` builds it from the configuration; the loop (`trainer.loop`) and the Ray Train
workers (`trainer.distributed`) take it as it is. It is picklable: Ray ships it to every worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stores.errors import UserError
from stores.images import ImageSet
from trainer.classifiers import build_classifier
from trainer.dra import match_grid
from trainer.loader import Source, split_batch

NOT_IDENTITY = ("checkpoint_every",)          # train keys that cannot change the result


@dataclass(frozen=True)
class Job:
    """Everything a training process needs (picklable: Ray ships it to every worker)."""

    name: str
    run_dir: str
    settings: dict                       # the resolved `train` section
    config: dict                         # the whole resolved configuration (saved as config.yaml)
    real: Source
    generated: Source | None
    holdout: tuple[int, int]             # ids [lo, hi) of the real training set held out for per-epoch accuracy
    classes: int
    channels: int
    resolution: int
    mean: tuple
    std: tuple
    target_shape: tuple | None           # (C_t, h, w) with DRA, else None
    feature_keys: dict                   # {"real": key, "generated": key} of the feature sets used
    dra_layer: str | None                # classifier layer aligned with the targets
    steps_per_epoch: int
    total_steps: int
    view_counts: tuple = (0, 0)          # stored views per image of the real and the generated feature set
    view_seed: int | None = None         # the feature sets' view seed (views mode)
    mirror_view: bool = False            # view 1 of every feature set used is the image's mirror (made with flips)

    @property
    def dra_targets(self) -> str | None:
        """What DRA aligns with (trainer/views.py): views | online | shifted; None without DRA."""
        return self.settings.get("dra_targets", "views") if self.dra else None

    @property
    def dra(self) -> bool:
        return self.target_shape is not None

    def identity(self) -> dict:
        """What makes two runs the same run: a run folder refuses to resume with anything else."""
        train = {k: v for k, v in self.settings.items() if k not in NOT_IDENTITY}
        if not self.dra:                          # dra off and lambda 0 are the same run; head settings unused
            train = {**{k: v for k, v in train.items() if not k.startswith("dra")}, "dra": False}
        return {"train": train, "real": _fingerprint(self.real), "generated": _fingerprint(self.generated),
                "features": self.feature_keys, "holdout": list(self.holdout)}

    def mix(self) -> tuple[int, int]:
        """(real rows, generated rows) of one rank's batch."""
        return split_batch(self.settings["batch_size"], self.settings["unsup_fraction"] if self.generated else 0.0,
                           self.settings["workers"])


def _fingerprint(source: Source | None) -> str | None:
    return None if source is None else ImageSet(Path(source.images)).fingerprint


def normalisation(real: ImageSet, stop: int, limit: int = 10_000) -> tuple[tuple, tuple]:
    """Per-channel mean and std in [0, 1] of the first training images (up to `limit`)."""
    x = real.read_range(0, min(stop, limit)).images.astype(np.float64) / 255       # (N, H, W, C)
    return tuple(x.mean(axis=(0, 1, 2)).round(6).tolist()), tuple(np.maximum(x.std(axis=(0, 1, 2)), 1e-3).round(6).tolist())


def check_dra_layer(s: dict, real: ImageSet, mean, std, target_shape: tuple) -> str:
    """The classifier layer to align (auto = the architecture's default); its grid must match the target's."""
    import torch
    model = build_classifier(s["arch"], real.classes, real.channels, real.resolution, mean, std)
    layers = model.feature_layers()
    layer = model.default_dra_layer if s["dra_layer"] == "auto" else s["dra_layer"]
    if layer not in layers:
        raise UserError(f"classifier {s['arch']} has no layer {layer!r} (train.dra_layer); its layers: "
                        f"{', '.join(f'{k} {shape_text(v)}' for k, v in layers.items())}")
    match_grid(torch.zeros(1, *layers[layer]), target_shape[1:])
    return layer


def shape_text(shape) -> str:
    return "x".join(map(str, shape))
