"""The one-writer lock of a folder on an object store: a lease object `<folder>/.lease`.

Taken with a conditional create (If-None-Match: *), so of two writers exactly one succeeds. The holder rewrites it
every third of `store.lease_seconds` with a conditional replace (If-Match: its own etag), pushing `expires` ahead.
A holder that died stops refreshing: once `expires` has passed, the next writer takes the lease over with a
conditional replace of the expired version, so two takers cannot both win. The record names its holder.
A holder that finds its lease taken over (it could not refresh in time) writes and deletes nothing more there.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from stores.objectstore import LostRace
from stores.remote import LEASE_NAME, Mirror, mirror_of


class Lease:
    def __init__(self, mirror: Mirror, folder_key: str, command: str, since: str):
        self.mirror, self.folder, self.key = mirror, folder_key, f"{folder_key}/{LEASE_NAME}"
        self.seconds = mirror.lease_seconds
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "since": since,
                       "token": uuid.uuid4().hex}
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.record, "expires": time.time() + self.seconds}, sort_keys=True).encode()

    def try_take(self) -> dict | None:
        """Take the lease: None on success, else the holder's record (a live lease)."""
        store = self.mirror.store
        try:
            self.etag = store.put(self.key, self._body(), create_only=True)
        except LostRace:
            holder, etag = self._current()
            if holder is not None and holder.get("expires", 0) > time.time():
                return holder
            try:                                   # expired (or vanished): replace exactly what we read
                self.etag = store.put(self.key, self._body(), if_etag=etag) if etag else \
                    store.put(self.key, self._body(), create_only=True)
            except LostRace:
                return self._current()[0] or {"host": "?", "pid": "?", "command": "another writer"}
            if holder is not None:
                print(f"took over the lease of {self.key}: its holder (pid {holder.get('pid')} on host "
                      f"{holder.get('host')}) stopped refreshing it", file=sys.stderr, flush=True)
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="lease-refresh")
        self._thread.start()
        return None

    def _current(self) -> tuple[dict | None, str | None]:
        store = self.mirror.store
        info = store.head(self.key)
        if info is None:
            return None, None
        try:
            return json.loads(store.get(self.key)), info.etag
        except (FileNotFoundError, ValueError):
            return None, info.etag

    def _refresh(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.etag = self.mirror.store.put(self.key, self._body(), if_etag=self.etag)
            except LostRace:
                self.lost = True
                self.mirror.lost_leases.add(self.folder)      # this process's next upload there stops it
                print(f"lost the lease of {self.key} (not refreshed in time; another writer took it over): "
                      f"stopping at the next write", file=sys.stderr, flush=True)
                return
            except Exception:                      # the store unreachable for a moment: try again next period
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost and self.etag is not None:
            info = self.mirror.store.head(self.key)
            if info is not None and info.etag == self.etag:
                self.mirror.store.delete([self.key])


def take_lease(folder: Path, command: str, since: str) -> tuple[Lease | None, dict | None]:
    """(the lease, None) when taken, (None, holder) when another holds it, (None, None) outside a mirror."""
    found = mirror_of(folder)
    if found is None:
        return None, None
    lease = Lease(found[0], found[1], command, since)
    holder = lease.try_take()
    return (None, holder) if holder is not None else (lease, None)
