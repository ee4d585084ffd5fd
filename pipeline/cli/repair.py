"""`dra-pipe repair [NAME...]`: rewrite exactly the damaged or missing shards of image and feature sets
(pipeline.repair)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, WaitOpt, given_root, resolve
from pipeline.repair import repair_sets


def register(app: typer.Typer) -> None:
    app.command("repair")(repair_cmd)


def repair_cmd(
    names: Optional[list[str]] = typer.Argument(None, help="image-set names or feature keys (default: every set)"),
    sources: Optional[list[Path]] = typer.Option(None, "--from", metavar="PATH", parser=given_root,
                                                 help="imported sets: the source file or folder (or s3://BUCKET/KEY), "
                                                      "where the recorded one moved (npz: repeat it for each file, "
                                                      "in order)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="generated and feature sets: the model spec, where "
                                                                    "the recorded one moved"),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPU actors when there is no GPU "
                                                                  "[config ray.cpu_actors]"),
    wait: bool = WaitOpt,
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Find each set's damaged or missing shards (as `verify` does) and redo exactly those from the recorded source
    or model, with the bytes they had. Every input is checked before anything is written."""
    cfg = resolve(config, root, {"ray.cpu_actors": workers})
    repair_sets(cfg, list(names or []), [str(s) for s in sources or []], model, wait)
