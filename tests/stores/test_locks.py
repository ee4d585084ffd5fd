"""Writer locks: another process holding a set's lock refuses (or delays) a second writer; death releases it."""
import fcntl
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from lockholder import Holder, another_process_can_lock, holding

from stores.errors import UserError
from stores.features import FeatureSetWriter
from stores.images import ImageSet, ImageSetWriter, image_set_dir, make_identity
from stores.locks import LOCK_NAME, writer_lock


def identity(seed: int) -> dict:
    return make_identity("generated", {"model": "m", "seed": seed}, 4, 1, 2, None, "train", 4, "npy")


def fill(writer: ImageSetWriter) -> None:
    writer.begin()
    for p in writer.pending():
        writer.write(p, np.full((p.count, 4, 4, 1), p.index, np.uint8), np.zeros(p.count, np.int64))


def snapshot(root, with_lock: bool = True) -> dict:
    """Every file under root with its bytes: a refused writer must leave all of it as it was (a writer refused
    after it got the lock has recorded itself in the lock file)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (with_lock or p.name != LOCK_NAME)}


def test_a_second_writer_is_refused_in_one_line_naming_host_and_pid(tmp_path):
    folder = tmp_path / "images" / "race"
    with holding(folder) as holder:
        before = snapshot(tmp_path)
        with pytest.raises(UserError) as refused:
            writer_lock(folder, "image set 'race'").acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "image set 'race'" in message
        assert "\n" not in message and "--wait" in message
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            ImageSetWriter(tmp_path, "race", identity(1), 8).begin()
        assert snapshot(tmp_path) == before and not (folder / "dataset.json").exists()


def test_the_lock_file_records_who_holds_it(tmp_path):
    with writer_lock(tmp_path / "set", "set"):
        record = json.loads((tmp_path / "set" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["command"]


def test_a_killed_holder_releases_the_lock(tmp_path):
    folder = tmp_path / "set"
    holder = Holder(folder)
    with pytest.raises(UserError):
        writer_lock(folder, "set").acquire()
    holder.kill()                                            # SIGKILL: no cleanup runs, the OS drops the flock
    with writer_lock(folder, "set"):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_wait_announces_whom_it_waits_for_and_proceeds_once_released(tmp_path):
    folder = tmp_path / "set"
    lines = []
    with holding(folder) as holder:
        threading.Timer(1.0, holder.release).start()
        started = time.monotonic()
        with writer_lock(folder, "image set 'x'", wait=True, announce=lines.append):
            waited = time.monotonic() - started
            assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert waited >= 0.9 and len(lines) == 1
    assert lines[0].startswith("waiting for image set 'x'") and f"pid {holder.pid}" in lines[0]


def test_a_waiter_whose_holder_removed_the_folder_locks_the_new_one(tmp_path):
    """The holder made the folder and wrote nothing: it removes it on release, and the waiter must not end up
    holding the lock of a deleted file (then a third writer would get in too)."""
    folder = tmp_path / "set"
    with holding(folder) as holder:
        threading.Timer(0.5, holder.release).start()
        with writer_lock(folder, "set", wait=True, announce=lambda line: None):
            assert not another_process_can_lock(folder)
    assert not folder.exists()                                # released with nothing written: no folder stays


def test_a_lock_file_removed_while_opened_is_not_taken(tmp_path, monkeypatch):
    """Deterministic version of that race: the holder removes its folder between this writer's open and flock."""
    folder = tmp_path / "set"
    holder = Holder(folder)
    real_flock = fcntl.flock

    def flock_after_the_holder_left(fd, operation):
        if holder.process.poll() is None:
            holder.release()
        return real_flock(fd, operation)
    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_left)
    with writer_lock(folder, "set"):
        monkeypatch.undo()
        assert (folder / LOCK_NAME).exists() and not another_process_can_lock(folder)


def test_a_process_may_nest_its_own_lock_and_holds_it_to_the_outermost_release(tmp_path):
    folder = tmp_path / "set"
    outer = writer_lock(folder, "set").acquire()
    with writer_lock(folder, "set"):
        (folder / "data").write_text("x")
    assert not another_process_can_lock(folder)               # still held by the outer one
    outer.release()
    assert another_process_can_lock(folder)


def test_the_second_writer_checks_the_identity_under_the_lock(tmp_path):
    """Both started on an empty folder; the first finished a seed-0 set while the second waited: the second,
    seed 1, is refused when it gets the lock, and the seed-0 set stays as it was."""
    late = ImageSetWriter(tmp_path, "race", identity(1), 8)   # saw no set: nothing to refuse yet
    with ImageSetWriter(tmp_path, "race", identity(0), 8) as first:
        fill(first)
    before = snapshot(tmp_path, with_lock=False)
    with pytest.raises(UserError, match="another identity"):
        late.begin()
    assert (snapshot(tmp_path, with_lock=False) == before
            and ImageSet(image_set_dir(tmp_path, "race")).identity == identity(0))


def test_a_complete_set_of_another_identity_is_refused_before_any_lock(tmp_path):
    with ImageSetWriter(tmp_path, "race", identity(0), 8) as first:
        fill(first)
    with holding(image_set_dir(tmp_path, "race")):           # even while someone writes it: the refusal is a read
        with pytest.raises(UserError, match="another identity"):
            ImageSetWriter(tmp_path, "race", identity(1), 8)


def test_a_writer_resumes_what_another_finished_while_it_waited(tmp_path):
    late = ImageSetWriter(tmp_path, "race", identity(0), 8)
    assert len(late.pending()) == 2
    with ImageSetWriter(tmp_path, "race", identity(0), 8) as first:
        fill(first)
    late.begin()
    assert late.pending() == []
    late.close()


def test_abort_removes_the_new_set_and_its_lock(tmp_path):
    writer = ImageSetWriter(tmp_path, "new", identity(0), 8)
    writer.begin()
    writer.abort()
    assert not image_set_dir(tmp_path, "new").exists() and another_process_can_lock(image_set_dir(tmp_path, "new"))


def test_feature_writer_is_refused_while_another_process_writes(tmp_path):
    writer = FeatureSetWriter(tmp_path, {"image_set": "abc"}, 8, 4, (2, 1, 1), 1)
    with holding(writer.path) as holder:
        with pytest.raises(UserError, match=f"feature set {writer.path.name} is being written by pid {holder.pid}"):
            writer.begin()
        assert not (writer.path / "meta.json").exists()
    writer.begin()
    assert (writer.path / "meta.json").exists()
    writer.close()


def test_taking_the_lock_removes_what_dead_writers_left_between_write_and_rename(tmp_path):
    """`.meta.json.tmp-<pid>` after Ctrl-C in extract, `.manifest.parquet.tmp-<pid>` after SIGTERM in generate, fit's
    `checkpoint.tmp-<pid>`: gone once the next writer holds the folder; records and this process's own stay."""
    folder = tmp_path / "set"
    holder = Holder(folder)                                  # the writer that dies between write and rename
    stale = [".meta.json.tmp-4242", ".manifest.parquet.tmp-77", "checkpoint.tmp-31337", ".scores.tmp-9.npz",
             ".shard-000001.tar.tmp-5"]
    kept = ["meta.json", "shard-000001.tar", "notes.tmp-draft", f".run.json.tmp-{os.getpid()}"]
    for name in stale + kept:
        (folder / name).write_text(name)
    (folder / ".model.tmp-12").mkdir()
    (folder / ".model.tmp-12" / "weights").write_text("w")
    with pytest.raises(UserError):                           # while another process holds it, nothing is touched
        writer_lock(folder, "set").acquire()
    assert all((folder / name).exists() for name in stale)
    holder.kill()
    with writer_lock(folder, "set"):
        assert sorted(p.name for p in folder.iterdir()) == sorted(kept + [LOCK_NAME])
