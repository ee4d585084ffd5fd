"""Generate: N class-conditional images from the configured model into a generated image set, on Ray workers.

Wires `stages.generate` (the sampling worker and the set's identity) to `pipeline.shards` (actors, overlap,
retries) and the image store (the driver records each shard after its data). With fewer shards than workers,
each shard is sampled in parts by several workers and written whole by the driver (pipeline.shards.parts).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import Config, parse_count
from pipeline.console import console, human_bytes, shard_list
from pipeline.shards.parts import ComputeOnly, ShardAssembler, split_jobs
from pipeline.workflow import generated_set, real_train_set
from stores.images import ImageSet, ImageSetWriter, ShardPlans, plan_shards, validate_set_name
from stores.manifest import ShardRecord
from stores.workspace import check_writable

if TYPE_CHECKING:                      # Ray, torch and the stage load only when a command needs them
    from pipeline.shards.cluster import ActorPlan
    from pipeline.shards.runner import Progress, RunSummary
    from stages.generate import GenerateSettings
    from stores.manifest import ShardJob

PROBE_IMAGES_CPU = 32


@dataclass
class GenerateJob:
    """Everything validated before anything is written."""
    n: int
    name: str
    shard_size: int
    spec: str
    settings: GenerateSettings
    model: object                      # the loaded model (a published stand-in when planning without the file)
    writer: ImageSetWriter | None      # None when only planning: the model file is not here
    pending: ShardPlans                # lazy: len() and .samples are arithmetic
    stand_in: str | None = None        # what stands in for a model that is not here yet (dry runs), as a note

    @property
    def shards(self) -> int:
        return len(plan_shards(self.n, self.shard_size))


def prepare(cfg: Config, dry_run: bool = False) -> GenerateJob:
    """Parse and check every input (UserError on the first bad one); nothing is written.

    A dry run without the model (a published EDM checkpoint that is not on this machine, or `fit` before
    fit-diffusion has run) plans with a randomly initialised network of its architecture (pipeline.plans.inputs):
    costs do not need weights.
    """
    from pipeline.models import resolve_model_spec
    from pipeline.plans.inputs import teacher_for_plan
    from stages.generate import GenerateSettings, absolute_spec, generated_identity, require_conditional
    from stages.models import load_model
    g = cfg.generate
    n = parse_count(g.n)
    name = validate_set_name(generated_set(cfg))
    settings = GenerateSettings(g.sampler, g.steps, g.churn, g.seed, g.batch_size, cfg.data.image_format,
                                cfg.model.dtype).check()
    if dry_run:
        model, spec, stand_in = teacher_for_plan(cfg)
        spec = absolute_spec(spec) if spec else cfg.model.spec
    else:
        spec = absolute_spec(resolve_model_spec(cfg))
        model, stand_in = load_model(spec), None
    require_conditional(model, spec)
    if stand_in:
        return GenerateJob(n, name, cfg.data.shard_size, spec, settings, model, None,
                           plan_shards(n, cfg.data.shard_size), stand_in)
    root = Path(cfg.root).resolve()
    check_writable(root)
    identity = generated_identity(model, settings, cfg.data.shard_size, class_names(cfg))
    from pipeline.models import model_provenance
    provenance = {**model_provenance(spec, root), "batch_size": settings.batch_size}
    writer = ImageSetWriter(root, name, identity, n, provenance)
    return GenerateJob(n, name, cfg.data.shard_size, spec, settings, model, writer, writer.pending())


def class_names(cfg: Config) -> list[str] | None:
    """Known for the fitted model: the names of the real training set it was fitted on."""
    if cfg.model.spec != "fit":
        return None
    return ImageSet.open(Path(cfg.root), real_train_set(cfg)).identity.get("class_names")


def run_generate(cfg: Config, dry_run: bool = False, on_progress: Callable[[Progress], None] | None = None,
                 poll_seconds: float = 0.5, wait: bool = False) -> RunSummary | None:
    """Plan, then generate the missing shards (none if the set is complete). Returns the run's summary.

    on_progress sees the runner's progress (workers, their pids and shards) every poll_seconds. The set is locked
    before Ray starts (refused while another process writes it, or waited for with `wait`).
    """
    from pipeline.shards.cluster import cluster_nodes, plan_actors, ray_session
    job = prepare(cfg, dry_run)
    if job.writer is not None and job.writer.damaged:
        console.print(f"{job.name}: shard(s) {shard_list(job.writer.damaged)} are damaged (deleted, truncated or "
                      f"corrupted); redoing them", highlight=False)
    if not job.pending:
        console.print(f"{job.name} is complete: {job.n:,} images in {job.shards} shards - nothing to do",
                      highlight=False)
        return None
    if dry_run and not cfg.ray.address:
        show_plan(job, plan_actors(local_nodes(cfg), cfg.ray.cpu_actors), cfg)
        console.print("dry run: nothing written")
        return None
    with job.writer.lock(wait) if not dry_run else nullcontext(), ray_session(cfg.ray.address, cfg.ray.num_cpus):
        actors = plan_actors(cluster_nodes(), cfg.ray.cpu_actors)
        show_plan(job, actors, cfg)
        if dry_run:
            console.print("dry run: nothing written")
            return None
        return execute(job, actors, cfg.ray.max_retries, on_progress, poll_seconds)


def local_nodes(cfg: Config) -> list[dict]:
    """What a local `ray.init(num_cpus=...)` would offer, without starting it."""
    import torch
    return [{"CPU": cfg.ray.num_cpus, "GPU": torch.cuda.device_count()}]


def show_plan(job: GenerateJob, actors: ActorPlan, cfg: Config | None = None) -> None:
    """N, shards, bytes and time: measured here (a probe batch, or one timed network evaluation when a probe
    would take long) and, from the network's counted FLOPs, GPU-hours at the stated rate (pipeline.estimates)."""
    from pipeline.estimates import describe_hours, forward_flops, gpu_hours
    from stages.generate import estimate_bytes
    s = job.settings
    todo = job.pending.samples                    # arithmetic: N may be 10^10
    done = job.shards - len(job.pending)
    here = measure_here(job, actors)
    per_image, how = (here.bytes_per_image, f"from a {here.images}-image probe") if here.bytes_per_image else \
        stated_bytes_per_image(job, cfg)
    flops = forward_flops(job.model) * s.nfe
    console.print(f"plan: {job.n:,} images -> {job.name}: {job.shards:,} shards of up to {job.shard_size:,}"
                  + (f" ({done:,} complete, skipping them; {len(job.pending):,} to generate)" if done else ""),
                  highlight=False)
    if job.stand_in:
        console.print(f"      {job.stand_in}", highlight=False, soft_wrap=True)
    console.print(f"      ~{human_bytes(estimate_bytes(job.n, job.shards, per_image))} on disk "
                  f"({per_image:,.0f} B/image, {how})", highlight=False, soft_wrap=True)
    console.print(f"      compute: {s.sampler} {s.steps} steps = {s.nfe} network evaluations x "
                  f"{flops / s.nfe / 1e9:,.3g} GFLOP = {flops / 1e9:,.4g} GFLOP per image in {s.dtype}; "
                  f"{describe_hours(gpu_hours(flops * todo), actors.actors if actors.num_gpus else 1)}",
                  highlight=False, soft_wrap=True)
    console.print(f"      here: ~{_duration(todo / (here.images_per_s * actors.actors))} at "
                  f"~{here.images_per_s * actors.actors:,.3g} images/s ({actors.describe()}; batch {s.batch_size}; "
                  f"{here.how})", highlight=False, soft_wrap=True)


PROBE_SECONDS = 15.0               # longest a dry run's sampling probe may take; beyond it, time one evaluation


@dataclass
class HereRate:
    images_per_s: float            # one worker
    images: int                    # images behind the figure
    how: str
    bytes_per_image: float | None  # encoded size of probe samples (None when no samples were drawn)


def measure_here(job: GenerateJob, actors: ActorPlan) -> HereRate:
    """One worker's speed on this machine: a sampling probe (which also gives the encoded size, unless a
    randomly initialised stand-in drew the samples) when it is short, else one timed batch of network evaluations
    times the sampler's evaluation count."""
    import torch

    from stages.generate import probe, time_forward
    s = job.settings
    batch = min(job.n, s.batch_size if torch.cuda.is_available() else min(s.batch_size, PROBE_IMAGES_CPU))
    forward_s = time_forward(job.model, min(batch, 4), actors.threads, s.dtype)      # seconds per image per evaluation
    if forward_s * s.nfe * batch <= PROBE_SECONDS:
        p = probe(job.model, s, batch, actors.threads)           # a stand-in's random weights draw noise: no sizes
        return HereRate(p.images_per_s, p.images, f"from a {p.images}-image probe",
                        None if job.stand_in else p.bytes_per_image)
    return HereRate(1 / (forward_s * s.nfe), min(batch, 4),
                    f"measured {forward_s * 1e3:,.0f} ms per evaluation per image x {s.nfe}", None)


def stated_bytes_per_image(job: GenerateJob, cfg: Config | None) -> tuple[float, str]:
    """Bytes per stored sample without samples to encode: the real training set's, when it is here and has the
    model's shape (generated images compress like real ones), else the bound of an incompressible image."""
    from stages.generate import incompressible_bytes
    m = job.model
    if cfg is not None:
        real = real_train_set(cfg)
        try:
            images = ImageSet.open(Path(cfg.root), real)
        except Exception:                              # absent or unreadable: fall back to the bound
            images = None
        shape = (m.img_resolution, m.img_channels)
        if images is not None and images.complete and (images.resolution, images.channels) == shape \
                and images.identity.get("image_format") == job.settings.image_format:
            return images.bytes_on_disk() / images.n, f"as the real set {real}"
    return float(incompressible_bytes(m, job.settings.image_format)), \
        "at most: an incompressible image in 512-byte tar blocks with its label; natural images take less"


def execute(job: GenerateJob, actors: ActorPlan, max_attempts: int,
            on_progress: Callable[[Progress], None] | None = None, poll_seconds: float = 0.5) -> RunSummary:
    """Write dataset.json, then the missing shards on Ray; the driver records each one after its data."""
    from pipeline.shards.progress import run_with_progress
    from stages.generate import GenerateWorker, remove_temporaries
    from stores.manifest import ShardJob
    job.writer.begin()
    remove_temporaries(job.writer.path)
    jobs = [ShardJob(p.index, p.first_id, p.count) for p in job.writer.pending()]      # read under the lock
    factory = partial(GenerateWorker, job.spec, job.settings, str(job.writer.path))
    record = partial(_record, job.writer)
    parts = split_jobs(jobs, actors.actors, job.settings.batch_size)
    if len(parts) > len(jobs):                     # fewer shards than workers: every worker samples a part
        assembler = ShardAssembler(jobs, parts, partial(_write_whole, job, time.perf_counter()))
        factory, record = ComputeOnly(factory), assembler.record
    summary = run_with_progress("generate", "images", parts, factory, actors, max_attempts, record,
                                on_progress, poll_seconds, kept=partial(_kept, job))
    summary.shards = len(jobs) if len(parts) > len(jobs) else summary.shards
    show_summary(job, summary, actors)
    return summary


def _write_whole(job: GenerateJob, started: float, shard: ShardJob, sampled: list[tuple]) -> None:
    """Write and record a shard from its parts' (images, labels, started), in id order."""
    from stores.tarshard import write_tar_shard
    images, labels = np.concatenate([s[0] for s in sampled]), np.concatenate([s[1] for s in sampled])
    record = write_tar_shard(job.writer.path, shard.index, shard.first_id, images, labels,
                             job.settings.image_format, started)
    _record(job.writer, shard, record)


def _kept(job: GenerateJob) -> str:
    return (f"{job.shards - len(job.writer.pending())} of {job.shards} shards of {job.name} are complete; rerun the "
            f"same command to resume")


def _record(writer: ImageSetWriter, job: ShardJob, shard: ShardRecord) -> None:
    """The manifest gets the shard the job asked for, after its file is in place."""
    if (shard.index, shard.first_id, shard.count) != (job.index, job.first_id, job.count):
        raise RuntimeError(f"worker returned shard {shard.index} [{shard.first_id}, +{shard.count}) for job {job}")
    writer.record(shard)


def show_summary(job: GenerateJob, summary: RunSummary, actors: ActorPlan) -> None:
    rate = summary.items / max(summary.seconds, 1e-9)
    nodes = len(summary.shards_per_node)
    counts = (("retries", summary.retries), ("workers replaced", summary.replaced))
    extra = "".join(f", {k} {v}" for k, v in counts if v)
    if len(summary.items_per_worker) > 1:
        extra += ", per worker " + " / ".join(f"{w} {n:,}" for w, n in sorted(summary.items_per_worker.items()))
    console.print(f"generated {summary.items:,} images ({summary.shards} shards) in {summary.seconds:.1f} s: "
                  f"{rate:,.1f} images/s on {actors.describe()}, {nodes} node{'s' if nodes != 1 else ''}, "
                  f"model busy {summary.busy_fraction:.0%}{extra}", highlight=False, soft_wrap=True)
    s = ImageSet(job.writer.path)
    state = "complete" if s.complete else f"{len(s.missing_shards())} shards missing"
    console.print(f"{s.name}: {state}, {s.n:,} images, fingerprint {s.fingerprint[:12]}", highlight=False)


def _duration(seconds: float) -> str:
    from pipeline.estimates import duration
    return duration(seconds)
