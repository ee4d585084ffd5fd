"""The persistent checksum cache: import and stage reruns read no unchanged file; `verify` always re-hashes."""
import hashlib
import json
import os
import time

import numpy as np
import pytest

import stores.checksums as checksums
import stores.tarshard as tarshard
from stores.catalog import verify_image_set
from stores.images import ImageSet, ImageSetWriter, make_identity
from stores.tarshard import file_problem, shard_name


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "checksums.json"
    monkeypatch.setenv(checksums.CACHE_ENV, str(path))
    new_process()
    yield path
    new_process()


def new_process() -> None:
    """What a fresh process starts with: no in-memory digests, the cache file read again."""
    checksums.flush_checksums()
    checksums._CACHES.clear()
    tarshard._INTACT.clear()


def age(path, seconds=100) -> None:
    """Set the file's mtime in the past, beyond the window in which a fresh write is not trusted."""
    past = time.time_ns() - seconds * 10**9
    os.utime(path, ns=(past, past))


def swap_contents_keeping_stat(path) -> None:
    """New bytes, same size, inode and mtime: only a hash can tell."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_unchanged_file_is_hashed_once_across_processes(tmp_path, cache_file):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(5000))
    age(source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert checksums.cached_file_sha256(source) == digest
    assert checksums.checksum_cache().hashed == 1
    new_process()
    swap_contents_keeping_stat(source)
    assert checksums.cached_file_sha256(source) == digest               # not read: the cache answered
    cache = checksums.checksum_cache()
    assert (cache.hits, cache.hashed) == (1, 0)
    age(source, 50)                                                     # a new mtime: hashed again
    assert checksums.cached_file_sha256(source) == hashlib.sha256(source.read_bytes()).hexdigest() != digest


def test_a_file_written_just_before_hashing_is_not_cached(tmp_path, cache_file):
    source = tmp_path / "fresh.bin"
    source.write_bytes(b"x" * 100)
    checksums.cached_file_sha256(source)
    new_process()
    checksums.cached_file_sha256(source)
    assert checksums.checksum_cache().hashed == 1
    assert not cache_file.exists()


@pytest.mark.parametrize("damage", [b"{not json", b'{"version": 1, "entries": {"/a": [1, 2]}}', b"[]", b""])
def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path, cache_file, damage):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(damage)
    new_process()
    source = tmp_path / "source.bin"
    source.write_bytes(b"y" * 100)
    age(source)
    assert checksums.cached_file_sha256(source) == hashlib.sha256(b"y" * 100).hexdigest()
    checksums.flush_checksums()
    entries = json.loads(cache_file.read_bytes())["entries"]
    assert list(entries) == [os.path.abspath(source)]


def test_off_disables_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(checksums.CACHE_ENV, "off")
    new_process()
    source = tmp_path / "source.bin"
    source.write_bytes(b"z" * 100)
    age(source)
    checksums.cached_file_sha256(source)
    checksums.cached_file_sha256(source)
    assert checksums.checksum_cache().hashed == 2
    new_process()


def test_import_rerun_reads_no_source_file(tmp_path, cli, cache_file):
    rng = np.random.default_rng(0)
    path = tmp_path / "gen.npz"
    np.savez(path, image=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), label=rng.integers(0, 10, 20))
    age(path)
    code, out, err = cli("import", "npz", "--from", path, "--name", "g", "--generated", "--shard-size", "8")
    assert code == 0, err
    new_process()
    st, other = os.stat(path), tmp_path / "other.npz"    # other pixels, same size, written into the same inode
    np.savez(other, image=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), label=rng.integers(0, 10, 20))
    with open(path, "r+b") as f:
        f.write(other.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a re-hash would see another source and import it again
    assert os.stat(path).st_size == st.st_size
    code, out, err = cli("import", "npz", "--from", path, "--name", "g", "--generated", "--shard-size", "8")
    assert code == 0, err
    assert "already imported" in out
    assert checksums.checksum_cache().hashed == 0


def build_set(root):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 12)
    writer = ImageSetWriter(root, "t", make_identity("real", {"importer": "test"}, 8, 1, 10, None, "train", 4,
                                                     "png"), 12)
    writer.begin()
    for p in writer.pending():
        writer.write(p, images[p.first_id:p.first_id + p.count], labels[p.first_id:p.first_id + p.count])
    writer.close()
    s = ImageSet.open(root, "t")
    for index in s.records:
        age(s.path / shard_name(index))
    return s


def test_stage_rerun_trusts_unchanged_shards_and_verify_rehashes(tmp_path, cache_file, monkeypatch):
    s = build_set(tmp_path)
    path, record = s.path / shard_name(0), s.records[0]
    assert all(file_problem(s.path / shard_name(i), r.bytes, r.sha256) is None for i, r in s.records.items())
    new_process()
    reopened = ImageSet.open(tmp_path, "t")
    hashed = []
    real, real_sha256 = tarshard.file_sha256_and_size, hashlib.sha256
    monkeypatch.setattr(tarshard, "file_sha256_and_size", lambda p: hashed.append(p) or real(p))
    monkeypatch.setattr("stores.images.hashlib.sha256", lambda data=b"": hashed.append(1) or real_sha256(data))
    assert reopened.read_shard(1).ids.tolist() == [4, 5, 6, 7]   # a reader trusts it too
    swap_contents_keeping_stat(path)
    assert file_problem(path, record.bytes, record.sha256) is None          # a new process trusts the cache
    assert hashed == []
    problems = verify_image_set(s.path)                                      # verify always hashes
    assert [p.shard for p in problems] == [0] and "corrupted" in problems[0].what
    new_process()
    assert file_problem(path, record.bytes, record.sha256) == "corrupted (sha256 differs)"   # entry forgotten
