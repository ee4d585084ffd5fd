"""`dra-pipe train`: adversarial training (TRADES / PGD-AT) on real + generated images, with or without DRA."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, WaitOpt, exit_once_reported, given, resolve
from pipeline.train import run_train


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        name: Optional[str] = typer.Option(None, "--name", parser=given, help="run folder runs/<name> "
                                                                              "(default: <arch>-<dra|nodra>-<seed>)"),
        dra: Optional[bool] = typer.Option(None, "--dra/--no-dra", help="add the DRA loss, or train the plain (DM-)AT "
                                                                        "baseline [config train.dra]"),
        lam: Optional[float] = typer.Option(None, "--lambda", help="weight of the DRA loss [config train.dra_lambda]"),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="epochs of ceil(N_real / batch) steps "
                                                                    "[config train.epochs]"),
        workers: Optional[int] = typer.Option(None, "--workers", help="data-parallel Ray Train workers "
                                                                      "[config train.workers]"),
        features: Optional[str] = typer.Option(None, "--features", help="feature-set key to align with "
                                                                        "(default: found by the config's features "
                                                                        "section)"),
        targets: Optional[str] = typer.Option(None, "--targets", help="views (stored views, exact) | online "
                                                                      "(teacher in the step, exact) | shifted "
                                                                      "(approximation) [config train.dra_targets]"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and an estimated time, train nothing"),
        wait: bool = WaitOpt,
        config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
    ):
        """Train a robust classifier (stage 2), streaming images with their cached diffusion targets."""
        cfg = resolve(config, root, {"train.dra": dra, "train.dra_lambda": lam, "train.epochs": epochs,
                                     "train.workers": workers, "train.dra_targets": targets})
        with exit_once_reported():
            run_train(cfg, name, features, dry_run, wait)
