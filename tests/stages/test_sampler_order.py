"""Every sampler against the exact probability-flow ODE on Gaussian data, where the ideal denoiser is closed form.

Data x0 ~ N(MU, S^2) per pixel: D(x; t) = (S^2 x + t^2 MU) / (S^2 + t^2), and the ODE carries x(T) to
x(0) = MU + (x(T) - MU) S / sqrt(S^2 + T^2). Each sampler's error must shrink as its steps grow, at least as
fast as its order promises, and the multistep solvers must beat Euler at equal network evaluations.
"""
from __future__ import annotations

import math

import pytest
import torch

from stages.sampler_registry import SAMPLERS
from stages.samplers import sample

MU, S = 0.3, 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
# error(N) / error(2N) at least this much: 2^order, with slack for the non-uniform steps and the last step to 0
MIN_RATIO = {"euler": 1.6, "heun": 3.0, "dpm-solver": 3.0, "dpm-solver-3m": 3.0, "ipndm": 3.0}


class GaussianDenoiser:
    def __call__(self, x, sigma, class_labels=None):
        var = sigma.double().reshape(-1, 1, 1, 1) ** 2                          # (B, 1, 1, 1)
        return ((S ** 2 * x.double() + var * MU) / (S ** 2 + var)).float()       # (B, C, H, W)


def _error(name: str, steps: int) -> float:
    """Max |sample - exact ODE solution| over a few latents."""
    latents = torch.randn((4, 1, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(name, GaussianDenoiser(), latents.float(), num_steps=steps, sigma_min=SIGMA_MIN,
                 sigma_max=SIGMA_MAX, rho=7.0)
    # exact from sigma_max down to sigma_min, then the shared final (Euler) step to 0, which returns D(x; sigma_min)
    x_end = MU + (latents * SIGMA_MAX - MU) * math.sqrt(S ** 2 + SIGMA_MIN ** 2) / math.sqrt(S ** 2 + SIGMA_MAX ** 2)
    exact = (S ** 2 * x_end + SIGMA_MIN ** 2 * MU) / (S ** 2 + SIGMA_MIN ** 2)
    return float((out - exact).abs().max())


def test_every_sampler_is_checked():
    assert set(MIN_RATIO) == set(SAMPLERS)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_error_shrinks_with_the_order(name):
    errors = [_error(name, steps) for steps in (8, 16, 32)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[1] / errors[2] >= MIN_RATIO[name], errors


@pytest.mark.parametrize("name", ["dpm-solver", "dpm-solver-3m", "ipndm"])
def test_multistep_beats_euler_at_equal_nfe(name):
    assert _error(name, SAMPLERS[name].steps_for_nfe(32)) < _error("euler", 32) / 4
