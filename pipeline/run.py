"""`dra-pipe run`: every stage pipeline.yaml names (run.stages), end to end, reusing what is cached.

The train stage trains each variant (DRA off and on with run.compare_dra, once per seed of run.seeds), the eval,
analyze and report stages evaluate, measure and compare them; on the CPU, side by side (run.parallel). `dra-pipe
sweep` runs its cells through the same stage runners.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.console import console
from pipeline.parallel import Job, parallel_slots, run_jobs
from pipeline.variants import default_run_names, run_name, run_seeds, train_variants
from stores.errors import UserError
from stores.images import validate_set_name


def run_pipeline(cfg: Config) -> None:
    """Check what can be checked before the first stage, then run each of run.stages in order."""
    run_seeds(cfg)                                 # a bad seed list or name fails before any stage runs
    if cfg.run.name is not None:
        validate_set_name(cfg.run.name, "run-name prefix")
    check_autoattack(cfg)
    started = time.perf_counter()
    runs: list[str] = []
    for stage in cfg.run.stages:
        console.rule(stage)
        runs = STAGE_RUNNERS[stage](cfg, runs) or runs
    console.rule("done")
    console.print(f"pipeline finished in {time.perf_counter() - started:,.0f} s", highlight=False)


def _stage_import(cfg: Config, runs: list[str]) -> None:
    from pipeline.data import import_configured, show_catalog
    import_configured(cfg)
    show_catalog(Path(cfg.root))


def _stage_fit(cfg: Config, runs: list[str]) -> None:
    from pipeline.fit import run_fit_diffusion
    if cfg.model.spec != "fit":
        console.print(f"model.spec is {cfg.model.spec}: no model to fit", highlight=False)
        return
    run_fit_diffusion(cfg, None)


def _stage_generate(cfg: Config, runs: list[str]) -> None:
    from pipeline.generate import run_generate
    run_generate(cfg)


def _stage_extract(cfg: Config, runs: list[str]) -> None:
    from pipeline.extract import run_extract
    if not cfg.train.dra and not cfg.run.compare_dra:
        console.print("DRA is off: no diffusion targets needed", highlight=False)
        return
    run_extract(cfg, [], [], False)


def check_autoattack(cfg: Config) -> None:
    """The eval stage needs pyautoattack when eval.autoattack is on: say so before the first stage, not after them."""
    from trainer.evaluate import autoattack_available
    if "eval" in cfg.run.stages and cfg.eval.autoattack and not autoattack_available():
        raise UserError("eval.autoattack is on but pyautoattack is not installed: `pip install pyautoattack` (or "
                        "`pip install -e '.[eval]'`), or set eval.autoattack: false")


def parse_seeds(text: str) -> list[int]:
    """--seeds 0,1,2 -> [0, 1, 2]."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None


def _stage_train(cfg: Config, runs: list[str]) -> list[str]:
    import torch

    from pipeline.plans.train import make_job
    variants = train_variants(cfg)
    names = [make_job(variant, run_name(variant)).name for variant in variants]
    on_cpu = not torch.cuda.is_available() and cfg.train.workers == 1
    run_side_by_side(cfg, [Job(n, _train_one, (v, n)) for n, v in zip(names, variants)], on_cpu, "training")
    return names


def _train_one(cfg: Config, name: str) -> None:
    from pipeline.train import run_train
    console.print(f"[bold]train {name}[/bold]")
    run_train(cfg, name)


def _stage_eval(cfg: Config, runs: list[str]) -> None:
    from trainer.evaluate import EvalSettings
    names = runs or default_run_names(cfg)
    settings = EvalSettings.from_config(cfg.eval)
    on_cpu = settings.torch_device().type == "cpu" and settings.cpu_threads > 0
    run_side_by_side(cfg, [Job(n, evaluate_cached, (cfg, n)) for n in names], on_cpu, "evaluating")


def run_side_by_side(cfg: Config, jobs: list[Job], on_cpu: bool, doing: str) -> None:
    """The jobs one process per core on the CPU when run.parallel is on (lines prefixed), else one after the other."""
    slots = parallel_slots(len(jobs), cfg.run.parallel, on_cpu)
    if slots > 1:
        console.print(f"{doing} {len(jobs)} runs side by side, {slots} at a time, one process per core "
                      f"(run.parallel; lines start with the run's name)", highlight=False)
    run_jobs(jobs, slots, _echo)


def _echo(line: str, to_stderr: bool) -> None:
    print(line, file=sys.stderr if to_stderr else sys.stdout, flush=True)


def evaluate_cached(cfg: Config, name: str) -> None:
    """Evaluate run `name` unless its eval.json is newer than its weights and made with the same settings."""
    from pipeline.evaluate import run_eval
    from trainer.classifier_files import find_run
    folder = find_run(Path(cfg.root), name)
    result = folder.final.with_name("eval.json")
    weights = folder.weights(cfg.eval.weights)
    if result.exists() and result.stat().st_mtime >= weights.stat().st_mtime and _same_eval(result, cfg):
        console.print(f"cached: {result} (newer than the run's weights, same settings)", highlight=False)
        return
    run_eval(cfg, name, None)


def _same_eval(path: Path, cfg: Config) -> bool:
    import json
    try:
        return json.loads(path.read_bytes()).get("settings") == dict(cfg.eval)
    except (ValueError, AttributeError):          # a damaged eval.json is evaluated again
        return False


def _stage_analyze(cfg: Config, runs: list[str]) -> None:
    from pipeline.analyze import run_analyze
    run_analyze(cfg, runs or default_run_names(cfg), strict=False)


def _stage_report(cfg: Config, runs: list[str]) -> None:
    from pipeline.evaluate import run_report
    run_report(cfg, runs or default_run_names(cfg))


STAGE_RUNNERS = {"import": _stage_import, "fit-diffusion": _stage_fit, "generate": _stage_generate,
                 "extract-features": _stage_extract, "train": _stage_train, "eval": _stage_eval,
                 "analyze": _stage_analyze, "report": _stage_report}
