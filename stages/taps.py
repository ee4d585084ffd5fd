"""Feature taps: intermediate block outputs of a `Denoiser`, captured with forward hooks."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stages.denoiser import Denoiser
from stores.errors import UserError


def _check_layers(model: Denoiser, layers: Sequence[str]) -> None:
    valid = model.layer_names()
    unknown = [name for name in layers if name not in valid]
    if unknown:
        raise UserError(f"unknown layer(s) {', '.join(map(repr, unknown))}: valid layers are {', '.join(valid)}")


def features(model: Denoiser, x_sigma: torch.Tensor, sigma, class_labels,
             layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run one forward of `model` and return the output of each named layer, e.g. (B, C, h, w).

    Gradient tracking and train/eval mode are the caller's choice (wrap in `torch.no_grad()` and
    call `model.eval()` for frozen targets). Hooks are removed afterwards, also on error.
    """
    layers = list(dict.fromkeys(layers))
    _check_layers(model, layers)
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs, output):
            captured[name] = output[0] if isinstance(output, tuple) else output   # diffusers down blocks: (h, skips)
            if len(captured) == len(layers):
                raise _AllCaptured                # the rest of the network cannot change what was captured
        return hook

    try:
        for name in layers:
            handles.append(model.layer_module(name).register_forward_hook(make_hook(name)))
        model(x_sigma, sigma, class_labels)
    except _AllCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: captured[name] for name in layers}


class _AllCaptured(Exception):
    """Raised by the last hook: a tap at the bottleneck skips the decoder's remaining blocks (about half the cost)."""


def describe_layers(model: Denoiser, sample_shape: Sequence[int] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape for one sample) of every layer, in forward order, from one dummy forward.

    `sample_shape` is (C, H, W) of one input image; by default (img_channels, img_resolution, img_resolution).
    """
    if sample_shape is None:
        sample_shape = (model.img_channels, model.img_resolution, model.img_resolution)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *sample_shape, device=device)                          # (1, C, H, W)
    # a class-conditional model needs a label (diffusers' refuses None): class 0, the shapes do not depend on it
    labels = torch.zeros(1, dtype=torch.long, device=device) if getattr(model, "label_dim", 0) else None
    names = model.layer_names()
    with torch.no_grad():
        out = features(model, x, torch.ones(1, device=device), labels, names)
    return [(name, tuple(out[name].shape[1:])) for name in names]


def parameter_count(model: nn.Module) -> int:
    """Number of parameter elements (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
