"""One writer per set, run or model: an flock on `<folder>/.lock`, which the OS releases when the holder dies.

The file records who holds it (host, pid, command, since), so a refused writer can say whom it waits for.
Readers never take it. A process may take a lock it already holds again (nested: a command locks a folder
before its writer does); the lock is released when the outermost holder releases it.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from stores.errors import StoppedWaiting, UserError

LOCK_NAME = ".lock"
POLL_SECONDS = 0.2


def writer_lock(folder: Path, what: str, wait: bool = False,
                announce: Callable[[str], None] | None = None) -> WriterLock:
    """`with writer_lock(folder, "image set 'x'", wait):` - refuses (UserError) or waits while another process writes.

    Take it before anything is written, including the folder's identity file; the folder is created for the lock
    file and removed again on release if nothing else was written into it.
    """
    return WriterLock(folder, what, wait, announce)


class WriterLock:
    _held: dict[str, list] = {}          # this process's locks: lock path -> [open file, depth, lease or None]

    def __init__(self, folder: Path, what: str, wait: bool = False, announce: Callable[[str], None] | None = None):
        self.folder = Path(folder).absolute()
        self.path = self.folder / LOCK_NAME
        self.what, self.wait = what, wait
        self.announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
        self.acquired = False
        self.lease = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> WriterLock:
        key = str(self.path)
        if key in self._held:
            self._held[key][1] += 1
        else:
            self._held[key] = [self._take(), 1, self.lease]
        self.acquired = True
        return self

    def release(self) -> None:
        if not self.acquired:
            return
        self.acquired = False
        entry = self._held[str(self.path)]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del self._held[str(self.path)]
        if entry[2] is not None:
            entry[2].release()
        empty = holds_only_the_lock(self.folder)
        self.path.unlink(missing_ok=True)          # still held: a waiter finds its file gone and starts over, and a
        if empty:                                  # refused or finished writer leaves no lock file behind
            try:
                self.folder.rmdir()                # nothing was written: leave no folder
            except OSError:                        # a waiter made a new lock file meanwhile: the folder is its
                pass
        entry[0].close()                           # closing the file releases the flock

    def _take(self):
        """Open, flock (non-blocking, polled so Ctrl-C stops a wait at once), check it is still the folder's file;
        in a mirror of an object store, also take the folder's lease (stores.lease) for writers on other nodes."""
        self._announced = False
        try:
            while True:
                self.folder.mkdir(parents=True, exist_ok=True)
                f = open(self.path, "a+")                  # never truncates: a refused writer changes nothing
                if not _try_flock(f):
                    holder = read_holder(f)
                    f.close()
                    self._busy(holder)
                elif _same_file(f, self.path):
                    lease, holder = _take_lease(self.folder)
                    if holder is not None:
                        f.close()
                        self._busy(holder)
                        continue
                    self.lease = lease
                    _record_holder(f)
                    remove_stale_temporaries(self.folder)
                    return f
                else:
                    f.close()                              # the holder removed the folder before releasing: retry
        except KeyboardInterrupt:
            if self._announced:                        # the CLI prints this as its one interrupt line
                raise StoppedWaiting(f"stopped waiting for {self.what}; this command wrote nothing") from None
            raise

    def _busy(self, holder: dict | None) -> None:
        """Refuse (UserError naming the holder), or announce the wait once and sleep a poll period."""
        holder = _describe(holder)
        if not self.wait:
            raise UserError(f"{self.what} is being written by {holder}; wait for it to finish, or pass "
                            f"--wait to wait for it")
        if not self._announced:
            self._announced = True                     # before the line: a Ctrl-C right after it is a stopped wait
            self.announce(f"waiting for {self.what}: it is being written by {holder} (Ctrl-C stops waiting)")
        time.sleep(POLL_SECONDS)


def _take_lease(folder: Path):
    from stores.lease import take_lease
    return take_lease(folder, _command_line(), _now())


def _try_flock(f) -> bool:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def read_holder(f) -> dict | None:
    """The holder's record from an open lock file; None while it is not yet written (the holder just locked)."""
    for _ in range(10):
        try:
            return json.loads(os.pread(f.fileno(), 4096, 0).decode())
        except (ValueError, UnicodeDecodeError):
            time.sleep(0.02)
    return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    lease = (f"; its lease on the bucket expires in {max(0.0, holder['expires'] - time.time()):.0f} s unless its "
             "holder renews it") if isinstance(holder.get("expires"), (int, float)) else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('command', '?')}, "
            f"since {holder.get('since', '?')}{lease})")


def _record_holder(f) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": _command_line(), "since": _now()}
    os.ftruncate(f.fileno(), 0)
    os.pwrite(f.fileno(), (json.dumps(record, sort_keys=True) + "\n").encode(), 0)


def _command_line() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else []
    return shlex.join(argv)[:300]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _same_file(f, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(f.fileno())
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


TEMPORARY = re.compile(r"\.tmp-(\d+)(\.[A-Za-z0-9]+)?$")     # `.meta.json.tmp-<pid>`, `.scores.tmp-<pid>.npz`, ...


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Delete the temporaries other processes left in `folder` (a writer killed between write and rename). Called
    with the folder's writer lock just taken: no other writer can be using them. Returns their names."""
    removed = []
    for path in Path(folder).iterdir():
        found = TEMPORARY.search(path.name)
        if found and int(found.group(1)) != os.getpid():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def holds_only_the_lock(folder: Path) -> bool:
    """The folder holds nothing but its lock file: a writer that holds the lock is creating it."""
    return Path(folder).is_dir() and [p.name for p in Path(folder).iterdir()] == [LOCK_NAME]


class LockedWriter(ABC):
    """Base of the store writers: `lock(wait)` takes the folder's writer lock, then `_reread()` reads the folder
    again under it (another writer may have created, grown or finished it meanwhile); `close()` releases."""

    path: Path
    what: str                            # for the messages: "image set 'x'"
    _lock: WriterLock | None = None

    def lock(self, wait: bool = False):
        """`with writer.lock(wait):` holds the lock to the end of the block; begin() takes it if not yet held."""
        if self._lock is None:
            self._lock = writer_lock(self.path, self.what, wait).acquire()
            try:
                self._reread()
            except BaseException:
                self.close()
                raise
        return self

    @abstractmethod
    def _reread(self) -> None:
        """Read the folder's identity and completed shards again, now that no other writer can change them."""

    def close(self) -> None:
        """Release the writer lock (the OS releases it too if the process dies)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()                 # a writer nobody closed releases its lock when it is collected
        except Exception:
            pass
