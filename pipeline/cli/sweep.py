"""`dra-pipe sweep KEY=V1,V2 ... [--seeds 0,1,2]`: the cross product of config overrides, each cell once per seed,
reusing every cached store, run and evaluation; results under <root>/sweeps/<name>/."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, console, resolve
from pipeline.cli.run import STAGE_RUNNERS, check_autoattack, evaluate_cached, parse_seeds, run_side_by_side
from pipeline.config import Config, load_config
from pipeline.parallel import Job
from pipeline.sweep import Axis, cells, default_name, label, markdown, parse_axes, plot, summarise, METRICS
from stores.errors import UserError
from stores.identity import short_key, write_json_atomic
from stores.images import validate_set_name

STAGE_ONE = ("import", "fit-diffusion", "generate", "extract-features")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_cmd)


def sweep_cmd(
    axes: List[str] = typer.Argument(..., help="KEY=V1,V2,... config overrides, e.g. train.dra_lambda=0,0.5 "
                                     "features.timesteps=25,100; a single value (train.epochs=2) fixes a key"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="training seeds, comma-separated [config run.seeds, else train.seed]"),
    name: Optional[str] = typer.Option(None, "--name", help="results folder <root>/sweeps/NAME (default: a hash of the axes and seeds)"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Run a grid of config overrides x seeds; writes table.md (mean +- std over seeds), results.json and a plot.

    Stage 1 runs once per distinct setting (cached by identity), each training once; a killed sweep resumes and
    a finished one reruns as a no-op."""
    run_sweep(resolve(config, root), parse_axes(axes), seeds, name)


def run_sweep(base: Config, axes: list[Axis], seeds_text: str | None, name: str | None) -> Path:
    seeds = parse_seeds(seeds_text) if seeds_text is not None else list(base.run.seeds or [base.train.seed])
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must list distinct seeds, got {seeds_text!r}")
    name = validate_set_name(name or default_name(axes, seeds), "sweep")
    plans = [(cell, [_variant(base, cell, seed) for seed in seeds]) for cell in cells(axes)]   # all checked first
    for _, variants in plans:
        check_autoattack(variants[0])
    out = Path(base.root) / "sweeps" / name
    command = "dra-pipe sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else "dra-pipe sweep"
    console.print(f"sweep {name}: {len(plans)} cell(s) x {len(seeds)} seed(s) -> {out}", highlight=False)
    started, cell_runs = time.perf_counter(), []
    for i, (cell, variants) in enumerate(plans, 1):
        console.rule(f"cell {i}/{len(plans)}: {label(cell)}")
        cell_runs.append(_prepare_cell(variants))
    _train_all(base, plans, cell_runs)
    rows = [{"cell": cell, "seeds": seeds, "runs": runs, "stats": _stats(base, runs)}
            for (cell, _), runs in zip(plans, cell_runs)]
    _write(out, axes, seeds, rows, command, time.perf_counter() - started)
    return out


def _variant(base: Config, cell: dict, seed: int) -> Config:
    """The cell's configuration for one seed (one setting per cell: no DRA on/off comparison inside it)."""
    origin = None if base._origin == "<defaults>" else base._origin
    cfg = load_config(origin, {"root": base.root, **cell, "train.seed": seed, "run.compare_dra": False})
    cfg["run"]["seeds"] = None
    return cfg


def _prepare_cell(variants: list[Config]) -> list[str]:
    """Stage 1 once for the cell (each stage skips what its cache holds; the seeds share it); the run name of each
    seed, the hash of the run's identity, so that a training two cells share runs once."""
    from pipeline.plans.train import make_job
    first = variants[0]
    for stage in (s for s in first.run.stages if s in STAGE_ONE):
        if stage == "extract-features" and not (first.train.dra and first.train.dra_lambda > 0):
            continue
        STAGE_RUNNERS[stage](first, [])
    runs = []
    for cfg in variants:
        job = make_job(cfg)
        runs.append(f"{job.settings['arch']}-{'dra' if job.dra else 'nodra'}-s{job.settings['seed']}-"
                    f"{short_key(job.identity(), 8)}")
    return runs


def _train_all(base: Config, plans: list, cell_runs: list[list[str]]) -> None:
    """Every distinct training of the grid, then its evaluation, in one pool: side by side on the CPU (run.parallel),
    so no core waits for a cell's last seed."""
    import torch
    todo: dict[str, Config] = {}
    for (_, variants), runs in zip(plans, cell_runs):
        for run, cfg in zip(runs, variants):
            if run in todo:
                console.print(f"same training as an earlier cell: {run}", highlight=False)
            todo.setdefault(run, cfg)
    on_cpu = not torch.cuda.is_available() and all(cfg.train.workers == 1 for cfg in todo.values())
    console.rule(f"{len(todo)} distinct trainings")
    run_side_by_side(base, [Job(run, _train_and_evaluate, (cfg, run)) for run, cfg in todo.items()], on_cpu,
                     "training and evaluating")


def _train_and_evaluate(cfg: Config, run: str) -> None:
    from pipeline.cli.train import run_train
    if "train" in cfg.run.stages:
        run_train(cfg, run)
    if "eval" in cfg.run.stages:
        evaluate_cached(cfg, run)


def _stats(base: Config, runs: list[str]) -> dict:
    from trainer.evaluate import EvalSettings
    from trainer.report import load_run, representation
    root = Path(base.root)
    infos = [load_run(root, r) for r in runs]
    stats = {m: summarise([(i.eval or {}).get(m) for i in infos]) for m in METRICS}
    settings = EvalSettings.from_config(dict(base.eval))
    stats["erank"] = summarise([representation(root, i, settings)["erank"] for i in infos])
    return stats


def _write(out: Path, axes: list[Axis], seeds: list[int], rows: list[dict], command: str, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(axes, rows, command))
    plot(axes, rows, out / "robust_accuracy.png")
    write_json_atomic(out / "results.json", {"command": command, "axes": {a.key: list(a.values) for a in axes},
                                             "seeds": seeds, "cells": rows, "seconds": round(seconds, 1)})
    console.print((out / "table.md").read_text(), highlight=False, markup=False)
    console.print(f"wrote {out / 'table.md'}, {out / 'results.json'} and {out / 'robust_accuracy.png'}", highlight=False)
