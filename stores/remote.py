"""A workspace on an object store, worked through a node-local mirror that is only a cache.

`root: s3://bucket/prefix` maps to the folder `<cache>/s3/bucket/prefix` on each node (`store.cache_dir`, else
$DRA_PIPE_CACHE, else ~/.cache/dra-pipe/store). The bucket is the truth; the mirror can be deleted at any time.
- At a command's start the small files (identities, manifests, meta.json, zarr metadata, run files) are pulled,
  but for the weights of runs (`runs/*/*.pt`): a command brings those of the runs it opens (`bring`).
- Shard data (image tars, zarr shard files) is fetched when read, checked against its recorded sha256, and kept
  within `store.cache_gb` (least recently used first out).
- Every file a writer completes (the local rename of the store contract) is uploaded whole before the writer goes
  on, so a shard object exists before a manifest that records it is uploaded.
Ray workers on other nodes get the URL through $DRA_PIPE_REMOTE and translate the driver's paths (`localize`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from stores.errors import IntegrityError, UserError
from stores.objectstore import ObjectStore

ENV = "DRA_PIPE_REMOTE"
CACHE_ENV = "DRA_PIPE_CACHE"
SYNC_STATE = ".sync-state.json"
LEASE_NAME = ".lease"
STORE_RECORDS = ("dataset.json", "manifest.parquet", "meta.json", "zarr.json")   # always uploaded as written
SHARD_DATA = re.compile(r"(^|/)images/[^/]+/shard-\d+\.tar$|(^|/)features/[^/]+/features\.zarr/[^/]+/c/")
DEFERRED = re.compile(r"(^|/)runs/[^/]+/[^/]+\.pt$")     # hundreds of MB per run at CIFAR size: brought on use
LOCAL_ONLY = re.compile(r"(^|/)(\.lock|\.lease|\.sync-state\.json)$|\.tmp-\d+")


@dataclass
class Mirror:
    root: Path
    store: ObjectStore
    cache_bytes: int | None = None
    lease_seconds: float = 30.0
    synced: dict[str, list] = field(default_factory=dict)      # key -> [etag, size, mtime_ns] of the local copy
    listings: dict[str, dict[str, tuple]] = field(default_factory=dict)   # folder key -> {key: (size, etag)}
    damaged: set[str] = field(default_factory=set)      # keys a rehash found damaged in this process
    used: dict[str, tuple[int, int]] = field(default_factory=dict)      # shard-data key -> (size, last use tick)
    tick: int = 0
    lost_leases: set[str] = field(default_factory=set)  # folders another writer took over: not written here again

    def key(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def save_state(self) -> None:
        tmp = self.root / f"{SYNC_STATE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(self.synced))
        os.replace(tmp, self.root / SYNC_STATE)


_MIRRORS: dict[str, Mirror] = {}
_ADOPTED: set[str] = set()                         # $DRA_PIPE_REMOTE values already registered here
_STARTED = time.time_ns()                          # push_changed uploads only what was written since


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dra-pipe" / "store").expanduser()


def attach(url: str, cache_dir: str | None = None, cache_gb: float | None = None, lease_seconds: float = 30.0,
           pull: bool = True, export: bool = True) -> Path:
    """Check the bucket is usable, register its mirror and return the mirror's root (pulling the small files).
    `export` names it in $DRA_PIPE_REMOTE for child processes (a worker keeps the driver's name there)."""
    store = ObjectStore(url)
    root = (cache_root(cache_dir) / store.scheme / store.bucket / store.prefix).resolve()
    if str(root) in _MIRRORS:
        mirror = _MIRRORS[str(root)]
    else:
        store.check_reachable()
        root.mkdir(parents=True, exist_ok=True)
        mirror = Mirror(root, store, None if cache_gb is None else int(cache_gb * 1e9), lease_seconds,
                        _read_state(root))
        _MIRRORS[str(root)] = mirror
    if export:
        os.environ[ENV] = json.dumps({"url": store.url, "mirror": str(root), "cache_gb": cache_gb,
                                      "lease_seconds": lease_seconds})
    if pull:
        pull_small_files(mirror)
    return root


def _read_state(root: Path) -> dict[str, list]:
    try:
        return json.loads((root / SYNC_STATE).read_text())
    except (OSError, ValueError):
        return {}


def localize(path: str | Path, need: bool = False) -> Path:
    """A path the driver sent, as this node sees it: under this node's mirror when the driver's is remote. With
    `need`, the small files under it (a model, a set's records) are brought here first."""
    spec = json.loads(os.environ.get(ENV) or "null")
    if not spec or not _within(Path(path), Path(spec["mirror"])):
        return Path(path)
    root = attach(spec["url"], cache_gb=spec.get("cache_gb"), lease_seconds=spec.get("lease_seconds", 30.0),
                  pull=False, export=False)
    local = root / Path(path).relative_to(spec["mirror"])
    if need:
        mirror, key = mirror_of(local)
        for info in mirror.store.list(key + "/") + [i for i in [mirror.store.head(key)] if i]:
            if not LOCAL_ONLY.search(info.key):
                _bring_small_file(mirror, info)
    return local


def bring(folder: Path) -> None:
    """The files of one folder a command is about to read, its run weights included (a no-op on a local root)."""
    localize(folder, need=True)


STORE_VARIABLES = ("AWS_", "GOOGLE_", "GCS_", "DRA_PIPE_STORE_")


def worker_environment() -> dict[str, str]:
    """What a worker process on another node needs to work in this process's object-store root: $DRA_PIPE_REMOTE
    and the store settings this command was started with (endpoint, credentials; unset them here to let the
    nodes use their own, an instance role). Empty for a local root."""
    if not os.environ.get(ENV):
        return {}
    return {k: v for k, v in os.environ.items() if k == ENV or k.startswith(STORE_VARIABLES)}


def mirror_of(path: Path) -> tuple[Mirror, str] | None:
    """The mirror holding `path` and its key there, or None for a path outside every mirror."""
    _adopt_inherited()
    if not _MIRRORS:
        return None
    full = Path(path).resolve()                    # a symlink into the mirror (bench extract's) names its target
    for mirror in _MIRRORS.values():
        if _within(full, mirror.root):
            return mirror, mirror.key(full)
    return None


def _within(path: Path, root: Path) -> bool:
    path = path.absolute()
    return path == root or root in path.parents


def _adopt_inherited() -> None:
    """A child process (a side-by-side training run, a Ray worker) writes into the mirror its parent named in
    $DRA_PIPE_REMOTE: register it here too, so that what it completes is uploaded."""
    value = os.environ.get(ENV)
    if not value or value in _ADOPTED:               # mirror_of runs per file: parse each value once
        return
    _ADOPTED.add(value)
    spec = json.loads(value)
    if spec["mirror"] not in _MIRRORS:
        cache = spec.get("cache_gb")
        _MIRRORS[spec["mirror"]] = Mirror(Path(spec["mirror"]), ObjectStore(spec["url"]),
                                          None if cache is None else int(cache * 1e9), spec.get("lease_seconds", 30.0),
                                          _read_state(Path(spec["mirror"])))


def attached() -> bool:
    """Whether this process works through a mirror (and so may have started obstore's runtime)."""
    _adopt_inherited()
    return bool(_MIRRORS)


def as_url(text: str | Path) -> str:
    """A message or path with every mirror folder written as its bucket URL: what the user named."""
    text = str(text)
    for root, mirror in sorted(_MIRRORS.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(root, mirror.store.url)
    return text


def is_shard_data(key: str) -> bool:
    return bool(SHARD_DATA.search(key))


def pull_small_files(mirror: Mirror) -> None:
    """Bring every object but shard data into the mirror when the local copy is absent or older; drop local
    copies of small files deleted in the bucket."""
    remote = {o.key: o for o in mirror.store.list() if not LOCAL_ONLY.search(o.key)}
    for info in remote.values():
        if not DEFERRED.search(info.key):
            _bring_small_file(mirror, info)
    for key in [k for k in mirror.synced if k not in remote]:
        if not is_shard_data(key):
            (mirror.root / key).unlink(missing_ok=True)
        del mirror.synced[key]
    for path in _files(mirror.root):               # a store record the bucket no longer has: a deleted set (not
        key = mirror.key(path)                     # one a writer on this node is just uploading: it holds .lock)
        if path.name in STORE_RECORDS and key not in remote and not (path.parent / ".lock").exists():
            path.unlink()
    mirror.save_state()


def _bring_small_file(mirror: Mirror, info) -> None:
    """Download a small file (never shard data: it is fetched when read) unless this node has its version."""
    local = mirror.root / info.key
    if is_shard_data(info.key) or (mirror.synced.get(info.key, [None])[0] == info.etag and local.exists()):
        return
    _download(mirror, info.key, local)
    st = local.stat()
    mirror.synced[info.key] = [info.etag, st.st_size, st.st_mtime_ns]


def _download(mirror: Mirror, key: str, local: Path) -> str:
    return download(mirror.store, key, local)


def download(store: ObjectStore, key: str, local: Path, on_bytes=None) -> str:
    """Download to a temporary sibling, rename; returns the sha256 of what arrived. The copy keeps the object's
    modification time, so that "is this file newer than that one" (an eval.json against its weights) holds on
    every node, whatever order the files arrived in. on_bytes(n) is told of every chunk written."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            modified = store.get_into(key, _Hashing(f, digest, on_bytes))
        os.utime(tmp, (modified, modified))
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


class _Hashing:
    def __init__(self, f, digest, on_bytes=None):
        self.f, self.digest, self.on_bytes = f, digest, on_bytes

    def write(self, chunk) -> None:
        self.digest.update(chunk)
        self.f.write(chunk)
        if self.on_bytes is not None:
            self.on_bytes(len(chunk))


def published(path: Path) -> None:
    """A file just became final in a mirror: upload it whole (a PUT is atomic) before the writer goes on."""
    found = mirror_of(path)
    if found is None or LOCAL_ONLY.search(found[1]):
        return
    mirror, key = found
    _check_lease(mirror, key)
    etag = mirror.store.put_file(key, path)
    st = Path(path).stat()
    mirror.synced[key] = [etag, st.st_size, st.st_mtime_ns]
    folder = set_folder(key)
    if folder in mirror.listings:
        mirror.listings[folder][key] = (st.st_size, etag)
    mirror.damaged.discard(key)
    if is_shard_data(key):
        _touch(mirror, key, st.st_size)


def _check_lease(mirror: Mirror, key: str) -> None:
    """Refuse to write or delete in a folder whose lease this process lost: another writer works there now."""
    for folder in mirror.lost_leases:
        if key == folder or key.startswith(folder + "/"):
            raise UserError(f"{mirror.store.url}/{folder}: this writer lost its lease (not refreshed for "
                            f"{mirror.lease_seconds:.0f} s) and another writer took the set over; stopped before "
                            f"writing beside it: rerun once that writer is done (or with --wait)")


def removed(path: Path) -> None:
    """A file or folder was deleted from a mirror: delete its objects (the folder's lease stays its holder's)."""
    found = mirror_of(path)
    if found is None:
        return
    mirror, key = found
    _check_lease(mirror, key)
    keys = [o.key for o in mirror.store.list(key + "/") if not o.key.endswith("/" + LEASE_NAME)]
    keys += [key] if mirror.store.head(key) else []
    mirror.store.delete(keys)
    for k in keys:
        mirror.synced.pop(k, None)
    mirror.listings = {}


def push_changed() -> int:
    """Upload every small file written into a mirror without `published` (reports, tracker logs); returns how
    many. Shard data is never pushed here: it is uploaded by its writer, before its record."""
    pushed = 0
    for mirror in _MIRRORS.values():
        for path in _files(mirror.root):
            key = mirror.key(path)
            if LOCAL_ONLY.search(key) or is_shard_data(key) or key.startswith("."):
                continue
            st = path.stat()
            if st.st_mtime_ns < _STARTED:          # older files: another command's, or a stale cache's
                continue
            if mirror.synced.get(key, [None, None, None])[1:] != [st.st_size, st.st_mtime_ns]:
                published(path)
                pushed += 1
        mirror.save_state()
    return pushed


def _files(root: Path):
    for folder, _, names in os.walk(root):
        for name in names:
            yield Path(folder) / name


def fetch(path: Path, size: int, sha256: str) -> bool:
    """Make the local copy of a recorded shard file: download it when absent or of another size, checking its
    sha256 against the record (IntegrityError when the object is missing or differs). True when it downloaded
    (and so checked) the file; a copy already here is checked by its reader as any local file is."""
    found = mirror_of(path)
    if found is None:
        return False
    mirror, key = found
    if Path(path).exists() and Path(path).stat().st_size == size:
        _touch(mirror, key, size)
        return False
    try:
        digest = _download(mirror, key, Path(path))
    except FileNotFoundError:
        raise IntegrityError(f"{mirror.store.url}/{key}: missing, though the manifest lists it; run `dra-pipe "
                             f"verify` and `dra-pipe repair`") from None
    if digest != sha256:
        Path(path).unlink(missing_ok=True)
        raise IntegrityError(f"{mirror.store.url}/{key}: sha256 differs from its record (corrupted); run "
                             f"`dra-pipe verify` and `dra-pipe repair`")
    _touch(mirror, key, size)
    _evict(mirror, keep=key)
    return True


def fetch_file(path: Path) -> None:
    """A workspace file a worker needs (a model): downloaded when absent here."""
    found = mirror_of(path)
    if found is not None and not Path(path).exists():
        mirror, key = found
        if mirror.store.head(key) is not None:
            _download(mirror, key, Path(path))


def set_folder(key: str) -> str:
    """images/<name> or features/<key>: the folder a listing covers."""
    return "/".join(key.split("/")[:2])


_CACHE_BOOK = threading.Lock()          # the reader and its prefetch thread both fetch, touch and evict


def _touch(mirror: Mirror, key: str, size: int) -> None:
    with _CACHE_BOOK:
        mirror.tick += 1
        mirror.used[key] = (size, mirror.tick)


def _evict(mirror: Mirror, keep: str) -> None:
    """Delete the least recently used shard files of this mirror while it holds more than `store.cache_gb`."""
    if mirror.cache_bytes is None:
        return
    with _CACHE_BOOK:
        _evict_over_bound(mirror, keep)


def _evict_over_bound(mirror: Mirror, keep: str) -> None:
    if not mirror.used.get("", None):               # first call: count what earlier processes left here
        for path in _files(mirror.root):
            k = mirror.key(path)
            if is_shard_data(k) and k not in mirror.used and not LOCAL_ONLY.search(k):
                mirror.used[k] = (path.stat().st_size, 0)
        mirror.used[""] = (0, 0)
    total = sum(s for s, _ in mirror.used.values())
    for key, (size, _) in sorted(mirror.used.items(), key=lambda kv: kv[1][1]):
        if total <= mirror.cache_bytes:
            break
        if key in ("", keep):
            continue
        (mirror.root / key).unlink(missing_ok=True)
        del mirror.used[key]
        total -= size


def detach_all() -> None:
    """Forget every mirror (tests; a command's end)."""
    _MIRRORS.clear()
    _ADOPTED.clear()
    os.environ.pop(ENV, None)

