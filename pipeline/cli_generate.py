"""`dra-pipe generate`: N class-conditional images from the configured model, on Ray workers.

Wires `stages.generate` (the sampling worker and the set's identity) to `pipeline.shard_runner`
(actors, overlap, retries) and the image store (the driver records each shard after its data).
pipeline.cli imports this module while it loads, so this module takes what it needs from pipeline.cli
inside functions; either module may be imported first.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from pipeline.config import Config, parse_count
from pipeline.stores.images import ImageSet, ImageSetWriter, ShardPlan, plan_shards, validate_set_name
from pipeline.stores.manifest import ShardRecord
from pipeline.workflow import generated_set, real_train_set

if TYPE_CHECKING:                      # Ray, torch and the stage load only when a command needs them
    from pipeline.shard_runner import ActorPlan, Progress, RunSummary, ShardJob
    from stages.generate import GenerateSettings

PROBE_IMAGES_CPU = 32


def register(app: typer.Typer) -> None:
    """Add `generate` to the CLI. pipeline.cli calls this while it loads, so its shared options are
    looked up here rather than when this module is imported (which may happen first)."""
    from pipeline.cli import ConfigOpt, RootOpt
    app.command("generate")(_command(ConfigOpt, RootOpt))


def _command(config_opt, root_opt):
    def generate_cmd(
        n: Optional[str] = typer.Option(None, "--n", help="images to generate: 50000, 1.5k, 20M, 1e6 [config generate.n]"),
        name: Optional[str] = typer.Option(None, "--name", help="generated image-set name [config generate.name, else <data name>-gen]"),
        seed: Optional[int] = typer.Option(None, "--seed", help="run seed: sample i depends only on (seed, i) [config generate.seed]"),
        sampler: Optional[str] = typer.Option(None, "--sampler", help="heun | euler | dpm-solver [config generate.sampler]"),
        steps: Optional[int] = typer.Option(None, "--steps", help="sampler steps [config generate.steps]"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per sampler call [config generate.batch_size]"),
        address: Optional[str] = typer.Option(None, "--address", help="join a running Ray cluster: auto or HOST:PORT [config ray.address; default: a local Ray]"),
        workers: Optional[int] = typer.Option(None, "--workers", help="CPU workers when there is no GPU [config ray.cpu_actors]"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (shards, bytes, time) and stop"),
        config: Path = config_opt, root: Optional[Path] = root_opt,
    ):
        """Generate N class-conditional images into a generated image set, on Ray workers (resumable)."""
        from pipeline.cli import resolve
        from pipeline.shard_runner import ShardFailed, WorkerStartError
        cfg = resolve(config, root, {"generate.n": n, "generate.name": name, "generate.seed": seed,
                                     "generate.sampler": sampler, "generate.steps": steps, "generate.batch_size": batch_size,
                                     "ray.address": address, "ray.cpu_actors": workers})
        try:
            run_generate(cfg, dry_run)
        except KeyboardInterrupt:
            raise typer.Exit(130)
        except (ShardFailed, WorkerStartError) as exc:
            print(f"error: {exc}; finished shards are kept, rerun the same command to resume", file=sys.stderr)
            raise typer.Exit(1)
    return generate_cmd


@dataclass
class GenerateJob:
    """Everything validated before anything is written."""
    n: int
    spec: str
    settings: GenerateSettings
    model: object              # the loaded model, for the probe
    writer: ImageSetWriter
    pending: list[ShardPlan]

    @property
    def name(self) -> str:
        return self.writer.path.name

    @property
    def shards(self) -> int:
        return len(plan_shards(self.n, self.writer.identity["shard_size"]))


def prepare(cfg: Config) -> GenerateJob:
    """Parse and check every input (UserError on the first bad one); nothing is written."""
    from pipeline.cli import resolve_model_spec
    from pipeline.workspace import check_writable
    from stages.generate import GenerateSettings, absolute_spec, generated_identity, load_generator_model
    g = cfg.generate
    n = parse_count(g.n)
    name = validate_set_name(generated_set(cfg))
    settings = GenerateSettings(g.sampler, g.steps, g.churn, g.seed, g.batch_size, cfg.data.image_format).check()
    spec = absolute_spec(resolve_model_spec(cfg))
    model = load_generator_model(spec)
    root = Path(cfg.root).resolve()
    check_writable(root)
    identity = generated_identity(model, settings, cfg.data.shard_size, class_names(cfg))
    writer = ImageSetWriter(root, name, identity, n)
    return GenerateJob(n, spec, settings, model, writer, writer.pending())


def class_names(cfg: Config) -> list[str] | None:
    """Known for the fitted model: the names of the real training set it was fitted on."""
    if cfg.model.spec != "fit":
        return None
    return ImageSet.open(Path(cfg.root), real_train_set(cfg)).identity.get("class_names")


def run_generate(cfg: Config, dry_run: bool = False, on_progress: Callable[[Progress], None] | None = None,
                 poll_seconds: float = 0.5) -> RunSummary | None:
    """Plan, then generate the missing shards (none if the set is complete). Returns the run's summary.

    on_progress sees the runner's progress (workers, their pids and shards) every poll_seconds.
    """
    from pipeline.cli import console
    from pipeline.shard_runner import cluster_nodes, plan_actors, ray_session
    job = prepare(cfg)
    if not job.pending:
        console.print(f"{job.name} is complete: {job.n:,} images in {job.shards} shards - nothing to do", highlight=False)
        return None
    if dry_run and not cfg.ray.address:
        show_plan(job, plan_actors(local_nodes(cfg), cfg.ray.cpu_actors))
        console.print("dry run: nothing written")
        return None
    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        actors = plan_actors(cluster_nodes(), cfg.ray.cpu_actors)
        show_plan(job, actors)
        if dry_run:
            console.print("dry run: nothing written")
            return None
        return execute(job, actors, cfg.ray.max_retries, on_progress, poll_seconds)


def local_nodes(cfg: Config) -> list[dict]:
    """What a local `ray.init(num_cpus=...)` would offer, without starting it."""
    import torch
    return [{"CPU": cfg.ray.num_cpus, "GPU": torch.cuda.device_count()}]


def show_plan(job: GenerateJob, actors: ActorPlan) -> None:
    """N, shards, bytes (from a probe batch encoded as in the shards) and time (from its measured speed)."""
    import torch
    from pipeline.cli import console, human_bytes
    from stages.generate import estimate_bytes, probe
    s = job.settings
    p = probe(job.model, s, min(job.n, s.batch_size if torch.cuda.is_available() else min(s.batch_size, PROBE_IMAGES_CPU)),
              actors.threads)
    todo = sum(plan.count for plan in job.pending)
    shards = job.shards
    size = estimate_bytes(job.n, shards, p.bytes_per_image)
    seconds = todo / (p.images_per_s * actors.actors)
    done = shards - len(job.pending)
    console.print(f"plan: {job.n:,} images -> {job.name}: {shards:,} shards of up to {job.writer.identity['shard_size']:,}"
                  + (f" ({done:,} complete, skipping them; {len(job.pending):,} to generate)" if done else ""), highlight=False)
    console.print(f"      ~{human_bytes(size)} on disk ({p.bytes_per_image:,.0f} B/image), ~{_duration(seconds)} at "
                  f"~{p.images_per_s * actors.actors:,.0f} images/s ({actors.describe()}; {s.sampler} {s.steps} steps, "
                  f"batch {s.batch_size}; from a {p.images}-image probe)", highlight=False)


def execute(job: GenerateJob, actors: ActorPlan, max_attempts: int,
            on_progress: Callable[[Progress], None] | None, poll_seconds: float) -> RunSummary:
    """Write dataset.json, then the missing shards on Ray; the driver records each one after its data."""
    from pipeline.cli import console
    from pipeline.progress import RateBar
    from pipeline.shard_runner import ShardJob, run_shards
    from stages.generate import GenerateWorker, remove_temporaries
    job.writer.begin()
    remove_temporaries(job.writer.path)
    jobs = [ShardJob(p.index, p.first_id, p.count) for p in job.pending]
    factory = partial(GenerateWorker, job.spec, job.settings, str(job.writer.path))
    with RateBar("generate", "images", total=sum(j.count for j in jobs)) as bar:
        try:
            summary = run_shards(jobs, factory, actors, max_attempts=max_attempts, record=partial(_record, job.writer),
                                 on_progress=partial(_show_progress, bar, on_progress), poll_seconds=poll_seconds,
                                 on_event=lambda message: bar.console.print(f"warning: {message}", highlight=False))
        except KeyboardInterrupt:
            bar.close()
            console.print(f"interrupted: {job.shards - len(job.writer.pending())} of {job.shards} shards of {job.name} "
                          f"are complete; rerun the same command to resume")
            raise
    show_summary(job, summary, actors)
    return summary


def _record(writer: ImageSetWriter, job: ShardJob, shard: ShardRecord) -> None:
    """The manifest gets the shard the job asked for, after its file is in place."""
    if (shard.index, shard.first_id, shard.count) != (job.index, job.first_id, job.count):
        raise RuntimeError(f"worker returned shard {shard.index} [{shard.first_id}, +{shard.count}) for job {job}")
    writer.record(shard)


def _show_progress(bar, also: Callable[[Progress], None] | None, p: Progress) -> None:
    bar.advance(p.items_done - bar.done, " | ".join(w.describe() for w in p.workers))
    if also:
        also(p)


def show_summary(job: GenerateJob, summary: RunSummary, actors: ActorPlan) -> None:
    from pipeline.cli import console
    rate = summary.items / max(summary.seconds, 1e-9)
    nodes = len(summary.shards_per_node)
    extra = "".join(f", {k} {v}" for k, v in (("retries", summary.retries), ("workers replaced", summary.replaced)) if v)
    console.print(f"generated {summary.items:,} images ({summary.shards} shards) in {summary.seconds:.1f} s: "
                  f"{rate:,.1f} images/s on {actors.describe()}, {nodes} node{'s' if nodes != 1 else ''}, "
                  f"model busy {summary.busy_fraction:.0%}{extra}", highlight=False, soft_wrap=True)
    s = ImageSet(job.writer.path)
    state = "complete" if s.complete else f"{len(s.missing_shards())} shards missing"
    console.print(f"{s.name}: {state}, {s.n:,} images, fingerprint {s.fingerprint[:12]}", highlight=False)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
