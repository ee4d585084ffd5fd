"""`dra-pipe generate`: N class-conditional images from the configured model, on Ray workers (pipeline.generate)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, WaitOpt, given, resolve
from pipeline.generate import run_generate
from stages.sampler_registry import sampler_help


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)


def generate_cmd(
    n: Optional[str] = typer.Option(None, "--n", help="images to generate: 50000, 1.5k, 20M, 1e6 [config generate.n]"),
    name: Optional[str] = typer.Option(None, "--name", parser=given,
                                       help="generated image-set name [config generate.name, else <data name>-gen]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="run seed: sample i depends only on (seed, i) "
                                                            "[config generate.seed]"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help=f"{sampler_help()} "
                                                                  "[config generate.sampler]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="sampler steps [config generate.steps]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per sampler call "
                                                                        "[config generate.batch_size]"),
    address: Optional[str] = typer.Option(None, "--address", help="join a running Ray cluster: auto or HOST:PORT "
                                                                  "[config ray.address; default: a local Ray]"),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPU workers when there is no GPU "
                                                                  "[config ray.cpu_actors]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (shards, bytes, time) and stop"),
    wait: bool = WaitOpt,
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Generate N class-conditional images into a generated image set, on Ray workers (resumable)."""
    cfg = resolve(config, root, {"generate.n": n, "generate.name": name, "generate.seed": seed,
                                 "generate.sampler": sampler, "generate.steps": steps,
                                 "generate.batch_size": batch_size, "ray.address": address, "ray.cpu_actors": workers})
    run_generate(cfg, dry_run, wait=wait)
