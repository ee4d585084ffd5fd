"""`dra-pipe bench sampler`: what one image costs to generate, in one run.

For (a) the digits model (the fitted one if `model.spec: fit` finds it, another spec's model, else a freshly
initialised network of the configured fit-diffusion size: the report says which; the cost of a forward does not
depend on the weights) and (b) the CIFAR-10-sized network (EDMPrecond with the official CIFAR-10 conditional
DDPM++ config, randomly initialised), it times
  forward   one network evaluation of a batch: ms per image and images/s
  sampler   the EDM Heun sampler (Algorithm 2, `generate.steps` steps, NFE = 2N - 1 counted): images/s
  overhead  sampler time / (NFE x forward time): 1.0 means the sampler costs nothing beyond its forwards
  bf16      one forward of one image in `model.dtype: bfloat16` (generate's own code path) against float32's
            time per image, and the max |diff| from the float32 samples of one untimed bf16 sampler run over the
            first images, as many (up to BF16_IMAGES) as fit in BF16_SECONDS at that speed; on any device. CPUs
            without bf16 instructions emulate it (this machine kind's AMD EPYC: about 20x slower than float32)
On a CUDA device it also runs the sampler under bf16 and fp16 autocast and through `torch.compile`, each with
its speed-up over float32 and its maximum deviation from the float32 samples (same latents and labels).
float32 is strict throughout (TF32 off). The sampler's own state is float64, as in the official code.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from pipeline.models import fit_settings, fitted_model_dir
from pipeline.workflow import real_train_set
from stages.edm.networks import EDMPrecond
from stages.fit_diffusion import network_config
from stages.models import load_model
from stages.noise import labels_for, latents_for
from stages.precision import in_dtype
from stages.published import CIFAR10_COND_VP
from stages.samplers import NFECounter, sample
from stages.taps import parameter_count
from stores.errors import UserError
from stores.images import ImageSet

# The official EDM CIFAR-10 conditional VP config (edm-cifar10-32x32-cond-vp.pkl; 55,735,299 parameters).
CIFAR10_CONFIG = CIFAR10_COND_VP

GPU_VARIANTS = ("bf16", "fp16", "compile")
BF16_IMAGES = 4                   # most images of the untimed bf16 run
BF16_SECONDS = 10.0               # what that run may take, at the measured bf16 forward speed (keeps the bench fast)


def bench_sampler(cfg, console: Console, *, steps: int | None = None, batch: int | None = None,
                  cifar: bool = True, cifar_batch: int = 4, cifar_config: dict | None = None,
                  device: str | None = None, variants: tuple[str, ...] | None = None,
                  min_seconds: float = 1.0, seed: int = 0) -> dict:
    """Run the benchmark and print its tables; returns the figures.

    steps: Heun steps (default `generate.steps`); batch: digits batch (default `generate.batch_size`);
    cifar_batch: batch of the CIFAR-10-sized network (small: about 0.1 s per image per forward on a 2-core CPU);
    variants: any of bf16, fp16, compile (default: all three on CUDA, none on the CPU).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = int(steps or cfg.generate.steps)
    batch = int(batch or cfg.generate.batch_size)
    if variants is None:
        variants = GPU_VARIANTS if dev.type == "cuda" else ()
    unknown = sorted(set(variants) - set(GPU_VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(GPU_VARIANTS)}")
    load_start = os.getloadavg()[0]
    console.print(f"bench sampler on {_device_name(dev)}, torch {torch.__version__}, {torch.get_num_threads()} "
                  f"threads; load average {load_start:.2f} (timings assume nothing else runs)", highlight=False)

    models = []
    net, source = _digits_model(cfg)
    models.append(("digits", net, source, batch))
    if cifar:
        torch.manual_seed(seed)
        models.append(("cifar10", EDMPrecond(**(cifar_config or CIFAR10_CONFIG)),
                       "randomly initialised, official config", cifar_batch))

    results: dict = {"device": _device_name(dev), "steps": steps, "models": {}, "variants": {}}
    with _strict_float32():
        _bench_all(models, results, variants, steps, dev, min_seconds, seed)
    results["load_average"] = (load_start, os.getloadavg()[0])
    _report(results, variants, dev, console)
    return results


class _strict_float32:
    """float32 means float32: no TF32 in CUDA convolutions and matmuls (cuDNN allows it by default)."""

    def __enter__(self):
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def _bench_all(models, results: dict, variants, steps: int, dev: torch.device, min_seconds: float, seed: int) -> None:
    for name, net, source, b in models:
        net = net.to(dev).eval().requires_grad_(False)
        row, reference, inputs = _bench_model(net, b, steps, dev, min_seconds, seed)
        row.update(source=source)
        results["models"][name] = row
        for variant in variants:
            results["variants"][f"{name}/{variant}"] = _bench_variant(net, variant, inputs, steps, dev, reference,
                                                                      row["sampler_seconds"], min_seconds)
        net.to("cpu")
        del reference, inputs


# --- models --------------------------------------------------------------------------------------------------

def _digits_model(cfg):
    """(network, where it came from): the fitted model, the configured spec's model, or a fresh one."""
    from pathlib import Path


    if cfg.model.spec != "fit":
        return load_model(cfg.model.spec), f"model.spec {cfg.model.spec}"
    try:
        images = ImageSet.open(Path(cfg.root), real_train_set(cfg))
    except UserError:                        # no real training set imported yet: assume the digits' shape
        images = None
    if images is not None:
        folder = fitted_model_dir(cfg, images.name)
        if (folder / "config.json").exists():
            return load_model(f"dra:{folder}"), f"fitted model {folder.name} (model.spec fit)"
    shape = images or SimpleNamespace(resolution=8, channels=1, classes=10)
    torch.manual_seed(0)
    net = EDMPrecond(**network_config(shape, fit_settings(cfg)))
    what = f"{shape.channels}x{shape.resolution}x{shape.resolution}, {shape.classes} classes"
    return net, f"freshly initialised, fit_diffusion config ({what}): no fitted model yet; the forward cost is the same"


# --- timing --------------------------------------------------------------------------------------------------

def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device, min_seconds: float, min_reps: int = 1):
    """(seconds per call, last result): repeats fn until min_reps calls and min_seconds have passed."""
    reps, total, out = 0, 0.0, None
    while reps < min_reps or total < min_seconds:
        _sync(dev)
        started = time.perf_counter()
        out = fn()
        _sync(dev)
        total += time.perf_counter() - started
        reps += 1
    return total / reps, out


def _inputs(net, b: int, dev: torch.device, seed: int) -> dict:
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    labels = labels_for(range(b), net.label_dim, seed) if net.label_dim else None
    return {"latents": latents_for(range(b), shape, seed).to(dev), "labels": None if labels is None else labels.to(dev)}


def _run_sampler(net, inputs: dict, steps: int, context=nullcontext):
    """(samples, NFE) of one Heun run."""
    counter = NFECounter(net)
    with context():
        out = sample("heun", counter, inputs["latents"], inputs["labels"], num_steps=steps)
    return out, counter.calls


@torch.no_grad()
def _bench_model(net, b: int, steps: int, dev: torch.device, min_seconds: float, seed: int):
    inputs = _inputs(net, b, dev, seed)
    x = inputs["latents"].to(torch.float32)
    sigma = torch.ones(b, device=dev)
    net(x, sigma, inputs["labels"])                                           # warm-up
    forward_s, _ = _timed(lambda: net(x, sigma, inputs["labels"]), dev, min_seconds, min_reps=3)
    sampler_s, (samples, nfe) = _timed(lambda: _run_sampler(net, inputs, steps), dev, min_seconds)
    expected = 2 * steps - 1
    if nfe != expected:
        raise RuntimeError(f"Heun sampler made {nfe} network evaluations for {steps} steps; expected {expected}")
    row = dict(params=parameter_count(net), shape=[net.img_channels, net.img_resolution, net.img_resolution],
               batch=b, forward_seconds=forward_s, forward_ms_per_image=1000 * forward_s / b,
               forward_images_per_s=b / forward_s, steps=steps, nfe=nfe, sampler_seconds=sampler_s,
               sampler_images_per_s=b / sampler_s, overhead=sampler_s / (nfe * forward_s))
    row.update(_bf16_deviation(net, inputs, steps, samples, forward_s / b, dev))
    return row, samples, inputs


def _bf16_deviation(net, inputs: dict, steps: int, reference: torch.Tensor, fp32_per_image: float,
                    dev: torch.device) -> dict:
    """bf16 as `model.dtype: bfloat16` computes: one image's forward time over float32's, and the max |bf16 - float32|
    over the first samples that fit in BF16_SECONDS (None when not even one does)."""
    bf16 = in_dtype(net, "bfloat16")
    one = inputs["latents"][:1].to(torch.float32)
    labels = None if inputs["labels"] is None else inputs["labels"][:1]
    seconds, _ = _timed(lambda: bf16(one, torch.ones(1, device=dev), labels), dev, 0.0)
    k = min(BF16_IMAGES, reference.shape[0], int(BF16_SECONDS / max(seconds * (2 * steps - 1), 1e-9)))
    out = {"bf16_forward_ratio": seconds / fp32_per_image, "bf16_images": k, "bf16_max_abs_diff": None}
    if k:
        some = {key: None if v is None else v[:k] for key, v in inputs.items()}
        samples, _ = _run_sampler(bf16, some, steps)
        out["bf16_max_abs_diff"] = float((samples - reference[:k]).abs().max())
    return out


@torch.no_grad()
def _bench_variant(net, variant: str, inputs: dict, steps: int, dev: torch.device, reference: torch.Tensor,
                   fp32_seconds: float, min_seconds: float) -> dict:
    """The sampler under autocast (bf16, fp16) or with a compiled network, against the float32 samples."""
    extra = {}
    if variant == "compile":
        model, context = torch.compile(net), nullcontext
        started = time.perf_counter()
        _run_sampler(model, inputs, steps)                                     # compiles (once per shape)
        _sync(dev)
        extra["compile_seconds"] = time.perf_counter() - started
    else:
        dtype = torch.bfloat16 if variant == "bf16" else torch.float16
        model, context = net, (lambda: torch.autocast(dev.type, dtype=dtype))
        _run_sampler(model, inputs, steps, context)                            # warm-up
    seconds, (samples, _) = _timed(lambda: _run_sampler(model, inputs, steps, context), dev, min_seconds)
    diff = (samples.to(torch.float64) - reference.to(torch.float64)).abs()
    b = reference.shape[0]
    return dict(sampler_seconds=seconds, sampler_images_per_s=b / seconds, speedup=fp32_seconds / seconds,
                max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                finite=bool(torch.isfinite(samples).all()), **extra)


# --- report --------------------------------------------------------------------------------------------------

def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({os.cpu_count()} cores)"


def _bf16_cell(r: dict) -> str:
    if r["bf16_max_abs_diff"] is None:
        return f"skipped (one image > {BF16_SECONDS:.0f} s)"
    return f"{r['bf16_max_abs_diff']:.2e} ({r['bf16_images']})"


def _report(results: dict, variants, dev: torch.device, console: Console) -> None:
    table = Table("model", "params", "image", "batch", "forward ms/image", "forward images/s", "steps", "NFE",
                  "sampler images/s", "sampler s/batch", "sampler / (NFE x forward)",
                  "bf16 forward / float32", "bf16 max |diff| (images)",
                  title=f"bench sampler: EDM Heun, float32, {results['device']}")
    for name, r in results["models"].items():
        table.add_row(name, f"{r['params']:,}", "x".join(map(str, r["shape"])), str(r["batch"]),
                      f"{r['forward_ms_per_image']:.3f}", f"{r['forward_images_per_s']:,.1f}", str(r["steps"]),
                      str(r["nfe"]), f"{r['sampler_images_per_s']:,.2f}", f"{r['sampler_seconds']:.2f}",
                      f"{r['overhead']:.2f}", f"{r['bf16_forward_ratio']:.2f}", _bf16_cell(r))
    console.print(table)
    for name, r in results["models"].items():
        console.print(f"{name}: {r['source']}", highlight=False)
    console.print(f"bf16: model.dtype bfloat16 as generate runs it (autocast network calls, float64 steps); forward of "
                  f"one image over float32's time per image; max |diff| of one untimed Heun run of the first images "
                  f"(those that fit in {BF16_SECONDS:.0f} s) from the float32 samples, images in [-1, 1]",
                  highlight=False)
    if results["variants"]:
        vt = Table("model", "variant", "sampler images/s", "speed-up vs float32", "max |diff| vs float32",
                   "mean |diff|",
                   title="reduced precision and torch.compile (same latents and labels; images in [-1, 1])")
        for key, v in results["variants"].items():
            name, variant = key.split("/")
            label = variant + (f" (compile {v['compile_seconds']:.0f} s)" if "compile_seconds" in v else "")
            vt.add_row(name, label, f"{v['sampler_images_per_s']:,.2f}", f"{v['speedup']:.2f}x",
                       f"{v['max_abs_diff']:.2e}" + ("" if v["finite"] else " (non-finite!)"),
                       f"{v['mean_abs_diff']:.2e}")
        console.print(vt)
    if dev.type != "cuda":
        skipped = [v for v in GPU_VARIANTS if v not in variants]
        if skipped:
            console.print(f"{', '.join(skipped)}: need a CUDA GPU (none here); skipped", highlight=False)
    lo, hi = results["load_average"]
    console.print(f"load average {lo:.2f} at the start, {hi:.2f} at the end", highlight=False)
