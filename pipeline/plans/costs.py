"""What one training step costs: FLOPs counted on the real networks, and seconds measured here (dry runs); and
the classifier's bare TRADES step beside WRN-28-10's, to size a ViT against the paper's CNN."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.estimates import count_flops
from trainer.attacks import trades_adversary, trades_loss
from trainer.classifiers import build_classifier
from trainer.job import Job
from trainer.loop import Dist, Trainer, derived_seed, evaluate

REFERENCE_ARCH = "wrn-28-10"


@dataclass(frozen=True)
class StepCost:
    """What one training image costs: counted FLOPs (forward, attack and backward) and measured seconds here."""

    flops_per_image: float               # one training step's FLOPs / its batch
    seconds_per_image: float             # measured on `device`, one rank
    timed_batch: int                     # images of the timed step
    holdout_flops_per_image: float       # the per-epoch held-out evaluation (clean + PGD-holdout_pgd_steps)


def step_cost(job: Job, device: torch.device | None = None, max_batch: int = 64,
              budget_flops: float = 2e11) -> StepCost:
    """Count a training step's FLOPs on a one-image batch (which is also the warm-up), then time steps of as
    many images as `budget_flops` allows (at most `max_batch`, at least one): a dry run of a WRN on a CPU
    stays within seconds, a small CNN is timed on a real-sized batch."""
    device = device or torch.device("cpu")
    per_rank = job.settings.batch_size // job.settings.workers
    # online mode: the teacher's tapped forward is not counted here (a stand-in returns zeros)
    stand_in = ((lambda views, ids, labels, generated: torch.zeros(len(ids), *job.target_shape))
                if job.dra_targets == "online" else None)
    trainer = Trainer(job, Dist(device=device), stand_in)
    trainer.model.train()
    flops = count_flops(lambda: trainer.train_step(synthetic_batch(job, 1, derived_seed(0))))
    size = int(max(1, min(per_rank, max_batch, budget_flops // max(flops, 1))))
    steps = 3 if 3 * size * flops <= budget_flops else 1
    batch = synthetic_batch(job, size, derived_seed(1))
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    seconds = (time.perf_counter() - started) / steps
    return StepCost(flops, seconds / size, size, holdout_flops(job, trainer.ema.module, device))


def holdout_flops(job: Job, model: nn.Module, device: torch.device) -> float:
    """FLOPs per image of `evaluate` with the job's PGD steps: counted at 1 and 2 steps, the rest is linear."""
    x = torch.rand(1, job.channels, job.resolution, job.resolution, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    one, two = (count_flops(lambda k=k: evaluate(model, x, y, job.settings.epsilon, k, 0, device)) for k in (1, 2))
    return one + (job.settings.holdout_pgd_steps - 1) * (two - one)


def synthetic_batch(job: Job, size: int, seed: int) -> dict[str, torch.Tensor]:
    """A random batch shaped like the loader's (for timing)."""
    g = torch.Generator().manual_seed(seed)
    r, c = job.resolution, job.channels
    batch = {"ids": torch.arange(size),
             "images": torch.randint(0, 256, (size, r, r, c), generator=g, dtype=torch.uint8),
             "labels": torch.randint(0, job.classes, (size,), generator=g),
             "generated": torch.zeros(size, dtype=torch.bool)}
    if job.dra:
        batch["targets"] = torch.randn((size, *job.target_shape), generator=g).half()
        batch["targets_v1"] = torch.randn((size, *job.target_shape), generator=g).half()
        batch["views"] = torch.zeros(size, dtype=torch.long)             # view 0 of every image
    return batch


def trades_step_flops(arch: str, channels: int, resolution: int, classes: int, attack_steps: int) -> int:
    """FLOPs per image of one TRADES step of the bare classifier (no DRA head, no EMA): the clean forward and the
    `attack_steps` forward and input-gradient passes of the attack, then the clean and adversarial forwards and
    the backward to the weights. Counted on the meta device (shapes only: nothing computed or allocated) with 0
    and 1 attack steps; each further step adds the same. Attention counts its two matmuls (four backward)."""
    with torch.device("meta"):
        model = build_classifier(arch, classes, channels, resolution, 0.5, 0.25).train()
        x = torch.rand(1, channels, resolution, resolution)
        y = torch.zeros(1, dtype=torch.long)

    def step(steps: int) -> None:
        x_adv = trades_adversary(model, x, 8 / 255, 2 / 255, steps)
        total, _, _ = trades_loss(model(x), model(x_adv), y)
        total.backward()
    none, one = (count_flops(lambda k=k: step(k)) for k in (0, 1))
    return none + attack_steps * (one - none)


def classifier_line(job: Job) -> str:
    """The plan's line: this classifier's GFLOP per image per TRADES step next to WRN-28-10's on the same data."""
    s = job.settings
    shape = (job.channels, job.resolution, job.classes, s.attack_steps)
    mine = trades_step_flops(s.arch, *shape)
    reference = mine if s.arch == REFERENCE_ARCH else trades_step_flops(REFERENCE_ARCH, *shape)
    return (f"classifier {s.arch}: {mine / 1e9:,.4g} GFLOP per image per TRADES step ({s.attack_steps} attack "
            f"steps, no DRA head), {REFERENCE_ARCH} {reference / 1e9:,.4g} on the same {job.resolution}x"
            f"{job.resolution} images ({mine / reference:.2g}x)")
