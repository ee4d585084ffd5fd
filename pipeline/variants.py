"""The training runs a configuration stands for: DRA off and on when comparing (run.compare_dra), once per seed of
run.seeds, with their names; `run`'s train, eval, analyze and report stages and `analyze` share them."""
from __future__ import annotations

import copy

from pipeline.config import Config
from stores.errors import UserError
from trainer.settings import TrainSettings
from trainer.settings import run_name as settings_run_name


def train_variants(cfg: Config) -> list[Config]:
    """DRA off and on when comparing (else the configured setting), once per seed of run.seeds."""
    settings = (False, True) if cfg.run.compare_dra else (cfg.train.dra,)
    variants = []
    for dra in settings:
        for seed in run_seeds(cfg):
            variant = copy.deepcopy(cfg)
            variant.train["dra"], variant.train["seed"] = dra, seed
            variants.append(variant)
    return variants


def run_seeds(cfg: Config) -> list[int]:
    seeds = cfg.run.seeds
    if seeds is None:
        return [cfg.train.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"run.seeds must list distinct seeds, got {seeds!r}; or set it to null for train.seed alone")
    return list(seeds)


def job_for(cfg: Config):
    from pipeline.plans.train import make_job
    return make_job(cfg, run_name(cfg))


def run_name(variant: Config) -> str | None:
    """NAME-<arch>-<dra|nodra>-<seed> under run.name; None = the trainer's own default (the same without prefix)."""
    if variant.run.name is None:
        return None
    return settings_run_name(TrainSettings.from_section(variant.train), variant.run.name)


def default_run_names(cfg: Config) -> list[str]:
    """The runs `dra-pipe run` trains with this configuration."""
    return [v.name for v in map(job_for, train_variants(cfg))]
