"""The Job a training process runs: resolved settings, the stores it streams, the classifier's DRA layer.

`pipeline.plans.train.make_job` builds it from the configuration; the loop (`trainer.loop`) and the Ray Train
workers (`trainer.distributed`) take it as it is. It is picklable: Ray ships it to every worker.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from stores.errors import UserError
from stores.images import ImageSet
from stores.remote import localize
from trainer.classifiers import build_classifier
from trainer.dra import match_grid
from trainer.loader import Source, split_batch
from trainer.settings import TrainSettings

NOT_IDENTITY = ("checkpoint_every", "loggers")          # train keys that cannot change the result


@dataclass(frozen=True)
class Job:
    """Everything a training process needs (picklable: Ray ships it to every worker)."""

    name: str
    run_dir: str
    settings: TrainSettings              # the resolved `train` section
    config: dict                         # the whole resolved configuration (saved as config.yaml)
    real: Source
    generated: Source | None
    holdout: tuple[int, int]             # ids [lo, hi) of the real training set held out for per-epoch accuracy
    classes: int
    channels: int
    resolution: int
    mean: tuple
    std: tuple
    target_shape: tuple | None           # (C_t, h, w) with DRA (settings.dra_on), else None
    feature_keys: dict                   # {"real": key, "generated": key} of the feature sets used
    dra_layer: str | None                # classifier layer aligned with the targets
    steps_per_epoch: int
    total_steps: int
    view_counts: tuple = (0, 0)          # stored views per image of the real and the generated feature set
    view_seed: int | None = None         # the feature sets' view seed (views mode)
    mirror_view: bool = False            # view 1 of every feature set used is the image's mirror (made with flips)
    group: dict | None = None            # the sweep and cell it is trained for (trackers group by them)

    def __post_init__(self):
        if (self.target_shape is not None) != self.dra:
            raise ValueError(f"job {self.name}: a target shape belongs to a job with DRA on, and only to one")

    @property
    def dra_targets(self) -> str | None:
        """What DRA aligns with (trainer/views.py): views | online | shifted; None without DRA."""
        return self.settings.dra_targets if self.dra else None

    @property
    def dra(self) -> bool:
        return self.settings.dra_on

    def without_dra(self) -> Job:
        """The same job as plain (DM-)AT: no head, no targets (benchmarks time the two side by side)."""
        return replace(self, settings=replace(self.settings, dra=False), target_shape=None, dra_layer=None)

    def localized(self) -> Job:
        """The job as a Ray Train worker on another node sees it: with an object-store root, its run folder and
        stores under this node's mirror, their small files (records, a checkpoint to resume) brought here."""
        def source(s: Source | None) -> Source | None:
            return s and replace(s, images=str(localize(s.images, need=True)),
                                 features=s.features and str(localize(s.features, need=True)))
        return replace(self, run_dir=str(localize(self.run_dir, need=True)), real=source(self.real),
                       generated=source(self.generated))

    def identity(self) -> dict:
        """What makes two runs the same run: a run folder refuses to resume with anything else."""
        train = {k: v for k, v in self.settings.identity_dict().items() if k not in NOT_IDENTITY}
        if not self.dra:                          # dra off and lambda 0 are the same run; head settings unused
            train = {**{k: v for k, v in train.items() if not k.startswith("dra")}, "dra": False}
        return {"train": train, "real": _fingerprint(self.real), "generated": _fingerprint(self.generated),
                "features": self.feature_keys, "holdout": list(self.holdout)}

    def mix(self) -> tuple[int, int]:
        """(real rows, generated rows) of one rank's batch."""
        s = self.settings
        return split_batch(s.batch_size, s.unsup_fraction if self.generated else 0.0, s.workers)


def _fingerprint(source: Source | None) -> str | None:
    return None if source is None else ImageSet(Path(source.images)).fingerprint


def normalisation(real: ImageSet, stop: int, limit: int = 10_000) -> tuple[tuple, tuple]:
    """Per-channel mean and std in [0, 1] of the first training images (up to `limit`)."""
    x = real.read_range(0, min(stop, limit)).images.astype(np.float64) / 255       # (N, H, W, C)
    return (tuple(x.mean(axis=(0, 1, 2)).round(6).tolist()),
            tuple(np.maximum(x.std(axis=(0, 1, 2)), 1e-3).round(6).tolist()))


def check_dra_layer(arch: str, dra_layer: str, real: ImageSet, mean, std, target_shape: tuple) -> str:
    """The classifier layer to align (dra_layer, or auto = the architecture's default); its grid must match the
    target's."""
    import torch
    model = build_classifier(arch, real.classes, real.channels, real.resolution, mean, std)
    layers = model.feature_layers()
    layer = model.default_dra_layer if dra_layer == "auto" else dra_layer
    if layer not in layers:
        raise UserError(f"classifier {arch} has no layer {layer!r} (train.dra_layer); its layers: "
                        f"{', '.join(f'{k} {shape_text(v)}' for k, v in layers.items())}")
    match_grid(torch.zeros(1, *layers[layer]), target_shape[1:])
    return layer


def shape_text(shape) -> str:
    return "x".join(map(str, shape))
