"""`dra-pipe model info` and `fit-diffusion`: inspect a diffusion model, train one on an image set (pipeline.fit)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, WaitOpt, resolve
from pipeline.fit import run_fit_diffusion, show_model
from stages.specs import spec_help

model_app = typer.Typer(help="Inspect diffusion models.", no_args_is_help=True)
ModelOpt = typer.Option(None, "--model", "-m", help=f"{spec_help(fit=True)} [config model.spec]")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
    model_app.command("info")(model_info_cmd)
    app.command("fit-diffusion")(fit_diffusion_cmd)


def model_info_cmd(model: Optional[str] = ModelOpt, config: Path = ConfigOpt, root: Optional[Path] = RootOpt):
    """List a model's feature layers with their output shapes, its parameter count and fingerprint."""
    cfg = resolve(config, root, {"model.spec": model})
    show_model(cfg)


def fit_diffusion_cmd(
    images: Optional[str] = typer.Option(None, "--images", help="image set to train on "
                                                                "(default: the real training set)"),
    duration_kimg: Optional[float] = typer.Option(None, "--duration-kimg",
                                                  help="training length in thousands of images "
                                                       "[config fit_diffusion.duration_kimg]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per step "
                                                                        "[config fit_diffusion.batch_size]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed [config fit_diffusion.seed]"),
    wait: bool = WaitOpt,
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Train a class-conditional EDM on an image set (resumable), saved as safetensors + JSON."""
    cfg = resolve(config, root, {"fit_diffusion.duration_kimg": duration_kimg, "fit_diffusion.batch_size": batch_size,
                                 "fit_diffusion.seed": seed})
    run_fit_diffusion(cfg, images, wait)
