"""Stage 2 as the pipeline runs it (`dra-pipe train`, the train stage of `run` and `sweep`): plan the Job, show a
dry run's cost, or train (or resume) the run to the end in this process or on Ray Train workers."""
from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline.config import Config
from pipeline.console import console, report_interrupt
from pipeline.progress import RateBar
from stores import remote
from stores.workspace import check_writable

RESUME_HINT = "rerun the same command to resume from the last checkpoint"


def run_train(cfg: Config, name: str | None = None, features: str | None = None, dry_run: bool = False,
              wait: bool = False, group: dict | None = None) -> dict:
    """Plan, then train (or resume) to the end; returns the last metrics row. The run folder is locked from before
    its config.yaml and run.json are written to the end (this driver holds it while Ray Train workers write).
    A Ctrl-C while training is reported (one line) and raised again as KeyboardInterrupt.
    group: the sweep and cell the run is trained for (its trackers group by them)."""
    from dataclasses import replace

    from pipeline.plans.train import make_job
    from trainer.trackers import check_loggers
    planned: list[str] | None = [] if dry_run else None
    job = replace(make_job(cfg, name, features, planned), group=group)
    if dry_run:
        show_plan(job, planned)
        return {}
    check_loggers(job.settings.loggers)
    check_writable(Path(cfg.root))
    from pipeline.plans.teacher import teacher_for
    teacher = teacher_for(job, Path(cfg.root))             # online mode: checked before the run folder is written
    with contextlib.ExitStack() as stack:
        if job.settings.workers > 1:              # checked to hold the workers before the run folder is written
            from trainer.distributed import training_cluster
            stack.enter_context(training_cluster(job.settings.workers, cfg.ray.address, cfg.ray.num_cpus))
        return _prepare_and_train(job, wait, teacher)


def _prepare_and_train(job, wait: bool, teacher=None) -> dict:
    from trainer.runs import RunFolder
    run = RunFolder(job.run_dir)
    with run.lock(wait):
        remote.bring(run.path)                  # an object store's root: the checkpoint to resume from
        return _train_run(job, run, teacher)


def _train_run(job, run, teacher=None) -> dict:
    from pipeline.plans.train import describe
    status = run.prepare(job.identity(), job.config)
    if status == "finished":
        console.print(f"run {job.name} is complete ({run.final}) - nothing to do", highlight=False)
        return run.read_metrics()[-1] if run.read_metrics() else {}
    for line in describe(job):
        console.print(line, highlight=False)
    if status == "resume":
        console.print(f"resuming from {run.checkpoint}", highlight=False)
    try:
        _train_somewhere(job, teacher)
    except BaseException:
        if status == "new" and not run.checkpoint.exists():
            run.discard()                          # nothing trained yet: leave no folder that looks like a run
        raise
    return _summary(run)


def _train_somewhere(job, teacher=None) -> None:
    if job.settings.workers > 1:
        from trainer.distributed import train_distributed
        try:
            train_distributed(job, job.settings.workers, teacher)
        except KeyboardInterrupt:
            report_interrupt(RESUME_HINT)
            raise
    else:
        _train_here(job, teacher)


def _summary(run) -> dict:
    rows = run.read_metrics()
    if rows:
        console.print(f"done: {epoch_line(rows[-1])}", highlight=False)
    console.print(f"saved {run.final} (the last EMA weights) and {run.metrics}", highlight=False, soft_wrap=True)
    if run.best.exists():
        import torch
        chosen = torch.load(run.best, map_location="cpu", weights_only=True)["selected"]
        console.print(f"best.pt: epoch {chosen['epoch']}, the best by {chosen['by']} ({chosen['pgd_acc']:.2%}); eval, "
                      f"report and export use it (eval.weights: best)", highlight=False, soft_wrap=True)
    return rows[-1] if rows else {}


def _train_here(job, teacher=None) -> None:
    """Train in this process, with a progress bar of the loss terms and images/s."""
    from trainer.loop import Dist, set_cpu_threads, train
    from trainer.runs import RunFolder
    set_cpu_threads(job.settings.loader_workers)
    checkpoint = RunFolder(job.run_dir).load_checkpoint()
    remaining = job.total_steps - (checkpoint["step"] if checkpoint else 0)
    shown = {"terms": ""}

    def on_step(step: int, images: int, terms: dict) -> None:
        if step % 5 == 0 or step == job.total_steps:          # .item() syncs a GPU: not every step
            shown["terms"] = " ".join(f"{k} {float(v):.3f}" for k, v in terms.items())
        bar.advance(1, f"{shown['terms']}  {bar.rate * images:,.0f} images/s")

    with RateBar(f"train {job.name}", "steps", total=remaining) as bar:
        try:
            train(job, Dist.local(), on_step=on_step, teacher=teacher,
                  on_epoch=lambda row: console.print(epoch_line(row), highlight=False))
        except KeyboardInterrupt:
            bar.close()
            report_interrupt(RESUME_HINT)
            raise


def epoch_line(row: dict) -> str:
    terms = " ".join(f"{k} {row[k]:.4f}" for k in ("loss", "ce", "kl", "dra") if k in row)
    acc = f", held-out clean {row['clean_acc']:.3f} PGD {row['pgd_acc']:.3f}" if "clean_acc" in row else ""
    return f"epoch {row['epoch']}: {terms}{acc}, {row['images_per_s']:,.0f} images/s"


def show_plan(job, planned: list[str] | None = None) -> None:
    """The plan, then its cost: FLOPs counted on the real networks, GPU-hours at the stated rate, time here."""
    from pipeline.plans.costs import classifier_line, step_cost
    from pipeline.plans.train import describe
    from trainer.loop import set_cpu_threads
    for note in planned or []:
        console.print(f"planned: {note}", highlight=False, soft_wrap=True)
    for line in [*describe(job), classifier_line(job)]:
        console.print(line, highlight=False, soft_wrap=True)
    set_cpu_threads(job.settings.loader_workers)
    _show_cost(job, step_cost(job))
    console.print("dry run: nothing trained" + (" (the planned stores must exist before training)" if planned else ""),
                  highlight=False)


def _show_cost(job, cost) -> None:
    from pipeline.estimates import describe_hours, duration, gpu_hours
    s = job.settings
    images = job.total_steps * s.batch_size
    held_out = (job.holdout[1] - job.holdout[0]) * s.epochs
    flops = images * cost.flops_per_image + held_out * cost.holdout_flops_per_image
    console.print(f"compute: {cost.flops_per_image / 1e9:,.4g} GFLOP per training image (counted: {s.objective}, "
                  f"{s.attack_steps} attack steps{', DRA head' if job.dra else ''}, backward) x {images:,} images; "
                  f"held-out evaluation {cost.holdout_flops_per_image / 1e9:,.3g} GFLOP per image x {held_out:,}",
                  highlight=False, soft_wrap=True)
    console.print(f"{describe_hours(gpu_hours(flops), s.workers)}", highlight=False, soft_wrap=True)
    per_rank = s.batch_size // s.workers
    step = cost.seconds_per_image * per_rank
    console.print(f"here: measured {step:.3g} s per step of {per_rank} images per rank "
                  f"({1 / cost.seconds_per_image:,.3g} images/s, timed on a synthetic batch of {cost.timed_batch}): "
                  f"about {duration(job.total_steps * step)} for {job.total_steps:,} steps, plus the per-epoch "
                  f"held-out evaluation", highlight=False, soft_wrap=True)
