"""model.dtype acts: generate, extract-features and the online teacher compute in it, the sampler's steps stay
float64, float32 is today's computation bit for bit, and a reduced dtype is recorded in the set identities."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from trainsets import image_set

from pipeline.config import load_config
from pipeline.plans.teacher import OnlineTeacher
from pipeline.workflow import generated_set
from stages.extract import NoiseLevel, compute_targets, feature_identity, view_targets
from stages.generate import GenerateSettings, generated_identity, sample_floats, to_uint8
from stages.models import load_model
from stages.noise import labels_for, latents_for
from stages.precision import check_compute_dtype, in_dtype
from stages.samplers import sample
from stores.errors import UserError
from stores.features import feature_key
from stores.identity import fingerprint
from stores.images import ImageSetWriter, dataset_fingerprint
from stores.views import ViewSpec

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

IDS, STEPS = list(range(6)), 4
LEVEL, LAYER = NoiseLevel.from_timestep(100), "dec.4x4_in1"
VIEWS = ViewSpec(2, 1, False)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """The tiny EDM network with every weight perturbed: its zero-initialised output layers would make D = c_skip x,
    which no compute dtype changes."""
    from conftest import tiny_edm_config

    from stages.edm.networks import EDMPrecond
    from stages.models import save_own
    torch.manual_seed(0)
    net = EDMPrecond(**tiny_edm_config()).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("models") / "perturbed"
    save_own(net, folder, {"test": "perturbed"})
    return f"dra:{folder}"


@pytest.fixture(scope="module")
def model(spec):
    return load_model(spec)


def settings(dtype: str) -> GenerateSettings:
    return GenerateSettings("heun", STEPS, 0.0, 3, 8, "png", dtype).check()


def test_bf16_generate_differs_from_float32_by_a_little(model):
    cpu = torch.device("cpu")
    x32, y32 = sample_floats(model, IDS, settings("float32"), cpu)
    x16, y16 = sample_floats(model, IDS, settings("bfloat16"), cpu)
    assert x16.dtype == torch.float64 and torch.equal(y32, y16)        # the sampler's state stays float64
    gap = float((x16 - x32).abs().max())
    assert 1e-3 < gap < 0.1 * float(x32.abs().max()), gap                # bf16 acted, and only at its rounding
    assert not np.array_equal(to_uint8(x16), to_uint8(x32))


def test_float32_generate_is_the_bare_sampler_bit_for_bit(model):
    """model.dtype float32 runs exactly what generate ran before the setting existed: the bare model in the sampler."""
    s = settings("float32")
    x, _ = sample_floats(model, IDS, s, torch.device("cpu"))
    shape = (model.img_channels, model.img_resolution, model.img_resolution)
    bare = sample("heun", model, latents_for(IDS, shape, s.seed), labels_for(IDS, model.label_dim, s.seed),
                  **s.sampler_options(IDS))
    assert torch.equal(x, bare) and in_dtype(model, "float32") is model


def test_only_the_network_call_runs_in_bf16(model):
    """The network sees float32 inputs and computes its convolutions in bf16; D comes back float32."""
    seen = {}
    conv = next(m for m in model.modules() if getattr(m, "weight", None) is not None and m.weight.ndim == 4)
    hook = conv.register_forward_hook(lambda m, args, out: seen.update(out=out.dtype))
    try:
        x = torch.randn(2, 1, 8, 8)
        d = in_dtype(model, "bfloat16")(x, torch.ones(2), torch.eye(10)[:2])
    finally:
        hook.remove()
    assert d.dtype == torch.float32 and seen["out"] == torch.bfloat16


def test_identity_records_a_reduced_dtype_and_keeps_float32s(model, tmp_path):
    f32 = generated_identity(model, settings("float32"), 16, None)
    bf16 = generated_identity(model, settings("bfloat16"), 16, None)
    assert set(f32["source"]) == {"model", "sampler", "steps", "churn", "seed", "sigma_min", "sigma_max", "rho"}
    assert bf16["source"] == {**f32["source"], "dtype": "bfloat16"}
    assert fingerprint(f32)[:16] == "82226fa7077ad1e9"                   # what main (577c0da) gives this model
    assert dataset_fingerprint(f32, 8) != dataset_fingerprint(bf16, 8)
    ImageSetWriter(tmp_path, "digits-gen", f32, 8).begin()
    with pytest.raises(UserError, match="another identity"):             # the same name cannot hold a bf16 set
        ImageSetWriter(tmp_path, "digits-gen", bf16, 8)
    names = [generated_set(load_config(None, {"model.dtype": d})) for d in ("float32", "bfloat16", "float16")]
    assert names == ["digits-gen", "digits-gen-bf16", "digits-gen-fp16"]   # the default name makes it a sibling


def test_extract_in_bf16_differs_a_little_and_gets_its_own_key(model, tmp_path):
    images = image_set(tmp_path, "digits-train", "real", 6, 6)
    shard = images.read_shard(0)
    args = (model, shard.ids, shard.images, shard.labels, LAYER, LEVEL, 0, "none", VIEWS, images.fingerprint)
    t32, t16 = compute_targets(*args, "float32"), compute_targets(*args, "bfloat16")
    assert np.array_equal(t32, compute_targets(*args)) and t32.dtype == np.float16
    rel = np.abs(t16.astype(np.float32) - t32).max() / np.abs(t32).max()
    assert 1e-3 < rel < 0.1, rel
    assert compute_targets(*args, "float32", "float32").dtype == np.float32
    ident = lambda **kw: feature_identity(images, "fp", LAYER, LEVEL, 0, "none", VIEWS, True, **kw)  # noqa: E731
    assert "compute_dtype" not in ident() and ident()["dtype"] == "float16"
    # main, noise keyed by set
    assert fingerprint(feature_identity(Named(), "m", LAYER, LEVEL, 0, "none", VIEWS, True))[:16] == "b73e071d22455c7a"
    assert ident(compute_dtype="bfloat16")["compute_dtype"] == "bfloat16"
    keys = {feature_key(ident()), feature_key(ident(compute_dtype="bfloat16")),
            feature_key(ident(stored_dtype="float32"))}
    assert len(keys) == 3


class Named:
    """An image set as feature_identity reads it."""
    fingerprint, name = "f" * 64, "digits-train"


def test_online_teacher_computes_in_the_sets_dtype(model, spec, tmp_path):
    images = image_set(tmp_path, "digits-train", "real", 4, 4)
    shard = images.read_shard(0)
    views = torch.from_numpy(shard.images)
    ids, labels = torch.from_numpy(shard.ids), torch.from_numpy(shard.labels)
    teacher = OnlineTeacher(spec, LAYER, LEVEL.sigma, LEVEL.timestep, 0, "none", (images.fingerprint, None),
                            compute_dtype="bfloat16")
    got = teacher(views, ids, labels, torch.zeros(len(ids), dtype=torch.bool))
    want = view_targets(model, ids, views, labels, LAYER, LEVEL, 0, "none", images.fingerprint, "bfloat16")
    f32 = view_targets(model, ids, views, labels, LAYER, LEVEL, 0, "none", images.fingerprint)
    assert torch.equal(got, want) and not torch.equal(got, f32)


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(UserError, match="unknown compute dtype"):
        check_compute_dtype("float8", "cpu")
    assert check_compute_dtype("float16", "cpu") == "float16"            # torch 2.13 autocasts fp16 on the CPU


def test_verify_recompute_uses_the_sets_dtypes(model, tmp_path):
    """A float32-stored set computed in bf16 recomputes to its own values (float32 storage: no float16 rounding)."""
    from stages.extract import recompute_deviation
    from stages.fingerprint import model_fingerprint
    from stores.features import FeatureSet, FeatureSetWriter, write_feature_shard
    images = image_set(tmp_path, "digits-train", "real", 12, 6)
    identity = feature_identity(images, model_fingerprint(model), LAYER, LEVEL, 0, "none", VIEWS, True,
                                stored_dtype="float32", compute_dtype="bfloat16")
    shards = [images.read_shard(p.index) for p in images.plan()]
    slabs = [compute_targets(model, s.ids, s.images, s.labels, LAYER, LEVEL, 0, "none", VIEWS, images.fingerprint,
                             "bfloat16", "float32")
             for s in shards]
    writer = FeatureSetWriter(tmp_path, identity, images.n, images.shard_size, slabs[0].shape[2:], VIEWS.count,
                              dtype="float32")
    writer.begin()
    for p, s, slab in zip(images.plan(), shards, slabs):
        writer.record(write_feature_shard(writer.path, p.index, p.first_id, s.ids, slab))
    fs = FeatureSet(writer.path)
    assert fs.read_shard(0)["targets"].dtype == np.float32
    result = recompute_deviation(model, images, fs, 12)
    assert result["samples"] == 12 and result["max_rel"] < 1e-5, result


def test_generate_command_samples_in_model_dtype_into_a_sibling(spec, tmp_path):
    """`dra-pipe generate`'s preparation: model.dtype reaches the workers' settings, the name and the identity."""
    from pipeline.generate import prepare
    jobs = {d: prepare(load_config(None, {"root": str(tmp_path), "model.spec": spec, "model.dtype": d,
                                          "generate.n": 8})) for d in ("float32", "bfloat16")}
    assert jobs["bfloat16"].settings.dtype == "bfloat16" and jobs["float32"].settings.dtype == "float32"
    assert (jobs["float32"].name, jobs["bfloat16"].name) == ("digits-gen", "digits-gen-bf16")
    assert jobs["bfloat16"].writer.identity["source"]["dtype"] == "bfloat16"
    assert "dtype" not in jobs["float32"].writer.identity["source"]


def test_teacher_for_a_run_takes_the_dtype_of_its_feature_set(spec, tmp_path):
    from types import SimpleNamespace

    from pipeline.plans.teacher import teacher_for
    from stores.features import FeatureSetWriter
    images = image_set(tmp_path, "digits-train", "real", 4, 4)
    identity = feature_identity(images, "fp", LAYER, LEVEL, 0, "none", VIEWS, True, compute_dtype="bfloat16")
    writer = FeatureSetWriter(tmp_path, identity, 4, 4, (16, 4, 4), VIEWS.count, provenance={"model_spec": spec})
    writer.begin()
    job = SimpleNamespace(dra_targets="online", feature_keys={"real": writer.path.name})
    assert teacher_for(job, tmp_path).compute_dtype == "bfloat16"
