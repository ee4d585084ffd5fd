import json

import numpy as np
import pytest
import zarr

from stores.errors import IntegrityError, UserError
from stores.features import (
    FeatureSet,
    FeatureSetWriter,
    feature_key,
    feature_set_dir,
    inner_chunk_samples,
    write_feature_shard,
)
from stores.images import plan_shards

IDENTITY = {"image_set": "f" * 64, "model": "m" * 64, "layer": "dec.8x8_in1", "sigma": 0.3423, "noise_seed": 0,
            "pool": "none", "dtype": "float16", "views": {"count": 2, "pad": 0, "flip": True, "seed": 0}}


def build(root, n=10, shard=4, shape=(3, 2, 2), flip=True, identity=IDENTITY, compression="none"):
    """Two views (view 1 = the negated view 0) with `flip`, else one."""
    rng = np.random.default_rng(1)
    targets = rng.standard_normal((n, *shape)).astype(np.float16)
    w = FeatureSetWriter(root, identity, n, shard, shape, 2 if flip else 1, compression)
    w.begin()
    for p in plan_shards(n, shard):
        sl = slice(p.first_id, p.first_id + p.count)
        ids = np.arange(p.first_id, p.first_id + p.count)
        slab = np.stack([targets[sl], -targets[sl]], axis=1) if flip else targets[sl]       # (n, V, C, h, w)
        w.record(write_feature_shard(w.path, p.index, p.first_id, ids, slab))
    return FeatureSet(w.path), targets


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip_by_image_shard(tmp_path, compression):
    fs, targets = build(tmp_path, compression=compression)
    for p in plan_shards(10, 4):
        slab = fs.read_shard(p.index)
        sl = slice(p.first_id, p.first_id + p.count)
        assert slab["targets"].dtype == np.float16
        assert np.array_equal(slab["targets"], targets[sl]) and np.array_equal(slab["targets_v1"], -targets[sl])
        assert slab["ids"].tolist() == list(range(p.first_id, p.first_id + p.count))


def test_layout_one_zarr_shard_per_image_shard_and_1mb_chunks(tmp_path):
    fs, _ = build(tmp_path, n=100, shard=40, shape=(256, 8, 8))
    arr = zarr.open_array(fs.path / "features.zarr" / "targets", mode="r")
    assert arr.shape == (100, 256, 8, 8) and arr.dtype == np.float16
    assert arr.shards == (40, 256, 8, 8)
    assert arr.chunks[0] * 256 * 8 * 8 * 2 >= 1 << 20            # inner chunks of at least 1 MB
    shard_files = sorted(p.relative_to(fs.path) for p in (fs.path / "features.zarr" / "targets" / "c").rglob("*")
                         if p.is_file())
    assert [str(p).split("/")[3] for p in shard_files] == ["0", "1", "2"]
    assert inner_chunk_samples(10000, 32768) == 40 and inner_chunk_samples(7, 32768) == 7


def test_key_follows_identity(tmp_path):
    assert feature_key(IDENTITY) == feature_key(dict(reversed(list(IDENTITY.items()))))
    sibling = {**IDENTITY, "sigma": 0.7236}
    assert feature_key(sibling) != feature_key(IDENTITY)
    assert feature_set_dir(tmp_path, IDENTITY).name == feature_key(IDENTITY)
    meta = json.loads((build(tmp_path)[0].path / "meta.json").read_text())
    assert meta["identity"] == IDENTITY and sorted(meta["shards"]) == ["0", "1", "2"]
    assert set(meta["shards"]["1"]["files"]) == {"targets", "ids", "targets_v1"}


def test_incomplete_shard_is_not_readable(tmp_path):
    w = FeatureSetWriter(tmp_path, IDENTITY, 10, 4, (3, 2, 2), 1)
    w.begin()
    w.record(write_feature_shard(w.path, 0, 0, np.arange(4), np.zeros((4, 3, 2, 2), np.float16)))
    fs = FeatureSet(w.path)
    assert fs.missing_shards([0, 1, 2]) == [1, 2]
    with pytest.raises(IntegrityError, match="not complete"):
        fs.read_shard(1)                   # zarr alone would return fill values here


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_zarr_shard_fails_read_and_verify(tmp_path, damage, cli):
    fs, _ = build(tmp_path / "dra-data")
    path = fs.file_path("targets", 1)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[5] ^= 0x10                     # inside the first inner chunk's data
        path.write_bytes(raw)
    elif damage == "truncate":
        path.write_bytes(raw[:-7])
    else:
        path.unlink()
    with pytest.raises(IntegrityError, match="targets"):
        FeatureSet(fs.path).read_shard(1)
    code, out, _ = cli("verify", fs.key)
    assert code == 1
    assert f"{fs.key}: shard 1" in out and "shard 0" not in out


def test_overflow_refused_with_count(tmp_path):
    w = FeatureSetWriter(tmp_path, IDENTITY, 4, 4, (3, 2, 2), 1)
    w.begin()
    bad = np.zeros((4, 3, 2, 2), np.float32)
    bad[0, 0, 0, 0] = 1e6                  # beyond float16's 65504
    bad[1, 0, 0, 0] = np.nan
    with np.errstate(over="ignore"):
        slab = bad.astype(np.float16)
    with pytest.raises(IntegrityError, match="2 values are inf or nan"):
        write_feature_shard(w.path, 0, 0, np.arange(4), slab)


def test_slab_of_another_shape_refused(tmp_path):
    """zarr 3.1 writes the top-left corner of a larger slab without a word (a worker that pooled nothing would
    leave wrong targets behind); the writer refuses it, and a slab with fewer or more ids than the shard."""
    w = FeatureSetWriter(tmp_path, IDENTITY, 4, 4, (3, 2, 2), 1)
    w.begin()
    with pytest.raises(ValueError, match=r"targets slab \(4, 3, 4, 4\) does not fit the set's \(4, 3, 2, 2\)"):
        write_feature_shard(w.path, 0, 0, np.arange(4), np.zeros((4, 3, 4, 4), np.float16))
    with pytest.raises(ValueError, match="does not fit"):
        write_feature_shard(w.path, 0, 0, np.arange(4), np.zeros((3, 3, 2, 2), np.float16))
    write_feature_shard(w.path, 0, 0, np.arange(4), np.zeros((4, 3, 2, 2), np.float16))


def test_layout_change_refused(tmp_path):
    build(tmp_path)
    with pytest.raises(UserError, match="exists with layout"):
        FeatureSetWriter(tmp_path, IDENTITY, 10, 4, (3, 4, 4), 2)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_fast_reader_equals_zarr(tmp_path, compression):
    from stores.tarshard import ShardBuffer
    fs, targets = build(tmp_path, n=150, shard=64, shape=(256, 8, 8), compression=compression)
    buffer, out = ShardBuffer(), np.empty((64, 256, 8, 8), np.float16)
    for index, first in ((0, 0), (1, 64), (2, 128)):      # the last shard is partial (22 samples)
        got = fs.read_targets_fast(index, "targets_v1", buffer, out)
        assert np.array_equal(got, fs.read_shard(index)["targets_v1"])
        assert np.array_equal(got, -targets[first:first + 64])


def test_fast_reader_detects_flipped_byte(tmp_path):
    from stores.tarshard import ShardBuffer
    fs, _ = build(tmp_path, n=64, shard=64, shape=(256, 8, 8))
    path = fs.file_path("targets", 0)
    raw = bytearray(path.read_bytes())
    raw[2_000_000] ^= 0x01
    path.write_bytes(raw)
    with pytest.raises(IntegrityError, match="crc32c"):
        fs.read_targets_fast(0, "targets", ShardBuffer(), np.empty((64, 256, 8, 8), np.float16))
