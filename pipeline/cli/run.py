"""`dra-pipe run`: every stage pipeline.yaml names (run.stages), end to end, reusing what is cached."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, exit_once_reported, given, resolve
from pipeline.run import parse_seeds, run_pipeline


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)


def run_cmd(
    seeds: Optional[str] = typer.Option(None, "--seeds", help="training seeds, comma-separated (0,1,2): each setting "
                                        "is trained once per seed and the report adds mean +- std [config run.seeds]"),
    name: Optional[str] = typer.Option(None, "--name", parser=given,
                                       help="run-name prefix: runs NAME-<arch>-<dra|nodra>-<seed>; a new prefix trains "
                                       "changed settings beside the old runs [config run.name]"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Run every stage pipeline.yaml names (run.stages), end to end, reusing what is cached."""
    cfg = resolve(config, root, {"run.seeds": parse_seeds(seeds) if seeds is not None else None, "run.name": name})
    with exit_once_reported():
        run_pipeline(cfg)
