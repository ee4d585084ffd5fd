"""Small image and feature sets for the trainer's tests, laid out as stage 1 would leave them.

A sample's target encodes where it came from: every value of target i is i (real) or 1000 + i (generated),
and the flipped target its negative, so any mismatch between an image and its target shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stores.features import FeatureSetWriter, write_feature_shard
from stores.images import ImageSet, ImageSetWriter, make_identity

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
                targets: np.ndarray | None = None) -> Path:
    """A feature set for `images`: the id-encoded targets above, or `targets` (N, *shape) as given."""
    identity = {"image_set": images.fingerprint, "image_set_name": images.name, "model": model, "layer": layer,
                "timestep": timestep, "sigma": 0.3423, "pool": pool, "flip": flip}
    w = FeatureSetWriter(root, identity, images.n, images.shard_size, shape, flip)
    w.begin()
    for p in images.plan():
        ids = np.arange(p.first_id, p.first_id + p.count)
        shard = (ids[:, None, None, None] + offset + np.zeros((1, *shape))) if targets is None else targets[ids]
        shard = shard.astype(np.float16)
        w.record(write_feature_shard(w.path, p.index, p.first_id, ids, shard, -shard if flip else None))
    return w.path


def workspace(root: Path, n_real: int = 120, n_gen: int = 200, shard: int = 32, features: bool = True,
              flip: bool = False, shape=(8, 4, 4)) -> dict:
    """digits-train, digits-test, digits-gen and (optionally) a feature set for train and gen."""
    real = image_set(root, "digits-train", "real", n_real, shard, seed=1)
    test = image_set(root, "digits-test", "real", 40, shard, seed=2)
    gen = image_set(root, "digits-gen", "generated", n_gen, shard, seed=3) if n_gen else None
    out = {"real": real, "test": test, "gen": gen}
    if features:
        out["real_features"] = feature_set(root, real, shape, flip)
        if gen is not None:
            out["gen_features"] = feature_set(root, gen, shape, flip, offset=GEN_OFFSET)
    return out
