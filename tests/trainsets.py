"""Small image and feature sets for the trainer's tests, laid out as stage 1 would leave them.

A sample's target encodes where it came from: channel 0 of target i is i (real) or 1000 + i (generated), negated
in odd views (view 1 = the mirror with flips), and channel 1 is the view v, so any mismatch between an image,
its view and its target shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stores.features import FeatureSetWriter, write_feature_shard
from stores.images import ImageSet, ImageSetWriter, make_identity
from stores.views import ViewSpec

GEN_OFFSET = 1000


def image_set(root: Path, name: str, kind: str, n: int, shard: int, res: int = 8, channels: int = 1,
              classes: int = 10, seed: int = 0) -> ImageSet:
    """Images whose mean brightness depends on the label (learnable), stored as npy shards."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    base = (labels[:, None, None, None] * (255 // classes)).astype(np.int64)
    images = np.clip(base + rng.integers(0, 40, (n, res, res, channels)), 0, 255).astype(np.uint8)
    split = "train" if kind == "generated" else name.rsplit("-", 1)[-1]
    identity = make_identity(kind, {"test": name, "seed": seed}, res, channels, classes, None, split, shard, "npy")
    w = ImageSetWriter(root, name, identity, n)
    w.begin()
    for p in w.pending():
        w.write(p, images[p.first_id:p.first_id + p.count], labels[p.first_id:p.first_id + p.count])
    return ImageSet(w.path)


def feature_set(root: Path, images: ImageSet, shape=(8, 4, 4), flip: bool = False, offset: int = 0,
                model: str = "m0", timestep: int = 100, layer: str = "dec.4x4_in1", pool: str = "none",
                views: int | None = None, pad: int = 0, targets: np.ndarray | None = None,
                dtype: str = "float16") -> Path:
    """Views made for crop pad `pad` and `flip` (the default train settings: pad 0, no flips); 2 views with flips.
    The id-encoded targets above, or `targets` as given: (N, *shape) for every view, or (N, V, *shape), stored
    as `dtype` (float16 sets made before features.dtype record no dtype in their identity)."""
    spec = ViewSpec(views or (2 if flip else 1), pad, flip)
    identity = {"image_set": images.fingerprint, "image_set_name": images.name, "model": model, "layer": layer,
                "timestep": timestep, "sigma": 0.3423, "pool": pool, "views": spec.identity(),
                **({} if dtype == "float16" else {"dtype": dtype})}
    w = FeatureSetWriter(root, identity, images.n, images.shard_size, shape, spec.count, dtype=dtype)
    w.begin()
    sign = np.where(np.arange(spec.count) % 2, -1, 1)
    for p in images.plan():
        ids = np.arange(p.first_id, p.first_id + p.count)
        if targets is not None:                  # (N, *shape): the same for every view, or (N, V, *shape)
            slab = (targets[ids] if targets.ndim == len(shape) + 2
                    else np.repeat(targets[ids][:, None], spec.count, axis=1))
        else:
            slab = np.zeros((p.count, spec.count, *shape))
            slab[:, :, 0] = (ids[:, None] + offset)[:, :, None, None] * sign[None, :, None, None]
            slab[:, :, 1] = np.arange(spec.count)[None, :, None, None]
        w.record(write_feature_shard(w.path, p.index, p.first_id, ids, slab.astype(dtype)))
    return w.path


def workspace(root: Path, n_real: int = 120, n_gen: int = 200, shard: int = 32, features: bool = True,
              flip: bool = False, shape=(8, 4, 4), views: int | None = None, pad: int = 0) -> dict:
    """digits-train, digits-test, digits-gen and (optionally) a feature set for train and gen."""
    real = image_set(root, "digits-train", "real", n_real, shard, seed=1)
    test = image_set(root, "digits-test", "real", 40, shard, seed=2)
    gen = image_set(root, "digits-gen", "generated", n_gen, shard, seed=3) if n_gen else None
    out = {"real": real, "test": test, "gen": gen}
    if features:
        out["real_features"] = feature_set(root, real, shape, flip, views=views, pad=pad)
        if gen is not None:
            out["gen_features"] = feature_set(root, gen, shape, flip, offset=GEN_OFFSET, views=views, pad=pad)
    return out


def npz_halves(folder: Path, parts: tuple, seed: int) -> list[tuple]:
    """DM-AT's layout in miniature: one .npz per (name, n) of `parts` with `image` uint8 (n, 32, 32, 3) and `label`
    int, random pixels; the second file deflated. Returns [(path, image, label)]."""
    rng = np.random.default_rng(seed)
    halves = []
    for (name, n), save in zip(parts, (np.savez, np.savez_compressed)):
        image, label = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)
        save(folder / name, image=image, label=label)
        halves.append((folder / name, image, label))
    return halves
