"""A linear probe: multinomial logistic regression on frozen features, trained on mini-batches with a seeded
order, zero initial weights and Adam (torch, so that it is differentiable for the robust probe); and its robust
accuracy under L-inf PGD on the input, through a feature callable such as a frozen diffusion teacher (the
"partially robust" test: a probe on teacher features, attacked through the teacher)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.analysis.rows import batches
from trainer.analysis.spectrum import Moments
from trainer.attacks import pgd_attack


@dataclass(frozen=True)
class ProbeSettings:
    epochs: int = 30              # passes over the training rows
    lr: float = 0.01              # Adam's learning rate, cosine-decayed to 0 over the run
    batch: int = 256              # rows per step
    seed: int = 0                 # seed of the row order
    weight_decay: float = 0.0     # L2 penalty on the weights


class LinearProbe(nn.Module):
    """logits = W ((f - mean) / std) + b over flattened features f; the standardisation is part of the model."""

    def __init__(self, dims: int, classes: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().reshape(1, dims))
        self.register_buffer("std", std.float().reshape(1, dims))
        self.linear = nn.Linear(dims, classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features.flatten(1) - self.mean) / self.std)


def standardiser(rows, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means and standard deviations of the rows (constant columns get std 1)."""
    moments = Moments(rows.dims)
    for _, part in batches(rows, batch):
        moments.add(part)
    var = (moments.covariance().diagonal() / max(moments.n, 1)).clamp_min(0)
    std = var.sqrt()
    return moments.mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()


def fit_probe(rows, labels: torch.Tensor, classes: int, s: ProbeSettings) -> LinearProbe:
    """Multinomial logistic regression (cross-entropy) of labels (N,) on rows (N, D), mini-batch Adam; the same
    rows, labels and settings give the same probe."""
    probe = LinearProbe(rows.dims, classes, *standardiser(rows))
    gen = torch.Generator().manual_seed(s.seed)
    steps = s.epochs * -(-len(rows) // s.batch)
    opt = torch.optim.Adam(probe.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    with torch.enable_grad():
        for _ in range(s.epochs):
            order = torch.randperm(len(rows), generator=gen)
            for lo in range(0, len(rows), s.batch):
                index = order[lo:lo + s.batch]
                loss = F.cross_entropy(probe(rows[index]), labels[index])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
    return probe.eval()


@torch.no_grad()
def probe_correct(probe: nn.Module, rows, labels: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """(N,) bool: the probe's prediction equals the label."""
    out = [probe(part).argmax(1) == labels[lo:lo + len(part)] for lo, part in batches(rows, batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


class ThroughFeatures(nn.Module):
    """probe(features(x)): a classifier of images made of a frozen feature callable and a probe."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], probe: nn.Module):
        super().__init__()
        self.features, self.probe = features, probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `+ 0 * x.sum()` keeps x in the graph when the features ignore it (the gradient is then 0, not an error)
        return self.probe(self.features(x)) + 0 * x.sum()


def robust_correct(features: Callable[[torch.Tensor], torch.Tensor], probe: nn.Module, x: torch.Tensor,
                   y: torch.Tensor, eps: float, step_size: float, steps: int, restarts: int = 1,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean correct, robust) (B,) bool for one batch of images x in [0, 1]: L-inf PGD (cross-entropy, random
    start from `generator`) on the input of probe(features(x)), with gradients through the features. Robust =
    correct both clean and after the attack, as in evaluation."""
    model = ThroughFeatures(features, probe).eval()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    x_adv = pgd_attack(model, x, y, eps, step_size, steps, loss="ce", restarts=restarts, generator=generator)
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    return clean, clean & robust
