"""`dra-pipe extract-features`: frozen diffusion targets for every image, cached by identity, on Ray
(pipeline.extract)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, WaitOpt, resolve
from pipeline.extract import run_extract
from stages.specs import spec_help
from stores.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("extract-features")
    def extract_features_cmd(
        timestep: Optional[list[int]] = typer.Option(None, "--timestep", "-t", help="DDPM timestep in [0, 999]; repeat "
                                                                                    "for several "
                                                                                    "[config features.timesteps]"),
        sigma: Optional[list[float]] = typer.Option(None, "--sigma", help="noise level sigma given directly "
                                                                          "(instead of --timestep); repeatable"),
        layer: Optional[str] = typer.Option(None, "--layer", help="diffusion layer to cache, e.g. dec.8x8_in1; auto = "
                                                                  "the bottleneck [config features.layer]"),
        pool: Optional[str] = typer.Option(None, "--pool", help="none | 2 | 4 | global spatial average pooling "
                                                                "[config features.pool]"),
        views: Optional[int] = typer.Option(None, "--views", help="augmented views per image, each with its exact "
                                                                  "target, made for train.crop_pad and train.flip "
                                                                  "[config features.views]"),
        images: Optional[list[str]] = typer.Option(None, "--images", help="image sets (repeatable); default: the real "
                                                                          "training set and the generated set"),
        model: Optional[str] = typer.Option(None, "--model", "-m", help=f"{spec_help(fit=True)} [config model.spec]"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per forward pass "
                                                                            "[config features.batch_size]"),
        address: Optional[str] = typer.Option(None, "--address", help="join a Ray cluster: auto or HOST:PORT "
                                                                      "[config ray.address]"),
        workers: Optional[int] = typer.Option(None, "--workers", help="CPU actors when there is no GPU "
                                                                      "[config ray.cpu_actors]"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (bytes per sample, total, time) "
                                                              "and stop"),
        wait: bool = WaitOpt,
        config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
    ):
        """Compute the frozen diffusion model's activations for every image (stage 1b), cached by identity."""
        if sigma and timestep:
            raise UserError("give the noise level as --timestep or as --sigma, not both; run the command once for each")
        cfg = resolve(config, root, {"features.layer": layer, "features.pool": pool, "features.views": views,
                                     "features.batch_size": batch_size, "model.spec": model, "ray.address": address,
                                     "ray.cpu_actors": workers,
                                     "features.timesteps": list(timestep) if timestep else None})
        run_extract(cfg, list(sigma or []), list(images or []), dry_run, wait)
