"""Safe loading of official-format EDM pickles, and the model fingerprint.

The pickles are written in the NVlabs/edm format by tests/model_files.py (see there): a plain `pickle.load`
of these files runs the code embedded in them.
"""
from __future__ import annotations

import builtins
import os
import pickle

import pytest
import torch
from model_files import class_source, official_modules, to_records, write_pickle
from safetensors.torch import load_file, save_file
from torch import nn

from stages.edm import EDMPrecond
from stages.edm_pickle import PersistentRecord, load_edm_pickle, read_edm_pickle
from stages.fingerprint import model_fingerprint
from stores.errors import UserError

CONFIG = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
              sigma_data=0.5, model_type="SongUNet", embedding_type="fourier", channel_mult_noise=2,
              encoder_type="residual", decoder_type="standard", resample_filter=[1, 3, 3, 1], model_channels=16,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], augment_dim=9, dropout=0.13)


@pytest.fixture
def official(tmp_path):
    """The stand-in `torch_utils.persistence` and `dnnlib.util` modules, importable for this test only."""
    with official_modules(tmp_path) as modules:
        yield modules


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = EDMPrecond(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move the near-zero output layers off their init
    return model


def _outputs(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.02, 0.8, 20.0]), torch.tensor([1, 4, 9]),
                     augment_labels=torch.rand(3, 9, generator=g))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_round_trip_equals_original(tmp_path, official, net, protocol):
    src = class_source(net)
    path = write_pickle(tmp_path / "net.pkl", to_records(net, official, src, net.config), official, src, protocol)
    loaded = load_edm_pickle(path)
    assert isinstance(loaded, EDMPrecond) and not loaded.training
    assert loaded.config == net.config
    assert all(not p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(loaded.model.map_noise.freqs, net.model.map_noise.freqs)
    assert torch.equal(_outputs(loaded), _outputs(net))
    assert model_fingerprint(loaded) == model_fingerprint(net)
    data = read_edm_pickle(path)
    assert isinstance(data["loss_fn"], PersistentRecord) and data["loss_fn"].class_name == "EDMLoss"
    assert data["dataset_kwargs"]["path"] == "cifar10.zip"


def test_embedded_source_is_never_executed(tmp_path, official, net):
    marker = tmp_path / "pwned"
    src = class_source(net, prefix=f"open({str(marker)!r}, 'w').write('pwned')\n")
    path = write_pickle(tmp_path / "hostile.pkl", to_records(net, official, src, net.config), official, src)
    loaded = load_edm_pickle(path)
    assert not marker.exists()
    assert torch.equal(_outputs(loaded), _outputs(net))
    with open(path, "rb") as f:  # the file really is hostile: a plain pickle.load runs the source
        pickle.load(f)
    assert marker.exists()


class _Call:
    """Pickles as a call of `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("make", [
    lambda marker: _Call(os.system, f"touch {marker}"),
    lambda marker: _Call(builtins.exec, f"open({str(marker)!r}, 'w').write('x')"),
    lambda marker: _Call(torch.storage._load_from_bytes, pickle.dumps(_Call(os.system, f"touch {marker}"))),
])
def test_hostile_globals_are_refused(tmp_path, make):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pkl"
    path.write_bytes(pickle.dumps(dict(ema=make(marker))))
    with pytest.raises(UserError, match="system|exec"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_not_a_pickle(tmp_path):
    text = tmp_path / "notes.pkl"
    text.write_text("this is not a pickle\n")
    with pytest.raises(UserError, match="not a usable EDM network pickle"):
        load_edm_pickle(text)
    zipped = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, zipped)
    with pytest.raises(UserError, match="not a usable EDM network pickle"):
        load_edm_pickle(zipped)
    with pytest.raises(UserError, match="no such file"):
        load_edm_pickle(tmp_path / "missing.pkl")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(UserError, match="no 'ema' network"):
        load_edm_pickle(plain)


def _records(net, official):
    return to_records(net, official, class_source(net), net.config)


def _state(record, *path):
    """State dict of the record at a module path (through ModuleDict containers)."""
    for name in path:
        record = record.meta["state"]["_modules"][name] if hasattr(record, "meta") else record._modules[name]
    return record.meta["state"] if hasattr(record, "meta") else record.__dict__


def test_unknown_or_mismatched_content_is_user_error(tmp_path, official, net):
    cases = []
    vp = _records(net, official)
    vp.meta["class_name"] = "VPPrecond"
    cases.append((vp, "VPPrecond"))
    odd = _records(net, official)
    _state(odd, "model")["_modules"]["map_layer0"].meta["class_name"] = "Mystery"
    cases.append((odd, "Mystery"))
    missing = _records(net, official)
    del _state(missing, "model", "enc", "8x8_block0", "qkv")["_parameters"]["bias"]
    cases.append((missing, "model.enc.8x8_block0.qkv.bias"))
    shaped = _records(net, official)
    _state(shaped, "model", "map_label")["_parameters"]["weight"] = torch.zeros(16, 11)
    cases.append((shaped, "model.map_label.weight"))
    extra = _records(net, official)
    _state(extra, "model", "map_layer1")["_buffers"]["running_mean"] = torch.zeros(3)
    cases.append((extra, "model.map_layer1.running_mean"))
    kwargs = _records(net, official)
    kwargs.meta["state"]["_init_kwargs"]["bogus_option"] = 1
    cases.append((kwargs, "bogus_option"))
    for i, (ema, fragment) in enumerate(cases):
        path = write_pickle(tmp_path / f"case{i}.pkl", ema, official)
        with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
            load_edm_pickle(path)


def test_fingerprint_stable_across_safetensors_round_trip(tmp_path, net):
    path = tmp_path / "net.safetensors"
    save_file(net.state_dict(), str(path))
    twin = EDMPrecond(**CONFIG)
    twin.load_state_dict(load_file(str(path)))
    assert model_fingerprint(twin) == model_fingerprint(net)
    assert len(model_fingerprint(net)) == 64


def test_fingerprint_changes_with_one_weight_or_the_config(net):
    twin = EDMPrecond(**CONFIG)
    twin.load_state_dict(net.state_dict())
    reference = model_fingerprint(twin)
    with torch.no_grad():
        twin.model.enc["8x8_block0"].conv1.weight[3, 2, 1, 0] += 1e-6
    assert model_fingerprint(twin) != reference
    other = EDMPrecond(**{**CONFIG, "dropout": 0.1})
    other.load_state_dict(net.state_dict())
    assert model_fingerprint(other) != reference


def test_fingerprint_ignores_how_defaults_were_spelled(net):
    explicit = EDMPrecond(**{**CONFIG, "channel_mult_emb": 4, "label_dropout": 0})  # the defaults, spelled out
    explicit.load_state_dict(net.state_dict())
    assert explicit.config == net.config
    assert model_fingerprint(explicit) == model_fingerprint(net)
    rebuilt = EDMPrecond(**net.config)
    rebuilt.load_state_dict(net.state_dict())
    assert model_fingerprint(rebuilt) == model_fingerprint(net)
