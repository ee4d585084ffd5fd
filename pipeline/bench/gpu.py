"""`dra-pipe bench gpu`: one prepared check of every stage on the accelerator, with nothing from outside.

Random weights and synthetic data made on the spot; at most about 8 minutes on one GPU. It measures
  sampler     the EDM CIFAR-10 network (55.7M parameters) in the Heun sampler: images/s in float32 (strict),
              TF32, bf16 and fp16 autocast, bf16 with channels_last and with torch.compile (the settings one
              would generate with), each with its max deviation from the float32 samples, at the batch that
              fills the GPU; measured FLOP rate over the stated one
  extract     tapped forwards/s at dec.8x8_in1, one view per image and several views per image
  train       WRN-28-10 TRADES steps (10-step attack): DRA off, DRA on stored targets, DRA with the online
              teacher; float32 and bf16 + channels_last; DM-AT+DRA's step time over DM-AT's
  loader      the trainer's own loader on CIFAR-sized shards with 8 workers, against what the step consumes
  scale       with more than one GPU, generate on one actor per GPU against one actor
  projection  the 20M recipe's wall time on 8 such GPUs, from these rates
`--smoke` runs the same code on the CPU with tiny sizes (a 16x16 EDM, the small CNN) in well under 3 minutes.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from pipeline.bench import gpu_parts as parts
from pipeline.bench.train import _build
from pipeline.config import load_config
from pipeline.estimates import STATED_DEVICE, STATED_RATE
from stages.edm.networks import EDMPrecond
from stages.extract import NoiseLevel, check_layer
from stages.published import CIFAR10_COND_VP
from stores.identity import write_json_atomic

RECIPE = SimpleNamespace(images=20_000_000, steps=20, views=4, epochs=2400, steps_per_epoch=25, batch=2048, gpus=8)


@dataclass(frozen=True)
class Sizes:
    net: dict                       # EDMPrecond config
    sampler_batches: tuple          # candidates; the best float32 throughput is kept
    sampler_steps: int
    extract_batch: int
    views: int
    arch: str
    train_batch: int
    train_steps: int
    attack_steps: int
    loader_samples: int
    loader_workers: int
    min_seconds: float
    variants: tuple
    sampler_budget_s: float         # the sampler section starts no variant after this (compile can take minutes)


FULL = Sizes(net=CIFAR10_COND_VP, sampler_batches=(128, 256, 512, 1024), sampler_steps=18, extract_batch=512,
             views=4, arch="wrn-28-10", train_batch=256, train_steps=6, attack_steps=10, loader_samples=30_000,
             loader_workers=8, min_seconds=2.0, variants=parts.SAMPLER_VARIANTS,
             sampler_budget_s=210.0)
SMOKE = Sizes(net=dict(img_resolution=16, img_channels=3, label_dim=10, model_type="SongUNet", model_channels=8,
                       channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0),
              sampler_batches=(2, 4), sampler_steps=3, extract_batch=4, views=2, arch="small-cnn", train_batch=8,
              train_steps=2, attack_steps=2, loader_samples=256, loader_workers=2, min_seconds=0.05,
              variants=("float32", "tf32", "bf16", "bf16+channels_last", "bf16+compile"), sampler_budget_s=600.0)


def bench_gpu(work: Path, console: Console, smoke: bool = False, out: Path | None = None) -> dict:
    """Run every section, print one table, write it as JSON (default <work>/gpu.json); returns the figures."""
    sizes = SMOKE if smoke else FULL
    dev = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    started = time.perf_counter()
    torch.manual_seed(0)
    net = EDMPrecond(**sizes.net).eval().requires_grad_(False)
    layer = check_layer(net, "auto")
    job = _job(work, sizes, net, layer, console)                   # synthetic stores, written on the CPU
    net = net.to(dev)
    result = {"device": _device_name(dev), "torch": torch.__version__, "python": platform.python_version(),
              "smoke": smoke, "layer": layer, "params": sum(p.numel() for p in net.parameters())}
    console.print(f"bench gpu{' --smoke' if smoke else ''} on {result['device']}: EDM {result['params']:,} parameters, "
                  f"tap {layer}", highlight=False)
    result["sampler"] = _sampler(net, sizes, dev)
    result["extract"] = parts.bench_extract(net, layer, sizes.extract_batch, sizes.views, dev, sizes.min_seconds)
    result["train"] = parts.bench_steps(job, net, layer, NoiseLevel.from_timestep(100).sigma,
                                        parts.step_batches(job, sizes.train_steps + 1), dev,
                                        ("float32", "bf16+channels_last"))
    result["loader"] = _loader(job, sizes, dev, result["train"])
    result["scale"] = _scale(net, work, dev, smoke)
    result["projection"] = project(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    _report(result, console)
    path = out or work / "gpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json.loads(json.dumps(result)))
    console.print(f"wrote {path} ({result['seconds']:.0f} s)", highlight=False)
    return result


def _sampler(net, sizes: Sizes, dev: torch.device) -> dict:
    batch, forward_s = parts.fill_batch(net, sizes.sampler_batches, dev, sizes.min_seconds)
    variants = tuple(v for v in sizes.variants if "compile" not in v or dev.type == "cuda")
    rows, skipped = parts.bench_sampler_variants(net, batch, sizes.sampler_steps, dev, sizes.min_seconds, variants,
                                                 sizes.sampler_budget_s)
    flops = parts.flops_per_image(net)
    for row in rows.values():
        row["flop_rate_over_stated"] = row["images_per_s"] * row["nfe"] * flops / STATED_RATE
    skipped.update({v: "torch.compile is timed on CUDA only" for v in sizes.variants if v not in variants})
    return {"batch": batch, "steps": sizes.sampler_steps, "forward_seconds": forward_s,
            "gflop_per_forward": flops / 1e9, "variants": rows, "skipped": skipped}


def _job(work: Path, sizes: Sizes, net, layer: str, console: Console):
    """A CIFAR-shaped real and generated set with stored targets of the teacher's layer, as stage 1 leaves them."""
    cfg = load_config(None, {"root": str(work), "data.image_format": "npy", "data.shard_size": 5000,
                             "features.views": 2, "train.arch": sizes.arch, "train.batch_size": sizes.train_batch,
                             "train.attack_steps": sizes.attack_steps, "train.attack_step_size": 2 / 255,
                             "train.epsilon": 8 / 255, "train.crop_pad": 4, "train.flip": True,
                             "train.dra_hidden": 2048 if sizes is FULL else 32, "train.unsup_fraction": 0.8,
                             "train.loader_workers": sizes.loader_workers})
    return _build(cfg, work / "data", sizes.loader_samples, net, layer, NoiseLevel.from_timestep(100), console)[0]


def _loader(job, sizes: Sizes, dev: torch.device, train: dict) -> dict:
    best = max((r for r in train.values() if r["variant"] == "DRA stored"), key=lambda r: r["images_per_s"])
    batches = max(4, min(64, sizes.loader_samples // sizes.train_batch))
    rate = parts.loader_rate(job, sizes.loader_workers, batches, pin_memory=dev.type == "cuda")
    return {"workers": sizes.loader_workers, "samples_per_s": rate, "step_consumes": best["images_per_s"],
            "ratio": rate / best["images_per_s"], "goal": "> 1"}


def _scale(net, work: Path, dev: torch.device, smoke: bool) -> dict:
    """images/s per actor with one actor per GPU against one actor (with --smoke: CPU actors, same code)."""
    count = torch.cuda.device_count() if dev.type == "cuda" else 0
    if count < 2 and not smoke:
        return {"gpus": count, "note": "one GPU visible: generating on one actor per GPU is not measured"}
    try:
        from pipeline.bench.gpu_scale import bench_scale  # imports Ray: only this section needs it
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "ray":
            raise
        return {"gpus": count, "note": "Ray is not installed: generating on one actor per GPU is not measured"}
    return bench_scale(net, work / "scale", smoke)


def project(result: dict) -> dict:
    """Hours of the 20M recipe on RECIPE.gpus GPUs, from the best measured rate of each stage (linear scaling)."""
    s = result["sampler"]
    sampler = max((r for r in s["variants"].values() if r["finite"]), key=lambda r: r["images_per_s"])
    gen_rate = sampler["images_per_s"] * sampler["nfe"] / (2 * RECIPE.steps - 1)      # at the recipe's NFE
    views = [r for r in result["extract"].values() if r["views"] > 1] or list(result["extract"].values())
    extract_rate = max(r["forwards_per_s"] for r in views)
    train = max((r for r in result["train"].values() if r["variant"] == "DRA stored"), key=lambda r: r["images_per_s"])
    train_rate = min(train["images_per_s"], result["loader"]["samples_per_s"])        # the slower of step and loader
    images_trained = RECIPE.epochs * RECIPE.steps_per_epoch * RECIPE.batch
    hours = {"generate": RECIPE.images / gen_rate / RECIPE.gpus / 3600,
             "extract": RECIPE.images * RECIPE.views / extract_rate / RECIPE.gpus / 3600,
             "train": images_trained / train_rate / RECIPE.gpus / 3600}
    return {"gpus": RECIPE.gpus, "hours": hours, "total_hours": sum(hours.values()),
            "from": {"generate_images_per_s": gen_rate, "extract_forwards_per_s": extract_rate,
                     "train_images_per_s": train_rate, "train_mode": train["mode"]},
            "recipe": dict(vars(RECIPE))}


def _device_name(dev: torch.device) -> str:
    return (f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)")


def _report(r: dict, console: Console) -> None:
    table = Table("section", "measure", "value", title=f"bench gpu: {r['device']}, torch {r['torch']}")
    s = r["sampler"]
    for name, v in s["variants"].items():
        table.add_row("sampler", f"{name} (batch {s['batch']}, {s['steps']} steps)",
                      f"{v['images_per_s']:,.1f} images/s, x{v['speedup']:.2f}, max |diff| {v['max_abs_diff']:.1e}, "
                      f"{v['flop_rate_over_stated']:.2f} of the stated rate")
    for name, why in s["skipped"].items():
        table.add_row("sampler", name, f"not measured: {why}")
    for name, v in r["extract"].items():
        table.add_row("extract", name,
                      f"{v['forwards_per_s']:,.0f} tapped forwards/s ({v['images_per_s']:,.0f} images/s)")
    for name, v in r["train"].items():
        table.add_row("train", name, f"{v['images_per_s']:,.1f} images/s ({v['seconds'] * 1000:,.1f} ms/step)")
    for mode in ("float32", "bf16+channels_last"):
        base, dra, online = (r["train"][f"{mode}/{k}"]["seconds"] for k in ("DM-AT", "DRA stored", "DRA online"))
        table.add_row("train", f"{mode}: DM-AT+DRA / DM-AT", f"stored {dra / base:.3f}, online {online / base:.3f}")
    lo = r["loader"]
    table.add_row("loader", f"{lo['workers']} workers", f"{lo['samples_per_s']:,.0f} samples/s = "
                  f"{lo['ratio']:.2f}x what the step consumes (goal > 1)")
    table.add_row("scale", f"{r['scale']['gpus']} GPU(s)", r["scale"].get("note", json.dumps(r["scale"])))
    p = r["projection"]
    table.add_row("projection", f"20M recipe on {p['gpus']} GPUs",
                  ", ".join(f"{k} {v:,.1f} h" for k, v in p["hours"].items())
                  + f"; total {p['total_hours']:,.1f} h (stated rate: {STATED_DEVICE})")
    console.print(table)
