"""Cost estimates for work this machine will not run itself: counted FLOPs at a stated accelerator rate.

A plan says how long a job takes on the hardware it is meant for. Rather than guess per-model speeds, the
plan counts the FLOPs of one unit of work (a network evaluation, a training step) with torch's FlopCounterMode
on the real network, and divides by one stated rate: DESIGN.md's reference of one H100 at 40% of its dense bf16
peak. At that rate the official EDM CIFAR-10 network (42.4 GFLOP per evaluation) generates 20M images with
35 evaluations each in about 21 GPU-hours, as DESIGN.md states.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

H100_BF16_DENSE_PEAK = 989.4e12          # FLOP/s, H100 SXM, dense (no sparsity)
UTILISATION = 0.40                       # fraction of peak a well-fed training or sampling loop sustains
STATED_RATE = H100_BF16_DENSE_PEAK * UTILISATION
STATED_DEVICE = "one H100 at 40% of its dense bf16 peak"


# torch's CPU attention kernels, which its FLOP registry leaves out: counted as the GPU kernels are
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                  flop_registry[torch.ops.aten._scaled_dot_product_flash_attention],
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                  flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_backward]}


class _FlopCount(TorchDispatchMode):
    """Sums torch's FLOP formulas over every dispatched op. Unlike FlopCounterMode it tracks no modules, whose
    backward hooks break `torch.autograd.grad` (every PGD attack step)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket) or _CPU_ATTENTION.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(work: Callable[[], object]) -> int:
    """FLOPs (a multiply-add counts 2) of everything `work` runs on this thread, backward passes included."""
    with _FlopCount() as counter:
        work()
    return int(counter.total)


def gpu_hours(flops: float) -> float:
    """Hours of one reference GPU for this many FLOPs at the stated rate."""
    return flops / STATED_RATE / 3600


def forward_flops(model: torch.nn.Module, batch: int = 1) -> int:
    """FLOPs of one denoiser evaluation per image (the conditioning label is class 0)."""
    device = next(model.parameters()).device
    shape = (batch, model.img_channels, model.img_resolution, model.img_resolution)
    x = torch.zeros(shape, device=device)
    sigma = torch.ones(batch, device=device)
    labels = torch.zeros(batch, model.label_dim, device=device) if model.label_dim else None
    if labels is not None:
        labels[:, 0] = 1
    with torch.no_grad():
        return count_flops(lambda: model(x, sigma, labels)) // batch


def describe_hours(hours: float, gpus: int = 1) -> str:
    """'~21 GPU-hours' (and the wall time on `gpus` of them, assuming ideal scaling)."""
    text = f"~{_short(hours)} GPU-hours at the stated rate ({STATED_DEVICE})"
    if gpus > 1:
        text += f"; ~{_short(hours / gpus)} h on {gpus} GPUs"
    return text


def _short(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 10 else f"{hours:.2g}"


def duration(seconds: float) -> str:
    """A wall time in the unit a reader wants: s, min, h, days or years."""
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172_800, "h", 3600), (3 * 31_557_600, "days", 86_400)):
        if seconds < limit:
            return f"{seconds / size:.0f} {unit}" if unit == "s" else f"{seconds / size:,.1f} {unit}"
    return f"{seconds / 31_557_600:,.1f} years"
