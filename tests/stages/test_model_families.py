"""One contract over every registered model family (stages.specs.FAMILIES), in the manner of diffusers'
SchedulerCommonTest: a maker writes a small real file of the family; the same checks run over each one.

Load it; denoise at sigma (the family's published preconditioning, and D(x; sigma) -> x as sigma -> 0); every tap
`model info` lists exists with its listed shape; the fingerprint is stable across loads; a truncated file is
refused in one line. A family registered without a maker here fails `test_every_family_has_a_maker`.
`fit` is not a family: it resolves to `dra:<workspace>/models/fit-*`, the `dra-fit` maker.
"""
from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_edm_config
from model_files import save_ddpm_pipeline, tiny_unet, write_edm_pickle

from stages.denoiser import Denoiser
from stages.edm import EDMPrecond
from stages.extract import default_layer
from stages.fingerprint import model_fingerprint
from stages.models import load_model, save_own
from stages.sigma import sigma_from_timestep
from stages.specs import FAMILIES, parse_spec, spec_help
from stages.taps import describe_layers, features
from stores.errors import IntegrityError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")

# per-sample noise levels at DDPM timesteps 100 and 640: a diffusers UNet sees integer timesteps there
SIGMAS = torch.tensor([sigma_from_timestep(100), sigma_from_timestep(640)], dtype=torch.float64)
LABELS = torch.tensor([3, 7])


@dataclass
class Made:
    """A model file of one family and what its architecture declares."""

    spec: str                                 # KIND:PATH, PATH under `root`
    root: Path                                # folder holding everything the maker wrote
    source: torch.nn.Module                   # the network that was written, in memory
    reference: Callable                       # (source, x, sigma [B] float64, labels [B]) -> D by the published formula
    image: tuple[int, int, int]               # (C, H, W)
    label_dim: int
    taps: dict[str, tuple[int, int, int]]     # shapes of some taps, from the architecture
    damage: str                               # the file a truncation damages, relative to root
    damaged_error: type = UserError           # IntegrityError for the workspace's own stored model


def _perturbed(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights moved off their init (EDM's output layers start near zero, which would hide c_out)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def edm_reference(net: EDMPrecond, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EDM's Table 1: D = c_skip x + c_out F(c_in x; ln(sigma) / 4), written out independently."""
    s, sd = sigma.view(-1, 1, 1, 1), net.sigma_data                                   # (B, 1, 1, 1)
    c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()
    c_in, c_noise = 1 / (s ** 2 + sd ** 2).sqrt(), s.log().flatten() / 4
    one_hot = torch.nn.functional.one_hot(labels, net.label_dim).float()               # (B, classes)
    augment = torch.zeros(x.shape[0], net.augment_dim) if net.augment_dim else None
    inner = net.model((c_in * x).float(), c_noise.float(), one_hot, augment_labels=augment)
    return (c_skip * x + c_out * inner).float()


def diffusers_reference(den, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DDPM eps-prediction in EDM form: D = x - sigma eps(sqrt(alpha_bar) x, t), alpha_bar = 1 / (1 + sigma^2)."""
    s = sigma.view(-1, 1, 1, 1)
    eps = den.unet((x / (1 + s ** 2).sqrt()).float(), torch.tensor([100, 640]), class_labels=labels,
                   return_dict=False)[0]
    return (x - s * eps).float()


EDM_TAPS = {"enc.8x8_conv": (8, 8, 8), "enc.4x4_block0": (16, 4, 4), "dec.4x4_in1": (16, 4, 4),
            "dec.8x8_block1": (8, 8, 8)}


def make_edm(root: Path) -> Made:
    """An official-format EDM pickle of an NCSN++-style 8x8 RGB network."""
    torch.manual_seed(1)
    config = dict(tiny_edm_config(8, 3, 10), embedding_type="fourier", channel_mult_noise=2,
                  encoder_type="residual", resample_filter=[1, 3, 3, 1], augment_dim=9)
    net = _perturbed(EDMPrecond(**config), 1)
    write_edm_pickle(root / "net.pkl", net)
    return Made(f"edm:{root / 'net.pkl'}", root, net, edm_reference, (3, 8, 8), 10, EDM_TAPS, "net.pkl")


def make_diffusers(root: Path) -> Made:
    """A class-conditional DDPM UNet2DModel pipeline folder (unet/ and scheduler/)."""
    from stages.diffusers_model import DiffusersDenoiser
    unet = tiny_unet(num_class_embeds=10, seed=2)
    save_ddpm_pipeline(root / "ddpm", unet)
    taps = {"down_blocks.0": (16, 4, 4), "mid_block": (32, 4, 4), "up_blocks.1": (16, 8, 8)}
    return Made(f"diffusers:{root / 'ddpm'}", root, DiffusersDenoiser(unet).eval(), diffusers_reference, (3, 8, 8),
                10, taps, "ddpm/unet/diffusion_pytorch_model.safetensors")


def _make_own(root: Path, folder: str, damaged_error: type) -> Made:
    torch.manual_seed(3)
    net = _perturbed(EDMPrecond(**tiny_edm_config()), 3)
    save_own(net, root / folder, {"test": "model families"})
    taps = {"enc.8x8_conv": (8, 8, 8), "dec.4x4_in1": (16, 4, 4)}
    return Made(f"dra:{root / folder}", root, net, edm_reference, (1, 8, 8), 10, taps,
                f"{folder}/model.safetensors", damaged_error)


MAKERS: dict[str, tuple[str, Callable[[Path], Made]]] = {
    "edm": ("edm", make_edm),
    "diffusers": ("diffusers", make_diffusers),
    "dra": ("dra", lambda root: _make_own(root, "tiny", UserError)),                     # a model given by path
    "dra-fit": ("dra", lambda root: _make_own(root, "models/fit-tiny", IntegrityError)),  # what `fit` resolves to
}


def test_every_family_has_a_maker():
    assert {kind for kind, _ in MAKERS.values()} == set(FAMILIES), "add a maker for each registered family"


@pytest.fixture(scope="module", params=list(MAKERS))
def made(request, tmp_path_factory) -> Made:
    kind, maker = MAKERS[request.param]
    result = maker(tmp_path_factory.mktemp(request.param))
    assert parse_spec(result.spec).kind == kind
    return result


def _x(batch: int = 2, shape=(3, 8, 8)) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(5))


def test_loads_frozen_with_its_declared_shape(made):
    model = load_model(made.spec)
    assert isinstance(model, Denoiser) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert (model.img_channels, model.img_resolution, model.img_resolution) == made.image
    assert model.label_dim == made.label_dim


def test_denoises_by_the_family_preconditioning(made):
    model, x = load_model(made.spec), _x(2, made.image)
    with torch.no_grad():
        got = model(x, SIGMAS, LABELS)
        want = made.reference(made.source, x.double(), SIGMAS, LABELS)
        tiny = model(x, torch.full((2,), 1e-4, dtype=torch.float64), LABELS)
    assert got.shape == x.shape and got.dtype == x.dtype and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (tiny - x).abs().max().item() < 1e-2                                        # D(x; sigma) -> x
    assert (got - x).abs().max().item() > 1e-2                                         # and not the identity


def test_every_listed_tap_exists_with_its_shape(made):
    model, x = load_model(made.spec), _x(3, made.image)
    listed = dict(describe_layers(model))
    assert list(listed) == model.layer_names() and default_layer(model) in listed
    assert {name: listed.get(name) for name in made.taps} == made.taps
    with torch.no_grad():
        for name, shape in listed.items():
            got = features(model, x, SIGMAS[:1].expand(3), torch.tensor([1, 2, 3]), [name])[name]
            assert tuple(got.shape) == (3, *shape), name


def test_fingerprint_is_stable_across_loads(made):
    first, second = model_fingerprint(load_model(made.spec)), model_fingerprint(load_model(made.spec))
    assert first == second == model_fingerprint(made.source)
    assert len(first) == 64


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_a_truncated_file_is_refused_in_one_line(made, tmp_path, cli, keep):
    copy = tmp_path / "copy"
    shutil.copytree(made.root, copy)
    spec = parse_spec(made.spec).with_path(copy / Path(parse_spec(made.spec).path).relative_to(made.root))
    damaged = copy / made.damage
    data = damaged.read_bytes()
    damaged.write_bytes(data[:math.floor(len(data) * keep)])
    with pytest.raises((UserError, IntegrityError)) as caught:
        load_model(str(spec))
    assert type(caught.value) is made.damaged_error
    message = str(caught.value)
    assert "\n" not in message and str(copy) in message, message
    code, _, err = cli("model", "info", "--model", str(spec), "--root", str(tmp_path / "ws"))
    assert code == (1 if made.damaged_error is IntegrityError else 2)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_one_parser_and_one_help():
    assert parse_spec("dra:/a:b/c").path == "/a:b/c" and str(parse_spec("edm:x.pkl")) == "edm:x.pkl"
    for bad in ("nonsense", "fit", "dra:", "ckpt:/x"):
        with pytest.raises(UserError, match=r"not understood; use edm:PATH\.pkl .* \| diffusers:DIR .* \| dra:DIR"):
            parse_spec(bad)
    assert spec_help(fit=True).startswith("fit (") and all(f.syntax in spec_help() for f in FAMILIES.values())
