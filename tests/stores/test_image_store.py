import subprocess
import sys
import textwrap

import numpy as np
import pytest
import webdataset as wds

from stores.errors import IntegrityError, UserError
from stores.images import ImageSet, ImageSetWriter, make_identity, plan_shards
from stores.manifest import read_manifest
from stores.tarshard import shard_name


def identity(fmt="png", shard_size=4, channels=1):
    return make_identity("real", {"importer": "test"}, 8, channels, 10, None, "train", shard_size, fmt)


def data(n=10, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, channels), dtype=np.uint8), rng.integers(0, 10, n)


def build(root, name="t", fmt="png", n=10, channels=1):
    images, labels = data(n, channels)
    w = ImageSetWriter(root, name, identity(fmt, channels=channels), n)
    w.begin()
    for p in w.pending():
        w.write(p, images[p.first_id:p.first_id + p.count], labels[p.first_id:p.first_id + p.count])
    return ImageSet.open(root, name), images, labels


@pytest.mark.parametrize("fmt, channels", [("png", 1), ("png", 3), ("npy", 3)])
def test_round_trip_lossless(tmp_path, fmt, channels):
    s, images, labels = build(tmp_path, fmt=fmt, channels=channels)
    assert s.complete and len(s.records) == 3
    got = s.read_range(0, 10)
    assert np.array_equal(got.images, images) and np.array_equal(got.labels, labels)
    assert np.array_equal(got.ids, np.arange(10))
    part = s.read_range(3, 9)
    assert np.array_equal(part.images, images[3:9]) and np.array_equal(part.ids, np.arange(3, 9))
    streamed = [(int(i), image, int(label)) for index in (2, 0)
                for i, image, label in zip(*_shard_fields(s.read_shard(index)))]
    assert [i for i, _, _ in streamed] == [8, 9, 0, 1, 2, 3]


def test_manifest_rows_and_identity(tmp_path):
    s, _, _ = build(tmp_path)
    rows = read_manifest(s.path)
    assert [r.first_id for r in rows.values()] == [0, 4, 8] and [r.count for r in rows.values()] == [4, 4, 2]
    for r in rows.values():
        assert r.bytes == (s.path / shard_name(r.index)).stat().st_size and len(r.sha256) == 64
    other, _, _ = build(tmp_path, name="u", n=9)
    assert other.fingerprint != s.fingerprint


def test_shards_are_webdataset_readable_with_digit_keys(tmp_path):
    s, images, labels = build(tmp_path, channels=3)
    urls = [str(s.path / shard_name(i)) for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node).decode("rgb8"))
    assert [x["__key__"] for x in samples] == [f"{i:010d}" for i in range(10)]
    assert all(x["__key__"].isdigit() for x in samples)
    assert np.array_equal(np.stack([x["png"] for x in samples]), images)
    assert [int(x["cls"]) for x in samples] == labels.tolist()


def test_identical_inputs_give_identical_bytes(tmp_path):
    a, _, _ = build(tmp_path / "a")
    b, _, _ = build(tmp_path / "b")
    assert [r.sha256 for r in a.records.values()] == [r.sha256 for r in b.records.values()]


def test_other_identity_under_same_name_refused(tmp_path):
    build(tmp_path)
    with pytest.raises(UserError, match="another identity"):
        ImageSetWriter(tmp_path, "t", identity(shard_size=5), 10)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_fails_read_and_verify_names_it(tmp_path, damage, cli):
    s, _, _ = build(tmp_path / "dra-data")
    path = s.path / shard_name(1)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        raw[520] ^= 0x01            # inside the first member's payload
        path.write_bytes(raw)
    else:
        path.unlink()
    with pytest.raises(IntegrityError, match="shard-000001.tar"):
        ImageSet(s.path).read_shard(1)
    assert ImageSet(s.path).read_shard(0).ids.tolist() == [0, 1, 2, 3]
    code, out, _ = cli("verify", "t")
    assert code == 1
    expected = {"truncate": "truncated", "flip": "corrupted", "delete": "deleted"}[damage]
    assert f"t: shard 1 {expected}" in out and "shard 0" not in out and "shard 2" not in out


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import stores.tarshard as ts
    from stores.images import ImageSetWriter, make_identity
    root, kill_at = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 10)
    encode, calls = ts.encode_image, [0]
    def dying_encode(image, fmt):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # die in the middle of a shard, as a crash would
        return encode(image, fmt)
    ts.encode_image = dying_encode
    w = ImageSetWriter(root, "t", make_identity("real", {"importer": "test"}, 8, 1, 10, None, "train", 4, "png"), 10)
    w.begin()
    for p in w.pending():
        w.write(p, images[p.first_id:p.first_id + p.count], labels[p.first_id:p.first_id + p.count])
""")


def test_killed_writer_leaves_no_partial_shard_and_rerun_completes(tmp_path):
    root = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), "6"], capture_output=True)
    assert proc.returncode == -9
    s = ImageSet.open(root, "t")
    assert sorted(s.records) == [0]
    assert [p.index for p in s.missing_shards()] == [1, 2]
    assert not (s.path / shard_name(1)).exists()          # the half-written shard is not visible
    assert any(f.name.startswith(".shard-000001.tar.tmp") for f in s.path.iterdir())
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), "0"], check=True)
    done = ImageSet.open(root, "t")
    clean, _, _ = build(tmp_path / "clean")
    assert done.complete
    assert [r.sha256 for r in done.records.values()] == [r.sha256 for r in clean.records.values()]


def test_shard_not_in_manifest_is_invisible(tmp_path):
    s, _, _ = build(tmp_path)
    from stores.manifest import write_manifest
    records = dict(s.records)
    del records[2]
    write_manifest(s.path, records)
    fresh = ImageSet(s.path)
    assert not fresh.complete and [p.index for p in fresh.missing_shards()] == [2]
    with pytest.raises(IntegrityError, match="not complete"):
        fresh.read_shard(2)


def test_plan_shards_contiguous():
    plans = plan_shards(10, 4)
    assert [(p.first_id, p.count) for p in plans] == [(0, 4), (4, 4), (8, 2)]


def test_writer_finds_a_shard_damaged_in_place_after_it_was_checked(tmp_path):
    """A reopened writer redoes a shard whose bytes changed in place (same inode, same size) since it last
    found the shard intact in this process."""
    build(tmp_path)
    assert ImageSetWriter(tmp_path, "t", identity(), 10).damaged == []         # checked (and found intact) once
    path = tmp_path / "images" / "t" / shard_name(1)
    data_bytes = bytearray(path.read_bytes())
    data_bytes[700] ^= 0xFF
    path.write_bytes(bytes(data_bytes))
    writer = ImageSetWriter(tmp_path, "t", identity(), 10)
    assert writer.damaged == [1] and [p.index for p in writer.pending()] == [1]


def _shard_fields(shard):
    """(ids, images, labels) of a decoded shard, for zipping sample by sample."""
    return shard.ids, shard.images, shard.labels
