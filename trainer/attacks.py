"""L-inf adversaries (PGD, the TRADES inner maximisation) and the adversarial training losses.

Images are in [0, 1]; every adversary returns a detached x_adv with |x_adv - x| <= eps and 0 <= x_adv <= 1.
The caller sets the model's train/eval mode (DM-AT attacks TRADES in train mode, PGD-AT and evaluation in
eval mode); the adversaries leave it as it is. In train mode they use batch statistics without updating BN
running statistics (DM-AT's `track_bn_stats(model, False)`), so only the training forward moves them.
Gradients are taken with respect to the input only: parameters' `.grad` are left untouched.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "margin")


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, BN layers in train mode normalise with batch statistics but do not update running ones."""
    changed = [m for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _draw(kind: str, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """uniform [0, 1) or standard normal noise shaped like `like`, from `generator` (any device) if given."""
    fn = torch.rand if kind == "uniform" else torch.randn
    if generator is None:
        return fn(like.shape, device=like.device, dtype=like.dtype)
    return fn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the L-inf ball of radius eps around x, then into [0, 1]."""
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample CW margin max_{j != y} z_j - z_y (B,): positive iff misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)                                    # (B,)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - true


def _per_sample_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")                          # (B,)
    return margin_loss(logits, y)


def _pgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
             loss: str, random_start: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One PGD run: sign-gradient ascent on the summed per-sample loss, projected after every step."""
    x_adv = x.clone()
    if random_start:
        x_adv = _project(x + (2 * _draw("uniform", x, generator) - 1) * eps, x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        objective = _per_sample_loss(model(x_adv), y, loss).sum()
        grad, = torch.autograd.grad(objective, [x_adv])
        x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
               loss: str = "ce", random_start: bool = True, restarts: int = 1,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD (Madry et al.) maximising cross-entropy or the CW margin; x (B, C, H, W) in [0, 1], y (B,).

    Over several restarts each sample keeps its worst example: a misclassified one beats a correct one, and
    between equals the higher loss wins. Random starts are uniform in the eps-ball, drawn from `generator`.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if restarts < 1 or steps < 0:
        raise ValueError(f"need restarts >= 1 and steps >= 0, got {restarts} and {steps}")
    x, best = x.detach(), None
    with torch.enable_grad(), frozen_bn_stats(model):
        for _ in range(restarts):
            x_adv = _pgd_run(model, x, y, eps, step_size, steps, loss, random_start, generator)
            if restarts == 1:
                return x_adv                                                             # no selection forward
            with torch.no_grad():
                logits = model(x_adv)
            wrong, value = logits.argmax(1) != y, _per_sample_loss(logits, y, loss)       # (B,), (B,)
            if best is None:
                best, best_wrong, best_value = x_adv, wrong, value
                continue
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (value > best_value))
            best = torch.where(better.view(-1, *[1] * (x.ndim - 1)), x_adv, best)
            best_wrong, best_value = torch.where(better, wrong, best_wrong), torch.where(better, value, best_value)
    return best


def trades_adversary(model: nn.Module, x: torch.Tensor, eps: float, step_size: float, steps: int,
                     generator: torch.Generator | None = None, start: str = "normal") -> torch.Tensor:
    """TRADES inner maximisation: argmax over the eps-ball of KL(p(x) || p(x_adv)), by L-inf PGD.

    start="normal": x + 0.001 N(0, 1), as in the TRADES code; start="uniform": uniform in the eps-ball, as in
    DM-AT's `trades_loss`. p(x) is computed once, without gradient.
    """
    if start not in ("normal", "uniform"):
        raise ValueError(f"start must be 'normal' or 'uniform', got {start!r}")
    x = x.detach()
    with torch.enable_grad(), frozen_bn_stats(model):
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)                                          # (B, classes)
        if start == "normal":
            x_adv = _project(x + 0.001 * _draw("normal", x, generator), x, eps)
        else:
            x_adv = _project(x + (2 * _draw("uniform", x, generator) - 1) * eps, x, eps)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
            grad, = torch.autograd.grad(kl, [x_adv])
            x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float = 5.0,
                label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, kl): CE with label smoothing on clean logits + beta * KL(p_clean || p_adv), batch mean.

    Gradients flow through both logits (as in TRADES and DM-AT).
    """
    ce = F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    return ce + beta * kl, ce, kl


def pgd_at_loss(logits_adv: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """PGD-AT (Madry): cross-entropy on the adversarial logits, optionally label-smoothed."""
    return F.cross_entropy(logits_adv, y, label_smoothing=label_smoothing)
