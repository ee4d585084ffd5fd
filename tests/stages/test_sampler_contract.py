"""One contract over every registered sampler (stages.sampler_registry.SAMPLERS), in the manner of diffusers'
SchedulerCommonTest: fixed latents give bitwise the same samples; the noise levels the network sees run from
sigma_max (clamped to the denoiser's range) down the EDM steps to sigma_min, and the last step lands on sigma = 0;
the network is called exactly as many times as the registry declares; the registry's churn flag is the truth;
sample i run alone equals sample i in a batch (it depends only on seed, i and the sampler settings); steps below a
sampler's declared minimum, and churn for a sampler without it, are refused as user errors.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_edm_config

from stages.edm import EDMPrecond
from stages.generate import GenerateSettings
from stages.noise import labels_for, latents_for
from stages.sampler_registry import SAMPLERS
from stages.samplers import NFECounter, sample
from stages.sigma import edm_sigma_steps
from stores.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = list(SAMPLERS)
IDS = list(range(4))


class RecordingDenoiser:
    """Ideal D for data ~ N(0.3, 0.5^2) per pixel; records the noise level and output of every call."""

    def __init__(self, sigma_min: float | None = None, sigma_max: float | None = None):
        if sigma_min is not None:
            self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.sigmas: list[float] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, x, sigma, class_labels=None):
        var = sigma.double().reshape(-1, 1, 1, 1) ** 2                                 # (B, 1, 1, 1)
        d = ((0.25 * x.double() + var * 0.3) / (0.25 + var)).float()                  # (B, C, H, W)
        self.sigmas.append(float(sigma[0]))
        self.outputs.append(d)
        return d


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    net = EDMPrecond(**tiny_edm_config()).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)                                         # off the near-zero init
    return net


def _settings(name: str, steps: int, churn: float = 0.0) -> GenerateSettings:
    return GenerateSettings(name, max(steps, SAMPLERS[name].min_steps), churn if SAMPLERS[name].takes_churn else 0.0,
                            seed=3)


def _latents(shape=(1, 8, 8)) -> torch.Tensor:
    return latents_for(IDS, shape, seed=3)                                             # (4, C, H, W)


@pytest.mark.parametrize("churn", [0.0, 30.0])
@pytest.mark.parametrize("name", NAMES)
def test_fixed_latents_give_the_same_samples(network, name, churn):
    settings = _settings(name, 4, churn)
    labels = labels_for(IDS, network.label_dim, 3)
    runs = [sample(name, network, _latents(), labels, **settings.sampler_options(IDS)) for _ in range(2)]
    assert runs[0].shape == (4, 1, 8, 8) and runs[0].dtype == torch.float64
    assert bool(torch.isfinite(runs[0]).all())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("sigma_range, want", [(None, (0.002, 80.0)), ((0.01, 20.0), (0.01, 20.0))])
@pytest.mark.parametrize("steps", [2, 5])
@pytest.mark.parametrize("name", NAMES)
def test_noise_levels_run_from_sigma_max_to_zero(name, steps, sigma_range, want):
    """sigma_range: the denoiser's own (sigma_min, sigma_max), which narrows the requested 0.002 .. 80."""
    steps = max(steps, SAMPLERS[name].min_steps)
    den = RecordingDenoiser(*(sigma_range or ()))
    out = sample(name, den, _latents((1, 2, 2)), num_steps=steps, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    levels = sorted(set(den.sigmas), reverse=True)
    assert den.sigmas[0] == pytest.approx(want[1], rel=1e-6)                           # starts at sigma_max
    assert len(levels) == steps and levels[-1] == pytest.approx(want[0], rel=1e-6)     # N levels, then 0:
    expected = edm_sigma_steps(steps, *want, 7.0)
    assert expected.shape == (steps + 1,) and expected[-1].item() == 0.0
    torch.testing.assert_close(torch.tensor(levels, dtype=torch.float64), expected[:-1], rtol=1e-6, atol=0)
    torch.testing.assert_close(out, den.outputs[-1].double(), rtol=1e-5, atol=1e-6)    # a step to 0 returns D


@pytest.mark.parametrize("steps", [2, 3, 18])
@pytest.mark.parametrize("name", NAMES)
def test_network_called_as_often_as_declared(name, steps):
    counter = NFECounter(RecordingDenoiser())
    settings = _settings(name, steps, churn=10.0)
    sample(name, counter, _latents((1, 2, 2)), **settings.sampler_options(IDS))
    assert counter.calls == SAMPLERS[name].nfe(settings.steps) == settings.nfe


@pytest.mark.parametrize("name, steps, nfe", [("heun", 18, 35), ("heun", 6, 11), ("euler", 18, 18),
                                              ("dpm-solver", 10, 10), ("dpm-solver-3m", 10, 10),
                                              ("ipndm", 10, 10)])
def test_declared_evaluations(name, steps, nfe):
    """Heun's last step is an Euler step (2N - 1); Euler and DPM-Solver++ 2M evaluate once per step."""
    counter = NFECounter(RecordingDenoiser())
    sample(name, counter, _latents((1, 2, 2)), num_steps=steps)
    assert counter.calls == nfe == SAMPLERS[name].nfe(steps)


@pytest.mark.parametrize("name", NAMES)
def test_churn_flag_matches_the_function(name):
    entry = SAMPLERS[name]
    options = inspect.signature(entry.function()).parameters
    assert ("S_churn" in options) == entry.takes_churn and entry.help_line().startswith(name)


@pytest.mark.parametrize("name", NAMES)
def test_sample_i_depends_only_on_seed_i_and_settings(network, name):
    """Sample 2 of ids [0, 1, 2, 3] equals sample 0 of ids [2]: no batch-mate leaks into it."""
    settings = _settings(name, 4, churn=30.0)
    labels = labels_for(IDS, network.label_dim, 3)
    whole = sample(name, network, _latents(), labels, **settings.sampler_options(IDS))
    alone = sample(name, network, latents_for([2], (1, 8, 8), seed=3), labels_for([2], network.label_dim, 3),
                   **settings.sampler_options([2]))
    torch.testing.assert_close(alone[0], whole[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bad_settings_are_user_errors(name):
    entry = SAMPLERS[name]
    with pytest.raises(UserError, match=f"at least {entry.min_steps}"):
        GenerateSettings(name, entry.min_steps - 1, 0.0).check()
    GenerateSettings(name, entry.min_steps, 0.0).check()
    if not entry.takes_churn:
        with pytest.raises(UserError, match="churn applies to the"):
            GenerateSettings(name, 10, 1.0).check()


def test_unknown_sampler_is_a_user_error():
    with pytest.raises(UserError, match="unknown sampler 'unipc'"):
        GenerateSettings("unipc", 10, 0.0).check()


def test_steps_for_nfe_inverts_the_evaluations():
    assert SAMPLERS["heun"].steps_for_nfe(35) == 18 and SAMPLERS["heun"].steps_for_nfe(10) is None
    assert SAMPLERS["dpm-solver-3m"].steps_for_nfe(5) == 5 and SAMPLERS["dpm-solver-3m"].steps_for_nfe(2) is None
