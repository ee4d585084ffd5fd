"""Classifiers: shapes, named feature maps, normalisation inside, parameter counts (DM-AT's WRN variant).

What holds for every architecture (feature shapes, penultimate, the probe touching nothing, attributes) is
tests/trainer/test_classifier_contract.py."""
from __future__ import annotations

import pytest
import torch

from stores.errors import UserError
from trainer.classifiers import ARCHITECTURES, WideResNet, build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

CIFAR = dict(num_classes=10, in_channels=3, resolution=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))


def _meta(arch: str, **kw):
    with torch.device("meta"):
        return build_classifier(arch, **{**CIFAR, **kw})


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, expected", [
    ("wrn-28-10", 36_479_194), ("wrn-34-10", 46_160_474), ("wrn-70-16", 266_796_506),
    ("preact-resnet18", 11_172_170), ("resnet18", 11_173_962),
])
def test_parameter_counts(arch, expected):
    assert _n_params(_meta(arch)) == expected


def test_wrn_feature_layers_and_default_grid():
    model = _meta("wrn-28-10")
    layers = model.feature_layers()
    assert list(layers) == ["stem", "block1", "block2", "block3", "final"]
    assert layers["block1"] == (160, 32, 32) and layers["block2"] == (320, 16, 16)
    assert model.default_dra_layer == "block3" and layers["block3"] == (640, 8, 8)   # DESIGN.md: matches dec.8x8_in1
    assert _meta("wrn-70-16").feature_layers()["block3"] == (1024, 8, 8)


def test_wrn_block_structure_follows_dm_at():
    model = _meta("wrn-28-10")
    assert len(model.stages["block1"]) == 4                                  # (28 - 4) / 6 blocks per group
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 for m in bns)
    assert sum(isinstance(m, torch.nn.SiLU) for m in model.modules()) == 1    # closing act; blocks use F.silu
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())


@pytest.mark.parametrize("arch", ["preact-resnet18", "resnet18"])
def test_resnet_default_layer_is_8x8_at_cifar(arch):
    model = _meta(arch)
    assert model.feature_layers()[model.default_dra_layer] == (256, 8, 8)
    assert model.feature_layers()["layer4"] == (512, 4, 4)


def test_small_cnn_on_digits_shapes_and_features():
    """Digits shapes; that features, logits and penultimate agree is the contract's (test_classifier_contract)."""
    torch.manual_seed(0)
    model = build_classifier("small-cnn", 10, 1, 8, mean=0.3, std=0.4)
    assert _n_params(model) < 100_000
    assert model.feature_layers() == {"conv1": (32, 8, 8), "conv2": (64, 8, 8), "conv3": (64, 4, 4)}
    assert model.default_dra_layer == "conv3"                                # 4x4 like the digits EDM dec.4x4_in1
    x = torch.rand(5, 1, 8, 8)
    model.eval()
    _, feature = model.forward_features(x, "conv3")
    torch.testing.assert_close(model.penultimate(x), feature.mean(dim=(2, 3)))   # conv3 is the last stage


def test_forward_features_one_pass_gradients_reach_feature():
    torch.manual_seed(0)
    model = build_classifier("preact-resnet18", 10, 3, 8, mean=0.5, std=0.25)
    logits, feature = model.forward_features(torch.rand(2, 3, 8, 8), "layer2")
    assert feature.shape == (2, 128, 4, 4) and logits.shape == (2, 10)
    (logits.sum() + feature.pow(2).mean()).backward()
    assert model.stages["stem"].weight.grad is not None


def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    a = build_classifier("small-cnn", 10, 3, 8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.2)).eval()
    b = build_classifier("small-cnn", 10, 3, 8, mean=0.0, std=1.0).eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k not in ("mean", "std")}, strict=False)
    x = torch.rand(4, 3, 8, 8)
    normalised = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1)
    torch.testing.assert_close(a(x), b(normalised))
    assert {"mean", "std"} <= set(a.state_dict())                            # buffers: saved, moved with .to()


def test_wrn_small_forward_and_other_resolution():
    model = _meta("wrn-28-10", num_classes=100, resolution=16)
    assert model.feature_layers()["block3"] == (640, 4, 4) and model.fc.out_features == 100
    tiny = build_classifier("resnet18", 7, 3, 8, mean=0.5, std=0.25).eval()
    assert tiny(torch.rand(2, 3, 8, 8)).shape == (2, 7)


def test_tiny_wideresnet_runs_and_trains():
    torch.manual_seed(0)
    model = WideResNet(10, 1, arch="wrn-10-1", num_classes=3, in_channels=3, resolution=16, mean=0.5, std=0.25)
    assert model.feature_layers() == {"stem": (16, 16, 16), "block1": (16, 16, 16), "block2": (32, 8, 8),
                                      "block3": (64, 4, 4), "final": (64, 4, 4)}
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 3, (8,))
    logits, feature = model.forward_features(x, "block3")
    assert feature.shape == (8, 64, 4, 4)
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_errors_name_valid_choices():
    with pytest.raises(UserError, match="valid ones are small-cnn, preact-resnet18"):
        build_classifier("wrn-16-4", **CIFAR)
    model = build_classifier("small-cnn", 10, 1, 8, mean=0.5, std=0.5)
    with pytest.raises(UserError, match="valid layers are conv1, conv2, conv3"):
        model.forward_features(torch.rand(1, 1, 8, 8), "block3")
    with pytest.raises(UserError, match="2 values but the images have 3 channels"):
        build_classifier("small-cnn", 10, 3, 8, mean=(0.5, 0.5), std=0.5)
    assert set(ARCHITECTURES) == {"small-cnn", "preact-resnet18", "resnet18", "wrn-28-10", "wrn-34-10", "wrn-70-16",
                                  "vit-s/2", "vit-s/4", "vit-b/2", "vit-b/4"}
