"""features.dtype acts: a float32 feature set stores float32 and every reader gives its values back exactly."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from trainsets import feature_set, image_set

from stores.errors import IntegrityError, UserError
from stores.features import FeatureSet, FeatureSetWriter
from stores.stream import PairedShardReader
from stores.tarshard import ShardBuffer
from trainer.loader import MixPlan, Source, make_loader

SHAPE = (3, 2, 2)


def float32_targets(n: int) -> np.ndarray:
    """(N, C, h, w) float32 values float16 cannot hold: thirds (rounded) and 1e5 (overflow)."""
    t = (np.arange(n * 12, dtype=np.float32).reshape(n, *SHAPE) + 1) / 3
    t[:, 0, 0, 0] = 1e5
    return t


def test_float32_set_stores_float32_and_reads_back_exactly(tmp_path):
    images = image_set(tmp_path, "digits-train", "real", 10, 4)
    targets = float32_targets(images.n)
    fs = FeatureSet(feature_set(tmp_path, images, SHAPE, targets=targets, dtype="float32"))
    assert fs.dtype == np.float32 and fs.group["targets"].dtype == np.float32 and fs.identity["dtype"] == "float32"
    reader = PairedShardReader(images.path, fs.path)
    for p in images.plan():
        rows = targets[p.first_id:p.first_id + p.count]
        assert np.array_equal(fs.read_shard(p.index)["targets"], rows)
        fast = fs.read_targets_fast(p.index, "targets", ShardBuffer(), np.empty((4, *SHAPE), np.float32))
        assert fast.dtype == np.float32 and np.array_equal(fast, rows)
        assert np.array_equal(reader.read(p.index)["targets"], rows)


def test_the_trainer_loader_streams_float32_targets_exactly(tmp_path):
    images = image_set(tmp_path, "digits-train", "real", 12, 4)
    targets = float32_targets(images.n)
    fs = FeatureSet(feature_set(tmp_path, images, SHAPE, targets=targets, dtype="float32"))
    plan = MixPlan(Source.open(images, fs, 0), None, 4, 0, seed=0, keys=("ids", "images", "labels", "targets"))
    for batch in itertools.islice(iter(make_loader(plan)), 6):
        assert batch["targets"].dtype == torch.float32
        assert torch.equal(batch["targets"], torch.from_numpy(targets[batch["ids"].numpy()]))


def test_float16_set_still_refuses_what_overflows_it(tmp_path):
    images = image_set(tmp_path, "digits-train", "real", 4, 4)
    with pytest.raises(IntegrityError, match="inf or nan in float16"), np.errstate(over="ignore"):
        feature_set(tmp_path, images, SHAPE, targets=float32_targets(4).astype(np.float64))


def test_a_dtype_without_numpy_storage_is_refused(tmp_path):
    with pytest.raises(UserError, match="float16, float32"):
        FeatureSetWriter(tmp_path, {"x": 1}, 4, 4, SHAPE, 1, dtype="bfloat16")


def test_the_run_finds_the_feature_set_of_its_dtypes(tmp_path):
    """Sibling sets of one teacher in float16 and float32 storage: features.dtype picks one, no ambiguity."""
    from pipeline.config import load_config
    from pipeline.plans.features import feature_query
    from trainer.targets import find_feature_sets
    images = image_set(tmp_path, "digits-train", "real", 8, 4)
    half = feature_set(tmp_path, images, SHAPE)
    full = feature_set(tmp_path, images, SHAPE, targets=float32_targets(8), dtype="float32")
    for dtype, want in (("float16", half), ("float32", full)):
        found = find_feature_sets(tmp_path, images, None, feature_query(load_config(None, {"features.dtype": dtype})))
        assert found["real"].path == want
    with pytest.raises(UserError, match="computed in bfloat16"):
        find_feature_sets(tmp_path, images, None, feature_query(load_config(None, {"model.dtype": "bfloat16"})))
