"""`dra-pipe bench generate`: the Ray generate pipeline against the bare sampler, in one run.

bare      `sample()` on precomputed latents in this process: the same model, sampler, batch and torch
          threads as one worker; no Ray, no per-sample noise derivation, no encoding, no writing.
pipeline  generate's machinery on a local Ray (ray.num_cpus, ray.cpu_actors): per-sample noise, sampling,
          uint8 conversion, PNG + tar + fsync in the overlapping finish, manifest written by the driver.
          Timed from the first shard handed out to the last one recorded; actor start-up (process,
          imports, model load) is reported separately.
ratio     pipeline / (bare x workers). The bare rate is measured before and after the pipeline and
          averaged, since this machine is shared. Goal: >= 0.9 on the 2-core CPU with the digits model,
          >= 0.97 on a GPU.
"""
from __future__ import annotations

import shutil
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from pipeline.config import Config
from pipeline.models import fit_settings, resolve_model_spec
from pipeline.shards.cluster import cluster_nodes, plan_actors, ray_session
from pipeline.shards.runner import run_shards
from stages.edm.networks import EDMPrecond
from stages.fit_diffusion import network_config
from stages.generate import (
    GenerateSettings,
    GenerateWorker,
    absolute_spec,
    generated_identity,
    load_generator_model,
    pick_device,
)
from stages.models import save_own
from stages.noise import labels_for, latents_for
from stages.samplers import sample
from stores.errors import UserError
from stores.images import ImageSetWriter
from stores.manifest import ShardJob

SET_NAME = "bench-gen"


def bench_generate(cfg: Config, work: Path, n: int | None, console: Console) -> dict:
    """Measure bare sampler and pipeline images/s in one run; print a table and the ratio; return the numbers.

    n: images the pipeline generates (default: 4 shards per worker).
    """
    work = Path(work).resolve()
    spec = _model_spec(cfg, work, console)
    model = load_generator_model(spec)
    g = cfg.generate
    settings = GenerateSettings(g.sampler, g.steps, g.churn, g.seed, g.batch_size, cfg.data.image_format,
                                cfg.model.dtype).check()
    with ray_session(None, cfg.ray.num_cpus):
        plan = plan_actors(cluster_nodes(), cfg.ray.cpu_actors)
        n = n or 4 * cfg.data.shard_size * plan.actors
        console.print(f"bench generate: {n:,} images, {settings.sampler} {settings.steps} steps, batch "
                      f"{settings.batch_size}, {plan.describe()}, model {spec}", highlight=False)
        before = bare_rate(model, settings, plan.threads)
        run = pipeline_run(spec, model, settings, cfg, plan, work, n)
        after = bare_rate(model, settings, plan.threads)
    result = {"bare_before": before, "bare_after": after, "pipeline": run["rate"], "workers": plan.actors,
              "ratio": run["rate"] / ((before + after) / 2 * plan.actors), "busy": run["busy"],
              "startup_s": run["startup_s"], "n": n}
    _report(result, console)
    return result


def bare_rate(model, settings: GenerateSettings, threads: int, batches: int = 2) -> float:
    """images/s of the sampler alone on full batches, after one warm-up batch."""
    device = pick_device()
    model = model.to(device)
    ids = list(range(settings.batch_size))
    latents = latents_for(ids, (model.img_channels, model.img_resolution, model.img_resolution),
                          settings.seed).to(device)
    labels = labels_for(ids, model.label_dim, settings.seed).to(device)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sample(settings.sampler, model, latents, labels, **settings.sampler_options(ids))
        started = time.perf_counter()
        for _ in range(batches):
            x = sample(settings.sampler, model, latents, labels, **settings.sampler_options(ids))
        x.cpu()
        return batches * len(ids) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(saved)


def pipeline_run(spec: str, model, settings: GenerateSettings, cfg: Config, plan, work: Path, n: int) -> dict:
    """Generate n images into a fresh set under `work` with the Ray shard runner."""
    identity = generated_identity(model, settings, cfg.data.shard_size, None)
    shutil.rmtree(work / "images" / SET_NAME, ignore_errors=True)
    writer = ImageSetWriter(work, SET_NAME, identity, n)
    writer.begin()
    jobs = [ShardJob(p.index, p.first_id, p.count) for p in writer.pending()]
    factory = partial(GenerateWorker, spec, settings, str(writer.path))
    summary = run_shards(jobs, factory, plan, max_attempts=cfg.ray.max_retries,
                         record=lambda job, record: writer.record(record))
    return {"rate": summary.items / summary.seconds, "busy": summary.busy_fraction,
            "startup_s": summary.startup_seconds}


def _model_spec(cfg: Config, work: Path, console: Console) -> str:
    """The configured model; for `fit` before fit-diffusion ran, an untrained network of the same shape."""
    try:
        return absolute_spec(resolve_model_spec(cfg))
    except UserError:
        if cfg.model.spec != "fit":
            raise
    digits = SimpleNamespace(resolution=8, channels=1, classes=10)      # the embedded data set's shape
    torch.manual_seed(0)
    net = EDMPrecond(**network_config(digits, fit_settings(cfg))).eval()
    folder = work / "untrained-digits-model"
    save_own(net, folder, {"made_by": "bench generate", "trained": False})
    console.print("no fitted model yet: timing an untrained network of fit-diffusion's digits architecture "
                  "(speed does not depend on the weights)")
    return f"dra:{folder}"


def _report(r: dict, console: Console) -> None:
    table = Table("measure", "value", title="bench generate")
    table.add_row("bare sampler images/s (before, after)", f"{r['bare_before']:,.1f}, {r['bare_after']:,.1f}")
    table.add_row(f"pipeline images/s ({r['workers']} worker{'s' if r['workers'] != 1 else ''})",
                  f"{r['pipeline']:,.1f}")
    table.add_row("model busy (share of pipeline time in compute)", f"{r['busy']:.0%}")
    table.add_row("worker start-up (not timed above)", f"{r['startup_s']:.1f} s")
    console.print(table)
    goal = 0.97 if torch.cuda.is_available() else 0.9
    console.print(f"pipeline / (bare x workers): {r['ratio']:.3f} (goal >= {goal})")
