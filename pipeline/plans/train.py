"""What `dra-pipe train` will do, resolved and checked before anything runs: the Job, from the configuration.

The trainer knows stage 1 only through the stores: the real training set `<prefix>-train`, the generated set
(`train.generated_set`, else the workspace's only generated set, else `generate.name` or
`<prefix>-gen`) and, with DRA, a feature set for each (`trainer.targets`), or named with
`--features KEY`. In a dry run, stores that are not there yet are planned from the configuration.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.config import Config
from pipeline.plans.features import PlannedFeatures, feature_query, feature_sets_for, planned_feature_sets, views_for
from pipeline.plans.inputs import PlannedImages, planned_generated, planned_real
from pipeline.workflow import real_train_set, training_generated_set
from stores.errors import UserError
from stores.images import ImageSet, image_set_dir, validate_set_name
from trainer.job import Job, check_dra_layer, normalisation, shape_text
from trainer.loader import Source, split_batch
from trainer.settings import TrainSettings, run_name
from trainer.targets import check_views_match, views_of


def make_job(cfg: Config, name: str | None = None, features_key: str | None = None,
             planned: list[str] | None = None) -> Job:
    """Resolve and check sets, feature sets, layer and grids; every problem is one UserError.

    planned: for dry runs, a list that receives one note per store that is not there yet and is instead planned
    from the configuration (its size from the importer and generate.n, the target shape from the teacher model).
    Without it a missing store is an error. A job with planned parts can be described and costed, not trained.
    """
    s, root = TrainSettings.from_section(cfg.train), Path(cfg.root)
    real, gen = _training_sets(cfg, s, planned)
    feats = feature_sets_for(root, feature_query(cfg), real, gen, features_key, planned, _configured_views(cfg),
                             lambda: planned_feature_sets(cfg, planned, gen is not None)) if s.dra_on else {}
    views = {k: views_of(f) for k, f in feats.items()}
    mirror = bool(views) and all(v.flip and v.count >= 2 for v in views.values())
    if s.dra_on:
        _check_views(s, feats, mirror)
    holdout = _holdout(real, s.holdout)
    streamed = {} if s.dra_targets == "online" else feats  # the online teacher computes its targets in the step
    real_source = _source(real, streamed.get("real"), 0, stop=holdout[0])
    gen_source = _source(gen, streamed.get("generated"), 1) if gen is not None else None
    mean, std = planned_normalisation(real) if isinstance(real, PlannedImages) else normalisation(real, holdout[0])
    target_shape = tuple(feats["real"].shape) if s.dra_on else None
    layer = check_dra_layer(s.arch, s.dra_layer, real, mean, std, target_shape) if s.dra_on else None
    steps = math.ceil(real_source.n / s.batch_size)
    name = validate_set_name(run_name(s) if name is None else name, "run")
    return Job(name=name, run_dir=str(root / "runs" / name), settings=s, config=_plain(cfg),
               real=real_source, generated=gen_source, holdout=holdout, classes=real.classes, channels=real.channels,
               resolution=real.resolution, mean=mean, std=std, target_shape=target_shape,
               feature_keys={k: f.key for k, f in feats.items()}, dra_layer=layer, steps_per_epoch=steps,
               total_steps=steps * s.epochs,
               view_counts=(views["real"].count if s.dra_on else 0,
                            views["generated"].count if "generated" in views else 0),
               view_seed=views["real"].seed if s.dra_on else None, mirror_view=mirror)


def _training_sets(cfg: Config, s: TrainSettings, planned: list[str] | None) -> tuple:
    """(real, generated or None): the image sets the run streams (planned ones in a dry run), checked to mix."""
    root = Path(cfg.root)
    real = _open_images(root, real_train_set(cfg), "dra-pipe import", planned, lambda: planned_real(cfg))
    split_batch(s.batch_size, s.unsup_fraction, s.workers)
    if planned is None:                            # a dry run may plan for a larger machine than this one
        check_loader_workers(s.loader_workers, os.cpu_count() or 1)
    if s.unsup_fraction <= 0:
        return real, None
    gen = _open_images(root, training_generated_set(cfg), "dra-pipe generate` or `dra-pipe import npz --generated",
                       planned, lambda: planned_generated(cfg, real))
    _check_compatible(real, gen)
    return real, gen


def _check_views(s: TrainSettings, feats: dict, mirror: bool) -> None:
    """With DRA: views mode needs views made for the run's crop pad and flips; shifted mode with flips the mirror."""
    if s.dra_targets == "views":
        check_views_match(feats, s.crop_pad, s.flip)
    if s.dra_targets == "shifted" and s.flip and not mirror:
        raise UserError(f"feature set {feats['real'].key} stores no mirrored view but train.flip is on; extract with "
                        f"train.flip: true (view 1 = the mirror) or set train.flip: false")


def _configured_views(cfg: Config) -> dict | None:
    """The views extract-features would store with this config, preferred among several matching sets in every
    mode (online and shifted read only view 0, which all sets share, but must still pick one); None if invalid."""
    try:
        return {"real": views_for(cfg, "real"), "generated": views_for(cfg, "generated")}
    except UserError:
        return None


def check_loader_workers(loader_workers: int, cpus: int) -> None:
    """More DataLoader processes than CPUs only contend with the step (and with each other)."""
    if loader_workers > cpus:
        raise UserError(f"train.loader_workers is {loader_workers} but this machine has {cpus} CPUs; set "
                        f"train.loader_workers to {cpus} or fewer")


def _open_images(root: Path, name: str, how: str, planned: list[str] | None = None, plan=None):
    if not (image_set_dir(root, name) / "dataset.json").exists():
        if planned is None:
            raise UserError(f"no image set {name} under {root}/images; run `{how}` first")
        images = plan()
        planned.append(images.describe(how))
        return images
    return ImageSet.open(root, name)


def _check_compatible(real: ImageSet, gen: ImageSet) -> None:
    shape = lambda s: (s.resolution, s.channels, s.classes)   # noqa: E731
    if shape(real) != shape(gen):
        raise UserError(f"generated set {gen.name} holds {gen.channels}x{gen.resolution}x{gen.resolution} images of "
                        f"{gen.classes} classes, the real set {real.name} {real.channels}x{real.resolution}x"
                        f"{real.resolution} of {real.classes}; generate from a model of this data")


def _holdout(real: ImageSet, count: int) -> tuple[int, int]:
    if count > real.n // 2:
        raise UserError(f"train.holdout {count} is more than half of the {real.n} images of {real.name}; lower it")
    return real.n - count, real.n


def _plain(d) -> dict:
    return {k: _plain(v) if isinstance(v, dict) else v for k, v in d.items()}


def _source(images, features, tag: int, stop: int | None = None) -> Source:
    """The stored sets' Source (checked); for planned stores, the shards they would have."""
    if isinstance(images, PlannedImages) or isinstance(features, PlannedFeatures):
        stop = images.n if stop is None else stop
        shards = tuple((p.index, p.first_id, min(p.count, stop - p.first_id)) for p in images.plan()
                       if p.first_id < stop)
        return Source(str(images.path), None, shards, tag)
    return Source.open(images, features, tag, stop=stop)


def planned_normalisation(real: PlannedImages) -> tuple[tuple, tuple]:
    """A planned set has no images yet: 0.5 and 0.25 per channel (they change no cost)."""
    return (0.5,) * real.channels, (0.25,) * real.channels


def describe(job: Job) -> list[str]:
    """The plan in a few lines (`--dry-run`)."""
    s = job.settings
    real_rows, gen_rows = job.mix()
    lines = [f"run {job.name} -> {job.run_dir}",
             f"data: real {Path(job.real.images).name} {job.real.n} images (+{job.holdout[1] - job.holdout[0]} held out"
             f" for per-epoch accuracy)" + (f", generated {Path(job.generated.images).name} {job.generated.n} images"
                                            if job.generated else ", no generated data"),
             f"batch {s.batch_size} = {real_rows * s.workers} real + {gen_rows * s.workers} generated "
             f"(unsup_fraction {s.unsup_fraction if job.generated else 0}) over {s.workers} worker(s)",
             f"{job.steps_per_epoch} steps per epoch (ceil({job.real.n} / {s.batch_size})) x {s.epochs} epochs "
             f"= {job.total_steps} steps",
             f"objective {s.objective}, L-inf eps {s.epsilon:g}, {s.attack_steps} steps of "
             f"{s.attack_step_size:g}; classifier {s.arch}",
             f"optimizer {optimizer_text(s)}, peak lr {s.peak_lr:g} (warmup, then cosine to 0), weight decay "
             f"{s.decay:g}"]
    if job.dra:
        lines.append(f"DRA on: lambda {s.dra_lambda:g}, targets {_targets_text(job)}, {s.dra_view} view, "
                     f"classifier layer {job.dra_layer} -> "
                     f"head (hidden {s.dra_hidden}, depth {s.dra_depth}) -> targets {shape_text(job.target_shape)}; "
                     f"feature sets {', '.join(f'{k} {v}' for k, v in job.feature_keys.items())}")
    else:
        lines.append("DRA off: plain " + ("DM-AT" if job.generated else "adversarial training")
                     + ", no feature set used")
    return lines


def optimizer_text(s: TrainSettings) -> str:
    """'sgd (Nesterov, momentum 0.9)' or 'adamw (betas 0.9, 0.999)', and 'auto: ' before it when auto chose it."""
    name = s.optimizer_name
    detail = "Nesterov, momentum 0.9" if name == "sgd" else f"betas {s.adam_beta1:g}, {s.adam_beta2:g}"
    return f"{'auto: ' if s.optimizer == 'auto' else ''}{name} ({detail})"


def _targets_text(job: Job) -> str:
    mode = job.dra_targets
    if mode == "views":
        counts = f"{job.view_counts[0]} stored views per real image" + (
            f", {job.view_counts[1]} per generated" if job.generated else "")
        return f"views ({counts}, exact)"
    if mode == "online":
        return "online (the teacher in the step, exact)"
    return "shifted (whole-cell shift of the un-augmented target: an approximation)"
