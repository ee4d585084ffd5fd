"""Samplers over an EDM-form denoiser D(x; sigma, labels).

`edm_heun_sampler` is Algorithm 2 of Karras et al. (2022) as the official sampler runs it: the state
is float64, the network sees x and sigma cast to float32, its output is cast back to float64.
`edm_euler_sampler` takes the same steps without the second-order correction.
`dpm_solver_sampler` drives diffusers' `EDMDPMSolverMultistepScheduler` (DPM-Solver++ 2M; 3M with
`dpm_solver_3m_sampler`). `ipndm_sampler` is the improved PNDM of Zhang & Chen (2023).

A denoiser is any callable denoiser(x [B, C, H, W] float32, sigma [B] float32, labels) -> D [B, C, H, W].
Optional attributes `sigma_min` / `sigma_max` narrow the sigma range as in the official code.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from stages.noise import one_hot
from stages.sampler_registry import SAMPLERS, sampler_entry  # noqa: F401  SAMPLERS re-exported
from stages.sigma import edm_sigma_steps
from stores.errors import UserError

NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]


class NFECounter:
    """Wraps a denoiser and counts its calls (network function evaluations); attributes pass through."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.denoiser(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["denoiser"], name)


def _sigma_range(denoiser, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """Clamp the requested range to what the denoiser supports."""
    lo = max(sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    hi = min(sigma_max, float(getattr(denoiser, "sigma_max", math.inf)))
    return lo, hi


def _denoise(denoiser, x: torch.Tensor, sigma: float, labels) -> torch.Tensor:
    """D(x; sigma) in float64; the network sees float32 x and a float32 sigma per sample."""
    sigmas = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)  # [B]
    return denoiser(x.to(torch.float32), sigmas, labels).to(torch.float64)


def _churn(x: torch.Tensor, t_cur: float, i: int, num_steps: int, S_churn, S_min, S_max, S_noise,
           noise_fn: NoiseFn | None) -> tuple[torch.Tensor, float]:
    """Raise the noise level from t_cur to t_hat = (1 + gamma) t_cur with fresh noise; returns (x_hat, t_hat)."""
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
    if gamma == 0:
        return x, t_cur
    if noise_fn is None:
        raise ValueError("S_churn > 0 needs noise_fn(x, step_index) (see stages.noise.churn_noise_fn)")
    t_hat = t_cur + gamma * t_cur
    eps = noise_fn(x, i).to(dtype=x.dtype, device=x.device)  # [B, C, H, W]
    return x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * eps, t_hat


@torch.no_grad()
def _edm_solve(denoiser, latents, class_labels, *, second_order: bool, num_steps, sigma_min, sigma_max, rho,
               S_churn, S_min, S_max, S_noise, noise_fn) -> torch.Tensor:
    """Shared loop of Algorithm 2; Heun correction on every step but the last when second_order."""
    lo, hi = _sigma_range(denoiser, sigma_min, sigma_max)
    t_steps = edm_sigma_steps(num_steps, lo, hi, rho).tolist()  # N + 1 floats, t_N = 0
    x_next = latents.to(torch.float64) * t_steps[0]  # [B, C, H, W]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = _churn(x_next, t_cur, i, num_steps, S_churn, S_min, S_max, S_noise, noise_fn)
        d_cur = (x_hat - _denoise(denoiser, x_hat, t_hat, class_labels)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if second_order and i < num_steps - 1:
            d_prime = (x_next - _denoise(denoiser, x_next, t_next, class_labels)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def edm_heun_sampler(denoiser, latents: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                     num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                     S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
                     noise_fn: NoiseFn | None = None) -> torch.Tensor:
    """EDM Algorithm 2 (2N - 1 NFE). latents [B, C, H, W] ~ N(0, I) -> samples [B, C, H, W] float64.

    Churn noise comes from noise_fn(x, step_index) -> tensor shaped like x, required when S_churn > 0.
    """
    return _edm_solve(denoiser, latents, class_labels, second_order=True, num_steps=num_steps,
                      sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, S_churn=S_churn, S_min=S_min,
                      S_max=S_max, S_noise=S_noise, noise_fn=noise_fn)


def edm_euler_sampler(denoiser, latents: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                      num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                      S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
                      noise_fn: NoiseFn | None = None) -> torch.Tensor:
    """First-order version of `edm_heun_sampler` on the same sigma steps (N NFE)."""
    return _edm_solve(denoiser, latents, class_labels, second_order=False, num_steps=num_steps,
                      sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, S_churn=S_churn, S_min=S_min,
                      S_max=S_max, S_noise=S_noise, noise_fn=noise_fn)


def _dpm_scheduler(num_steps: int, sigma_min: float, sigma_max: float, rho: float, solver_order: int):
    """diffusers' EDM DPM-Solver++ on the Karras steps, final sigma 0, stepping from index 0."""
    from diffusers import EDMDPMSolverMultistepScheduler

    scheduler = EDMDPMSolverMultistepScheduler(
        sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=0.5, sigma_schedule="karras", rho=rho,
        prediction_type="epsilon", solver_order=solver_order, algorithm_type="dpmsolver++",
        final_sigmas_type="zero")
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(0)
    return scheduler


def _as_model_output(scheduler, x: torch.Tensor, denoised: torch.Tensor, step: int) -> torch.Tensor:
    """F such that the scheduler's `precondition_outputs` (c_skip x + c_out F) gives back our D."""
    sigma = scheduler.sigmas[step]
    skip_x = scheduler.precondition_outputs(x, torch.zeros((), dtype=x.dtype), sigma)  # c_skip x
    c_out = scheduler.precondition_outputs(torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype), sigma)
    return (denoised - skip_x) / c_out


@torch.no_grad()
def dpm_solver_sampler(denoiser, latents: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                       num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                       solver_order: int = 2) -> torch.Tensor:
    """DPM-Solver++ (2M by default) via diffusers, N NFE. latents [B, C, H, W] -> samples float64.

    Our D already includes EDM preconditioning, so the raw x (not `scale_model_input`'s c_in x) goes to
    the denoiser, and D is converted to the "epsilon" output that the scheduler's own c_skip/c_out
    turn back into D.
    """
    lo, hi = _sigma_range(denoiser, sigma_min, sigma_max)
    edm_sigma_steps(num_steps, lo, hi, rho)  # validates the arguments
    scheduler = _dpm_scheduler(num_steps, lo, hi, rho, solver_order)
    x = latents.to(torch.float64) * float(scheduler.sigmas[0])  # [B, C, H, W]
    for i, t in enumerate(scheduler.timesteps):
        denoised = _denoise(denoiser, x, float(scheduler.sigmas[i]), class_labels)
        x = scheduler.step(_as_model_output(scheduler, x, denoised, i), t, x).prev_sample
    return x


def dpm_solver_3m_sampler(denoiser, latents: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                          num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                          rho: float = 7.0) -> torch.Tensor:
    """DPM-Solver++ 3M via diffusers (`solver_order` 3), N NFE; the order is fixed by the name so that it is part
    of the generated set's identity."""
    return dpm_solver_sampler(denoiser, latents, class_labels, num_steps=num_steps, sigma_min=sigma_min,
                              sigma_max=sigma_max, rho=rho, solver_order=3)


# Adams-Bashforth weights of iPNDM (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential
# integrator", Eq. 24), newest slope first, by the order the history allows.
IPNDM_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def ipndm_sampler(denoiser, latents: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                  num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> torch.Tensor:
    """iPNDM on the EDM steps, N NFE: an explicit multistep over the slopes d = (x - D) / t, order rising with
    the history up to 4 (fixed: the sampler's name is its identity); the last step (to sigma = 0) is first order,
    so it returns D as the other samplers do (diffusers' `lower_order_final`). latents [B, C, H, W] -> float64."""
    lo, hi = _sigma_range(denoiser, sigma_min, sigma_max)
    t_steps = edm_sigma_steps(num_steps, lo, hi, rho).tolist()  # N + 1 floats, t_N = 0
    x = latents.to(torch.float64) * t_steps[0]  # [B, C, H, W]
    slopes: list[torch.Tensor] = []  # newest first
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        slopes.insert(0, (x - _denoise(denoiser, x, t_cur, class_labels)) / t_cur)
        del slopes[max(IPNDM_WEIGHTS):]
        order = 1 if i == num_steps - 1 else len(slopes)
        slope = sum(w * d for w, d in zip(IPNDM_WEIGHTS[order], slopes))
        x = x + (t_next - t_cur) * slope
    return x


def _check_options(name: str, fn, opts: dict) -> None:
    """UserError naming any option that sampler `name` does not take."""
    params = inspect.signature(fn).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise UserError(f"sampler '{name}' has no option {', '.join(unknown)}; options: {', '.join(allowed)}")


def sample(name: str, denoiser, latents: torch.Tensor, labels: torch.Tensor | None = None, **opts) -> torch.Tensor:
    """Run sampler `name`; integer labels [B] become one-hot for a conditional denoiser."""
    fn = sampler_entry(name).function()
    _check_options(name, fn, opts)
    label_dim = int(getattr(denoiser, "label_dim", 0))
    if labels is not None and label_dim > 0 and not labels.is_floating_point():
        labels = one_hot(labels, label_dim).to(latents.device)
    return fn(denoiser, latents, labels, **opts)
