"""Loading a model spec (`edm:PATH.pkl`, `diffusers:DIR`, `dra:DIR`; the registry is stages.specs), and the
compute device.
"""
from __future__ import annotations

import torch

from stages.denoiser import Denoiser
from stages.own_format import save_own  # noqa: F401  re-exported: writers of the own format import it here
from stages.specs import parse_spec
from stores.errors import UserError


def load_model(spec: str) -> Denoiser:
    """Load a frozen denoiser from a spec (stages.specs); bad specs and unreadable files raise UserError."""
    parsed = parse_spec(spec)
    if not parsed.exists():
        raise UserError(f"model file or folder {parsed.path} does not exist (spec {spec!r})")
    model = parsed.family.load(parsed.path)
    return model.eval().requires_grad_(False)


def pick_device() -> torch.device:
    """This process's compute device: `cuda` (device 0 of what CUDA_VISIBLE_DEVICES shows it: a Ray actor that
    reserved one GPU sees only that one) when a GPU is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
