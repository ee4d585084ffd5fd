"""extract-features end to end on Ray: cache identity, siblings, resume, bad input, verify --recompute."""
import json

import numpy as np
import pytest

from stores.features import FeatureSet, list_feature_sets
from stores.images import ImageSet


@pytest.fixture
def workspace(cli, tmp_path, tiny_model_dir, ray_local):
    # a small training split (180 images in 3 shards) keeps each extraction to a second or two
    (tmp_path / "pipeline.yaml").write_text(f"model:\n  spec: dra:{tiny_model_dir}\nfeatures:\n  batch_size: 128\n"
                                            f"data:\n  test_fraction: 0.9\n")
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
        assert slab["targets"].shape == (64, 16, 4, 4) and slab["ids"][0] == 64
        assert np.isfinite(slab["targets"].astype(np.float32)).all()
    assert "bytes/sample" in out and "4.1 KB" not in out            # the plan shows sizes before any work
    code, out, _ = cli("extract-features", "--timestep", "100")
    assert code == 0 and "cached:" in out and "extracted" not in out
    code, out, _ = cli("extract-features", "--timestep", "100", "--pool", "2")
    assert code == 0 and "extracted" in out
    assert len(feature_sets(workspace)) == 3                          # another pooling: a sibling set
    key = next(k for k, s in feature_sets(workspace).items() if s.identity["pool"] == "2")
    code, out, err = cli("verify", key, "--recompute", "5")
    assert code == 0, err
    deviation = float(out.split("max abs deviation ")[1].split(",")[0])
    assert deviation < 1e-2


def test_resume_redoes_only_missing_shards(cli, workspace):
    code, _, err = cli("extract-features", "--timestep", "100", "--no-flip")
    assert code == 0, err
    fs = next(iter(feature_sets(workspace).values()))
    before = {i: r.files["targets"]["sha256"] for i, r in fs.records.items()}
    meta = json.loads((fs.path / "meta.json").read_text())
    del meta["shards"]["2"]                                           # as if the run died before shard 2 was recorded
    (fs.path / "meta.json").write_text(json.dumps(meta))
    code, out, err = cli("extract-features", "--timestep", "100", "--no-flip")
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
