import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stores.errors import IntegrityError, UserError
from stores.features import FeatureSetWriter, write_feature_shard
from stores.images import ImageSet, ImageSetWriter, make_identity
from stores.stream import ShardStream


def build(root, n=50, shard=8, fmt="npy", name="s"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    w = ImageSetWriter(root, name, make_identity("real", {"t": name}, 8, 3, 10, None, "train", shard, fmt), n)
    w.begin()
    for p in w.pending():
        w.write(p, images[p.first_id:p.first_id + p.count], labels[p.first_id:p.first_id + p.count])
    s = ImageSet(w.path)
    # target of sample i = a pattern that encodes i, so any mismatch between image and target shows
    targets = (np.arange(n)[:, None, None, None] + np.zeros((1, 4, 2, 2))).astype(np.float16)
    fw = FeatureSetWriter(root, {"image_set": s.fingerprint}, n, shard, (4, 2, 2), 2)
    fw.begin()
    for p in s.plan():
        sl = slice(p.first_id, p.first_id + p.count)
        fw.record(write_feature_shard(fw.path, p.index, p.first_id, np.arange(sl.start, sl.stop),
                                      np.stack([targets[sl], -targets[sl]], axis=1)))
    return s, fw.path, images, labels


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_pair_each_image_with_its_target(tmp_path, workers):
    s, fpath, images, labels = build(tmp_path)
    stream = ShardStream(s.path, fpath, s.plan_indices(), batch_size=16, seed=3)
    seen = []
    for batch in DataLoader(stream, batch_size=None, num_workers=workers):
        ids = batch["ids"].numpy()
        assert torch.equal(batch["images"], torch.from_numpy(images[ids]))
        assert torch.equal(batch["labels"], torch.from_numpy(labels[ids]))
        assert (batch["targets"][:, 0, 0, 0].numpy() == ids.astype(np.float16)).all()
        assert (batch["targets_v1"][:, 0, 0, 0].numpy() == -ids.astype(np.float16)).all()
        seen += ids.tolist()
    assert sorted(seen) == list(range(50))           # every sample once per epoch, none twice


def test_ranks_and_workers_split_without_overlap(tmp_path):
    s, fpath, _, _ = build(tmp_path, n=100, shard=5)
    seen = []
    for rank in range(2):
        stream = ShardStream(s.path, fpath, s.plan_indices(), batch_size=7, rank=rank, world_size=2)
        seen += [i for b in DataLoader(stream, batch_size=None, num_workers=2) for i in b["ids"].tolist()]
    assert sorted(seen) == list(range(100))


def test_shuffle_changes_with_epoch_and_is_reproducible(tmp_path):
    s, fpath, _, _ = build(tmp_path)
    def order(epoch):
        st = ShardStream(s.path, fpath, s.plan_indices(), batch_size=16, seed=1)
        st.set_epoch(epoch)
        return [i for b in st for i in b["ids"].tolist()]
    assert order(0) == order(0) and order(0) != order(1) and sorted(order(1)) == list(range(50))


def test_features_of_other_images_refused(tmp_path):
    s, fpath, _, _ = build(tmp_path)
    other, _, _, _ = build(tmp_path / "other", name="t")
    stream = ShardStream(other.path, fpath, other.plan_indices(), batch_size=16)
    with pytest.raises(UserError, match=f"computed from image set {s.fingerprint[:12]}.*{other.fingerprint[:12]}"):
        next(iter(stream))


def test_shard_loader_recycles_slots_and_every_kept_batch_stays_intact(tmp_path):
    """Many more batches than slots (SLOTS_PER_WORKER per worker): a slot refilled too early would corrupt a kept
    batch."""
    from stores.handover import SLOTS_PER_WORKER
    from stores.stream import ShardLoader
    s, fpath, images, labels = build(tmp_path, n=200, shard=8)
    loader = ShardLoader(s.path, fpath, s.plan_indices(), batch_size=4, workers=2, seed=5)
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)                                       # all kept at once
        assert len(batches) > 2 * 2 * SLOTS_PER_WORKER
        seen = []
        for batch in batches:
            ids = batch["ids"].numpy()
            assert "_slot" not in batch
            assert torch.equal(batch["images"], torch.from_numpy(images[ids]))
            assert torch.equal(batch["labels"], torch.from_numpy(labels[ids]))
            assert (batch["targets"][:, 0, 0, 0].numpy() == ids.astype(np.float16)).all()
            assert (batch["targets_v1"][:, 0, 0, 0].numpy() == -ids.astype(np.float16)).all()
            seen += ids.tolist()
        assert sorted(seen) == list(range(200))


def test_borrowed_shard_batches_are_right_until_the_next_and_their_slot_comes_back(tmp_path):
    """borrow=True: each batch, read before the next is drawn, is right; a batch held on is refilled (no copy)."""
    from stores.stream import ShardLoader
    s, fpath, images, _ = build(tmp_path, n=200, shard=8)
    loader = ShardLoader(s.path, fpath, s.plan_indices(), batch_size=4, workers=2, seed=5, borrow=True)
    stream = iter(loader)
    first = next(stream)
    first_ids, seen = first["ids"].clone(), first["ids"].tolist()
    for batch in stream:
        ids = batch["ids"].numpy()
        assert torch.equal(batch["images"], torch.from_numpy(images[ids]))
        assert (batch["targets"][:, 0, 0, 0].numpy() == ids.astype(np.float16)).all()
        seen += ids.tolist()
    assert sorted(seen) == list(range(200))
    assert not torch.equal(first["ids"], first_ids)                 # its slot was filled again


def test_a_verified_shard_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    import hashlib
    import os
    s, _, _, _ = build(tmp_path, n=40, shard=8)
    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr("stores.images.hashlib.sha256", lambda data=b"": hashed.append(1) or real_sha256(data))
    s.read_shard(0)
    s.read_shard(0)
    s.read_shard(1)
    assert len(hashed) == 2                                          # shard 0 once, shard 1 once
    path = s.path / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0xFF                                              # same size, new contents (and ctime)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(0, 0))                                        # even with mtime set back, ctime moved
    with pytest.raises(IntegrityError, match="sha256 differs"):
        s.read_shard(0)


def test_shard_loader_can_be_left_midway_and_iterated_again(tmp_path):
    from stores.stream import ShardLoader
    s, fpath, _, _ = build(tmp_path, n=120, shard=8)
    loader = ShardLoader(s.path, fpath, s.plan_indices(), batch_size=4, workers=2)
    for i, _ in enumerate(loader):
        if i == 3:
            break                                                   # in-flight batches never freed by the consumer
    assert sorted(i for b in loader for i in b["ids"].tolist()) == list(range(120))
    in_process = ShardLoader(s.path, fpath, s.plan_indices(), batch_size=4, workers=0)
    assert sorted(i for b in in_process for i in b["ids"].tolist()) == list(range(120))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_shard_read_in_a_worker_is_the_one_line_error_it_raised(tmp_path, workers):
    """DataLoader re-raises a worker's error with the worker's traceback as its message; the user's one line must
    be the error itself, as when the main process reads the shard."""
    from stores.stream import ShardLoader
    s, fpath, _, _ = build(tmp_path, n=24, shard=8)
    shard = s.path / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF                                              # inside the first member's bytes
    shard.write_bytes(bytes(data))
    loader = ShardLoader(s.path, fpath, s.plan_indices(), batch_size=4, workers=workers)
    with pytest.raises(IntegrityError) as raised:
        list(loader)
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message and len(message) < 300, message
    assert "shard-000001.tar" in message or "shard 1" in message, message
