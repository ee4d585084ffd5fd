"""What `dra-pipe analyze` reads: a finished run (its classifier, configuration, test and training sets, eval.json),
the teachers it is measured against, and images streamed from the stores batch by batch (one image shard at a
time, with its cached targets where a measure needs them); features go to row files, never a whole split in
memory. Everything is checked when the context is built, before anything is written."""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, config_from
from pipeline.models import recorded_model, resolve_model_spec
from pipeline.plans.features import feature_query
from pipeline.plans.teacher import FrozenTeacher
from stores.errors import UserError
from stores.features import FeatureSet
from stores.images import DATASET_JSON, ImageSet, image_set_dir
from trainer.analysis.rows import FileRows
from trainer.targets import find_feature_sets


@dataclass(frozen=True)
class AnalyzeSettings:
    """The `analyze` section of pipeline.yaml."""

    measures: tuple
    timesteps: tuple
    layers: tuple
    probe_pool: str
    probe_labels: str
    probe_epochs: int
    probe_lr: float
    n_train: int
    n_test: int
    batch_size: int
    seed: int
    sae_expansion: int
    sae_k: int
    sae_epochs: int
    dimension_target: float
    pair_crop_pad: int
    ridge: float

    @classmethod
    def from_config(cls, section: dict) -> AnalyzeSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})


@dataclass(frozen=True)
class Tap:
    """A frozen teacher's tap: the model, its noise seed and compute dtype, layer, noise level and pooling; and the
    feature set it was read from, if any (whose cached training targets are its targets)."""

    spec: str
    fingerprint: str | None
    noise_seed: int
    compute_dtype: str
    layer: str
    timestep: int | None
    sigma: float
    pool: str
    feature_key: str | None = None

    def identity(self) -> dict:
        """What the targets depend on (the model by fingerprint when known, else by spec)."""
        return {"model": self.fingerprint or self.spec, "noise_seed": self.noise_seed, "dtype": self.compute_dtype,
                "layer": self.layer, "timestep": self.timestep, "sigma": self.sigma, "pool": self.pool}


def tap_of(fs: FeatureSet, root: Path) -> Tap:
    """The teacher tap a feature set was made with, from its identity and recorded model."""
    ident = fs.identity
    spec, _ = recorded_model(fs.meta.get("provenance", {}), root)
    if not spec:
        raise UserError(f"feature set {fs.key} records no model spec; extract it again with dra-pipe extract-features")
    return Tap(spec, ident.get("model"), ident["noise_seed"], ident.get("compute_dtype", "float32"), ident["layer"],
               ident["timestep"], ident["sigma"], str(ident["pool"]), fs.key)


def named_feature_set(root: Path, key: str, train: ImageSet) -> FeatureSet:
    """--features KEY: a feature set of the run's training images."""
    path = root / "features" / key
    if not (path / "meta.json").exists():
        raise UserError(f"no feature set {key} under {root}/features; `dra-pipe ls` lists them")
    fs = FeatureSet(path)
    if fs.identity.get("image_set") != train.fingerprint:
        raise UserError(f"feature set {key} was computed from image set {fs.identity.get('image_set_name')} "
                        f"({str(fs.identity.get('image_set'))[:12]}), not from the run's training set {train.name} "
                        f"({train.fingerprint[:12]}); pass a feature set of {train.name}")
    return fs


def run_feature_set(root: Path, run_cfg: Config, identity: dict, train: ImageSet) -> FeatureSet | None:
    """The feature set a DRA run aligned with (its run.json names it); for a DRA-off run the one its configuration
    would have used (the same teacher as its DRA twin); None if the workspace holds none."""
    key = ((identity.get("features") or {}) if isinstance(identity, dict) else {}).get("real")
    if key:
        return named_feature_set(root, key, train)
    try:
        return find_feature_sets(root, train, None, feature_query(run_cfg))["real"]
    except UserError as exc:
        if "several feature sets" in str(exc):
            raise
        return None


def open_images(root: Path, name: str, run: str) -> ImageSet:
    if not (image_set_dir(root, name) / DATASET_JSON).exists():
        raise UserError(f"no image set {name} under {root}/images for run {run}; import the data first")
    images = ImageSet.open(root, name)
    images.require_complete("import it again")
    return images


def image_batches(images: ImageSet, n: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(ids (B,), images (B, C, H, W) float in [0, 1], labels (B,)) of the first n images (0 = all), one image
    shard decoded at a time."""
    for _, ids, x, y in _shard_batches(images, n, batch):
        yield ids, x, y


def _shard_batches(images: ImageSet, n: int, batch: int):
    stop = images.n if n <= 0 else min(n, images.n)
    for plan in images.plan():
        if plan.first_id >= stop:
            break
        shard = images.read_shard(plan.index)
        keep = min(plan.count, stop - plan.first_id)
        for lo in range(0, keep, batch):
            hi = min(lo + batch, keep)
            x = torch.from_numpy(shard.images[lo:hi]).permute(0, 3, 1, 2).float() / 255
            yield (plan.index, lo, hi), torch.from_numpy(shard.ids[lo:hi]), x, torch.from_numpy(shard.labels[lo:hi])


def cached_target_batches(images: ImageSet, fs: FeatureSet, n: int, batch: int):
    """image_batches with each image's cached target (view 0, float32 (B, Ct, h, w)) from feature set fs."""
    slabs: dict[int, dict] = {}
    for (index, lo, hi), ids, x, y in _shard_batches(images, n, batch):
        if index not in slabs:
            slabs = {index: fs.read_shard(index)}
        slab = slabs[index]
        if not np.array_equal(slab["ids"][lo:hi], ids.numpy()):
            raise UserError(f"feature set {fs.key} holds other ids than image shard {index} of {images.name}")
        yield ids, x, y, torch.from_numpy(np.asarray(slab["targets"][lo:hi], dtype=np.float32))


@dataclass
class Scratch:
    """Row files of one analysis in a temporary folder outside the workspace, removed at the end."""

    folder: tempfile.TemporaryDirectory = field(default_factory=lambda: tempfile.TemporaryDirectory(prefix="analyze-"))
    count: int = 0

    def rows(self, n: int, dims: int) -> FileRows:
        self.count += 1
        return FileRows(Path(self.folder.name), f"rows{self.count}", n, dims)

    def close(self) -> None:
        self.folder.cleanup()


def collect(scratch: Scratch, batches, features: Callable, n: int) -> tuple[FileRows, torch.Tensor]:
    """(rows (n, D) of features(ids, x, y) flattened per image, labels (n,)) over the batches."""
    rows, labels, lo = None, torch.zeros(n, dtype=torch.int64), 0
    for ids, x, y, *rest in batches:
        out = features(ids, x, y, *rest).detach().float().cpu().flatten(1)
        if rows is None:
            rows = scratch.rows(n, out.shape[1])
        rows.put(lo, out)
        labels[lo:lo + len(y)] = y
        lo += len(y)
    if rows is None:
        raise UserError("no images to analyze (analyze.n_train / n_test, or an empty set)")
    return rows, labels


def count(images: ImageSet, n: int) -> int:
    return images.n if n <= 0 else min(n, images.n)


def teacher_model(teachers: dict, tap: Tap) -> FrozenTeacher:
    """One loaded model per (spec, noise seed, compute dtype), shared by every tap of it."""
    key = (tap.spec, tap.noise_seed, tap.compute_dtype)
    if key not in teachers:
        teachers[key] = FrozenTeacher(tap.spec, tap.noise_seed, tap.compute_dtype, tap.fingerprint)
    return teachers[key]


def default_tap(root: Path, run_cfg: Config, fs: FeatureSet | None) -> Tap:
    """The teacher whose layers and timesteps the teacher probe spans: the run's feature set's model, or the
    configured one (model.spec, features.noise_seed, model.dtype) when the workspace holds no feature set."""
    if fs is not None:
        return tap_of(fs, root)
    return Tap(resolve_model_spec(run_cfg), None, run_cfg.features.noise_seed, run_cfg.model.dtype, "auto", None,
               0.0, "none")


def run_config(info, root: Path) -> Config:
    return config_from(info.config, str(info.folder.config), str(root))
