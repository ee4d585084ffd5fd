"""`dra-pipe sweep KEY=V1,V2 ... [--seeds 0,1,2]`: the cross product of config overrides, each cell once per seed,
reusing every cached store, run and evaluation; results under <root>/sweeps/<name>/."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, exit_once_reported, given, resolve
from pipeline.sweep import parse_axes, run_sweep


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_cmd)


def sweep_cmd(
    axes: list[str] = typer.Argument(..., help="KEY=V1,V2,... config overrides, e.g. train.dra_lambda=0,0.5 "
                                     "features.timesteps=25,100; a single value (train.epochs=2) fixes a key"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="training seeds, comma-separated "
                                                              "[config run.seeds, else train.seed]"),
    name: Optional[str] = typer.Option(None, "--name", parser=given, help="results folder <root>/sweeps/NAME "
                                                                          "(default: a hash of the axes and seeds)"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Run a grid of config overrides x seeds; writes table.md (mean +- std over seeds), results.json and a plot.

    Stage 1 runs once per distinct setting (cached by identity), each training once; a killed sweep resumes and
    a finished one reruns as a no-op."""
    base, parsed = resolve(config, root), parse_axes(axes)
    command = ("dra-pipe sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2
               else "dra-pipe sweep")
    with exit_once_reported():
        run_sweep(base, parsed, seeds, name, command)
