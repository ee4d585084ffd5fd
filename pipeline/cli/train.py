"""`dra-pipe train`: adversarial training (TRADES / PGD-AT) on real + generated images, with or without DRA."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, console, interrupted, resolve, RootOpt, WaitOpt
from pipeline.config import Config
from pipeline.progress import RateBar
from stores.workspace import check_writable


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        name: Optional[str] = typer.Option(None, "--name", help="run folder runs/<name> (default: <arch>-<dra|nodra>-<seed>)"),
        dra: Optional[bool] = typer.Option(None, "--dra/--no-dra", help="add the DRA loss, or train the plain (DM-)AT baseline [config train.dra]"),
        lam: Optional[float] = typer.Option(None, "--lambda", help="weight of the DRA loss [config train.dra_lambda]"),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="epochs of ceil(N_real / batch) steps [config train.epochs]"),
        workers: Optional[int] = typer.Option(None, "--workers", help="data-parallel Ray Train workers [config train.workers]"),
        features: Optional[str] = typer.Option(None, "--features", help="feature-set key to align with (default: found by the config's features section)"),
        targets: Optional[str] = typer.Option(None, "--targets", help="views (stored views, exact) | online (teacher in the step, exact) | shifted (approximation) [config train.dra_targets]"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and an estimated time, train nothing"),
        wait: bool = WaitOpt,
        config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
    ):
        """Train a robust classifier (stage 2), streaming images with their cached diffusion targets."""
        cfg = resolve(config, root, {"train.dra": dra, "train.dra_lambda": lam, "train.epochs": epochs,
                                     "train.workers": workers, "train.dra_targets": targets})
        run_train(cfg, name, features, dry_run, wait)


def run_train(cfg: Config, name: str | None = None, features: str | None = None, dry_run: bool = False,
              wait: bool = False) -> dict:
    """Plan, then train (or resume) to the end; returns the last metrics row. The run folder is locked from before
    its config.yaml and run.json are written to the end (this driver holds it while Ray Train workers write)."""
    from pipeline.plans.train import make_job
    planned: list[str] | None = [] if dry_run else None
    job = make_job(cfg, name, features, planned)
    if dry_run:
        show_plan(job, planned)
        return {}
    check_writable(Path(cfg.root))
    from pipeline.plans.teacher import teacher_for
    teacher = teacher_for(job, Path(cfg.root))             # online mode: checked before the run folder is written
    with contextlib.ExitStack() as stack:
        if job.settings["workers"] > 1:            # checked to hold the workers before the run folder is written
            from trainer.distributed import training_cluster
            stack.enter_context(training_cluster(job.settings["workers"], cfg.ray.address, cfg.ray.num_cpus))
        return _prepare_and_train(job, wait, teacher)


def _prepare_and_train(job, wait: bool, teacher=None) -> dict:
    from trainer.runs import RunFolder
    run = RunFolder(job.run_dir)
    with run.lock(wait):
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
    if job.settings["workers"] > 1:
        from trainer.distributed import train_distributed
        try:
            train_distributed(job, job.settings["workers"], teacher)
        except KeyboardInterrupt:
            raise interrupted("rerun the same command to resume from the last checkpoint")
    else:
        _train_here(job, teacher)
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
    set_cpu_threads(job.settings["loader_workers"])
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
            raise interrupted("rerun the same command to resume from the last checkpoint")


def epoch_line(row: dict) -> str:
    terms = " ".join(f"{k} {row[k]:.4f}" for k in ("loss", "ce", "kl", "dra") if k in row)
    acc = f", held-out clean {row['clean_acc']:.3f} PGD {row['pgd_acc']:.3f}" if "clean_acc" in row else ""
    return f"epoch {row['epoch']}: {terms}{acc}, {row['images_per_s']:,.0f} images/s"


def show_plan(job, planned: list[str] | None = None) -> None:
    """The plan, then its cost: FLOPs counted on the real networks, GPU-hours at the stated rate, time here."""
    from pipeline.estimates import describe_hours, gpu_hours
    from pipeline.plans.costs import step_cost
    from pipeline.plans.train import describe
    from trainer.loop import set_cpu_threads
    for note in planned or []:
        console.print(f"planned: {note}", highlight=False, soft_wrap=True)
    for line in describe(job):
        console.print(line, highlight=False, soft_wrap=True)
    set_cpu_threads(job.settings["loader_workers"])
    s = job.settings
    cost = step_cost(job)
    images = job.total_steps * s["batch_size"]
    held_out = (job.holdout[1] - job.holdout[0]) * s["epochs"]
    flops = images * cost.flops_per_image + held_out * cost.holdout_flops_per_image
    console.print(f"compute: {cost.flops_per_image / 1e9:,.4g} GFLOP per training image (counted: {s['objective']}, "
                  f"{s['attack_steps']} attack steps{', DRA head' if job.dra else ''}, backward) x {images:,} images; "
                  f"held-out evaluation {cost.holdout_flops_per_image / 1e9:,.3g} GFLOP per image x {held_out:,}",
                  highlight=False, soft_wrap=True)
    console.print(f"{describe_hours(gpu_hours(flops), s['workers'])}", highlight=False, soft_wrap=True)
    per_rank = s["batch_size"] // s["workers"]
    step = cost.seconds_per_image * per_rank
    console.print(f"here: measured {step:.3g} s per step of {per_rank} images per rank ({1 / cost.seconds_per_image:,.3g} "
                  f"images/s, timed on a synthetic batch of {cost.timed_batch}): about {_duration(job.total_steps * step)} "
                  f"for {job.total_steps:,} steps, plus the per-epoch held-out evaluation", highlight=False, soft_wrap=True)
    console.print("dry run: nothing trained" + (" (the planned stores must exist before training)" if planned else ""),
                  highlight=False)


def _duration(seconds: float) -> str:
    from pipeline.estimates import duration
    return duration(seconds)
