"""extract-features end to end on Ray: cache identity, siblings, resume, bad input, verify --recompute."""
import json

import numpy as np
import pytest

from stores.features import FeatureSet, list_feature_sets
from stores.images import ImageSet


@pytest.fixture
def workspace(cli, tmp_path, tiny_model_dir, ray_local):
    # a small training split (180 images in 3 shards) keeps each extraction to a second or two
    (tmp_path / "pipeline.yaml").write_text(f"model:\n  spec: dra:{tiny_model_dir}\n"
                                            f"features:\n  batch_size: 128\n  views: 4\n"
                                            f"data:\n  test_fraction: 0.9\n"
                                            f"train:\n  crop_pad: 1\n")   # views of 1-px crops
    code, _, err = cli("import", "digits", "--shard-size", "64")
    assert code == 0, err
    return tmp_path / "dra-data"


def feature_sets(root):
    return {p.name: FeatureSet(p) for p in list_feature_sets(root)}


def test_extract_cache_siblings_and_recompute(cli, workspace):
    code, out, err = cli("extract-features", "--timestep", "100", "--timestep", "200")
    assert code == 0, err
    sets = feature_sets(workspace)
    assert sorted(s.identity["timestep"] for s in sets.values()) == [100, 200]
    train = ImageSet.open(workspace, "digits-train")
    for fs in sets.values():
        assert sorted(fs.records) == train.plan_indices()               # one zarr shard per image shard
        slab = fs.read_shard(1)
        assert fs.views == 4 and fs.identity["views"] == {"count": 4, "pad": 1, "flip": False, "seed": 0}
        for name in ("targets", "targets_v1", "targets_v2", "targets_v3"):
            assert slab[name].shape == (64, 16, 4, 4) and slab["ids"][0] == 64
            assert np.isfinite(slab[name].astype(np.float32)).all()
        assert np.abs(slab["targets_v1"].astype(np.float32) - slab["targets"]).max() > 1e-3   # another view
    assert "bytes/image" in out and "2.0 KB" in out                 # the plan shows 4 views' sizes before any work
    code, out, _ = cli("extract-features", "--timestep", "100")
    assert code == 0 and "cached:" in out and "extracted" not in out
    code, out, _ = cli("extract-features", "--timestep", "100", "--pool", "2")
    assert code == 0 and "extracted" in out
    assert len(feature_sets(workspace)) == 3                          # another pooling: a sibling set
    code, out, _ = cli("extract-features", "--timestep", "100", "--views", "2")
    assert code == 0 and "extracted" in out
    assert len(feature_sets(workspace)) == 4                          # other views: a sibling set
    key = next(k for k, s in feature_sets(workspace).items() if s.identity["pool"] == "2")
    code, out, err = cli("verify", key, "--recompute", "5")
    assert code == 0, err
    deviation = float(out.split("max abs deviation ")[1].split(",")[0])
    assert deviation < 1e-2


def test_verify_recompute_checks_every_view(cli, workspace):
    code, _, err = cli("extract-features", "--timestep", "100", "--views", "3")
    assert code == 0, err
    fs = next(iter(feature_sets(workspace).values()))
    code, out, err = cli("verify", fs.key, "--recompute", "4")
    assert code == 0, err
    # damage view 2 of every sample (consistently rewritten, so checksums pass): only recomputing it can tell
    import zarr
    group = zarr.open_group(fs.path / "features.zarr", mode="r+")
    group["targets_v2"][:] = group["targets_v2"][:] * 0.5
    from stores.tarshard import file_sha256_and_size
    meta = json.loads((fs.path / "meta.json").read_text())
    for index, record in meta["shards"].items():
        digest, size = file_sha256_and_size(fs.file_path("targets_v2", int(index)))
        record["files"]["targets_v2"] = {"sha256": digest, "bytes": size}
    (fs.path / "meta.json").write_text(json.dumps(meta))
    code, out, err = cli("verify", fs.key, "--recompute", "4")
    assert code == 1, (out, err)


def test_resume_redoes_only_missing_shards(cli, workspace):
    code, _, err = cli("extract-features", "--timestep", "100", "--views", "1")
    assert code == 0, err
    fs = next(iter(feature_sets(workspace).values()))
    before = {i: r.files["targets"]["sha256"] for i, r in fs.records.items()}
    meta = json.loads((fs.path / "meta.json").read_text())
    del meta["shards"]["2"]                                           # as if the run died before shard 2 was recorded
    (fs.path / "meta.json").write_text(json.dumps(meta))
    code, out, err = cli("extract-features", "--timestep", "100", "--views", "1")
    assert code == 0, err
    assert "1 of 3 shards to do" in out
    after = {i: r.files["targets"]["sha256"] for i, r in FeatureSet(fs.path).records.items()}
    assert after == before                                            # same bytes as the undisturbed run


@pytest.mark.parametrize("args, needle", [
    (["--timestep", "1000"], "[0, 999]"),
    (["--layer", "dec.9x9_in1"], "valid layers: enc.8x8_conv"),
    (["--images", "nope"], "image set 'nope' not found"),
    (["--model", "dra:/nonexistent"], "does not exist"),
    (["--pool", "3"], "must be one of"),
    (["--views", "0"], "features.views' must be >= 1"),
    (["--views", "10"], "more than the 9 distinct augmentations of crop pad 1 with flips off"),
])
def test_bad_input_one_line_exit_2_nothing_written(cli, workspace, args, needle):
    code, out, err = cli("extract-features", *args)
    assert code == 2 and needle in err and err.count("\n") == 1
    assert not (workspace / "features").exists()


def test_incompatible_image_set(cli, workspace, tmp_path):
    from conftest import make_cifar_tarball
    make_cifar_tarball(tmp_path / "c.tar.gz")
    cli("import", "cifar10", "--from", tmp_path / "c.tar.gz")
    code, _, err = cli("extract-features", "--images", "cifar10-train")
    assert code == 2 and "3x32x32 images, the model expects 1x8x8" in err


def test_bf16_compute_and_float32_storage_make_a_sibling_that_verifies(cli, workspace, tmp_path, tiny_model_dir):
    """model.dtype bfloat16 + features.dtype float32: another key, float32 arrays, values within bf16 rounding of
    the float32 set's, and `verify --recompute` recomputes in bf16 (float32 storage: no float16 rounding left)."""
    code, _, err = cli("extract-features", "--timestep", "100", "--views", "1")
    assert code == 0, err
    (plain,) = feature_sets(workspace).values()
    config = tmp_path / "bf16.yaml"
    config.write_text(f"model:\n  spec: dra:{tiny_model_dir}\n  dtype: bfloat16\nfeatures:\n  batch_size: 128\n"
                      f"  dtype: float32\ndata:\n  test_fraction: 0.9\n")
    code, out, err = cli("extract-features", "--timestep", "100", "--views", "1", "--config", config)
    assert code == 0, err
    assert "float32 per view;" in out and "computed in bfloat16" in out
    (other,) = [s for k, s in feature_sets(workspace).items() if k != plain.key]
    assert (other.identity["dtype"], other.identity["compute_dtype"]) == ("float32", "bfloat16")
    assert "compute_dtype" not in plain.identity and plain.identity["dtype"] == "float16"
    a, b = plain.read_shard(0)["targets"], other.read_shard(0)["targets"]
    assert b.dtype == np.float32 and a.dtype == np.float16
    rel = np.abs(b - a.astype(np.float32)).max() / np.abs(a.astype(np.float32)).max()
    assert 2e-3 < rel < 0.1, rel                                      # bf16 acted, beyond float16's rounding
    code, out, err = cli("verify", other.key, "--recompute", "4", "--config", config)
    assert code == 0, err
    assert "float32 storage" in out and "computed in bfloat16" in out
    assert float(out.split("max relative ")[1].split(" ")[0]) < 1e-5
