"""DM-AT's optimisation pieces: SGD (or AdamW, for ViTs) with selective weight decay, cosine-with-warmup LR, EMA."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
NO_DECAY_NAMES = ("bias", "pos_embed", "cls_token")     # besides every parameter of a normalisation layer


def _decay_groups(modules: list[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed): normalisation-layer parameters, biases, position embeddings and class tokens are
    not decayed."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                (no_decay if isinstance(sub, _NORMS) or name in NO_DECAY_NAMES else decay).append(p)
    return decay, no_decay


def make_optimizer(model: nn.Module, head: nn.Module | None, lr: float, weight_decay: float,
                   nesterov: bool = True, momentum: float = 0.9, optimizer: str = "sgd",
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """SGD or AdamW over the classifier and the DRA head (if any): group 0 the decayed weights, group 1 the
    parameters exempt from decay (norms, biases, position embeddings).

    DM-AT exempts BN parameters from weight decay; biases are exempt too here (DM-AT decays the last linear
    layer's bias, its only other bias). SGD: Nesterov momentum, L2 decay added to the gradient; AdamW: `betas`,
    decay decoupled from the gradient (Loshchilov & Hutter), which is what ViT recipes tune.
    """
    decay, no_decay = _decay_groups([m for m in (model, head) if m is not None])
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"optimizer must be sgd or adamw, got {optimizer!r}")


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_fraction: float = 0.025) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`: linear warmup then cosine to 0.

    Warmup over W = round(warmup_fraction * total_steps) steps: peak * (step + 1) / W; then
    peak * (1 + cos(pi * (step - W) / (total_steps - W))) / 2, reaching 0 at step = total_steps.
    DM-AT's "cosinew" is torch's OneCycleLR with pct_start 0.025 (warmup from peak/25 along a cosine, down to
    peak/2.5e5), stepped once per epoch; this is the per-step version with the end points at 0.
    """
    if total_steps < 1 or not 0 <= warmup_fraction < 1:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_fraction < 1, got {total_steps}, {warmup_fraction}")
    warmup = round(warmup_fraction * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's parameters (DM-AT's `ema_update` + `update_bn`).

    Update n (1-based) uses decay = min(tau, (1 + d) / (10 + d)) with d = n - warmup_steps, and decay 0 (a
    plain copy) while n < warmup_steps (DM-AT: warmup_steps = 0.025 * total steps). Buffers (BN running
    statistics, normalisation constants) are copied from the live model, not averaged.
    `module` is the averaged model, in eval mode; evaluate and checkpoint it.
    """

    def __init__(self, model: nn.Module, tau: float = 0.995, warmup_steps: int = 0):
        if not 0 <= tau < 1:
            raise ValueError(f"tau must be in [0, 1), got {tau}")
        self.tau, self.warmup_steps, self.num_updates = tau, warmup_steps, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay(self, n: int) -> float:
        """Decay used by update number n (1-based)."""
        d = n - self.warmup_steps
        return 0.0 if d < 0 else min(self.tau, (1 + d) / (10 + d))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average the parameters of `model` into `module`; copy its buffers."""
        self.num_updates += 1
        decay = self.decay(self.num_updates)
        params = dict(model.named_parameters())
        for name, p_avg in self.module.named_parameters():
            p_avg.lerp_(params[name].detach().to(p_avg.dtype), 1 - decay)     # avg = decay avg + (1 - decay) p
        buffers = dict(model.named_buffers())
        for name, b_avg in self.module.named_buffers():
            b_avg.copy_(buffers[name])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates,
                "tau": self.tau, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.tau, self.warmup_steps = float(state["tau"]), int(state["warmup_steps"])
