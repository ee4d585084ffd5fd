"""What `dra-pipe train` will do, resolved and checked before anything runs.

The trainer knows stage 1 only through the stores: the real training set `<prefix>-train`, the generated set
(`generate.name` or `<prefix>-gen`) and, with DRA, a feature set for each, found by the identity in their
meta.json (image-set fingerprint, timestep, layer, pooling) or named with `--features KEY`. Both feature sets
must come from the same teacher (identical identity apart from the image set), so real and generated images
are aligned with the same representation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.errors import IntegrityError, UserError
from pipeline.stores.features import FeatureSet, list_feature_sets
from pipeline.planning import PlannedImages, planned_generated, planned_real, teacher_for_plan
from pipeline.stores.images import ImageSet, image_set_dir
from pipeline.workflow import real_train_set, training_generated_set
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


def make_job(cfg: Config, name: str | None = None, features_key: str | None = None,
             planned: list[str] | None = None) -> Job:
    """Resolve and check sets, feature sets, layer and grids; every problem is one UserError.

    planned: for dry runs, a list that receives one note per store that is not there yet and is instead planned
    from the configuration (its size from the importer and generate.n, the target shape from the teacher model).
    Without it a missing store is an error. A job with planned parts can be described and costed, not trained.
    """
    s = dict(cfg.train)
    root = Path(cfg.root)
    real = _open_images(root, real_train_set(cfg), "dra-pipe import", planned, lambda: planned_real(cfg))
    fraction = s["unsup_fraction"]
    split_batch(s["batch_size"], fraction, s["workers"])
    gen = _open_images(root, training_generated_set(cfg), "dra-pipe generate", planned,
                       lambda: planned_generated(cfg, real)) if fraction > 0 else None
    if gen is not None:
        _check_compatible(real, gen)
    dra = s["dra"] and s["dra_lambda"] > 0
    feats = _feature_sets(cfg, real, gen, features_key, planned) if dra else {}
    holdout = _holdout(real, s["holdout"])
    real_source = _source(real, feats.get("real"), 0, stop=holdout[0])
    gen_source = _source(gen, feats.get("generated"), 1) if gen is not None else None
    if dra and s["flip"] and not all(f.flip for f in feats.values()):
        raise UserError(f"feature set {feats['real'].key} stores no flipped targets but train.flip is on; extract with "
                        f"features.flip: true or set train.flip: false")
    mean, std = normalisation(real, holdout[0])
    target_shape = tuple(feats["real"].shape) if dra else None
    layer = check_dra_layer(s, real, mean, std, target_shape) if dra else None
    steps = math.ceil(real_source.n / s["batch_size"])
    run_name = name or f"{s['arch']}-{'dra' if dra else 'nodra'}-{s['seed']}"
    return Job(name=run_name, run_dir=str(root / "runs" / run_name), settings=s, config=_plain(cfg),
               real=real_source, generated=gen_source, holdout=holdout, classes=real.classes, channels=real.channels,
               resolution=real.resolution, mean=mean, std=std, target_shape=target_shape,
               feature_keys={k: f.key for k, f in feats.items()}, dra_layer=layer, steps_per_epoch=steps,
               total_steps=steps * s["epochs"])


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


def _fingerprint(source: Source | None) -> str | None:
    return None if source is None else ImageSet(Path(source.images)).fingerprint


def _plain(d) -> dict:
    return {k: _plain(v) if isinstance(v, dict) else v for k, v in d.items()}


# --- feature sets ------------------------------------------------------------------------------------------

def _teacher(fs: FeatureSet) -> dict:
    """The identity apart from the image set: which model, layer, noise level, pooling, flips."""
    return {k: v for k, v in fs.identity.items() if k not in ("image_set", "image_set_name")}


def _matches(fs: FeatureSet, features_cfg) -> bool:
    i = fs.identity
    layer_ok = features_cfg.layer == "auto" or i.get("layer") == features_cfg.layer
    return i.get("timestep") == features_cfg.timesteps[0] and layer_ok and str(i.get("pool")) == str(features_cfg.pool)


def _readable(root: Path) -> list[FeatureSet]:
    sets = []
    for path in list_feature_sets(root):
        try:
            sets.append(FeatureSet(path))
        except (UserError, IntegrityError):
            continue                              # damaged sets are `dra-pipe verify`'s business
    return sets


def find_feature_sets(root: Path, real: ImageSet, gen: ImageSet | None, features_cfg,
                      key: str | None = None) -> dict[str, FeatureSet]:
    """{"real": set[, "generated": set]}: by `key` (either one; the other must share its teacher) or by config."""
    sets = _readable(root)
    if key is not None:
        chosen = next((f for f in sets if f.key == key), None)
        if chosen is None:
            raise UserError(f"no feature set {key} under {root}/features; `dra-pipe ls` lists them")
        own = {real.fingerprint: "real", **({gen.fingerprint: "generated"} if gen else {})}
        made_from = chosen.identity.get("image_set")
        if made_from not in own:
            names = " or ".join(f"{s.name} ({s.fingerprint[:12]})" for s in (real, gen) if s is not None)
            raise UserError(f"feature set {key} was computed from image set {str(made_from)[:12]}, not from {names}; "
                            f"pick a feature set of these images")
        candidates = {own[made_from]: [chosen]}
    else:
        candidates = {"real": [f for f in sets if f.identity.get("image_set") == real.fingerprint and _matches(f, features_cfg)]}
        if not candidates["real"]:
            raise UserError(f"no feature set for {real.name} at timestep {features_cfg.timesteps[0]}, layer "
                            f"{features_cfg.layer}, pool {features_cfg.pool}; run `dra-pipe extract-features` first")
    pairs = _pairs(sets, real, gen, candidates)
    if len(pairs) > 1:
        keys = ", ".join(p["real"].key for p in pairs)
        raise UserError(f"several feature sets of {real.name} match ({keys}); pass --features KEY")
    return pairs[0]


def _pairs(sets: list[FeatureSet], real: ImageSet, gen: ImageSet | None, candidates: dict) -> list[dict]:
    """Complete the candidates with the other set's feature set of the same teacher."""
    if gen is None:
        return [{"real": f} for f in candidates["real"]]
    have, need, need_set = ("real", "generated", gen) if "real" in candidates else ("generated", "real", real)
    pairs = []
    for f in candidates[have]:
        others = [o for o in sets if o.identity.get("image_set") == need_set.fingerprint and _teacher(o) == _teacher(f)]
        pairs += [{have: f, need: o} for o in others]
    if not pairs:
        _missing(need_set, candidates[have][0])
    return pairs


def _missing(images: ImageSet, like: FeatureSet):
    raise UserError(f"no feature set for {images.name} from the same teacher as {like.key} (layer "
                    f"{like.identity.get('layer')}, timestep {like.identity.get('timestep')}); run "
                    f"`dra-pipe extract-features` for {images.name}")


# --- stores planned from the configuration (dry runs) ---------------------------------------------------------

def _source(images, features, tag: int, stop: int | None = None) -> Source:
    """The stored sets' Source (checked); for planned stores, the shards they would have."""
    if isinstance(images, PlannedImages) or isinstance(features, PlannedFeatures):
        stop = images.n if stop is None else stop
        shards = tuple((p.index, p.first_id, min(p.count, stop - p.first_id)) for p in images.plan() if p.first_id < stop)
        return Source(str(images.path), None, shards, tag)
    return Source.open(images, features, tag, stop=stop)


@dataclass(frozen=True)
class PlannedFeatures:
    """A feature set the configuration describes: its key names what it will hold, its shape is the teacher's."""

    key: str
    shape: tuple
    flip: bool


def _feature_sets(cfg: Config, real, gen, key: str | None, planned: list[str] | None) -> dict:
    """The stored feature sets; in a dry run, where they (or their image sets) are not there yet, the planned ones."""
    stored = [x for x in (real, gen) if x is not None and not isinstance(x, PlannedImages)]
    if planned is None or (len(stored) == len([x for x in (real, gen) if x is not None])):
        try:
            return find_feature_sets(Path(cfg.root), real, gen, cfg.features, key)
        except UserError:
            if planned is None:
                raise
    shape, layer, note = planned_target_shape(cfg)
    if note:
        planned.append(note)
    f = cfg.features
    planned.append(f"feature sets are not here yet (`dra-pipe extract-features` writes them): planned as {layer} at "
                   f"timestep {f.timesteps[0]}, pool {f.pool}, {_shape(shape)} per image"
                   + (" and its flip" if f.flip else ""))
    planned_set = PlannedFeatures(f"(planned: {layer} t={f.timesteps[0]})", shape, bool(f.flip))
    return {"real": planned_set, **({"generated": planned_set} if gen is not None else {})}


def planned_target_shape(cfg: Config) -> tuple[tuple, str, str | None]:
    """(C, h, w) and layer of the targets extract-features would store, from the teacher model and the pooling;
    and a note when a published architecture stands in for a missing checkpoint."""
    from stages.extract import check_layer, target_shape
    model, _, note = teacher_for_plan(cfg)
    layer = check_layer(model, cfg.features.layer)
    return target_shape(model, layer, str(cfg.features.pool)), layer, note


# --- model-side checks -------------------------------------------------------------------------------------

def normalisation(real: ImageSet, stop: int, limit: int = 10_000) -> tuple[tuple, tuple]:
    """Per-channel mean and std in [0, 1] of the first training images (up to `limit`); a planned set has none
    yet, and gets 0.5 and 0.25 (they change no cost)."""
    if isinstance(real, PlannedImages):
        return (0.5,) * real.channels, (0.25,) * real.channels
    x = real.read_range(0, min(stop, limit)).images.astype(np.float64) / 255       # (N, H, W, C)
    return tuple(x.mean(axis=(0, 1, 2)).round(6).tolist()), tuple(np.maximum(x.std(axis=(0, 1, 2)), 1e-3).round(6).tolist())


def check_dra_layer(s: dict, real: ImageSet, mean, std, target_shape: tuple) -> str:
    """The classifier layer to align (auto = the architecture's default); its grid must match the target's."""
    import torch
    from trainer.classifiers import build_classifier
    from trainer.dra import match_grid
    model = build_classifier(s["arch"], real.classes, real.channels, real.resolution, mean, std)
    layers = model.feature_layers()
    layer = model.default_dra_layer if s["dra_layer"] == "auto" else s["dra_layer"]
    if layer not in layers:
        raise UserError(f"classifier {s['arch']} has no layer {layer!r} (train.dra_layer); its layers: "
                        f"{', '.join(f'{k} {_shape(v)}' for k, v in layers.items())}")
    match_grid(torch.zeros(1, *layers[layer]), target_shape[1:])
    return layer


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def describe(job: Job) -> list[str]:
    """The plan in a few lines (`--dry-run`)."""
    s = job.settings
    real_rows, gen_rows = job.mix()
    lines = [f"run {job.name} -> {job.run_dir}",
             f"data: real {Path(job.real.images).name} {job.real.n} images (+{job.holdout[1] - job.holdout[0]} held out"
             f" for per-epoch accuracy)" + (f", generated {Path(job.generated.images).name} {job.generated.n} images"
                                            if job.generated else ", no generated data"),
             f"batch {s['batch_size']} = {real_rows * s['workers']} real + {gen_rows * s['workers']} generated "
             f"(unsup_fraction {s['unsup_fraction'] if job.generated else 0}) over {s['workers']} worker(s)",
             f"{job.steps_per_epoch} steps per epoch (ceil({job.real.n} / {s['batch_size']})) x {s['epochs']} epochs "
             f"= {job.total_steps} steps",
             f"objective {s['objective']}, L-inf eps {s['epsilon']:g}, {s['attack_steps']} steps of "
             f"{s['attack_step_size']:g}; classifier {s['arch']}"]
    if job.dra:
        lines.append(f"DRA on: lambda {s['dra_lambda']:g}, {s['dra_view']} view, classifier layer {job.dra_layer} -> "
                     f"head (hidden {s['dra_hidden']}, depth {s['dra_depth']}) -> targets {_shape(job.target_shape)}; "
                     f"feature sets {', '.join(f'{k} {v}' for k, v in job.feature_keys.items())}")
    else:
        lines.append("DRA off: plain " + ("DM-AT" if job.generated else "adversarial training") + ", no feature set used")
    return lines
