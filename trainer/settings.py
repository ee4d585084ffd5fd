"""Stage 2's settings: the `train` section of pipeline.yaml, resolved into one frozen, typed value.

The pipeline builds it once (`TrainSettings.from_section(cfg.train)`) and hands it to the Job; the trainer reads
attributes, never string keys. Defaults, bounds and help live in `pipeline.config.SCHEMA` alone (the trainer may
not import the pipeline; `tests/trainer/test_settings.py` fails when the two differ by a key), except what a null
train.lr or train.weight_decay means for each optimizer: OPTIMIZER_DEFAULTS here, which the schema's help quotes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from trainer.architectures import ARCHITECTURES, architecture

OPTIMIZERS = ("sgd", "adamw")
# null train.lr / train.weight_decay: SGD's are the values these keys had as defaults before AdamW (DM-AT's CIFAR
# recipe sets lr 0.2 at batch 512); AdamW's are the usual ones for ViTs trained from scratch on small images
OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.1, "weight_decay": 5e-4}, "adamw": {"lr": 1e-3, "weight_decay": 0.05}}
ADAMW_KEYS = ("optimizer", "adam_beta1", "adam_beta2")     # in a run's identity only when it trains with AdamW


@dataclass(frozen=True)
class TrainSettings:
    """One field per key of the `train` section, in the schema's order (so `as_dict` is the section itself)."""

    arch: str                    # classifier architecture
    objective: str               # adversarial objective: pgd-at | trades | clean (no attack)
    epochs: int                  # epochs of ceil(N_real / batch) steps
    batch_size: int              # global batch size, split evenly over the workers
    generated_set: str | None    # generated image set to train on; None = found in the workspace
    unsup_fraction: float        # fraction of each batch drawn from generated data, in [0, 1)
    optimizer: str               # sgd | adamw | auto (per architecture): `optimizer_name` resolves it
    lr: float | None             # peak learning rate (warmup then cosine, per step); None = `peak_lr`'s default
    weight_decay: float | None   # weight decay, skipped on norms, biases, position embeddings; None = `decay`'s
    adam_beta1: float            # AdamW betas
    adam_beta2: float
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
    def optimizer_name(self) -> str:
        """sgd | adamw: train.optimizer, or with auto the architecture's (SGD for the CNNs, AdamW for the ViTs)."""
        return architecture(self.arch).optimizer if self.optimizer == "auto" else self.optimizer

    @property
    def peak_lr(self) -> float:
        """train.lr, or with null the optimizer's default (SGD's 0.1 would blow AdamW up)."""
        return OPTIMIZER_DEFAULTS[self.optimizer_name]["lr"] if self.lr is None else self.lr

    @property
    def decay(self) -> float:
        """train.weight_decay, or with null the optimizer's default."""
        return OPTIMIZER_DEFAULTS[self.optimizer_name]["weight_decay"] if self.weight_decay is None else \
            self.weight_decay

    @property
    def adam_betas(self) -> tuple[float, float]:
        return self.adam_beta1, self.adam_beta2

    def identity_dict(self) -> dict:
        """`as_dict` with the optimizer resolved, as a run's identity records it: lr and weight decay as numbers;
        the optimizer and its betas only for AdamW. An SGD run (every run before train.optimizer existed) keeps
        the identity it had, whether its lr is written out or left to the default."""
        out = {**self.as_dict(), "lr": self.peak_lr, "weight_decay": self.decay}
        if self.optimizer_name == "sgd":
            return {k: v for k, v in out.items() if k not in ADAMW_KEYS}
        return {**out, "optimizer": "adamw"}

    @property
    def dra_on(self) -> bool:
        """Whether the run trains with DRA: the one place this is decided."""
        return dra_on(self.dra, self.dra_lambda)


def dra_on(dra: bool, dra_lambda: float) -> bool:
    """DRA is on when it is asked for and weighs something: `dra: off` and lambda 0 are the same plain (DM-)AT."""
    return bool(dra) and dra_lambda > 0


def run_name(settings: TrainSettings, prefix: str | None = None, identity_key: str | None = None) -> str:
    """A run's folder name: <arch>-<dra|nodra>-<seed>, after `<prefix>-` when given (run.name). A sweep names each
    run by its identity instead: <arch>-<dra|nodra>-s<seed>-<identity_key>. A slash in the architecture becomes a
    dash (vit-b/2 -> vit-b-2, as DiT-XL/2's files are named DiT-XL-2)."""
    seed = f"s{settings.seed}-{identity_key}" if identity_key is not None else str(settings.seed)
    name = f"{settings.arch.replace('/', '-')}-{'dra' if settings.dra_on else 'nodra'}-{seed}"
    return name if prefix is None else f"{prefix}-{name}"


def per_optimizer(key: str) -> str:
    """'0.1 for sgd, 0.001 for adamw': an optimizer default, for the schema's help."""
    return ", ".join(f"{OPTIMIZER_DEFAULTS[o][key]:g} for {o}" for o in OPTIMIZERS)


def optimizer_help() -> str:
    """'sgd for small-cnn, ...; adamw for vit-s/2, ...': what train.optimizer: auto picks, for the schema's help."""
    return "; ".join(f"{o} for {', '.join(a.name for a in ARCHITECTURES.values() if a.optimizer == o)}"
                     for o in OPTIMIZERS)
