"""extract-features: the frozen diffusion model's activation for every image at fixed noise levels.

For sample i at noise level sigma: x_sigma = x + sigma * eps, eps drawn from (noise seed, i, timestep) only,
target = the model's output at `layer` for x_sigma (with the sample's class label for a conditional model),
optionally pooled, stored float16 (or float32: `features.dtype`). The network runs in the compute dtype
(`model.dtype`, stages/precision.py), recorded in the identity unless float32. With V views (stores/views.py),
view v's target is the same computation on the augmented image a_v(x) (flip, then a zero-padded crop):
a_v(x) + sigma * eps, with the image's eps for every view. The V views of a batch go through one forward; the
trainer's online teacher calls `view_targets` on the augmented images it trains on, so both give the same numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages.denoiser import Denoiser
from stages.models import device_of, load_model, pick_device
from stages.noise import noise_for
from stages.precision import compute_context, dtype_identity
from stages.sigma import sigma_from_timestep, timestep_from_sigma
from stages.specs import localize_spec
from stages.taps import describe_layers, features
from stores.errors import UserError
from stores.features import STORED_DTYPES, FeatureShardRecord, write_feature_shard
from stores.images import ImageSet
from stores.remote import localize
from stores.views import ViewSpec, all_views, apply_views


@dataclass(frozen=True)
class NoiseLevel:
    """A DDPM timestep (sigma from the linear schedule) or a sigma given directly (timestep None)."""

    sigma: float
    timestep: int | None

    @classmethod
    def from_timestep(cls, t: int) -> NoiseLevel:
        return cls(sigma_from_timestep(t), int(t))

    @classmethod
    def from_sigma(cls, sigma: float) -> NoiseLevel:
        if not (sigma > 0 and np.isfinite(sigma)):
            raise UserError(f"--sigma {sigma} must be a positive finite noise level")
        return cls(float(sigma), None)

    @property
    def noise_stream(self) -> int:
        """Which timestep's eps stream to draw: the nearest DDPM timestep for a direct sigma."""
        return self.timestep if self.timestep is not None else timestep_from_sigma(self.sigma)

    def label(self) -> str:
        return f"t={self.timestep} (sigma {self.sigma:.4f})" if self.timestep is not None else f"sigma={self.sigma:g}"


def default_layer(model: Denoiser) -> str:
    """The bottleneck: EDM's lowest-resolution `dec.<r>x<r>_in1` (CIFAR-10: dec.8x8_in1), diffusers' mid_block."""
    names = model.layer_names()
    inner = [n for n in names if n.startswith("dec.") and n.endswith("_in1")]
    if inner:
        return inner[0]
    if "mid_block" in names:
        return "mid_block"
    raise UserError(f"no default layer for this model; pass --layer (one of {', '.join(names)})")


def check_layer(model: Denoiser, layer: str) -> str:
    if layer == "auto":
        return default_layer(model)
    if layer not in model.layer_names():
        raise UserError(f"unknown layer {layer!r}; valid layers: {', '.join(model.layer_names())}")
    return layer


def target_shape(model: Denoiser, layer: str, pool: str) -> tuple[int, int, int]:
    """(C, h, w) of one stored target."""
    c, h, w = dict(describe_layers(model))[layer]
    if pool == "global":
        return (c, 1, 1)
    if pool != "none":
        k = int(pool)
        if h % k or w % k:
            raise UserError(f"--pool {pool} does not divide the {h}x{w} grid of {layer}; use another pooling")
        return (c, h // k, w // k)
    return (c, h, w)


def check_compatible(model: Denoiser, images: ImageSet) -> None:
    if (images.resolution, images.channels) != (model.img_resolution, model.img_channels):
        raise UserError(f"image set {images.name} holds {images.channels}x{images.resolution}x{images.resolution} "
                        f"images, the model expects {model.img_channels}x{model.img_resolution}x{model.img_resolution}")
    if model.label_dim and images.classes > model.label_dim:
        raise UserError(f"image set {images.name} has {images.classes} classes, the model knows {model.label_dim}")


def feature_identity(images: ImageSet, model_fp: str, layer: str, level: NoiseLevel, noise_seed: int, pool: str,
                     views: ViewSpec, conditional: bool, stored_dtype: str = "float16",
                     compute_dtype: str = "float32") -> dict:
    """What a feature set is: its folder key is a hash of this. `dtype` is the stored dtype; `compute_dtype` (the
    model's) appears unless float32, so float32 sets keep the keys they had before the setting existed."""
    check_stored_dtype(stored_dtype)
    return {"image_set": images.fingerprint, "image_set_name": images.name, "model": model_fp, "layer": layer,
            "timestep": level.timestep, "sigma": level.sigma, "noise_stream": level.noise_stream,
            "noise_seed": noise_seed, "noise_key": "seed, image set, id, timestep", "pool": pool, "dtype": stored_dtype,
            "views": views.identity(), "labels": "sample class" if conditional else "none",
            **dtype_identity(compute_dtype, "compute_dtype")}


def check_stored_dtype(name: str) -> str:
    if name not in STORED_DTYPES:
        raise UserError(f"features.dtype {name!r} cannot be stored; choose one of: {', '.join(STORED_DTYPES)} "
                        f"(numpy and zarr have no bfloat16; float32 avoids float16 overflow at twice the bytes)")
    return name


def identity_dtypes(identity: dict) -> tuple[str, str]:
    """(stored dtype, compute dtype) a feature set's identity records."""
    return identity.get("dtype", "float16"), identity.get("compute_dtype", "float32")


def pool_targets(h: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, C, H, W) -> pooled (B, C, h, w)."""
    if pool == "none":
        return h
    if pool == "global":
        return h.mean(dim=(2, 3), keepdim=True)
    return F.avg_pool2d(h, int(pool))


def to_model_range(images_uint8) -> torch.Tensor:
    """(B, H, W, C) uint8 (numpy or torch) -> (B, C, H, W) float32 in [-1, 1]."""
    return torch.as_tensor(images_uint8).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1


@torch.no_grad()
def _tapped(model: Denoiser, x: torch.Tensor, eps: torch.Tensor, labels, layer: str, level: NoiseLevel,
            pool: str, compute_dtype: str = "float32") -> torch.Tensor:
    return tapped(model, x, eps, labels, layer, level, pool, compute_dtype)


def tapped(model: Denoiser, x: torch.Tensor, eps: torch.Tensor, labels, layer: str, level: NoiseLevel,
           pool: str, compute_dtype: str = "float32") -> torch.Tensor:
    """Pooled activation at `layer` for x + sigma * eps, the network in `compute_dtype` (labels None: none given).
    x, eps (B, C, H, W) on any device -> (B, Ct, h, w) float32 on the model's device; differentiable in x when
    gradients are on."""
    x = x.to(device_of(model))
    x_sigma = x + level.sigma * eps.to(x.device)
    cond = torch.as_tensor(labels).to(x.device) if model.label_dim and labels is not None else None
    sigma = torch.full((len(x),), level.sigma, dtype=torch.float64, device=x.device)
    with compute_context(compute_dtype, x.device):
        tapped = features(model, x_sigma, sigma, cond, [layer])[layer]
    return pool_targets(tapped.float(), pool)


@torch.no_grad()
def view_targets(model: Denoiser, ids, views_uint8, labels, layer: str, level: NoiseLevel, noise_seed: int,
                 pool: str, image_sets: str | list[str], compute_dtype: str = "float32") -> torch.Tensor:
    """Targets of already augmented images (B, H, W, C) uint8, each with its image's eps (keyed by its image set's
    fingerprint, one for all or one per row, and its id): (B, Ct, h, w) float32."""
    ids = torch.as_tensor(ids).cpu().tolist()
    x = to_model_range(views_uint8)                                                   # (B, C, H, W)
    eps = noise_for(ids, x.shape[1:], noise_seed, level.noise_stream, image_sets)
    return _tapped(model, x, eps, labels, layer, level, pool, compute_dtype)


def input_targets(model: Denoiser, x01: torch.Tensor, ids, labels, layer: str, level: NoiseLevel, noise_seed: int,
                  pool: str, image_set: str, compute_dtype: str = "float32") -> torch.Tensor:
    """Targets of images x01 (B, C, H, W) float in [0, 1], each with its image's eps as `view_targets` draws it,
    differentiable in x01 (an attack through the frozen teacher): (B, Ct, h, w) float32."""
    eps = noise_for(torch.as_tensor(ids).cpu().tolist(), x01.shape[1:], noise_seed, level.noise_stream, image_set)
    return tapped(model, x01 * 2 - 1, eps, labels, layer, level, pool, compute_dtype)


@torch.no_grad()
def compute_targets(model: Denoiser, ids: np.ndarray, images: np.ndarray, labels: np.ndarray, layer: str,
                    level: NoiseLevel, noise_seed: int, pool: str, views: ViewSpec, image_set: str,
                    compute_dtype: str = "float32", stored_dtype: str = "float16") -> np.ndarray:
    """Targets of every view of a batch of image set `image_set` (its fingerprint keys the noise) in one forward:
    (B, V, Ct, h, w) in the stored dtype."""
    B, V = len(ids), views.count
    flips, shifts = all_views(views, ids)                                             # (B, V), (B, V, 2)
    repeated = torch.from_numpy(np.ascontiguousarray(images)).repeat_interleave(V, dim=0)   # (B V, H, W, C)
    x = to_model_range(apply_views(repeated, flips.reshape(-1), shifts.reshape(-1, 2)))     # (B V, C, H, W)
    eps = noise_for(ids.tolist(), x.shape[1:], noise_seed, level.noise_stream, image_set)  # (B, C, H, W): every view
    out = _tapped(model, x, eps.repeat_interleave(V, dim=0), np.repeat(labels, V), layer, level, pool, compute_dtype)
    return _to_stored(out, stored_dtype).reshape(B, V, *out.shape[1:])


def _to_stored(h: torch.Tensor, stored_dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        return h.cpu().numpy().astype(check_stored_dtype(stored_dtype))   # float16 overflow: inf, refused by the writer


@dataclass(frozen=True)
class FeaturePayload:
    """What a shard job needs beyond its id range: its image set and the feature sets still lacking it."""

    image_set: str           # folder of the image set
    outputs: tuple           # ((feature-set folder, NoiseLevel), ...)
    views: ViewSpec          # the views every one of them stores


class FeatureWorker:
    """Built once per Ray actor (the model loads once); a shard runner worker: compute, then finish."""

    def __init__(self, model_spec: str, layer: str, pool: str, noise_seed: int, batch_size: int,
                 compute_dtype: str = "float32", stored_dtype: str = "float16"):
        self.model = load_model(localize_spec(model_spec)).to(pick_device())   # a GPU actor's GPU, else the CPU
        self.layer, self.pool = layer, pool
        self.noise_seed, self.batch_size = noise_seed, batch_size
        self.stored_dtype, self.compute_dtype = stored_dtype, compute_dtype
        self._image_sets: dict[str, ImageSet] = {}
        self._feature_sets: dict[str, Path] = {}      # driver's folder -> this node's, its metadata brought once

    def compute(self, job, progress) -> tuple[float, list[np.ndarray]]:
        """Decode the image shard once, then targets of every view for every noise level, batch by batch
        (batch_size // V images, so a forward holds about batch_size views)."""
        started = time.perf_counter()
        payload: FeaturePayload = job.payload
        if payload.image_set not in self._image_sets:      # this node's view of an object-store workspace
            self._image_sets[payload.image_set] = ImageSet(localize(payload.image_set, need=True))
        images = self._image_sets[payload.image_set]
        shard = images.read_shard(job.index)
        if shard.ids[0] != job.first_id or len(shard.ids) != job.count:
            raise RuntimeError(f"image shard {job.index} holds ids {shard.ids[0]}.., the job expects {job.first_id}..")
        parts: list[list] = [[] for _ in payload.outputs]
        step = max(1, self.batch_size // payload.views.count)
        for lo in range(0, job.count, step):
            sl = slice(lo, lo + step)
            for out, (_, level) in zip(parts, payload.outputs):
                out.append(compute_targets(self.model, shard.ids[sl], shard.images[sl], shard.labels[sl], self.layer,
                                           level, self.noise_seed, self.pool, payload.views, images.fingerprint,
                                           self.compute_dtype, self.stored_dtype))
            progress(len(shard.ids[sl]))
        return started, [np.concatenate(out) for out in parts]

    def finish(self, job, intermediate) -> list[FeatureShardRecord]:
        """Write one zarr shard per feature set (refused if any value overflowed float16)."""
        started, slabs = intermediate
        ids = np.arange(job.first_id, job.first_id + job.count, dtype=np.int64)
        return [write_feature_shard(self._feature_set(folder), job.index, job.first_id, ids, targets, started=started)
                for (folder, _), targets in zip(job.payload.outputs, slabs)]

    def _feature_set(self, folder: str) -> Path:
        """The set's folder on this node. On an object store its metadata (zarr.json) is brought on first use only:
        a listing per shard would grow with the set (hundreds of thousands of objects at the DM-AT size)."""
        if folder not in self._feature_sets:
            self._feature_sets[folder] = localize(folder, need=True)
        return self._feature_sets[folder]


def recompute_deviation(model: Denoiser, images: ImageSet, feature_set, k: int, seed: int = 0) -> dict:
    """Recompute k random cached samples, every view; the largest absolute and relative deviation from the cache."""
    ident = feature_set.identity
    level = NoiseLevel(ident["sigma"], ident["timestep"])
    done = sorted(feature_set.records)
    if not done:
        raise UserError(f"feature set {feature_set.key} has no completed shard to check")
    counts = np.array([feature_set.records[i].count for i in done])
    starts = np.concatenate([[0], np.cumsum(counts)])              # k distinct samples, at most every one cached
    positions = np.random.default_rng(seed).choice(int(starts[-1]), size=min(k, int(starts[-1])), replace=False)
    picks: dict[int, set[int]] = {}
    for pos in positions:
        j = int(np.searchsorted(starts, pos, side="right")) - 1
        picks.setdefault(done[j], set()).add(int(pos - starts[j]))
    worst_abs = worst_rel = 0.0
    per_view = [0.0] * len(feature_set.target_names())
    checked = 0
    for index, rows in sorted(picks.items()):
        cached = feature_set.read_shard(index)
        shard = images.read_shard(index)
        sel = np.array(sorted(rows))
        views = ViewSpec.from_identity(ident.get("views"))
        stored_dtype, compute_dtype = identity_dtypes(ident)
        fresh = compute_targets(model, shard.ids[sel], shard.images[sel], shard.labels[sel], ident["layer"], level,
                                ident["noise_seed"], ident["pool"], views, images.fingerprint, compute_dtype,
                                stored_dtype)                                             # (k, V, Ct, h, w)
        pairs = [(fresh[:, v], cached[name][sel]) for v, name in enumerate(feature_set.target_names())]
        for v, (new, old) in enumerate(pairs):                                                # per view
            new, old = new.astype(np.float32), old.astype(np.float32)
            diff = np.abs(new - old).reshape(len(sel), -1).max(axis=1)
            scale = np.maximum(np.abs(old).reshape(len(sel), -1).max(axis=1), 1e-6)
            worst_abs, worst_rel = max(worst_abs, float(diff.max())), max(worst_rel, float((diff / scale).max()))
            per_view[v] = max(per_view[v], float((diff / scale).max()))
        checked += len(sel)
    return {"samples": checked, "max_abs": worst_abs, "max_rel": worst_rel, "max_rel_per_view": per_view}
