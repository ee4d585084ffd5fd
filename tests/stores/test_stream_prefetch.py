"""Streaming from an object-store root: the same batches as from a local root, with shards downloaded ahead."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from stores import remote
from stores.features import FeatureSetWriter, write_feature_shard
from stores.images import ImageSet, ImageSetWriter, make_identity
from stores.stream import ShardPrefetch, ShardStream


def write_sets(root, n=60, shard=8):
    """The same image set (npy, 8x8x3) and two-view feature set under `root` (a local folder or a mirror)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    w = ImageSetWriter(root, "s", make_identity("real", {"t": "s"}, 8, 3, 10, None, "train", shard, "npy"), n)
    w.begin()
    for p in w.pending():
        w.write(p, images[p.first_id:p.first_id + p.count], labels[p.first_id:p.first_id + p.count])
    w.close()
    s = ImageSet(w.path)
    targets = rng.standard_normal((n, 2, 4, 2, 2)).astype(np.float16)
    fw = FeatureSetWriter(root, {"image_set": s.fingerprint}, n, shard, (4, 2, 2), 2)
    fw.begin()
    for p in s.plan():
        fw.record(write_feature_shard(fw.path, p.index, p.first_id, np.arange(p.first_id, p.first_id + p.count),
                                      targets[p.first_id:p.first_id + p.count]))
    fw.close()
    return s.path, fw.path


@pytest.fixture
def two_roots(s3_root, tmp_path, monkeypatch):
    """((images, features) on a local root, (images, features) on the bucket as a fresh node sees it: its mirror
    holds the small files only, no shard yet)."""
    local = write_sets(tmp_path / "local")
    write_sets(remote.attach(s3_root))
    remote.detach_all()
    monkeypatch.setenv("DRA_PIPE_CACHE", str(tmp_path / "node-b"))
    mirror = remote.attach(s3_root)
    in_bucket = tuple(mirror / p.relative_to(tmp_path / "local") for p in local)
    assert not list(in_bucket[0].glob("shard-*.tar"))
    return local, in_bucket


def batches(paths, workers, epochs=2):
    """Every batch of `epochs` epochs through ShardLoader (its workers: forkserver processes on a bucket)."""
    from stores.stream import ShardLoader
    loader = ShardLoader(*paths, ImageSet(paths[0]).plan_indices(), batch_size=5, workers=workers, seed=7)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out += list(loader)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bucket_streams_exactly_the_batches_of_a_local_root(two_roots, workers):
    """Same batches, byte for byte. With workers: obstore hangs in a process forked after it ran, so a loader over
    a bucket starts its workers fresh (forkserver) with this process's environment."""
    local, in_bucket = two_roots
    expected, got = batches(local, workers), batches(in_bucket, workers)
    assert len(got) == len(expected) >= 2 * 12
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_next_shards_are_downloaded_ahead_in_the_background(two_roots, monkeypatch):
    _, in_bucket = two_roots
    made, downloads = [], []
    original_init, original_download = ShardPrefetch.__init__, remote._download

    def keep(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    def logged(mirror, key, local):
        downloads.append((key, threading.current_thread().name))
        return original_download(mirror, key, local)

    monkeypatch.setattr(ShardPrefetch, "__init__", keep)
    monkeypatch.setattr(remote, "_download", logged)
    stream = ShardStream(*in_bucket, ImageSet(in_bucket[0]).plan_indices(), batch_size=5, seed=7)
    order = stream.my_shards()
    it = iter(stream)
    next(it)                                          # 5 rows of the first shard (8 rows): only it is read
    assert len(made) == 1 and made[0].window == 2
    for ahead in order[1:3]:
        made[0].pending[ahead].result()               # queued when the first shard was read; waited on here
        assert all(path.exists() for path, _, _ in made[0].files(ahead))
    assert not made[0].files(order[3])[0][0].exists()  # two ahead, no more
    assert downloads and all(name.startswith("dra-prefetch") for _, name in downloads)
    assert sum(1 for _ in it) == 11                   # the rest of the epoch; the thread ends with it
    assert made[0]._pool is None


def test_a_local_root_reads_without_a_thread(tmp_path):
    paths = write_sets(tmp_path)
    stream = ShardStream(*paths, ImageSet(paths[0]).plan_indices(), batch_size=5)
    for _ in stream:
        assert not [t for t in threading.enumerate() if t.name.startswith("dra-prefetch")]


def test_the_window_shrinks_to_what_the_cache_holds_beside_the_shard_read(two_roots, s3_root):
    _, in_bucket = two_roots
    mirror, _ = remote.mirror_of(in_bucket[0])
    images = ImageSet(in_bucket[0])
    from stores.features import FeatureSet
    features = FeatureSet(in_bucket[1])
    shard_bytes = sum(size for _, size, _ in ShardPrefetch(images, features, 2).files(0))
    mirror.cache_bytes = int(2.5 * shard_bytes)
    assert ShardPrefetch.for_sets(images, features, 2).window == 1
    mirror.cache_bytes = int(1.5 * shard_bytes)
    assert ShardPrefetch.for_sets(images, features, 2) is None
