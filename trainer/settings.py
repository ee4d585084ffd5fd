"""Stage 2's settings: the `train` section of pipeline.yaml, resolved into one frozen, typed value.

The pipeline builds it once (`TrainSettings.from_section(cfg.train)`) and hands it to the Job; the trainer reads
attributes, never string keys. Defaults, bounds and help live in `pipeline.config.SCHEMA` alone (the trainer may
not import the pipeline; `tests/trainer/test_settings.py` fails when the two differ by a key).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class TrainSettings:
    """One field per key of the `train` section, in the schema's order (so `as_dict` is the section itself)."""

    arch: str                    # classifier architecture
    objective: str               # adversarial objective: pgd-at | trades | clean (no attack)
    epochs: int                  # epochs of ceil(N_real / batch) steps
    batch_size: int              # global batch size, split evenly over the workers
    generated_set: str | None    # generated image set to train on; None = found in the workspace
    unsup_fraction: float        # fraction of each batch drawn from generated data, in [0, 1)
    lr: float                    # peak SGD learning rate (warmup then cosine, per step)
    weight_decay: float          # weight decay, skipped on BN and biases
    label_smoothing: float       # label smoothing of the cross-entropy
    trades_beta: float           # TRADES beta (weight of the KL term)
    epsilon: float               # L-inf radius in [0, 1] pixel units
    attack_steps: int            # PGD steps of the training attack
    attack_step_size: float      # PGD step size in [0, 1] pixel units
    precision: str               # the step's forward and loss: float32 | bf16 autocast
    attack_precision: str        # the training attack: float32 | bf16 autocast
    attack_start: str            # start of the TRADES inner attack: normal | uniform in the eps-ball
    crop_pad: int                # random-crop padding in pixels
    flip: bool                   # random horizontal flips
    dra_targets: str             # what DRA aligns with: views | online | shifted
    ema_decay: float             # EMA decay tau
    dra: bool                    # add the DRA loss (with dra_lambda > 0: see dra_on)
    dra_lambda: float            # weight of the DRA loss
    dra_layer: str               # classifier feature map aligned with the targets; auto = per architecture
    dra_view: str                # input whose features are aligned: adversarial | clean
    dra_hidden: int              # hidden width of the projection head
    dra_depth: int               # linear layers of the projection head
    holdout: int                 # last real training images held out for per-epoch accuracy
    holdout_pgd_steps: int       # PGD steps of the per-epoch held-out evaluation
    checkpoint_every: int        # also checkpoint every this many steps (0 = at epoch ends only)
    loggers: list                # live trackers: tensorboard | wandb | mlflow (trainer/trackers.py)
    seed: int                    # training seed
    workers: int                 # data-parallel Ray Train workers (ranks)
    loader_workers: int          # DataLoader worker processes per rank

    @classmethod
    def from_section(cls, section: Mapping) -> TrainSettings:
        """From the resolved `train` section (every key present; an unknown or missing key is a TypeError)."""
        return cls(**dict(section))

    def as_dict(self) -> dict:
        """The section as a plain dict, keys in the schema's order (what a run's identity records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def dra_on(self) -> bool:
        """Whether the run trains with DRA: the one place this is decided."""
        return dra_on(self.dra, self.dra_lambda)


def dra_on(dra: bool, dra_lambda: float) -> bool:
    """DRA is on when it is asked for and weighs something: `dra: off` and lambda 0 are the same plain (DM-)AT."""
    return bool(dra) and dra_lambda > 0


def run_name(settings: TrainSettings, prefix: str | None = None, identity_key: str | None = None) -> str:
    """A run's folder name: <arch>-<dra|nodra>-<seed>, after `<prefix>-` when given (run.name). A sweep names each
    run by its identity instead: <arch>-<dra|nodra>-s<seed>-<identity_key>."""
    seed = f"s{settings.seed}-{identity_key}" if identity_key is not None else str(settings.seed)
    name = f"{settings.arch}-{'dra' if settings.dra_on else 'nodra'}-{seed}"
    return name if prefix is None else f"{prefix}-{name}"
