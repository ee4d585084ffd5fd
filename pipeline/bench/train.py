"""`dra-pipe bench train`: the training loader and step, against the alternatives, in one run.

Data: a synthetic real and generated set (`samples` each) of the configured image shape, with feature sets
of the configured diffusion layer's shape, under <root>/bench/train (reused when present). The diffusion model
is the configured one when it exists, else an untrained network of the fit-diffusion shape (same cost).
  (a) loader: MixedStream through DataLoader(train.loader_workers) plus augmentation, samples/s, next to the
      rate at which the DM-AT+DRA step consumes images;
  (b) step time, one batch of train.batch_size, the configured classifier and objective:
      DM-AT             no head, no targets
      DM-AT+DRA cached  targets streamed from the feature sets (this pipeline)
      DRA naive         targets computed by the diffusion model inside the step (what the cache avoids)
      measured round-robin over the same batches (order alternating); ratios are medians of per-round ratios,
      which a busy shared machine disturbs less than ratios of medians. Goal: cached / DM-AT <= 1.05.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pipeline.config import Config, load_config
from pipeline.models import fit_settings, resolve_model_spec
from pipeline.plans.train import make_job
from pipeline.workflow import real_train_set
from stages.edm.networks import EDMPrecond
from stages.extract import NoiseLevel, check_layer, compute_targets, target_shape
from stages.fit_diffusion import network_config
from stages.models import load_model
from stores.errors import UserError
from stores.features import FeatureSetWriter, write_feature_shard
from stores.identity import short_key
from stores.images import ImageSet, ImageSetWriter, image_set_dir, make_identity
from stores.views import ViewSpec, distinct_augmentations
from trainer.loader import make_loader
from trainer.loop import Dist, Trainer, mix_plan, set_cpu_threads
from trainer.views import align


def bench_train(cfg: Config, console: Console, steps: int = 10, samples: int = 10_000,
                work_dir: Path | None = None) -> dict:
    """Run (a) and (b); print a table and the ratios; return the figures."""
    work = Path(work_dir or Path(cfg.root) / "bench" / "train")
    model, level, layer = _teacher(cfg)
    job, bench_cfg = _build(cfg, work, samples, model, layer, level, console)
    set_cpu_threads(job.settings.loader_workers)
    loader_rate = _loader_rate(job, batches=max(steps * 3, 20))
    times = _step_times(job, model, layer, level, bench_cfg.features.noise_seed, bench_cfg.features.pool, steps)
    return _report(job, loader_rate, times, console)


# --- the diffusion model and the data --------------------------------------------------------------------

def _teacher(cfg: Config):
    """(frozen denoiser, NoiseLevel, layer) as extract-features would use them."""
    try:
        model = load_model(resolve_model_spec(cfg))
    except UserError:                                     # no model yet: an untrained one of the same shape
        res, channels, classes = _real_shape(cfg)
        shape = SimpleNamespace(resolution=res, channels=channels, classes=classes)
        model = EDMPrecond(**network_config(shape, fit_settings(cfg))).eval().requires_grad_(False)
    return model, NoiseLevel.from_timestep(cfg.features.timesteps[0]), check_layer(model, cfg.features.layer)


def _real_shape(cfg: Config) -> tuple[int, int, int]:
    """(resolution, channels, classes) of the real training set, or the digits' when none is imported."""
    path = image_set_dir(Path(cfg.root), real_train_set(cfg))
    if (path / "dataset.json").exists():
        s = ImageSet(path)
        return s.resolution, s.channels, s.classes
    return 8, 1, 10


def _build(cfg: Config, work: Path, samples: int, model, layer: str, level, console: Console):
    """Synthetic bench-train / bench-gen sets with feature sets; returns (job, its config)."""
    res, ch, classes = model.img_resolution, model.img_channels, max(model.label_dim, 2)
    shape = target_shape(model, layer, cfg.features.pool)
    t = cfg.train
    views = ViewSpec(min(cfg.features.views, distinct_augmentations(t.crop_pad, t.flip)), t.crop_pad, t.flip,
                    cfg.features.view_seed)
    # one folder per data shape
    work = work / short_key([samples, res, ch, classes, shape, views.identity(), layer, level.timestep,
                             cfg.features.pool, cfg.data.shard_size, cfg.data.image_format], 8)
    for name, kind, seed in (("bench-train", "real", 0), ("bench-gen", "generated", 1)):
        _write_set(work, name, kind, samples, res, ch, classes, shape, views, cfg, layer, level, seed)
    over = dict(cfg)
    over.update({"root": str(work), "data": {**cfg.data, "name": "bench"}, "generate": {**cfg.generate, "name": None},
                 "features": {**cfg.features, "views": views.count, "views_generated": None},
                 "train": {**cfg.train, "dra": True, "dra_lambda": cfg.train.dra_lambda or 0.5, "workers": 1,
                           "holdout": 0, "unsup_fraction": cfg.train.unsup_fraction or 0.5}})
    bench_cfg = load_config(None, _flatten(over))
    console.print(f"bench train: {samples:,} + {samples:,} synthetic {ch}x{res}x{res} images with "
                  f"{'x'.join(map(str, shape))} targets in {work}", highlight=False)
    return make_job(bench_cfg, "bench"), bench_cfg


def _write_set(work, name, kind, n, res, ch, classes, shape, views, cfg, layer, level, seed) -> None:
    identity = make_identity(kind, {"bench": seed}, res, ch, classes, None, "train", cfg.data.shard_size,
                             cfg.data.image_format)
    writer = ImageSetWriter(work, name, identity, n)
    rng = np.random.default_rng(seed)
    if writer.pending():
        writer.begin()
        for p in writer.pending():
            writer.write(p, rng.integers(0, 256, (p.count, res, res, ch), dtype=np.uint8),
                         rng.integers(0, classes, p.count))
    images = ImageSet(writer.path)
    fid = {"image_set": images.fingerprint, "image_set_name": name, "model": "bench", "layer": layer,
           "timestep": level.timestep, "sigma": level.sigma, "pool": cfg.features.pool, "views": views.identity()}
    fw = FeatureSetWriter(work, fid, n, images.shard_size, shape, views.count)
    fw.begin()
    for i in fw.pending(images.plan_indices()):
        p = images.plan()[i]
        t = rng.standard_normal((p.count, views.count, *shape)).astype(np.float16)
        fw.record(write_feature_shard(fw.path, i, p.first_id, np.arange(p.first_id, p.first_id + p.count), t))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- measurements ------------------------------------------------------------------------------------------

def _loader_rate(job, batches: int) -> float:
    """Samples/s of the rank's loader with augmentation and targets (after a warm-up of a few batches)."""
    plan = mix_plan(job, Dist())
    gen = torch.Generator().manual_seed(0)
    it = iter(make_loader(plan, borrow=True))              # as the training loop consumes it
    for _ in range(3):
        next(it)
    started = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        align(job.dra_targets, b, job.settings.crop_pad, job.settings.flip, gen, job.view_seed)
    return batches * plan.batch_size / (time.perf_counter() - started)


def _step_times(job, model, layer, level, noise_seed: int, pool: str, steps: int) -> dict[str, list[float]]:
    """Seconds per step of the three variants, measured in turn on the same batches."""
    it = iter(make_loader(dataclasses.replace(mix_plan(job, Dist()), loader_workers=0)))
    batches = [next(it) for _ in range(steps + 1)]
    plain = job.without_dra()
    trainers = {"DM-AT": Trainer(plain, Dist()), "DM-AT+DRA cached": Trainer(job, Dist()),
                "DRA naive": Trainer(job, Dist())}
    times = {k: [] for k in trainers}
    for i, batch in enumerate(batches):
        order = list(trainers.items())
        for name, trainer in order if i % 2 else order[::-1]:        # alternate the order: drift cancels
            started = time.perf_counter()
            naive = name == "DRA naive"
            step_batch = _with_computed_targets(batch, model, layer, level, noise_seed, pool) if naive else batch
            trainer.train_step(step_batch)
            if i:                                                     # the first round is a warm-up
                times[name].append(time.perf_counter() - started)
    return times


def _with_computed_targets(batch: dict, model, layer: str, level, noise_seed: int, pool: str) -> dict:
    """The batch with targets from one diffusion forward per image, as a naive step would."""
    t = compute_targets(model, batch["ids"].numpy(), batch["images"].numpy(), batch["labels"].numpy(), layer, level,
                        noise_seed, pool, ViewSpec(1, 0, False),
                        "bench")        # the noise's key does not change the cost timed here
    return {**batch, "targets": torch.from_numpy(t[:, 0])}


def _report(job, loader_rate: float, times: dict, console: Console) -> dict:
    b = job.settings.batch_size
    med = {k: statistics.median(v) for k, v in times.items()}
    consume = b / med["DM-AT+DRA cached"]
    table = Table("measure", "value", title=f"bench train: {job.settings.arch}, {job.settings.objective}, "
                                            f"batch {b}, {job.settings.attack_steps} attack steps")
    table.add_row(f"(a) loader + augmentation ({job.settings.loader_workers} workers)", f"{loader_rate:,.0f} samples/s")
    table.add_row("    DM-AT+DRA step consumes", f"{consume:,.0f} images/s")
    for name, value in med.items():
        table.add_row(f"(b) step {name}", f"{value * 1000:,.1f} ms")
    console.print(table)
    cached = _ratio(times["DM-AT+DRA cached"], times["DM-AT"])
    naive = _ratio(times["DRA naive"], times["DM-AT+DRA cached"])
    console.print(f"loader / consumption: {loader_rate / consume:.1f}x (goal > 1)")
    console.print(f"DM-AT+DRA cached / DM-AT: {cached:.3f} (goal <= 1.05)")
    console.print(f"DRA naive / DM-AT+DRA cached: {naive:.2f}x")
    return {"loader_samples_per_s": loader_rate, "consume_images_per_s": consume,
            **{f"step_s/{k}": v for k, v in med.items()}, "ratio_cached_over_dmat": cached,
            "ratio_naive_over_cached": naive}


def _ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i] (the two were timed next to each other)."""
    return statistics.median(x / y for x, y in zip(a, b))
