"""Noise levels: DDPM discrete timesteps <-> EDM sigma, and the EDM sampler's sigma steps.

DDPM's linear schedule: beta_t = 1e-4 + (0.02 - 1e-4) * t / 999 for t = 0..999,
alpha_bar_t = prod_{s <= t} (1 - beta_s), sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t).
A VP model sees sqrt(alpha_bar_t) * x_sigma where x_sigma = x + sigma * eps (EDM form).
"""
from __future__ import annotations

import numbers
from functools import lru_cache

import numpy as np
import torch

from stores.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


@lru_cache(maxsize=1)
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """(alpha_bar [1000], sigma [1000]) in float64, read-only."""
    t = np.arange(NUM_TRAIN_TIMESTEPS, dtype=np.float64)
    betas = BETA_START + (BETA_END - BETA_START) * t / (NUM_TRAIN_TIMESTEPS - 1)
    alpha_bar = np.cumprod(1.0 - betas)
    sigma = np.sqrt((1.0 - alpha_bar) / alpha_bar)
    alpha_bar.flags.writeable = False
    sigma.flags.writeable = False
    return alpha_bar, sigma


def sigma_table() -> np.ndarray:
    """sigma(t) for t = 0..999, float64 [1000], increasing."""
    return _tables()[1]


def _check_timestep(t) -> int:
    """The timestep as an int; UserError unless it is an integer in [0, 999]."""
    valid = f"the timestep must be an integer in [0, {NUM_TRAIN_TIMESTEPS - 1}] (DDPM's 1000-step linear schedule)"
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise UserError(f"{valid}; got {t!r}")
    if isinstance(t, numbers.Integral):
        value = int(t)
    elif float(t).is_integer():
        value = int(t)
    else:
        raise UserError(f"{valid}; got {t!r}")
    if not 0 <= value < NUM_TRAIN_TIMESTEPS:
        raise UserError(f"{valid}; got {value}")
    return value


def alpha_bar(t) -> float:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) on DDPM's linear schedule."""
    return float(_tables()[0][_check_timestep(t)])


def sigma_from_timestep(t) -> float:
    """EDM noise level of DDPM timestep t: sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    return float(_tables()[1][_check_timestep(t)])


def timestep_from_sigma(sigma: float) -> int:
    """The DDPM timestep whose sigma is nearest to `sigma` in log space (clamped to [0, 999])."""
    value = float(sigma)
    if not np.isfinite(value) or value <= 0:
        raise UserError(f"sigma must be a positive finite number; got {sigma!r}")
    log_table = np.log(sigma_table())
    return int(np.argmin(np.abs(log_table - np.log(value))))


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0) -> torch.Tensor:
    """EDM discretisation: sigma_i for i < N, then sigma_N = 0. Float64 [N + 1], decreasing."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 2:
        raise UserError(f"num_steps must be an integer >= 2; got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise UserError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise UserError(f"rho must be positive; got {rho}")
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])
