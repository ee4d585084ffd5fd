"""Compute dtype of the frozen diffusion model (`model.dtype`): float32, or bf16 / fp16 autocast.

Only the network call runs in the reduced dtype: its input is float32, autocast lowers the convolutions and
matmuls, and its output comes back as float32. The samplers keep their step arithmetic (x_next, d_cur, t_hat)
in float64 around that call (stages/samplers.py), as the official EDM sampler does; extract-features pools the
tapped activation in float32.

torch 2.13 autocasts both bfloat16 and float16 on the CPU and on CUDA; a CUDA device without bf16 support is
refused for bfloat16.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from stores.errors import UserError

COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_compute_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """`name` if the device can compute in it, else a UserError naming the device."""
    if name not in COMPUTE_DTYPES:
        raise UserError(f"unknown compute dtype {name!r} (model.dtype); choose one of: {', '.join(COMPUTE_DTYPES)}")
    device = torch.device(device)
    if name == "float32":
        return name
    if not torch.amp.is_autocast_available(device.type):
        raise UserError(f"model.dtype {name}: torch has no autocast on device {device.type}; use model.dtype: float32")
    if device.type == "cuda" and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"model.dtype bfloat16: CUDA device {torch.cuda.get_device_name(device)} has no bfloat16 "
                        f"support; use float16 or float32")
    return name


def compute_context(name: str, device: torch.device | str):
    """Autocast in the compute dtype on `device` (float32: nothing)."""
    dtype = COMPUTE_DTYPES[name]
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class InDtype:
    """A denoiser whose calls run in compute dtype `name`, returning float32; other attributes pass through."""

    def __init__(self, denoiser, name: str):
        self.denoiser, self.dtype_name = denoiser, name

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with compute_context(self.dtype_name, x.device):
            return self.denoiser(x, *args, **kwargs).to(torch.float32)

    def __getattr__(self, name):
        return getattr(self.__dict__["denoiser"], name)


def in_dtype(denoiser, name: str):
    """The denoiser itself for float32 (bytes as before), else wrapped in `InDtype`."""
    return denoiser if name == "float32" else InDtype(denoiser, name)


def dtype_identity(name: str, key: str = "dtype") -> dict:
    """What a set's identity records of its compute dtype: nothing for float32 (the identity of sets made before the
    setting existed, so they stay valid), {key: name} otherwise."""
    return {} if name == "float32" else {key: name}
