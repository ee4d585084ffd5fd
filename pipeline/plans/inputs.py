"""Stores and models a dry run plans with when they are not on this machine yet.

A plan of the real recipe (`--dry-run` with pipeline.cifar10.yaml) should work on a laptop that holds neither the
EDM checkpoint nor CIFAR-10. What the plan needs is known without them: the size of an official data set, the
count a config asks to generate, and the shapes and FLOPs of a published network (random weights will do).
Outside dry runs nothing here is used: a missing store or model stays an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, parse_count
from pipeline.models import fit_settings, resolve_model_spec
from pipeline.workflow import generated_set, real_train_set
from stages.edm.networks import EDMPrecond
from stages.fit_diffusion import network_config
from stages.importers import planned_train_split
from stages.models import load_model
from stages.published import published_name, published_stand_in
from stages.specs import parse_spec
from stores.errors import UserError
from stores.images import ImageSet, image_set_dir, plan_shards


@dataclass(frozen=True)
class PlannedImages:
    """An image set the configuration describes but the stores do not hold yet."""

    path: Path
    n: int
    classes: int
    channels: int
    resolution: int
    shard_size: int
    fingerprint = None

    @property
    def name(self) -> str:
        return self.path.name

    def plan(self):
        return plan_shards(self.n, self.shard_size)

    def describe(self, how: str) -> str:
        return (f"image set {self.name} is not here yet (`{how}` writes it): planned as {self.n:,} images of "
                f"{self.channels}x{self.resolution}x{self.resolution}, {self.classes} classes")


def planned_real(cfg: Config) -> PlannedImages:
    """The real training set an import of the configured source would write."""
    d = cfg.data
    shape = planned_train_split(d.importer, d.test_fraction, d.split_seed, d.resolution)
    if shape is None:
        raise UserError(f"no image set {real_train_set(cfg)} under {cfg.root}/images, and the size of a {d.importer} "
                        f"import is unknown before it runs; run `dra-pipe import` first, even for a dry run")
    n, classes, channels, resolution = shape
    return PlannedImages(image_set_dir(Path(cfg.root), real_train_set(cfg)), n, classes, channels, resolution,
                         d.shard_size)


def planned_generated(cfg: Config, like) -> PlannedImages:
    """The generated set `generate.n` asks for, shaped like `like` (the real set or the model)."""
    if cfg.train.generated_set:
        raise UserError(f"no image set {cfg.train.generated_set} (train.generated_set) under {cfg.root}/images; its "
                        "size is known once `dra-pipe select` has made it")
    return PlannedImages(image_set_dir(Path(cfg.root), generated_set(cfg)), parse_count(cfg.generate.n), like.classes,
                         like.channels, like.resolution, cfg.data.shard_size)


def model_for_plan(spec: str):
    """(model, published name or None): the loaded model, or for a missing published EDM checkpoint a randomly
    initialised network of its architecture (stages.published); shapes and FLOPs do not depend on weights."""
    if not parse_spec(spec).exists() and published_name(spec):
        return published_stand_in(spec), published_name(spec)
    return load_model(spec), None


def teacher_for_plan(cfg: Config):
    """(model, spec or None, note or None) for a dry run: the configured model; for a missing published EDM
    checkpoint its architecture; for `model.spec: fit` before fit-diffusion has run, a network of the configured
    fit-diffusion architecture for the real set (planned if it is not imported yet). Random weights in both cases."""
    try:
        spec = resolve_model_spec(cfg)
    except UserError:
        if cfg.model.spec != "fit":
            raise
        real = _real_or_planned(cfg)
        net = EDMPrecond(**network_config(real, fit_settings(cfg))).eval().requires_grad_(False)
        return net, None, (f"the model fit-diffusion trains on {real.name} is not there yet: planned with its "
                           f"configured architecture ({sum(p.numel() for p in net.parameters()):,} parameters, "
                           "random weights)")
    model, published = model_for_plan(spec)
    return model, spec, stand_in_note(spec, published, model) if published else None


def _real_or_planned(cfg: Config):
    root, name = Path(cfg.root), real_train_set(cfg)
    return ImageSet.open(root, name) if (image_set_dir(root, name) / "dataset.json").exists() else planned_real(cfg)


def stand_in_note(spec: str, name: str, model) -> str:
    params = sum(p.numel() for p in model.parameters())
    return (f"model file {parse_spec(spec).path} is not here: planned with the published architecture of {name} "
            f"({params:,} parameters, random weights); the real run needs the file")
