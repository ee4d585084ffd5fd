"""Noise levels and samplers: DDPM sigma mapping, EDM steps, official-sampler conformance, ideal-denoiser tests."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import conformance_dir

from stages.noise import churn_noise_fn
from stages.samplers import SAMPLERS, NFECounter, edm_euler_sampler, edm_heun_sampler, sample
from stages.sigma import alpha_bar, edm_sigma_steps, sigma_from_timestep, sigma_table, timestep_from_sigma
from stores.errors import UserError

CONFORMANCE = conformance_dir()  # ../shared/conformance next to the repo


# ---------------------------------------------------------------- DDPM timesteps <-> sigma

def test_sigma_of_ddpm_timesteps():
    assert sigma_from_timestep(100) == pytest.approx(0.3423, abs=1e-4)
    assert sigma_from_timestep(200) == pytest.approx(0.7236, abs=1e-4)
    prod = 1.0
    for s in range(301):  # independent running product
        prod *= 1 - (1e-4 + (0.02 - 1e-4) * s / 999)
    assert alpha_bar(300) == pytest.approx(prod, rel=1e-12)
    assert sigma_from_timestep(300) == pytest.approx(math.sqrt((1 - prod) / prod), rel=1e-12)
    assert np.all(np.diff(sigma_table()) > 0) and sigma_table().dtype == np.float64


def test_timestep_from_sigma_is_nearest_inverse():
    assert all(timestep_from_sigma(sigma_from_timestep(t)) == t for t in range(1000))
    lo, hi = sigma_from_timestep(100), sigma_from_timestep(101)
    assert timestep_from_sigma(lo * (hi / lo) ** 0.4) == 100
    assert timestep_from_sigma(lo * (hi / lo) ** 0.6) == 101
    assert timestep_from_sigma(1e-6) == 0 and timestep_from_sigma(1e6) == 999
    s0, s1 = sigma_from_timestep(0), sigma_from_timestep(1)
    assert timestep_from_sigma(math.sqrt(s0 * s1) * 1.01) == 1  # nearest in log sigma (linearly nearer to 0)
    with pytest.raises(UserError):
        timestep_from_sigma(-1.0)


@pytest.mark.parametrize("bad", [-1, 1000, 100.5, "100", None])
def test_bad_timesteps_name_the_range(bad):
    with pytest.raises(UserError, match=r"\[0, 999\]"):
        sigma_from_timestep(bad)


def test_integral_float_timestep_accepted():
    assert sigma_from_timestep(100.0) == sigma_from_timestep(np.int64(100))


# ---------------------------------------------------------------- EDM sigma steps

def test_edm_sigma_steps():
    steps = edm_sigma_steps(18)
    assert steps.dtype == torch.float64 and steps.shape == (19,)
    assert steps[0].item() == pytest.approx(80.0, rel=1e-12) and steps[17].item() == pytest.approx(0.002, rel=1e-12)
    assert steps[18].item() == 0.0 and bool(torch.all(steps[1:] < steps[:-1]))
    i = 5
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert steps[i].item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(UserError):
        edm_sigma_steps(1)
    with pytest.raises(UserError):
        edm_sigma_steps(10, sigma_min=5, sigma_max=1)


# ---------------------------------------------------------------- ideal denoisers

class GaussianDenoiser:
    """Ideal D for data ~ N(mu, s^2) per dimension: (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""

    def __init__(self, mu: torch.Tensor, s: torch.Tensor):
        self.mu, self.s = mu.double(), s.double()  # [1, C, H, W]

    def __call__(self, x, sigma, class_labels=None):
        var = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1) ** 2
        return (self.s ** 2 * x.double() + var * self.mu) / (self.s ** 2 + var)


class MixtureDenoiser:
    """Ideal D for data ~ sum_k w_k N(mu_k, s^2 I) in d = numel(mu_k) dimensions."""

    def __init__(self, mus: torch.Tensor, weights: torch.Tensor, s: float):
        self.mus, self.log_w, self.s2 = mus.double(), weights.double().log(), s * s  # mus [K, C, H, W]

    def __call__(self, x, sigma, class_labels=None):
        x = x.double().unsqueeze(1)  # [B, 1, C, H, W]
        var = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1, 1) ** 2 + self.s2
        logits = self.log_w - ((x - self.mus) ** 2).flatten(2).sum(-1) / (2 * var.reshape(-1, 1))  # [B, K]
        post = logits.softmax(dim=1)[..., None, None, None]
        means = (self.s2 * x + (var - self.s2) * self.mus) / var  # [B, K, C, H, W]
        return (post * means).sum(1)


MU = torch.tensor([1.0, -0.5, 0.2, -1.0]).view(1, 1, 2, 2)
STD = torch.tensor([0.5, 0.3, 0.6, 0.4]).view(1, 1, 2, 2)


def _latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))  # [n, 1, 2, 2]


def _scalar_gain(s: float, num_steps: int, second_order: bool, sigma_max: float = 80.0) -> float:
    """Algorithm 2 on the scalar ODE dy/dsigma = sigma y / (s^2 + sigma^2) (y = x - mu), from y = 1."""
    rho, lo = 7.0, 0.002
    t = [(sigma_max ** (1 / rho) + i / (num_steps - 1) * (lo ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
         for i in range(num_steps)] + [0.0]
    slope = lambda y, sig: sig * y / (s * s + sig * sig)  # noqa: E731
    y = 1.0
    for i in range(num_steps):
        d = slope(y, t[i])
        y_next = y + (t[i + 1] - t[i]) * d
        if second_order and i < num_steps - 1:
            y_next = y + (t[i + 1] - t[i]) * 0.5 * (d + slope(y_next, t[i + 1]))
        y = y_next
    return y


def _assert_moments(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, extra_rel_var: float = 0.0):
    """Mean within 5 standard errors; variance within 5 standard errors (+ a relative allowance)."""
    n = x.shape[0]
    mean_err = (x.mean(0) - mu[0]).abs() / (var[0] / n).sqrt()
    var_err = (x.var(0) / var[0] - 1).abs()
    assert mean_err.max() < 5, mean_err
    assert var_err.max() < 5 * math.sqrt(2 / (n - 1)) + extra_rel_var, var_err


@pytest.mark.parametrize("second_order", [True, False])
def test_sampler_follows_algorithm2_on_gaussian(second_order):
    """Per sample, the output equals mu + (80 z - mu) * gain, gain from an independent scalar recursion."""
    z = _latents(256)
    fn = edm_heun_sampler if second_order else edm_euler_sampler
    out = fn(GaussianDenoiser(MU, STD), z, num_steps=18)
    gains = torch.tensor([_scalar_gain(s, 18, second_order) for s in STD.flatten().tolist()]).view(1, 1, 2, 2)
    expect = MU.double() + (80 * z.double() - MU.double()) * gains.double()
    assert out.dtype == torch.float64
    assert (out - expect).abs().max().item() < 1e-5


def test_heun_recovers_gaussian_moments():
    """18 steps: the moments Algorithm 2 gives (its truncation error is ~11 % in variance here);
    128 steps: the data distribution itself, both within 5 standard errors of 4096 samples."""
    z = _latents(4096, seed=1)
    den = GaussianDenoiser(MU, STD)
    gain = torch.tensor([_scalar_gain(s, 18, True) / (s / math.hypot(s, 80)) for s in STD.flatten().tolist()])
    _assert_moments(edm_heun_sampler(den, z, num_steps=18), MU, STD ** 2 * gain.view(1, 1, 2, 2) ** 2)
    _assert_moments(edm_heun_sampler(den, z, num_steps=128), MU, STD ** 2)


@pytest.mark.parametrize("name,steps,allowance", [("euler", 256, 0.03), ("dpm-solver", 64, 0.01)])
def test_other_samplers_recover_gaussian_moments(name, steps, allowance):
    out = sample(name, GaussianDenoiser(MU, STD), _latents(4096, seed=2), num_steps=steps)
    _assert_moments(out, MU, STD ** 2, extra_rel_var=allowance)


def test_heun_recovers_mixture():
    """Two components at +-0.8 (weights 0.3 / 0.7, s = 0.3): component shares within 5 binomial standard errors."""
    mus = torch.stack([torch.full((1, 2, 2), 0.8), torch.full((1, 2, 2), -0.8)])  # [2, 1, 2, 2]
    out = edm_heun_sampler(MixtureDenoiser(mus, torch.tensor([0.3, 0.7]), 0.3), _latents(4096, seed=3),
                           num_steps=64)
    upper = out.flatten(1).mean(1) > 0
    n = out.shape[0]
    assert abs(upper.double().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    for part, mu in ((out[upper], 0.8), (out[~upper], -0.8)):
        _assert_moments(part, torch.full((1, 1, 2, 2), mu), torch.full((1, 1, 2, 2), 0.09), extra_rel_var=0.02)


# ---------------------------------------------------------------- churn, registry (NFE, sigma range: the contract)

def test_network_sees_float32_and_sigma_per_sample():
    seen = []

    def den(x, sigma, labels=None):
        seen.append((x.dtype, sigma.dtype, tuple(sigma.shape), labels))
        return torch.zeros_like(x)
    edm_heun_sampler(den, _latents(3), "L", num_steps=3)
    assert seen == [(torch.float32, torch.float32, (3,), "L")] * 5


def test_churn_uses_noise_fn_in_range_and_is_per_sample():
    calls = []
    den = GaussianDenoiser(MU, STD)
    base = churn_noise_fn(range(4), seed=7)

    def noise_fn(x, i):
        calls.append(i)
        return base(x, i)
    opts = dict(num_steps=10, S_churn=40, S_min=0.05, S_max=50)
    full = edm_heun_sampler(den, _latents(4), noise_fn=noise_fn, **opts)
    steps = edm_sigma_steps(10)[:-1]
    assert calls == [i for i, s in enumerate(steps.tolist()) if 0.05 <= s <= 50]
    assert not torch.allclose(full, edm_heun_sampler(den, _latents(4), **{**opts, "S_churn": 0}))
    halves = [edm_heun_sampler(den, _latents(4)[sl], noise_fn=churn_noise_fn(ids, 7), **opts)
              for sl, ids in ((slice(0, 2), [0, 1]), (slice(2, 4), [2, 3]))]
    assert torch.equal(torch.cat(halves), full)
    with pytest.raises(ValueError, match="noise_fn"):
        edm_heun_sampler(den, _latents(4), **opts)


def test_churn_gamma_capped_and_noise_scaled():
    """S_churn huge: gamma = sqrt(2) - 1, so the first call sees sigma_hat = 80 sqrt(2) and, from zero latents
    and unit noise, x_hat = sqrt(sigma_hat^2 - 80^2) * S_noise = 80 * S_noise."""
    seen = []

    def den(x, sigma, labels=None):
        seen.append((sigma[0].item(), x))
        return torch.zeros_like(x)
    edm_heun_sampler(den, torch.zeros(2, 1, 2, 2), num_steps=4, S_churn=1e6, S_noise=1.5,
                     noise_fn=lambda x, i: torch.ones_like(x))
    assert seen[0][0] == pytest.approx(80 * math.sqrt(2), rel=1e-6)
    torch.testing.assert_close(seen[0][1], torch.full((2, 1, 2, 2), 120.0))


def test_registry_and_sample_errors():
    assert set(SAMPLERS) == {"heun", "euler", "dpm-solver", "dpm-solver-3m", "ipndm"}
    with pytest.raises(UserError, match="heun, euler, dpm-solver, dpm-solver-3m, ipndm"):
        sample("ddim", GaussianDenoiser(MU, STD), _latents(2), None)
    with pytest.raises(UserError, match="S_churn"):
        sample("dpm-solver", GaussianDenoiser(MU, STD), _latents(2), None, S_churn=1)


def test_sample_one_hot_encodes_integer_labels():
    got = []

    def den(x, sigma, labels=None):
        got.append(labels)
        return torch.zeros_like(x)
    den.label_dim = 4
    sample("euler", den, _latents(2), torch.tensor([3, 1]), num_steps=2)
    assert torch.equal(got[0], torch.tensor([[0, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.float32))


# ---------------------------------------------------------------- conformance with the official sampler

def _small_edm():
    from stages.edm.networks import EDMPrecond

    config = json.loads((CONFORMANCE / "songunet-small.json").read_text())["config"]
    net = EDMPrecond(**config).eval()
    data = np.load(CONFORMANCE / "songunet-small.npz")
    params = {k.removeprefix("param:"): torch.from_numpy(data[k]) for k in data.files if k.startswith("param:")}
    own = dict(net.named_parameters())
    assert set(own) == set(params)
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(params[name])
    return net


@pytest.mark.parametrize("steps", [6, 18])
def test_heun_matches_official_sampler(steps):
    ref = np.load(CONFORMANCE / "edm-heun-sampler.npz")
    net = NFECounter(_small_edm())
    out = edm_heun_sampler(net, torch.from_numpy(ref["latents"]), torch.from_numpy(ref["class_labels"]),
                           num_steps=steps)
    expect = torch.from_numpy(ref[f"out_steps{steps}"])
    assert out.dtype == expect.dtype == torch.float64
    assert (out - expect).abs().max().item() <= 1e-4
    assert net.calls == 2 * steps - 1
