"""EDM networks against reference outputs of the official NVlabs/edm code (DESIGN.md, "Conformance data")."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from stages.edm import EDMPrecond
from stages.edm.layers import UNetBlock
from stages.taps import features
from stores.errors import UserError


def _shared_dir() -> Path | None:
    candidates = [REPO.parent / "shared"]
    if os.environ.get("DRA_SHARED"):
        candidates.append(Path(os.environ["DRA_SHARED"]))
    candidates.append(Path("/work/shared"))
    return next((c for c in candidates if (c / "conformance").is_dir()), None)


SHARED = _shared_dir()


def _conformance(name: str) -> tuple[dict, np.lib.npyio.NpzFile]:
    if SHARED is None or not (SHARED / "conformance" / f"{name}.npz").is_file():
        pytest.skip(f"conformance data {name} not found (set DRA_SHARED)")
    root = SHARED / "conformance"
    return json.loads((root / f"{name}.json").read_text()), np.load(root / f"{name}.npz")


def fill_by_rule(named: dict[str, torch.Tensor]) -> None:
    """DESIGN.md fill rule: sorted names, k = position, j = flat index, s = sin(0.37 j + 1.3 k) in float64."""
    with torch.no_grad():
        for k, name in enumerate(sorted(named)):
            t = named[name]
            s = np.sin(0.37 * np.arange(t.numel(), dtype=np.float64) + 1.3 * k)
            if t.ndim >= 2:
                v = s / np.sqrt(t.numel() / t.shape[0])
            elif "norm" in name and name.endswith(".weight"):
                v = 1 + 0.1 * s
            else:
                v = 0.1 * s
            t.copy_(torch.from_numpy(v.reshape(t.shape)))


def _inputs(z) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.from_numpy(z["x"]), torch.from_numpy(z["sigma"]), torch.from_numpy(z["class_labels"])


def _max_diffs(net: EDMPrecond, z, layers: list[str]) -> dict[str, float]:
    """Max abs difference of D and of each activation against the npz."""
    x, sigma, labels = _inputs(z)
    with torch.no_grad():
        D = net(x, sigma, labels)
        acts = features(net, x, sigma, labels, layers)  # stops after the last tap
    diffs = {"D": (D - torch.from_numpy(z["D"])).abs().max().item()}
    for name in layers:
        ref = torch.from_numpy(z[f"act:{name}"])
        assert acts[name].shape == ref.shape, name
        diffs[name] = (acts[name] - ref).abs().max().item()
    return diffs


def _assert_structure(net: EDMPrecond, cfg: dict) -> None:
    assert [(n, list(p.shape)) for n, p in net.named_parameters()] == [(n, s) for n, s in cfg["parameters"]]
    assert [(n, list(b.shape)) for n, b in net.named_buffers()] == [(n, s) for n, s in cfg["buffers"]]
    assert sum(p.numel() for p in net.parameters()) == cfg["n_params"]
    assert list(net.model.enc) == cfg["enc_keys"]
    assert list(net.model.dec) == cfg["dec_keys"]


def test_songunet_small_matches_official_outputs():
    cfg, z = _conformance("songunet-small")
    net = EDMPrecond(**cfg["config"]).eval()
    _assert_structure(net, cfg)
    params = {k.removeprefix("param:"): z[k] for k in z.files if k.startswith("param:")}
    assert set(params) == {n for n, _ in cfg["parameters"]}
    net.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=False)
    assert torch.equal(net.model.enc["16x16_conv"].weight, torch.from_numpy(params["model.enc.16x16_conv.weight"]))
    diffs = _max_diffs(net, z, cfg["layers"])
    print("songunet-small max abs diffs:", diffs)
    assert set(diffs) == {"D", *cfg["layers"]}
    assert max(diffs.values()) <= 1e-4, diffs


def test_official_cifar10_config_matches_official_outputs():
    cfg, z = _conformance("edm-cifar10-cond-vp")
    net = EDMPrecond(**cfg["config"]).eval()
    _assert_structure(net, cfg)
    assert cfg["n_params"] == 55_735_299
    assert not {n for n, _ in cfg["buffers"]} & {n for n, _ in cfg["parameters"]}  # buffers are not parameters
    fill_by_rule(dict(net.named_parameters()))
    diffs = _max_diffs(net, z, cfg["layers"])
    print("edm-cifar10-cond-vp max abs diffs:", diffs)
    assert max(diffs.values()) <= 1e-3, diffs


SMALL = dict(img_resolution=16, img_channels=3, label_dim=10, model_type="SongUNet", model_channels=16,
             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9)


class _RecordingInner(torch.nn.Module):
    """Stands in for the U-Net: records its inputs and returns a fixed F."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = (x, noise_labels, class_labels, augment_labels)
        return torch.full_like(x, 0.25)


def test_preconditioning_formulas():
    net = EDMPrecond(**SMALL)
    net.model = _RecordingInner()
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.3, 4.0])
    D = net(x, sigma, torch.tensor([2, 5]))
    s = sigma.reshape(-1, 1, 1, 1)
    x_in, c_noise, labels, augment = net.model.seen
    torch.testing.assert_close(x_in, x / (0.25 + s ** 2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(labels, torch.eye(10)[[2, 5]])
    torch.testing.assert_close(augment, torch.zeros(2, 9))
    expected = 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * 0.25
    torch.testing.assert_close(D, expected)


def test_label_forms_and_defaults_agree():
    net = EDMPrecond(**SMALL).eval()
    fill_by_rule(dict(net.named_parameters()))
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 1.5])
    with torch.no_grad():
        one_hot = net(x, sigma, torch.eye(10)[[3, 8]])
        index = net(x, sigma, torch.tensor([3, 8]))
        no_labels = net(x, sigma)
        zero_labels = net(x, sigma, torch.zeros(2, 10), augment_labels=torch.zeros(2, 9))
        scalar_sigma = net(x, 0.5, torch.eye(10)[[3, 8]])
        other_augment = net(x, sigma, torch.eye(10)[[3, 8]], augment_labels=torch.ones(2, 9))
    torch.testing.assert_close(one_hot, index)
    torch.testing.assert_close(no_labels, zero_labels)
    torch.testing.assert_close(scalar_sigma[0], one_hot[0])
    assert not torch.allclose(one_hot, no_labels)
    assert not torch.allclose(one_hot, other_augment)


def _variant_inputs(batch: int = 3):
    x = torch.from_numpy(np.sin(np.arange(batch * 3 * 16 * 16) * 0.7).reshape(batch, 3, 16, 16)).float()
    augment = torch.from_numpy(0.5 * np.cos(np.arange(batch * 9) * 0.3).reshape(batch, 9)).float()
    return x, torch.tensor([0.05, 0.9, 12.0]), torch.eye(10)[[1, 4, 7]], augment


# Per-sample sum and abs-sum of D from the official NVlabs/edm networks, parameters (and Fourier
# frequencies) filled by the DESIGN.md rule, inputs from _variant_inputs.
VARIANTS = {
    "ncsnpp": (dict(img_resolution=16, img_channels=3, label_dim=10, model_type="SongUNet", embedding_type="fourier",
                    channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
                    resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
                    attn_resolutions=[8], augment_dim=9),
               324451, [-5.32966, -20.37026, 109.62559], [481.35471, 271.76971, 423.07425]),
    "skip": (dict(img_resolution=16, img_channels=3, label_dim=0, model_type="SongUNet", embedding_type="positional",
                  encoder_type="skip", decoder_type="skip", resample_filter=[1, 1], model_channels=16,
                  channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4]),
             319753, [0.4671, -120.33845, -237.08041], [491.54728, 533.61161, 703.83683]),
    "adm": (dict(img_resolution=16, img_channels=3, label_dim=10, model_type="DhariwalUNet", model_channels=32,
                 channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8, 4], augment_dim=9),
            1422979, [31.68628, 256.58917, 266.82924], [483.28776, 257.52901, 266.82924]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_architecture_variants_match_official_checksums(variant):
    config, n_params, sums, abs_sums = VARIANTS[variant]
    net = EDMPrecond(**config).eval()
    assert sum(p.numel() for p in net.parameters()) == n_params
    named = dict(net.named_parameters())
    named.update({n: b for n, b in net.named_buffers() if n.endswith("freqs")})
    fill_by_rule(named)
    x, sigma, labels, augment = _variant_inputs()
    with torch.no_grad():
        D = net(x, sigma, labels if config["label_dim"] else None, augment_labels=augment).double()
    np.testing.assert_allclose(D.sum((1, 2, 3)).numpy(), sums, atol=2e-3)
    np.testing.assert_allclose(D.abs().sum((1, 2, 3)).numpy(), abs_sums, atol=2e-3)


def test_variant_layer_names_and_aux_layers():
    net = EDMPrecond(**VARIANTS["ncsnpp"][0])
    names = dict(net.named_parameters())
    assert "model.enc.8x8_aux_residual.weight" in names and "model.map_noise.freqs" in dict(net.named_buffers())
    skip = EDMPrecond(**VARIANTS["skip"][0])
    assert {"model.enc.8x8_aux_skip.weight", "model.dec.8x8_aux_conv.weight"} <= set(dict(skip.named_parameters()))
    assert "model.dec.8x8_aux_up.resample_filter" in dict(skip.named_buffers())
    assert not any("aux" in n for n in net.layer_names())
    assert all(isinstance(net.layer_module(n), UNetBlock) for n in net.layer_names() if not n.endswith("_conv"))


@pytest.mark.parametrize("config, n_params", [
    (dict(img_resolution=32, img_channels=3, label_dim=10, model_type="SongUNet", embedding_type="fourier",
          channel_mult_noise=2, encoder_type="residual", decoder_type="standard", resample_filter=[1, 3, 3, 1],
          model_channels=128, channel_mult=[2, 2, 2], augment_dim=9), 56_400_643),   # NCSN++ CIFAR-10 (VE)
    (dict(img_resolution=64, img_channels=3, label_dim=1000, model_type="DhariwalUNet", model_channels=192,
          channel_mult=[1, 2, 3, 4]), 295_899_267),                                   # ADM ImageNet-64
])
def test_official_full_size_parameter_counts(config, n_params):
    with torch.device("meta"):
        net = EDMPrecond(**config)
    assert sum(p.numel() for p in net.parameters()) == n_params


@pytest.mark.parametrize("bad, fragment", [
    (dict(model_type="UNet2D"), "model_type"),
    (dict(embedding_type="sinusoidal"), "embedding_type"),
    (dict(encoder_type="dense"), "encoder_type"),
    (dict(decoder_type="residual"), "decoder_type"),
    (dict(num_heads=4), "num_heads"),
])
def test_bad_config_is_user_error(bad, fragment):
    with pytest.raises(UserError, match=fragment):
        EDMPrecond(**{**SMALL, **bad})
