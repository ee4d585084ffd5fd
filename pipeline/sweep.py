"""`dra-pipe sweep`: a grid of config overrides x seeds, every cell run by the same stages as `dra-pipe run`.

A sweep is its axes (KEY=V1,V2,...) and its seeds. Each cell of the cross product is a configuration; each
(cell, seed) one training run, named by the hash of its Job identity, so two cells that resolve to the same
training (lambda 0 at any timestep) share one run, and a rerun finds every finished run, evaluation and cached
store where it left them. Stage 1 caches by identity too: extraction runs once per distinct teacher setting.
With `analyze` in run.stages every run is analysed too, and the table adds the measures' mean +- std.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pipeline.config import Config, check_value, key_spec, load_config
from pipeline.console import console
from pipeline.parallel import Job
from pipeline.run import STAGE_RUNNERS, check_autoattack, evaluate_cached, parse_seeds, run_side_by_side
from pipeline.sweep_effects import effects_markdown, interactions, main_effects
from pipeline.yaml_input import brief
from stores.errors import UserError
from stores.identity import short_key, write_json_atomic
from stores.images import validate_set_name
from trainer.analysis_results import SUMMARY, read_analysis, summary
from trainer.settings import TrainSettings, run_name
from trainer.trackers import check_loggers, sweep_parent

METRICS = ("clean", "pgd_ce", "pgd_margin", "autoattack")
HEADERS = {"clean": "clean", "pgd_ce": "PGD-CE", "pgd_margin": "PGD-margin", "autoattack": "AutoAttack",
           "erank": "eff. rank"}
FIXED_BY_SWEEP = ("train.seed", "run.seeds", "run.compare_dra")      # the sweep sets these itself
STAGE_ONE = ("import", "fit-diffusion", "generate", "extract-features")


@dataclass(frozen=True)
class Axis:
    key: str          # dotted config key
    values: tuple     # checked values, in the order given


def parse_axis(spec: str) -> Axis:
    """'train.dra_lambda=0,0.1,0.5' -> Axis; values parsed as YAML scalars and checked against the schema.
    A list-valued key takes one element per cell: features.timesteps=25,100 gives [25] and [100]."""
    key, sep, text = spec.partition("=")
    key = key.strip()
    if not sep or not key or not text.strip():
        raise UserError(f"sweep axis {spec!r}: write KEY=V1,V2,... such as train.dra_lambda=0,0.5")
    if key in FIXED_BY_SWEEP:
        raise UserError(f"sweep axis {key}: the sweep sets it itself; give seeds with --seeds")
    if key == "root":
        raise UserError("sweep axis root: a sweep runs in one workspace, reusing its caches; pass --root DIR instead")
    spec_of = key_spec(key)
    values = []
    for raw in text.split(","):
        value = _scalar(key, raw.strip())
        if value is None:
            raise UserError(f"sweep axis {key}: empty or null value in {text!r}; list values such as {key}=1,2")
        if spec_of.kind is list and not isinstance(value, list):
            value = [value]
        values.append(check_value(key, spec_of, value, "sweep"))
    if len({json.dumps(v) for v in values}) != len(values):
        raise UserError(f"sweep axis {key}: a value is listed twice in {text!r}")
    return Axis(key, tuple(values))


def _scalar(key: str, raw: str):
    """One value of an axis: a YAML scalar (`0.5`, `true`, `heun`); lists, mappings, anchors and broken YAML are
    refused in one line (values are split at commas, so `[25,100]` would arrive as `[25` and `100]`)."""
    if not raw:
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = ...
    if value is ... or isinstance(value, (list, dict)):
        raise UserError(f"sweep axis {key}: {brief(raw)} is not a plain value; list one value per cell, separated "
                        f"by commas, such as {key}=25,100")
    return value


def parse_axes(specs: list[str]) -> list[Axis]:
    if not specs:
        raise UserError("name at least one axis, e.g. `dra-pipe sweep train.dra_lambda=0,0.5`")
    axes = [parse_axis(s) for s in specs]
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise UserError(f"sweep axis {twice} is given twice; list all its values in one")
    return axes


def cells(axes: list[Axis]) -> list[dict]:
    """The cross product: one {key: value} per cell, the first axis varying slowest."""
    return [dict(zip((a.key for a in axes), combo)) for combo in itertools.product(*(a.values for a in axes))]


def default_name(axes: list[Axis], seeds: list[int]) -> str:
    return "sweep-" + short_key({"axes": [[a.key, list(a.values)] for a in axes], "seeds": seeds})[:10]


def label(cell: dict) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in cell.items())


def _text(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) if len(value) != 1 else str(value[0])
    return f"{value:g}" if isinstance(value, float) else str(value)


def summarise(values: list[float | None]) -> dict | None:
    """Mean and sample std over seeds (None when a seed lacks the figure, e.g. AutoAttack off)."""
    if not values or any(v is None for v in values):
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": [float(v) for v in values]}


def _cell_text(stat: dict | None, percent: bool) -> str:
    if stat is None:
        return "-"
    if percent:
        return f"{stat['mean']:.2%} +- {stat['std']:.2%}"
    return f"{stat['mean']:.2f} +- {stat['std']:.2f}" if abs(stat["mean"]) >= 1 else \
        f"{stat['mean']:.3f} +- {stat['std']:.3f}"


def markdown(axes: list[Axis], rows: list[dict], command: str) -> str:
    """table.md: one row per cell, mean +- sample std over the seeds."""
    shown = (*METRICS, "erank", *(k for k in SUMMARY if k != "erank" and any(r["stats"].get(k) for r in rows)))
    columns = [a.key for a in axes] + ["seeds", *(HEADERS.get(m) or SUMMARY[m][0] for m in shown)]
    lines = [f"`{command}`", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells_text = [_text(row["cell"][a.key]) for a in axes] + [",".join(map(str, row["seeds"]))]
        cells_text += [_cell_text(row["stats"].get(m), m in METRICS or (m in SUMMARY and SUMMARY[m][1]))
                       for m in shown]
        lines.append("| " + " | ".join(cells_text) + " |")
    return "\n".join(lines) + "\n"


def plot(axes: list[Axis], rows: list[dict], path: Path) -> Path:
    """Robust accuracy (PGD-CE, and AutoAttack where run) against each swept key: one panel per key, one line per
    setting of the other keys, mean with sample-std error bars over the seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, panels = plt.subplots(1, len(axes), figsize=(4.5 * len(axes), 3.6), squeeze=False)
    for ax_index, (axis, panel) in enumerate(zip(axes, panels[0])):
        others = [a for i, a in enumerate(axes) if i != ax_index]
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(label({a.key: row["cell"][a.key] for a in others}) or "all", []).append(row)
        positions = {json.dumps(v): i for i, v in enumerate(axis.values)}
        for name, members in groups.items():
            for metric, style in (("pgd_ce", "-o"), ("autoattack", "--s")):
                points = [(positions[json.dumps(r["cell"][axis.key])], r["stats"][metric]) for r in members
                          if r["stats"].get(metric)]
                if points:
                    xs, stats = zip(*sorted(points, key=lambda p: p[0]))
                    panel.errorbar(xs, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], fmt=style,
                                   capsize=3, label=f"{HEADERS[metric]} {name}" if name != "all" else HEADERS[metric])
        panel.set_xticks(range(len(axis.values)), [_text(v) for v in axis.values])
        panel.set_xlabel(axis.key)
        panel.set_ylabel("robust accuracy")
        panel.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- running a sweep ---------------------------------------------------------------------------------------------

def run_sweep(base: Config, axes: list[Axis], seeds_text: str | None, name: str | None,
              command: str = "dra-pipe sweep") -> Path:
    """Every cell x seed: stage 1 once per cell, each distinct training once, then the table, results and plot under
    <root>/sweeps/<name>; returns that folder. command: the command line recorded in table.md and results.json."""
    seeds = parse_seeds(seeds_text) if seeds_text is not None else list(base.run.seeds or [base.train.seed])
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must list distinct seeds, got {seeds_text!r}")
    name = validate_set_name(default_name(axes, seeds) if name is None else name, "sweep")
    plans = [(cell, [_variant(base, cell, seed) for seed in seeds]) for cell in cells(axes)]   # all checked first
    for _, variants in plans:
        check_autoattack(variants[0])
        check_loggers(variants[0].train.loggers)
    out = Path(base.root) / "sweeps" / name
    console.print(f"sweep {name}: {len(plans)} cell(s) x {len(seeds)} seed(s) -> {out}", highlight=False)
    started, cell_runs = time.perf_counter(), []
    for i, (cell, variants) in enumerate(plans, 1):
        console.rule(f"cell {i}/{len(plans)}: {label(cell)}")
        cell_runs.append(_prepare_cell(variants))
    group = {"sweep": name, "mlflow_parent": sweep_parent(Path(base.root), base.train.loggers, name)}
    _train_all(base, plans, cell_runs, group)
    rows = [{"cell": cell, "seeds": seeds, "runs": runs, "stats": _stats(base, runs)}
            for (cell, _), runs in zip(plans, cell_runs)]
    _write(out, axes, seeds, rows, command, time.perf_counter() - started)
    return out


def _variant(base: Config, cell: dict, seed: int) -> Config:
    """The cell's configuration for one seed (one setting per cell: no DRA on/off comparison inside it)."""
    origin = None if base._origin == "<defaults>" else base._origin
    overrides = {"root": base.root, **cell, "train.seed": seed, "run.compare_dra": False}
    cfg = load_config(origin, {**overrides, **_generated_name(base, cell)})
    cfg["run"]["seeds"] = None
    return cfg


GENERATED_BY = ("generate.", "model.", "fit_diffusion.", "data.")      # keys a generated set's images depend on


def _generated_name(base: Config, cell: dict) -> dict:
    """A cell that changes how the generated images are made gets its own generated set (and trains on it):
    generate.name <generate's set>-<the changed values>, e.g. digits-gen-ipndm-5; a cell that changes none, or
    names the set itself, keeps the base's."""
    from pipeline.workflow import generated_set
    if "generate.name" in cell or "train.generated_set" in cell:
        return {}
    changed = {k: v for k, v in sorted(cell.items()) if k.startswith(GENERATED_BY) and v != _base_value(base, k)}
    if not changed:
        return {}
    text = "-".join(_text(v) for v in changed.values())
    suffix = text if len(text) <= 32 and all(c.isalnum() or c in "._" for c in text.replace("-", "")) \
        else short_key(changed, 8)
    return {"generate.name": f"{generated_set(base)}-{suffix}"}


def _base_value(base: Config, key: str):
    section, _, name = key.partition(".")
    return base[section][name]


def _prepare_cell(variants: list[Config]) -> list[str]:
    """Stage 1 once for the cell (each stage skips what its cache holds; the seeds share it); the run name of each
    seed, the hash of the run's identity, so that a training two cells share runs once."""
    from pipeline.plans.train import make_job
    first = variants[0]
    for stage in (s for s in first.run.stages if s in STAGE_ONE):
        if stage == "extract-features" and not TrainSettings.from_section(first.train).dra_on:
            continue
        STAGE_RUNNERS[stage](first, [])
    runs = []
    for cfg in variants:
        job = make_job(cfg)
        runs.append(run_name(job.settings, identity_key=short_key(job.identity(), 8)))
    return runs


def _train_all(base: Config, plans: list, cell_runs: list[list[str]], group: dict) -> None:
    """Every distinct training of the grid, then its evaluation, in one pool: side by side on the CPU (run.parallel),
    so no core waits for a cell's last seed. group: the sweep's name (and MLflow parent run) its trackers share."""
    import torch
    todo: dict[str, tuple[Config, dict]] = {}
    for (cell, variants), runs in zip(plans, cell_runs):
        for run, cfg in zip(runs, variants):
            if run in todo:
                console.print(f"same training as an earlier cell: {run}", highlight=False)
            todo.setdefault(run, (cfg, {**group, "cell": label(cell)}))
    on_cpu = not torch.cuda.is_available() and all(cfg.train.workers == 1 for cfg, _ in todo.values())
    console.rule(f"{len(todo)} distinct trainings")
    run_side_by_side(base, [Job(run, _train_and_evaluate, (cfg, run, cell)) for run, (cfg, cell) in todo.items()],
                     on_cpu, "training and evaluating")


def _train_and_evaluate(cfg: Config, run: str, group: dict | None = None) -> None:
    from pipeline.train import run_train
    if "train" in cfg.run.stages:
        run_train(cfg, run, group=group)
    if "eval" in cfg.run.stages:
        evaluate_cached(cfg, run)
    if "analyze" in cfg.run.stages:
        from pipeline.analyze import run_analyze
        run_analyze(cfg, [run], wait=True, strict=False)


def _stats(base: Config, runs: list[str]) -> dict:
    from trainer.evaluate import EvalSettings
    from trainer.report import load_run, representation
    root = Path(base.root)
    infos = [load_run(root, r) for r in runs]
    stats = {m: summarise([(i.eval or {}).get(m) for i in infos]) for m in METRICS}
    settings = EvalSettings.from_config(dict(base.eval))
    stats["erank"] = summarise([representation(root, i, settings)["erank"] for i in infos])
    measured = [summary(read_analysis(i.folder.path)) for i in infos]
    stats.update({k: summarise([m[k] for m in measured]) for k in SUMMARY if k != "erank"})
    return stats


def _write(out: Path, axes: list[Axis], seeds: list[int], rows: list[dict], command: str, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(axes, rows, command))
    plot(axes, rows, out / "robust_accuracy.png")
    measured = [m for m in (*METRICS, *SUMMARY) if any(r["stats"].get(m) for r in rows)]
    effects, crossed = main_effects(axes, rows, measured), interactions(axes, rows, measured)
    names = {**{k: label for k, (label, _) in SUMMARY.items()}, **HEADERS}
    percent = {*METRICS, *(k for k, (_, is_percent) in SUMMARY.items() if is_percent)}
    (out / "effects.md").write_text(effects_markdown(effects, crossed, percent, names))
    write_json_atomic(out / "results.json", {"command": command, "axes": {a.key: list(a.values) for a in axes},
                                             "seeds": seeds, "cells": rows, "effects": effects,
                                             "interactions": crossed, "seconds": round(seconds, 1)})
    console.print((out / "table.md").read_text(), highlight=False, markup=False)
    console.print(f"wrote {out / 'table.md'}, {out / 'effects.md'} (paired per-seed differences), "
                  f"{out / 'results.json'} and {out / 'robust_accuracy.png'}", highlight=False)
