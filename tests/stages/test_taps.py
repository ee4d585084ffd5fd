"""Feature taps on EDM networks: values, hook hygiene, layer errors, shapes and counts."""
from __future__ import annotations

import pytest
import torch

from stages.taps import describe_layers, features, parameter_count
from stores.errors import UserError


@pytest.fixture(scope="module")
def small():
    """The conformance songunet-small network with its official parameters, its json and npz."""
    from conftest import songunet_small
    return songunet_small()


def _hook_count(net: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


def test_taps_equal_official_activations(small):
    net, cfg, z = small
    labels = torch.from_numpy(z["class_labels"]).argmax(1)  # integer labels: same as the one-hot ones
    with torch.no_grad():
        acts = features(net, torch.from_numpy(z["x"]), torch.from_numpy(z["sigma"]), labels, cfg["layers"])
    assert list(acts) == cfg["layers"]
    for name in cfg["layers"]:
        diff = (acts[name] - torch.from_numpy(z[f"act:{name}"])).abs().max().item()
        assert diff <= 1e-4, (name, diff)
    assert _hook_count(net) == 0


def test_layer_names_in_forward_order(small):
    net, cfg, _ = small
    expected = [f"enc.{k}" for k in cfg["enc_keys"]] + [f"dec.{k}" for k in cfg["dec_keys"] if "aux" not in k]
    assert net.layer_names() == expected
    order = []
    handles = [net.layer_module(n).register_forward_hook(lambda m, a, o, n=n: order.append(n)) for n in expected]
    with torch.no_grad():
        net(torch.zeros(1, 3, 16, 16), torch.ones(1))
    for h in handles:
        h.remove()
    assert order == expected


def test_unknown_layer_lists_valid_names(small):
    net, _, z = small
    with pytest.raises(UserError) as info:
        features(net, torch.from_numpy(z["x"]), torch.from_numpy(z["sigma"]), None, ["dec.8x8_in1", "dec.4x4_in1"])
    message = str(info.value)
    assert "dec.4x4_in1" in message and "enc.8x8_block0" in message and "dec.16x16_block1" in message
    with pytest.raises(UserError, match="enc.16x16_conv"):
        net.layer_module("model.enc.8x8_block0")
    assert _hook_count(net) == 0


def test_hooks_removed_when_forward_fails(small):
    net, _, _ = small
    with pytest.raises(RuntimeError):
        features(net, torch.zeros(1, 5, 16, 16), torch.ones(1), None, ["enc.8x8_block0", "dec.8x8_in0"])
    assert _hook_count(net) == 0


def test_describe_layers_and_parameter_count(small):
    net, cfg, z = small
    shapes = describe_layers(net)
    assert [n for n, _ in shapes] == net.layer_names()
    described = dict(shapes)
    for name in cfg["layers"]:
        assert described[name] == tuple(z[f"act:{name}"].shape[1:])
    assert described["enc.16x16_conv"] == (16, 16, 16)
    assert described["dec.16x16_block1"] == (16, 16, 16)
    assert dict(describe_layers(net, (3, 32, 32)))["dec.8x8_in1"] == (32, 16, 16)
    assert parameter_count(net) == cfg["n_params"] == 189_523
