"""`dra-pipe bench targets`: how far what the trainer aligns with is from the true target of the image it sees.

On real training images of the workspace, under the run's augmentation (train.crop_pad, train.flip), the true
target of an augmented image is the frozen teacher's tapped activation of that very image (the same noise per
image id as the cache). The relative error ||aligned - true|| / ||true|| is measured for
  stored views  the target the loader hands over for the view it drew (train.dra_targets: views)
  online        the teacher inside the step (the reference itself; its error is its run-to-run difference)
  shift         the un-augmented target moved by whole cells, on the cells it keeps (dra_targets: shifted)
and each mode's training step is timed against plain DM-AT on the workspace's own batches. With --cifar it also
times the online teacher on the CIFAR-size pair (WRN-28-10, EDM CIFAR-10 at dec.8x8_in1, a small batch here)
next to its FLOP-count ratio. The last line reads
  target error under the training augmentation: stored views X, whole-cell shift Y
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pipeline.config import Config
from pipeline.estimates import count_flops
from pipeline.plans.teacher import teacher_for
from pipeline.plans.train import make_job
from stages.extract import NoiseLevel, view_targets
from stages.models import load_model
from stores.errors import UserError
from stores.features import FeatureSet
from stores.images import ImageSet
from stores.views import apply_views, view_augmentations
from trainer.augment import apply_augment, draw_params
from trainer.loader import make_loader
from trainer.loop import Dist, Trainer, mix_plan
from trainer.views import view_choices

GOAL_ERROR, GOAL_STEP = 0.01, 1.05


def bench_targets(cfg: Config, console: Console, images: int = 256, steps: int = 24, cifar: bool = False) -> dict:
    """Measure the three errors and step ratios; print a table and the last line; return the figures."""
    if images < 1 or steps < 1:
        raise UserError(f"bench targets needs at least one image and one step (got {images} and {steps})")
    job = make_job(cfg)
    if not job.dra:
        raise UserError("bench targets needs DRA on (train.dra true, train.dra_lambda > 0) and its feature sets")
    root = Path(cfg.root)
    features = FeatureSet(root / "features" / job.feature_keys["real"])
    teacher, level = _teacher(features)
    sample = _real_sample(ImageSet(Path(job.real.images)), features, images)
    result = {"images": len(sample["ids"]), "layer": features.identity["layer"], "views": features.views,
              "errors": _errors(job, teacher, level, features, sample, cfg.train.seed),
              "steps": _step_ratios(cfg, root, steps)}
    if cifar:
        result["cifar"] = _cifar_online()
    _report(result, console)
    return result


def _teacher(features: FeatureSet):
    spec = features.meta.get("provenance", {}).get("model_spec")
    if not spec:
        raise UserError(f"feature set {features.key} records no model spec; extract it again")
    ident = features.identity
    return load_model(spec).eval().requires_grad_(False), NoiseLevel(ident["sigma"], ident["timestep"])


def _real_sample(images: ImageSet, features: FeatureSet, n: int) -> dict:
    """The first n real training images with every stored view's target (float32, (N, V, C, h, w))."""
    plan = images.plan()[0]
    n = min(n, plan.count)
    data = images.read_range(plan.first_id, plan.first_id + n)
    stored = features.read_shard(0)
    views = np.stack([stored[name][:n] for name in features.target_names()], axis=1).astype(np.float32)
    return {"ids": torch.arange(plan.first_id, plan.first_id + n), "images": torch.from_numpy(data.images),
            "labels": torch.from_numpy(data.labels), "stored": torch.from_numpy(views)}


def _relative(aligned: torch.Tensor, true: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """||aligned - true|| / ||true|| over the whole batch (over the kept cells when a mask is given)."""
    diff, ref = aligned - true, true
    if keep is not None:
        diff, ref = diff * keep[:, None], ref * keep[:, None]
    return float(diff.norm() / ref.norm().clamp_min(1e-12))


def _errors(job, teacher, level, features: FeatureSet, s: dict, seed: int) -> dict:
    ident, pad, flip = features.identity, job.settings.crop_pad, job.settings.flip
    truth = lambda flips, shifts: view_targets(teacher, s["ids"], apply_views(s["images"], flips, shifts),  # noqa: E731
                                               s["labels"], ident["layer"], level, ident["noise_seed"],
                                               str(ident["pool"]), ident["image_set"])
    # stored views: the view the loader would draw for each row, its stored target, against the truth of that view
    counts = np.full(len(s["ids"]), features.views)
    chosen = torch.from_numpy(view_choices(seed, 0, 0, counts))
    flips, shifts = view_augmentations(job.view_seed, s["ids"], chosen, pad, flip)
    stored = s["stored"][torch.arange(len(chosen)), chosen]
    views_error = _relative(stored, truth(flips, shifts))
    # online and shift: the random crop/flip of the run's augmentation
    flips, shifts = draw_params(len(s["ids"]), torch.Generator().manual_seed(seed), pad, flip)
    true = truth(flips, shifts)
    online_error = _relative(truth(flips, shifts), true)
    mirror = s["stored"][:, 1] if flip and features.views > 1 and job.mirror_view else None
    _, shifted, keep = apply_augment(s["images"], s["stored"][:, 0], mirror, flips, shifts)
    shift_error = _relative(shifted, true, keep.float())
    return {"stored views": views_error, "online": online_error, "whole-cell shift": shift_error,
            "shift kept cells": float(keep.float().mean()),
            "unaugmented target": _relative(s["stored"][:, 0], true)}


def _step_ratios(cfg: Config, root: Path, steps: int) -> dict:
    """Median per-round ratio of each mode's step time over DM-AT's, round-robin over the same loader batches."""
    modes = {"DM-AT": None, "views": "views", "online": "online", "shifted": "shifted"}
    trainers, plans = {}, {}
    for name, mode in modes.items():
        over = {"train.dra": mode is not None, **({"train.dra_targets": mode} if mode else {})}
        variant = _with(cfg, over)
        job = dataclasses.replace(make_job(variant, f"bench-{name}"), run_dir=str(root / "bench" / "targets"))
        trainers[name] = Trainer(job, Dist(), teacher_for(job, root))
        plans[name] = iter(make_loader(dataclasses.replace(mix_plan(job, Dist()), loader_workers=0)))
    times = {name: [] for name in modes}
    for i in range(steps + 1):
        order = list(trainers) if i % 2 else list(trainers)[::-1]
        for name in order:
            batch = next(plans[name])
            started = time.perf_counter()
            trainers[name].train_step(batch)
            if i:
                times[name].append(time.perf_counter() - started)
    base = times["DM-AT"]
    return {name: {"seconds": statistics.median(t), "ratio": statistics.median(a / b for a, b in zip(t, base))}
            for name, t in times.items()}


def _with(cfg: Config, overrides: dict) -> Config:
    from pipeline.config import load_config
    origin = None if cfg._origin == "<defaults>" else cfg._origin
    return load_config(origin, {"root": cfg.root, **overrides})


def _cifar_online(batch: int = 2) -> dict:
    """The online teacher's cost on the CIFAR-size pair: WRN-28-10 TRADES step vs the same step plus the EDM CIFAR-10
    forward truncated at dec.8x8_in1, timed here and counted in FLOPs."""
    import tempfile

    from pipeline.bench.gpu import FULL, _job
    from pipeline.bench.gpu_parts import bench_steps, step_batches, teacher_targets
    from stages.edm.networks import EDMPrecond
    from stages.extract import check_layer
    sizes = dataclasses.replace(FULL, train_batch=batch, loader_samples=64, loader_workers=0)
    torch.manual_seed(0)
    net = EDMPrecond(**sizes.net).eval().requires_grad_(False)
    layer = check_layer(net, "dec.8x8_in1")
    with tempfile.TemporaryDirectory() as work:
        job = _job(Path(work), sizes, net, layer, Console(quiet=True))
        batches = step_batches(job, 3)
        sigma = NoiseLevel.from_timestep(100).sigma
        timed = bench_steps(job, net, layer, sigma, batches, torch.device("cpu"), ("float32",))
        trainer = Trainer(job.without_dra(), Dist())
        step_flops = count_flops(lambda: trainer.train_step(batches[0]))
        teacher_flops = count_flops(lambda: teacher_targets(net, batches[0]["images"], batches[0]["labels"], sigma,
                                                            layer))
    base = timed["float32/DM-AT"]["seconds"]
    return {"batch": batch, "step_seconds": base, "online_ratio": timed["float32/DRA online"]["seconds"] / base,
            "stored_ratio": timed["float32/DRA stored"]["seconds"] / base,
            "flop_ratio": (step_flops + teacher_flops) / step_flops,
            "gflop_step_per_image": step_flops / batch / 1e9, "gflop_teacher_per_image": teacher_flops / batch / 1e9}


def _report(r: dict, console: Console) -> None:
    table = Table("measure", "value", title=f"bench targets: {r['images']} real images, {r['views']} stored views, "
                                            f"layer {r['layer']}")
    for name, value in r["errors"].items():
        table.add_row(f"relative error: {name}" if name != "shift kept cells" else "whole-cell shift keeps",
                      f"{value:.2%}" if name == "shift kept cells" else f"{value:.4f}")
    for name, v in r["steps"].items():
        table.add_row(f"step {name}", f"{v['seconds'] * 1000:,.1f} ms = {v['ratio']:.3f} x DM-AT")
    if "cifar" in r:
        c = r["cifar"]
        table.add_row(f"CIFAR pair, batch {c['batch']}: online / DM-AT", f"{c['online_ratio']:.3f} measured, "
                      f"{c['flop_ratio']:.3f} by FLOPs ({c['gflop_teacher_per_image']:.1f} + "
                      f"{c['gflop_step_per_image']:.1f} GFLOP)")
    console.print(table)
    views_step = r["steps"]["views"]["ratio"]
    console.print(f"goals: stored-views error <= {GOAL_ERROR} "
                  f"({'met' if r['errors']['stored views'] <= GOAL_ERROR else 'not met'}), "
                  f"cached-views step <= {GOAL_STEP} x DM-AT ({views_step:.3f}: "
                  f"{'met' if views_step <= GOAL_STEP else 'not met'})",
                  highlight=False)
    console.print(f"target error under the training augmentation: stored views {r['errors']['stored views']:.4f}, "
                  f"whole-cell shift {r['errors']['whole-cell shift']:.4f}", highlight=False)
