"""The measurements of `dra-pipe bench gpu`: sampler, extract, train step and loader, each on the device given.

Every timing synchronises the device before and after, warms up first, and repeats until a minimum time has
passed. Reduced-precision variants are compared with the float32 result of the same inputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import torch

from pipeline.bench.sampler import _sync as sync
from pipeline.bench.sampler import _timed as repeat_timed
from pipeline.estimates import forward_flops
from stages.noise import labels_for, latents_for
from stages.samplers import NFECounter, sample
from stages.taps import features
from trainer.loader import make_loader
from trainer.loop import Dist, Trainer, mix_plan

SAMPLER_VARIANTS = ("float32", "tf32", "bf16", "fp16", "bf16+channels_last", "bf16+compile")


def timed(fn: Callable, dev: torch.device, min_seconds: float, min_reps: int = 1):
    """(seconds per call, last result) after one untimed warm-up call (bench sampler's timer)."""
    fn()
    return repeat_timed(fn, dev, min_seconds, min_reps)


@contextlib.contextmanager
def precision(variant: str, dev: torch.device):
    """float32 strict (TF32 off), TF32 matmuls and convolutions, or bf16 / fp16 autocast."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(variant)
    try:
        with torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --- sampler ---------------------------------------------------------------------------------------------------

def sampler_inputs(net, batch: int, dev: torch.device, seed: int = 0) -> dict:
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    return {"latents": latents_for(range(batch), shape, seed).to(dev),
            "labels": labels_for(range(batch), net.label_dim, seed).to(dev) if net.label_dim else None}


def run_heun(net, inputs: dict, steps: int, channels_last: bool = False) -> tuple[torch.Tensor, int]:
    """(samples, NFE) of the EDM Heun sampler; its state stays float64 whatever the network computes in."""
    latents = inputs["latents"].contiguous(memory_format=torch.channels_last) if channels_last else inputs["latents"]
    counter = NFECounter(net)
    out = sample("heun", counter, latents, inputs["labels"], num_steps=steps)
    return out, counter.calls


def fill_batch(net, batches: tuple[int, ...], dev: torch.device, min_seconds: float) -> tuple[int, float]:
    """The batch (of the candidates) with the most forward images/s in float32, stopping at the first that does
    not fit in memory; and its forward seconds."""
    best = (batches[0], 0.0, float("inf"))
    for b in batches:
        x = torch.randn(b, net.img_channels, net.img_resolution, net.img_resolution, device=dev)
        sigma, inputs = torch.ones(b, device=dev), sampler_inputs(net, b, dev)
        try:
            with torch.no_grad(), precision("float32", dev):
                seconds, _ = timed(lambda: net(x, sigma, inputs["labels"]), dev, min_seconds / 4, min_reps=2)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            torch.cuda.empty_cache()
            break
        if b / seconds > best[1]:
            best = (b, b / seconds, seconds)
    return best[0], best[2]


@torch.no_grad()
def bench_sampler_variants(net, batch: int, steps: int, dev: torch.device, min_seconds: float,
                           variants: tuple[str, ...], budget_s: float = float("inf")) -> tuple[dict, dict]:
    """(rows, skipped): images/s of the Heun sampler per variant, its max |deviation| from float32 and speed-up over
    it; the variants not started because the section had used `budget_s` (the first always runs).

    A variant is a precision (float32 strict, tf32, bf16, fp16) with optional `+channels_last` and `+compile`.
    Warm-up is two network calls (cuDNN picks its kernels per shape), not a whole run: a float32 run of the CIFAR
    network at a full batch takes tens of seconds on one GPU, and the check has 8 minutes.
    """
    inputs = sampler_inputs(net, batch, dev)
    rows, skipped, reference, base_seconds = {}, {}, None, None
    started = time.perf_counter()
    for variant in variants:
        if rows and time.perf_counter() - started > budget_s:
            skipped[variant] = f"over the section's time budget ({budget_s:.0f} s)"
            continue
        mode, *flags = variant.split("+")
        channels_last, extra = "channels_last" in flags, {}
        model = net.to(memory_format=torch.channels_last) if channels_last else net
        with precision(mode, dev):
            if "compile" in flags:
                model, extra["compile_seconds"] = _compiled(model, inputs, steps, dev)
            else:
                _warm_up(model, inputs, dev, channels_last)
            seconds, (samples, nfe) = repeat_timed(lambda: run_heun(model, inputs, steps, channels_last), dev,
                                                   min_seconds)
        if channels_last:
            net.to(memory_format=torch.contiguous_format)
        if reference is None:
            reference, base_seconds = samples.double(), seconds
        rows[variant] = {"images_per_s": batch / seconds, "seconds": seconds, "nfe": nfe,
                         "max_abs_diff": float((samples.double() - reference).abs().max()),
                         "finite": bool(torch.isfinite(samples).all()), "speedup": base_seconds / seconds, **extra}
    return rows, skipped


def _warm_up(model, inputs: dict, dev: torch.device, channels_last: bool) -> None:
    x = inputs["latents"].float() * 80
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    for _ in range(2):
        model(x, torch.full((len(x),), 80.0, device=dev), inputs["labels"])
    sync(dev)


def _compiled(model, inputs: dict, steps: int, dev: torch.device):
    """torch.compile'd model after one whole run (compiling for every sigma the run sees); (model, seconds)."""
    compiled = torch.compile(model)
    started = time.perf_counter()
    run_heun(compiled, inputs, steps)
    sync(dev)
    return compiled, time.perf_counter() - started


# --- extract ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_targets(net, images: torch.Tensor, labels: torch.Tensor, sigma: float, layer: str,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The frozen teacher's tapped activation of uint8 images (B, H, W, C) at x + sigma * eps: (B, C_t, h, w)."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1                                   # (B, C, H, W) in [-1, 1]
    eps = torch.randn(x.shape, generator=generator, device=x.device) if generator is not None else torch.randn_like(x)
    s = torch.full((len(x),), sigma, device=x.device, dtype=torch.float64)
    return features(net, x + sigma * eps, s, labels if net.label_dim else None, [layer])[layer]


def bench_extract(net, layer: str, batch: int, views: int, dev: torch.device, min_seconds: float,
                  modes: tuple[str, ...] = ("float32", "bf16")) -> dict:
    """Tapped forwards/s at `layer`, per image (views 1) and with `views` views of each image in one batch."""
    r, c = net.img_resolution, net.img_channels
    images = torch.randint(0, 256, (batch, r, r, c), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, max(net.label_dim, 1), (batch,), device=dev)
    rows = {}
    for mode in modes:
        for v in sorted({1, views}):
            stacked = torch.cat([images if k % 2 == 0 else images.flip(2) for k in range(v)])        # (vB, H, W, C)
            stacked_labels = labels.repeat(v)
            with precision(mode, dev):
                seconds, _ = timed(lambda: teacher_targets(net, stacked, stacked_labels, 0.3423, layer), dev,
                                   min_seconds, min_reps=2)
            rows[f"{mode}/views{v}"] = {"forwards_per_s": v * batch / seconds, "images_per_s": batch / seconds,
                                        "views": v, "mode": mode}
    return rows


# --- training step ---------------------------------------------------------------------------------------------

def step_trainers(job, dev: torch.device) -> dict[str, Trainer]:
    """DM-AT (no head, no targets), DM-AT+DRA on stored targets, and on targets of the online teacher."""
    plain = job.without_dra()
    return {"DM-AT": Trainer(plain, Dist(device=dev)), "DRA stored": Trainer(job, Dist(device=dev)),
            "DRA online": Trainer(job, Dist(device=dev))}


def set_precision(trainer: Trainer, mode: str, dev: torch.device) -> None:
    """The step's and its attack's precision (train.precision, train.attack_precision: both bf16 or both float32)
    and, with bf16 here, channels_last weights."""
    bf16 = mode == "bf16+channels_last"
    both = "bf16" if bf16 else "float32"
    trainer.s = dataclasses.replace(trainer.s, precision=both, attack_precision=both)
    trainer.model.to(memory_format=torch.channels_last if bf16 else torch.contiguous_format)


def bench_steps(job, teacher, layer: str, sigma: float, batches: list[dict], dev: torch.device,
                modes: tuple[str, ...]) -> dict:
    """Seconds per training step of each trainer and precision, round-robin over the same batches."""
    out = {}
    for mode in modes:
        trainers = step_trainers(job, dev)
        for t in trainers.values():
            set_precision(t, mode, dev)
        times = {name: [] for name in trainers}
        for i, batch in enumerate(batches):
            for name, trainer in trainers.items():
                sync(dev)
                started = time.perf_counter()
                step_batch = batch
                if name == "DRA online":
                    images = batch["images"].to(dev, non_blocking=True)
                    with precision("bf16" if mode.startswith("bf16") else "float32", dev):
                        targets = teacher_targets(teacher, images, batch["labels"].to(dev), sigma, layer)
                    step_batch = {**batch, "targets": targets.float()}
                trainer.train_step(step_batch)
                sync(dev)
                if i:                                                   # the first round warms up
                    times[name].append(time.perf_counter() - started)
        b = len(batches[0]["ids"])
        for name, seconds in times.items():
            median = sorted(seconds)[len(seconds) // 2]
            out[f"{mode}/{name}"] = {"seconds": median, "images_per_s": b / median, "mode": mode, "variant": name}
    return out


def step_batches(job, count: int) -> list[dict]:
    it = iter(make_loader(dataclasses.replace(mix_plan(job, Dist()), loader_workers=0)))
    return [next(it) for _ in range(count)]


def loader_rate(job, workers: int, batches: int, pin_memory: bool) -> float:
    """Samples/s of the trainer's own loader (images, labels, targets) with `workers` processes."""
    plan = dataclasses.replace(mix_plan(job, Dist()), loader_workers=workers)
    it = iter(make_loader(plan, pin_memory=pin_memory, borrow=True))         # as the training loop consumes it
    for _ in range(max(2, workers)):
        next(it)
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * plan.batch_size / (time.perf_counter() - started)


def flops_per_image(net) -> float:
    return float(forward_flops(net, 1))
