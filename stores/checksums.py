"""A persistent sha256 cache keyed by (path, size, mtime_ns, inode): unchanged files are never read twice.

Import reruns (a 62 GB .npz source) and stage reruns (every recorded shard) ask it before hashing. It lives
outside the workspace, so a rerun changes no byte there: `$DRA_PIPE_CHECKSUM_CACHE` names the file ("off"
disables it), else `$XDG_CACHE_HOME/dra-pipe/checksums.json` (default `~/.cache/dra-pipe/checksums.json`).

A file modified within RACY_NS of its hashing is not cached: filesystem timestamps are coarse (a jiffy on
Linux), so a write right after the hash could keep the recorded mtime. `dra-pipe verify` never asks the cache.
The file is written atomically and merged with what other processes wrote; a damaged or unwritable cache is
ignored and rewritten, never an error.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import time
from pathlib import Path

CACHE_ENV = "DRA_PIPE_CHECKSUM_CACHE"
RACY_NS = 2_000_000_000          # FAT stores mtimes to 2 s; ext4, xfs to a jiffy
FLUSH_EVERY = 64                 # new entries, or
FLUSH_SECONDS = 5.0              # seconds since the last write, whichever comes first
MAX_ENTRIES = 200_000            # beyond this the oldest-hashed entries are dropped


def cache_file() -> Path | None:
    """Where the cache lives, or None when `$DRA_PIPE_CHECKSUM_CACHE` is "off"."""
    named = os.environ.get(CACHE_ENV)
    if named:
        return None if named.lower() == "off" else Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dra-pipe" / "checksums.json"


class ChecksumCache:
    """Entries: absolute path -> [size, mtime_ns, inode, sha256, hashed_at_ns]."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries = _read_entries(path)
        self.dirty: dict[str, list] = {}
        self.flushed_at = time.monotonic()
        self.hits = self.hashed = 0

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        """The recorded sha256 of the file if its size, mtime and inode are what they were when hashed."""
        entry = self.entries.get(_key(path))
        if entry and entry[:3] == [st.st_size, st.st_mtime_ns, st.st_ino]:
            return entry[3]
        return None

    def record(self, path: Path, st: os.stat_result, sha256: str, stat_taken_ns: int) -> None:
        """Remember the digest of the file as it was at `st`, taken at `stat_taken_ns` (before it was read)."""
        if self.path is None or st.st_mtime_ns + RACY_NS > stat_taken_ns:
            return
        entry = [st.st_size, st.st_mtime_ns, st.st_ino, sha256, stat_taken_ns]
        self.entries[_key(path)] = self.dirty[_key(path)] = entry
        if len(self.dirty) >= FLUSH_EVERY or time.monotonic() - self.flushed_at > FLUSH_SECONDS:
            self.flush()

    def forget(self, path: Path) -> None:
        """Drop the file's entry (verify found it damaged): the next stage run hashes it again."""
        if self.entries.pop(_key(path), None) is not None:
            self.dirty[_key(path)] = None
            self.flush()

    def flush(self) -> None:
        """Merge this process's new entries into the file on disk, atomically."""
        self.flushed_at = time.monotonic()
        if self.path is None or not self.dirty:
            return
        merged = _read_entries(self.path)
        for key, entry in self.dirty.items():
            if entry is None:
                merged.pop(key, None)
            else:
                merged[key] = entry
        if len(merged) > MAX_ENTRIES:
            merged = dict(sorted(merged.items(), key=lambda kv: kv[1][4])[-MAX_ENTRIES:])
        try:
            _write_atomic(self.path, merged)
        except OSError:
            return                 # a read-only home: the cache only saves time
        self.dirty.clear()


def _key(path: Path) -> str:
    return os.path.abspath(path)


def _read_entries(path: Path | None) -> dict[str, list]:
    """The cache file's valid entries; anything damaged counts as empty."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == 1 else None
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if _valid_entry(v)}


def _valid_entry(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 5 and all(isinstance(x, int) for x in entry[:3] + entry[4:])
            and isinstance(entry[3], str) and len(entry[3]) == 64)


def _write_atomic(path: Path, entries: dict[str, list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "entries": entries}, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_CACHES: dict[Path | None, ChecksumCache] = {}


def checksum_cache() -> ChecksumCache:
    """This process's cache for the file `cache_file()` names now (loaded once per process and file)."""
    where = cache_file()
    if where not in _CACHES:
        _CACHES[where] = ChecksumCache(where)
    return _CACHES[where]


def flush_checksums() -> None:
    for cache in _CACHES.values():
        cache.flush()


atexit.register(flush_checksums)


def cached_file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read only when the cache has no digest for its present (size, mtime, inode)."""
    cache = checksum_cache()
    taken = time.time_ns()
    st = os.stat(path)
    known = cache.lookup(Path(path), st)
    if known is not None:
        cache.hits += 1
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    cache.hashed += 1
    cache.record(Path(path), st, h.hexdigest(), taken)
    return h.hexdigest()
