"""DiffusersDenoiser: EDM-form wrapper of a local DDPM UNet2DModel, on tiny random UNets saved to tmp_path."""
from __future__ import annotations

import json

import pytest
import torch
from model_files import save_ddpm_pipeline, tiny_unet

from stages.diffusers_model import DiffusersDenoiser, continuous_timestep, load_diffusers_denoiser
from stages.sigma import alpha_bar, sigma_from_timestep, sigma_table
from stores.errors import UserError


def _x(batch=2, seed=1):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t", [0, 100, 640])
def test_d_is_x_minus_sigma_eps_at_ddpm_timestep(t):
    unet = tiny_unet()
    den = DiffusersDenoiser(unet)
    x = _x()
    sigma = sigma_from_timestep(t)
    with torch.no_grad():
        d = den(x, torch.tensor(sigma, dtype=torch.float64))
        eps = unet(alpha_bar(t) ** 0.5 * x, torch.tensor([t, t]), return_dict=False)[0]
    assert d.shape == x.shape and d.dtype == x.dtype
    torch.testing.assert_close(d, x - sigma * eps, atol=1e-5, rtol=1e-5)


def test_per_sample_sigma():
    den = DiffusersDenoiser(tiny_unet())
    x = _x(2)
    sigmas = torch.tensor([sigma_from_timestep(50), sigma_from_timestep(700)], dtype=torch.float64)
    with torch.no_grad():
        both = den(x, sigmas)
        first = den(x[:1], sigmas[:1])
        second = den(x[1:], sigmas[1:])
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_continuous_timestep():
    table = torch.tensor(sigma_table())
    assert torch.equal(continuous_timestep(table), torch.arange(1000, dtype=torch.float64))
    mid = (table[100] * table[101]).sqrt()  # halfway in log sigma
    assert continuous_timestep(mid.view(1)).item() == pytest.approx(100.5, abs=1e-9)
    assert continuous_timestep(torch.tensor([1e-5, 1e5])).tolist() == [0.0, 999.0]


def test_attributes_and_layers():
    den = DiffusersDenoiser(tiny_unet())
    assert (den.img_resolution, den.img_channels, den.label_dim) == (8, 3, 0)
    assert den.sigma_min == pytest.approx(sigma_from_timestep(0)) and den.sigma_max == sigma_from_timestep(999)
    names = den.layer_names()
    assert names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    outputs = {}
    hooks = [den.layer_module(n).register_forward_hook(lambda m, i, o, n=n: outputs.setdefault(n, o)) for n in names]
    with torch.no_grad():
        den(_x(), torch.tensor(0.5))
    for h in hooks:
        h.remove()
    assert list(outputs) == names
    assert outputs["mid_block"].shape == (2, 32, 4, 4) and outputs["down_blocks.0"][0].shape == (2, 16, 4, 4)
    with pytest.raises(UserError, match="mid_block"):
        den.layer_module("conv_in")


def test_class_conditional_labels():
    den = DiffusersDenoiser(tiny_unet(num_class_embeds=10))
    assert den.label_dim == 10
    x, sigma = _x(2), torch.tensor(0.7)
    with torch.no_grad():
        by_index = den(x, sigma, torch.tensor([3, 8]))
        by_one_hot = den(x, sigma, torch.nn.functional.one_hot(torch.tensor([3, 8]), 10).float())
        other = den(x, sigma, torch.tensor([4, 8]))
    assert torch.equal(by_index, by_one_hot)
    assert not torch.allclose(other[0], by_index[0]) and torch.equal(other[1], by_index[1])
    with pytest.raises(ValueError, match="class_labels"):
        den(x, sigma)


def test_load_round_trip(tmp_path):
    unet = tiny_unet(seed=3)
    root = save_ddpm_pipeline(tmp_path / "ddpm", unet)
    x, sigma = _x(), torch.tensor(sigma_from_timestep(100), dtype=torch.float64)
    with torch.no_grad():
        want = DiffusersDenoiser(unet)(x, sigma)
        for path in (root, root / "unet"):  # the pipeline folder or its unet folder
            loaded = load_diffusers_denoiser(path)
            assert not loaded.training
            assert torch.equal(loaded(x, sigma), want)
            for name, tensor in unet.state_dict().items():
                assert torch.equal(loaded.unet.state_dict()[name], tensor)


def test_not_a_diffusers_model(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="UNet2DModel"):
        load_diffusers_denoiser(tmp_path / "junk")
    with pytest.raises(UserError, match="does not exist"):
        load_diffusers_denoiser(tmp_path / "missing")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError, match="UNet2DConditionModel"):
        load_diffusers_denoiser(other)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    with pytest.raises(UserError, match="cannot load"):
        load_diffusers_denoiser(broken)


@pytest.mark.parametrize("kwargs,match", [({"prediction_type": "v_prediction"}, "prediction_type"),
                                          ({"beta_schedule": "scaled_linear"}, "beta_schedule"),
                                          ({"beta_end": 0.012}, "beta_end"),
                                          ({"num_train_timesteps": 500}, "num_train_timesteps")])
def test_scheduler_must_be_ddpm_linear_eps(tmp_path, kwargs, match):
    root = save_ddpm_pipeline(tmp_path / "m", tiny_unet(), **kwargs)
    with pytest.raises(UserError, match=match):
        load_diffusers_denoiser(root)


def test_heun_sampling_through_the_wrapper():
    """The samplers clamp sigma to the DDPM range [sigma(0), sigma(999)] and run the wrapped UNet end to end."""
    from stages.samplers import sample

    den = DiffusersDenoiser(tiny_unet(num_class_embeds=10))
    seen = []
    den.register_forward_pre_hook(lambda module, args: seen.append(float(args[1][0])))
    out = sample("heun", den, _x(2), torch.tensor([1, 2]), num_steps=4, sigma_min=0.002, sigma_max=500)
    assert out.shape == (2, 3, 8, 8) and bool(torch.isfinite(out).all()) and len(seen) == 7
    assert seen[0] == pytest.approx(sigma_from_timestep(999), rel=1e-6)
    assert seen[-1] == pytest.approx(sigma_from_timestep(0), rel=1e-6)
