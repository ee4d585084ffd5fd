"""The object-store layer against a real S3 API server on localhost: whole PUTs, the lease, the mirror's cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stores import remote
from stores.errors import IntegrityError, UserError
from stores.lease import take_lease
from stores.locks import writer_lock
from stores.objectstore import LostRace, ObjectStore

REPO = Path(__file__).resolve().parents[2]


def test_conditional_create_lets_exactly_one_writer_win(s3_root):
    store = ObjectStore(s3_root)
    store.put("a/lease", b"first", create_only=True)
    with pytest.raises(LostRace):
        store.put("a/lease", b"second", create_only=True)
    etag = store.head("a/lease").etag
    store.put("a/lease", b"third", if_etag=etag)             # replace exactly the version read
    with pytest.raises(LostRace):
        store.put("a/lease", b"fourth", if_etag=etag)        # that version is gone
    assert store.get("a/lease") == b"third"


def test_a_second_writer_is_refused_naming_the_holder_and_takes_an_expired_lease(s3_root, capfd):
    root = remote.attach(s3_root, lease_seconds=1.5)
    folder = root / "images" / "x"
    first, _ = take_lease(folder, "dra-pipe generate", "now")
    assert first is not None
    second, holder = take_lease(folder, "dra-pipe generate", "now")
    assert second is None and holder["pid"] == os.getpid() and holder["command"] == "dra-pipe generate"
    time.sleep(2.0)                                          # refreshed every 0.5 s: still held past its 1.5 s
    assert take_lease(folder, "other", "now")[0] is None
    first._stop.set()                                        # the holder stops refreshing: as if it died
    first._thread.join()
    time.sleep(1.7)
    third, holder = take_lease(folder, "other", "now")
    assert holder is None and third is not None
    assert "took over the lease" in capfd.readouterr().err
    third.release()
    assert ObjectStore(s3_root).head("images/x/.lease") is None


def test_a_writer_whose_lease_was_taken_over_writes_and_deletes_nothing_more_there(s3_root, capfd):
    import threading
    root = remote.attach(s3_root, lease_seconds=1.5)
    folder = root / "images" / "x"
    mine, _ = take_lease(folder, "dra-pipe generate", "now")
    mine._stop.set()                                         # this writer stalls past its lease...
    mine._thread.join()
    store = ObjectStore(s3_root)
    store.put("images/x/.lease", json.dumps({"pid": 1, "expires": time.time() + 60}).encode(), if_etag=mine.etag)
    mine._stop.clear()                                       # ...another node took the set over; it wakes up
    mine._thread = threading.Thread(target=mine._refresh, daemon=True)
    mine._thread.start()
    deadline = time.time() + 10
    while not mine.lost and time.time() < deadline:
        time.sleep(0.1)
    assert mine.lost and "lost the lease" in capfd.readouterr().err
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shard-000000.tar").write_bytes(b"late")
    with pytest.raises(UserError, match="lost its lease"):
        remote.published(folder / "shard-000000.tar")
    with pytest.raises(UserError, match="lost its lease"):
        remote.removed(folder)
    assert store.head("images/x/shard-000000.tar") is None and store.head("images/x/.lease") is not None
    mine.release()
    assert json.loads(store.get("images/x/.lease"))["pid"] == 1          # the new holder's lease stays


HOLD = """
import sys, time
from stores import remote
from stores.locks import writer_lock
root = remote.attach(sys.argv[1], lease_seconds=2.0)
with writer_lock(root / "images" / "x", "image set 'x'"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_writer_on_another_node_killed_leaves_a_lease_that_expires(s3_root, tmp_path, monkeypatch):
    """Two nodes: separate cache folders, so the local flock cannot see the other writer; only the lease can."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DRA_PIPE_CACHE": str(tmp_path / "node-b")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, s3_root], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        root = remote.attach(s3_root, lease_seconds=2.0)
        with pytest.raises(UserError, match=f"being written by pid {holder.pid} on host"):
            writer_lock(root / "images" / "x", "image set 'x'").acquire()
        holder.kill()
        holder.wait()
        time.sleep(2.2)
        lock = writer_lock(root / "images" / "x", "image set 'x'").acquire()
        lock.release()
    finally:
        holder.kill()


KILLED_UPLOAD = """
import os, sys, time
from stores.objectstore import ObjectStore

def chunks():
    for _ in range(4):
        yield os.urandom(8 << 20)
    print("sent", flush=True)                  # 32 MB are on their way (multipart parts): now the writer dies
    time.sleep(600)
    yield b"end"

ObjectStore(sys.argv[1]).put("images/x/shard-000000.tar", chunks())
"""


def test_a_writer_killed_mid_upload_leaves_no_object(s3_root, s3_server):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    uploader = subprocess.Popen([sys.executable, "-c", KILLED_UPLOAD, s3_root], env=env, stdout=subprocess.PIPE,
                                text=True)
    try:
        assert uploader.stdout.readline().strip() == "sent"
        time.sleep(0.5)
    finally:
        uploader.kill()
        uploader.wait()
    bucket = s3_root.split("/")[2]
    started = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in started] == ["ws/images/x/shard-000000.tar"]     # parts were sent, never completed
    assert ObjectStore(s3_root).head("images/x/shard-000000.tar") is None
    assert ObjectStore(s3_root).list() == []


def test_a_shard_is_fetched_checked_and_the_cache_stays_within_its_bound(s3_root):
    store = ObjectStore(s3_root)
    import hashlib
    blobs = {i: os.urandom(400_000) for i in range(4)}
    for i, blob in blobs.items():
        store.put(f"images/x/shard-00000{i}.tar", blob)
    root = remote.attach(s3_root, cache_gb=0.001)            # 1 MB: two shards fit, not three
    for i, blob in blobs.items():
        path = root / "images" / "x" / f"shard-00000{i}.tar"
        assert remote.fetch(path, len(blob), hashlib.sha256(blob).hexdigest())
        assert path.read_bytes() == blob
    kept = sorted(p.name for p in (root / "images" / "x").iterdir())
    assert kept == ["shard-000002.tar", "shard-000003.tar"]   # the least recently used left first
    store.put("images/x/shard-000000.tar", b"x" * 400_000)   # damaged in the bucket
    with pytest.raises(IntegrityError, match="sha256 differs"):
        remote.fetch(root / "images" / "x" / "shard-000000.tar", 400_000, hashlib.sha256(blobs[0]).hexdigest())
    assert not (root / "images" / "x" / "shard-000000.tar").exists()


def test_a_copy_keeps_its_objects_time_and_run_weights_wait_until_a_command_brings_them(s3_root):
    """"Is eval.json newer than the weights it scored" must not depend on the order a node downloaded them in."""
    store = ObjectStore(s3_root)
    store.put("runs/r/final.pt", b"weights")
    time.sleep(1.1)                                          # Last-Modified has whole seconds
    store.put("runs/r/eval.json", b"{}")
    store.put("runs/r/run.json", b"{}")
    root = remote.attach(s3_root)                            # a command's start on a fresh node
    run = root / "runs" / "r"
    assert (run / "eval.json").exists() and (run / "run.json").exists() and not (run / "final.pt").exists()
    remote.bring(run)                                        # the weights arrive after eval.json
    assert (run / "final.pt").read_bytes() == b"weights"
    assert (run / "eval.json").stat().st_mtime > (run / "final.pt").stat().st_mtime
    assert abs((run / "eval.json").stat().st_mtime - time.time()) < 60


@pytest.mark.parametrize("change, says", [
    ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "secret key is wrong"),
    ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN"}, "access key is not known"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "connection refused"),
])
def test_bad_credentials_or_endpoint_are_named_before_anything_is_written(s3_root, monkeypatch, tmp_path, change,
                                                                          says):
    for key, value in change.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=says):
        remote.attach(s3_root)
    assert not (tmp_path / "cache").exists()


def test_a_missing_bucket_is_named(s3_root, tmp_path):
    with pytest.raises(UserError, match="bucket does not exist"):
        remote.attach("s3://no-such-bucket-here/ws")
    assert not (tmp_path / "cache").exists()


def test_gcs_with_a_damaged_service_account_key_is_named(monkeypatch, tmp_path):
    """gs:// goes through the same client: a key file without a private key is one UserError, nothing written
    (offline: never the metadata server)."""
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "service_account", "client_email": "x@y.iam.gserviceaccount.com",
                               "private_key": "not a key", "private_key_id": "1",
                               "token_uri": "http://127.0.0.1:9/token"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("DRA_PIPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="cannot use gs://some-bucket.*no readable private key"):
        remote.attach("gs://some-bucket/ws")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("secret_ok", [True, False])
def test_a_profile_gives_the_credentials(s3_root, s3_server, monkeypatch, tmp_path, secret_ok):
    """No keys in the environment, AWS_PROFILE naming a profile of a shared credentials file (as `aws configure`
    writes it): its keys are used, and a wrong one is named."""
    secret = s3_server.secret_key if secret_ok else "wrong"
    (tmp_path / "credentials").write_text(f"[lab]\naws_access_key_id = {s3_server.access_key}\n"
                                          f"aws_secret_access_key = {secret}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    if secret_ok:
        assert remote.attach(s3_root).is_dir()
    else:
        with pytest.raises(UserError, match="secret key is wrong"):
            remote.attach(s3_root)
