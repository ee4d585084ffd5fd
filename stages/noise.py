"""Per-sample randomness: everything random about sample i depends only on (seed, i, stream).

Each (seed, key, stream) gets its own CPU `torch.Generator`, seeded with the first 63 bits of
sha256("dra-pipe|<seed>|<key>|<stream>"). Values are drawn on the CPU and then moved, so a sample's
latents, labels and noise are bitwise the same whatever the batch, worker, device or resume point.

Streams: "latents" (initial noise), "churn/<step>" (sampler churn noise),
"feature-noise/<image-set fingerprint>/<timestep>" (eps for feature extraction: keyed by the image set too, so
real image i and generated image i do not share their noise), "labels" (keyed by block index).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

import torch


def _check_int(name: str, value) -> int:
    """A non-negative Python int, or ValueError."""
    if isinstance(value, bool) or int(value) != value or int(value) < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return int(value)


def _id_list(ids: Iterable) -> list[int]:
    """Sample ids as Python ints (accepts lists, ranges, numpy arrays, tensors)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [_check_int("sample id", i) for i in ids]


def stream_seed(seed: int, key: int, stream: str) -> int:
    """63-bit seed derived from (seed, key, stream) by sha256."""
    text = f"dra-pipe|{_check_int('seed', seed)}|{_check_int('key', key)}|{stream}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_generator(seed: int, sample_id: int, stream: str) -> torch.Generator:
    """A fresh CPU generator for one sample's `stream`."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(stream_seed(seed, sample_id, stream))
    return generator


def _normals(ids: Iterable, shape: Sequence[int], seed: int, stream: str | Sequence[str],
             dtype: torch.dtype) -> torch.Tensor:
    """Stack of per-sample standard normals: [B, *shape]. stream: one for every id, or one per id."""
    id_list = _id_list(ids)
    streams = [stream] * len(id_list) if isinstance(stream, str) else list(stream)
    if len(streams) != len(id_list):
        raise ValueError(f"{len(streams)} noise streams for {len(id_list)} ids")
    rows = [torch.randn(tuple(shape), generator=sample_generator(seed, i, st), dtype=dtype)
            for i, st in zip(id_list, streams)]
    if not rows:
        return torch.empty((0, *shape), dtype=dtype)
    return torch.stack(rows)


def latents_for(ids: Iterable, shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial sampler noise N(0, I) for each id: [B, C, H, W] given shape = (C, H, W)."""
    return _normals(ids, shape, seed, "latents", dtype)


def noise_for(ids: Iterable, shape: Sequence[int], seed: int, t: int, image_set: str | Sequence[str],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Feature-extraction eps for each id of image set `image_set` (a fingerprint; or one per id, for a batch mixing
    real and generated images) at timestep t: [B, C, H, W] given shape = (C, H, W)."""
    t = _check_int("timestep", t)
    sets = [image_set] if isinstance(image_set, str) else list(image_set)
    if not all(isinstance(k, str) and k and "|" not in k for k in sets):
        raise ValueError(f"image-set keys must be non-empty strings without '|'; got {image_set!r}")
    streams = (f"feature-noise/{image_set}/{t}" if isinstance(image_set, str)
               else [f"feature-noise/{k}/{t}" for k in sets])
    return _normals(ids, shape, seed, streams, dtype)


def labels_for(ids: Iterable, num_classes: int, seed: int) -> torch.Tensor:
    """Balanced class labels, int64 [B].

    Ids are grouped in blocks of K = num_classes (block b = ids bK .. bK + K - 1); sample id gets
    perm_b[id % K], where perm_b is a random permutation of range(K) drawn from (seed, b). So each
    K-aligned block of ids holds every class exactly once, and a label depends only on (seed, id).
    """
    k = _check_int("num_classes", num_classes)
    if k < 1:
        raise ValueError("num_classes must be at least 1")
    perms: dict[int, torch.Tensor] = {}
    labels = []
    for i in _id_list(ids):
        block = i // k
        if block not in perms:
            perms[block] = torch.randperm(k, generator=sample_generator(seed, block, "labels"))
        labels.append(int(perms[block][i % k]))
    return torch.tensor(labels, dtype=torch.int64)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [B] -> float32 one-hot [B, num_classes] (EDM's label input)."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float32)


def churn_noise_fn(ids: Iterable, seed: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """noise_fn(x, step_index) for the EDM samplers: per-sample normals shaped and typed like x [B, ...]."""
    id_list = _id_list(ids)

    def noise_fn(x: torch.Tensor, step_index: int) -> torch.Tensor:
        if x.shape[0] != len(id_list):
            raise ValueError(f"churn noise for {len(id_list)} ids, but the batch has {x.shape[0]} samples")
        stream = f"churn/{_check_int('step index', step_index)}"
        noise = _normals(id_list, x.shape[1:], seed, stream, x.dtype)
        return noise.to(x.device)

    return noise_fn
