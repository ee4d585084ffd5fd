"""An import's source on an object store (`--from s3://BUCKET/KEY`, or `data.source`): one object, or every object
under a prefix (a folder), brought into this node's cache (`<cache>/sources/<scheme>/<bucket>/<key>`) and imported
from there. A copy whose object is unchanged (same size and ETag) is not downloaded again."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from stores.errors import UserError
from stores.objectstore import ObjectInfo, ObjectStore, is_url
from stores.remote import cache_root, download

STATE = ".sources-state.json"


def source_objects(url: str) -> tuple[ObjectStore, str, list[ObjectInfo]]:
    """(the bucket's store, the key the URL names, the objects to bring): UserError when there are none."""
    named = ObjectStore(url)
    if not named.prefix:
        raise UserError(f"{url} names a whole bucket; give the file or folder to import: "
                        f"{named.scheme}://{named.bucket}/KEY")
    store = ObjectStore(f"{named.scheme}://{named.bucket}")
    store.check_reachable()
    single = store.head(named.prefix)
    objects = [single] if single is not None else \
        [o for o in store.list(named.prefix + "/") if not o.key.endswith("/")]
    if not objects:
        raise UserError(f"{named.url}: no such object, and no objects under it as a folder; check --from "
                        f"(data.source)")
    return store, named.prefix, objects


def local_source(text: str, cache_dir: str | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> str:
    """The local path to import from: `text` itself when it is not a URL, else this node's copy of it."""
    if not is_url(text):
        return text
    store, key, objects = source_objects(text)
    folder = cache_root(cache_dir) / "sources" / store.scheme / store.bucket
    state_path = folder / STATE
    state = _read_state(state_path)
    for info in objects:
        local = folder / info.key
        if state.get(info.key) == [info.etag, info.size] and local.is_file() and local.stat().st_size == info.size:
            continue
        download(store, info.key, local, on_bytes)
        state[info.key] = [info.etag, info.size]
        _write_state(state_path, state)
    return str(folder / key)


def missing_bytes(text: str, cache_dir: str | None = None) -> int:
    """Bytes `local_source` would download now (0 for a local path or an unchanged copy)."""
    if not is_url(text):
        return 0
    store, _, objects = source_objects(text)
    folder = cache_root(cache_dir) / "sources" / store.scheme / store.bucket
    state = _read_state(folder / STATE)
    return sum(o.size for o in objects if state.get(o.key) != [o.etag, o.size] or not (folder / o.key).is_file())


def _read_state(path: Path) -> dict[str, list]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)
