"""generate: class-conditional samples from a diffusion model into a generated image set.

Sample i's class label and initial noise (and churn noise) depend only on (run seed, i)
(`stages.noise`), so a shard holds the same images whatever the number of workers or the restarts,
bitwise on the CPU at a fixed batch size (batches start at the shard's first id). Images are stored
the EDM way: uint8 = (x * 127.5 + 128) clipped to [0, 255], HWC.

`GenerateWorker` is the Ray worker of `pipeline.shards`: built once per actor (the model loads
once), it samples a shard in batches (compute) and writes it as a tar shard (finish).
"""
from __future__ import annotations

import math
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.fingerprint import model_fingerprint
from stages.models import load_model, pick_device  # pick_device: re-exported for the CLI
from stages.noise import churn_noise_fn, labels_for, latents_for
from stages.precision import check_compute_dtype, compute_context, dtype_identity, in_dtype
from stages.sampler_registry import SAMPLERS, sampler_entry
from stages.samplers import sample
from stages.specs import localize_spec, parse_spec
from stores.errors import UserError
from stores.images import make_identity
from stores.manifest import ShardJob, ShardRecord
from stores.remote import localize
from stores.tarshard import BLOCK, encode_image, write_tar_shard

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0     # EDM's defaults, recorded in the identity


@dataclass(frozen=True)
class GenerateSettings:
    sampler: str = "heun"        # a name in stages.sampler_registry.SAMPLERS
    steps: int = 18              # sampler steps (Heun: 2 * steps - 1 network evaluations)
    churn: float = 0.0           # EDM S_churn; 0 = deterministic
    seed: int = 0                # run seed: sample i depends only on (seed, i)
    batch_size: int = 256        # images per sampler call (not part of the identity)
    image_format: str = "png"    # encoding inside the shards
    dtype: str = "float32"       # compute dtype of the network calls (model.dtype); the sampler's steps stay float64

    def check(self) -> GenerateSettings:
        """UserError for settings no sampler run could use."""
        entry = sampler_entry(self.sampler)
        if self.steps < 2:
            raise UserError(f"--steps must be at least 2 (got {self.steps}): "
                            "the EDM discretisation needs two noise levels")
        if self.steps < entry.min_steps:
            raise UserError(f"--steps must be at least {entry.min_steps} for {self.sampler} (got {self.steps})")
        if self.churn > 0 and not entry.takes_churn:
            with_churn = " and ".join(name for name, e in SAMPLERS.items() if e.takes_churn)
            raise UserError(f"churn applies to the {with_churn} samplers only; "
                            f"set generate.churn: 0 for {self.sampler}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        check_compute_dtype(self.dtype, pick_device())
        return self

    @property
    def nfe(self) -> int:
        """Network evaluations per image (stages.sampler_registry: Heun 2N - 1, Euler and DPM-Solver N)."""
        return sampler_entry(self.sampler).nfe(self.steps)

    def sampler_options(self, ids: list[int]) -> dict:
        opts = dict(num_steps=self.steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
        if sampler_entry(self.sampler).takes_churn:
            opts["S_churn"] = self.churn
            if self.churn > 0:
                opts["noise_fn"] = churn_noise_fn(ids, self.seed)
        return opts


def absolute_spec(spec: str) -> str:
    """`kind:PATH` with PATH made absolute: Ray workers need not share the driver's working directory."""
    return str(parse_spec(spec).absolute())


def load_generator_model(spec: str) -> torch.nn.Module:
    """The model, refused unless it is class-conditional."""
    return require_conditional(load_model(spec), spec)


def require_conditional(model: torch.nn.Module, spec: str) -> torch.nn.Module:
    if not int(getattr(model, "label_dim", 0)):
        raise UserError(f"model {spec} is unconditional (no class labels); generate needs a class-conditional model")
    return model


def generated_identity(model, settings: GenerateSettings, shard_size: int, class_names: list[str] | None) -> dict:
    """Identity of the set: the model fingerprint and the sampler settings (with the compute dtype unless float32),
    not n nor the batch size."""
    source = {"model": model_fingerprint(model), "sampler": settings.sampler, "steps": settings.steps,
              "churn": settings.churn, "seed": settings.seed, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX,
              "rho": RHO, **dtype_identity(settings.dtype)}
    return make_identity("generated", source, model.img_resolution, model.img_channels, model.label_dim,
                         class_names, "train", shard_size, settings.image_format)


def sample_floats(model, ids: list[int], settings: GenerateSettings,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples for these ids: (float64 [B, C, H, W] in about [-1, 1], int64 labels [B])."""
    shape = (model.img_channels, model.img_resolution, model.img_resolution)
    latents = latents_for(ids, shape, settings.seed).to(device)
    labels = labels_for(ids, model.label_dim, settings.seed)
    x = sample(settings.sampler, in_dtype(model, settings.dtype), latents, labels.to(device),
               **settings.sampler_options(ids))
    return x, labels


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C], as EDM's generate.py stores images."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class GenerateWorker:
    """Samples and writes shards of one generated set; the model loads once per worker."""

    def __init__(self, spec: str, settings: GenerateSettings, set_dir: str):
        self.settings, self.set_dir = settings, localize(set_dir)        # this node's view of an object store
        self.device = pick_device()
        self.model = load_model(localize_spec(spec)).to(self.device)

    def compute(self, job: ShardJob, progress: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray, float]:
        """Sample ids [first_id, first_id + count) in batches that start at first_id."""
        started = time.perf_counter()
        m, b = self.model, self.settings.batch_size
        images = np.empty((job.count, m.img_resolution, m.img_resolution, m.img_channels), dtype=np.uint8)
        labels = np.empty(job.count, dtype=np.int64)
        for lo in range(0, job.count, b):
            hi = min(lo + b, job.count)
            x, y = sample_floats(m, list(range(job.first_id + lo, job.first_id + hi)), self.settings, self.device)
            images[lo:hi], labels[lo:hi] = to_uint8(x), y.numpy()
            progress(hi - lo)
        return images, labels, started

    def finish(self, job: ShardJob, sampled: tuple[np.ndarray, np.ndarray, float]) -> ShardRecord:
        images, labels, started = sampled
        return write_tar_shard(self.set_dir, job.index, job.first_id, images, labels, self.settings.image_format,
                               started)


def remove_temporaries(set_dir: Path) -> int:
    """Delete shard temporaries a killed worker left behind (never visible: readers trust the manifest)."""
    stale = list(Path(set_dir).glob(".shard-*.tar.tmp-*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


@dataclass(frozen=True)
class Probe:
    images: int               # probe batch size
    images_per_s: float       # one worker's sampling rate on this machine
    bytes_per_image: float    # in a tar shard, both members with their headers


def probe(model, settings: GenerateSettings, count: int, threads: int) -> Probe:
    """Sample the first `count` ids once, as one worker would (its torch threads, after a 1-image warm-up),
    to measure speed and encoded size. The model returns to the CPU afterwards."""
    device, saved = pick_device(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.to(device)
        sample_floats(model, [0], settings, device)
        started = time.perf_counter()
        x, labels = sample_floats(model, list(range(count)), settings, device)
        images = to_uint8(x)                       # waits for the device
        seconds = time.perf_counter() - started
    finally:
        model.to("cpu")
        torch.set_num_threads(saved)
    sizes = [_member_bytes(len(encode_image(img, settings.image_format))) + _member_bytes(len(str(int(y))))
             for img, y in zip(images, labels)]
    return Probe(count, count / max(seconds, 1e-9), float(np.mean(sizes)))


def time_forward(model, batch: int, threads: int, dtype: str = "float32") -> float:
    """Seconds per image of one network evaluation on this machine (a batch of `batch`, after a warm-up),
    with a worker's torch threads. Times the sampler's cost when a whole probe would take too long: the sampler
    adds about nothing beyond its evaluations (`dra-pipe bench sampler`: overhead 0.94-1.06)."""
    device, saved = pick_device(), torch.get_num_threads()
    torch.set_num_threads(threads)
    shape = (batch, model.img_channels, model.img_resolution, model.img_resolution)
    try:
        model.to(device)
        x, sigma = torch.zeros(shape, device=device), torch.ones(batch, device=device)
        labels = (torch.eye(model.label_dim, device=device)[torch.arange(batch) % model.label_dim] if model.label_dim
                  else None)
        with torch.no_grad(), compute_context(dtype, device):
            model(x[:1], sigma[:1], None if labels is None else labels[:1])
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model(x, sigma, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
    finally:
        model.to("cpu")
        torch.set_num_threads(saved)
    return seconds / batch


def incompressible_bytes(model, image_format: str, label: int = 0) -> int:
    """Bytes one sample takes in a shard when its image does not compress at all (uniform noise): a bound."""
    noise = np.random.default_rng(0).integers(0, 256, (model.img_resolution, model.img_resolution, model.img_channels),
                                              dtype=np.uint8)
    return _member_bytes(len(encode_image(noise, image_format))) + _member_bytes(len(str(label)))


def estimate_bytes(n: int, shards: int, bytes_per_image: float) -> int:
    """Tar layout: members of 512-byte blocks, then two zero blocks padded to a 10 KB record per shard."""
    return int(n * bytes_per_image + shards * (2 * BLOCK + tarfile.RECORDSIZE / 2))


def _member_bytes(payload: int) -> int:
    return BLOCK + math.ceil(payload / BLOCK) * BLOCK
