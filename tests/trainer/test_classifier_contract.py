"""One contract over every registered classifier architecture (trainer.architectures.ARCHITECTURES), in the
manner of diffusers' SchedulerCommonTest: `feature_layers()` shapes are what `forward_features` returns, in stage
order, with the logits of the same pass; `penultimate` is exactly what the last linear layer sees; the shape
probe touches nothing. Each net is built at the smallest input that leaves its last stage a grid of 2x2 or more
(so that pooling is not the identity): 8x8, 16x16 for the ResNets (three stride-2 stages); the ViTs at 8x8 have
grids of 4x4 (patch 2) and 2x2 (patch 4) tokens. wrn-70-16 still has its 266.8M parameters and vit-b/* their
85M, so the nets are built once per module.
"""
from __future__ import annotations

import pytest
import torch

from trainer.architectures import ARCHITECTURES
from trainer.classifiers import Classifier, build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_RGB = dict(num_classes=7, in_channels=3, resolution=8, mean=(0.4914, 0.4822, 0.4465), std=(0.25, 0.24, 0.26))
SHAPES = {"small-cnn": dict(num_classes=10, in_channels=1, resolution=8, mean=0.3, std=0.4),     # the digits
          "preact-resnet18": dict(SMALL_RGB, resolution=16), "resnet18": dict(SMALL_RGB, resolution=16)}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def built(request) -> tuple[str, dict, Classifier]:
    arch, shape = request.param, SHAPES.get(request.param, SMALL_RGB)
    torch.manual_seed(0)
    return arch, shape, build_classifier(arch, **shape).eval()


def _x(shape: dict, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, shape["in_channels"], shape["resolution"], shape["resolution"], generator=g)


def test_attributes_and_default_layer(built):
    arch, shape, model = built
    assert (model.arch, model.num_classes, model.in_channels, model.resolution) == (
        arch, shape["num_classes"], shape["in_channels"], shape["resolution"])
    assert list(model.feature_layers()) == list(model.stages)
    assert model.default_dra_layer in model.feature_layers()
    assert ARCHITECTURES[arch].help_line().startswith(arch)


def test_feature_layers_match_forward_features(built):
    _, shape, model = built
    x = _x(shape)
    with torch.no_grad():
        logits = model(x)
        for layer, (c, h, w) in model.feature_layers().items():
            layer_logits, feature = model.forward_features(x, layer)
            assert feature.shape == (2, c, h, w), layer
            torch.testing.assert_close(layer_logits, logits)
    assert logits.shape == (2, shape["num_classes"])


def test_penultimate_is_the_input_of_the_last_linear_layer(built):
    _, shape, model = built
    x, seen = _x(shape), []
    handle = model.fc.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            model(x)
            pooled = model.penultimate(x)
    finally:
        handle.remove()
    assert pooled.shape == (2, model.fc.in_features)
    _, h, w = list(model.feature_layers().values())[-1]
    assert h * w > 1                                                    # pooling a grid, not one cell: a real check
    torch.testing.assert_close(pooled, seen[0])


def test_feature_layers_touches_nothing(built):
    _, _, model = built
    model.train()
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model._layer_shapes = None                                      # probe again, in training mode
        model.feature_layers()
        assert model.training
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        model.eval()
