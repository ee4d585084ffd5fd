"""An import's source on an object store (`--from s3://BUCKET/KEY`, or `data.source`): one object, or every object
under a prefix (a folder), brought into this node's cache (`<cache>/sources/<scheme>/<bucket>/<key>`) and imported
from there. A copy whose object is unchanged (same size and ETag) is not downloaded again."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stores.errors import UserError
from stores.objectstore import ObjectInfo, ObjectStore
from stores.remote import cache_root, download

STATE = ".sources-state.json"


@dataclass
class SourceCopy:
    """This node's copy of one source URL: what the bucket holds for it, and which of it is not here yet."""
    store: ObjectStore
    key: str
    folder: Path                     # the cache folder of the bucket
    objects: list[ObjectInfo]
    state: dict[str, list]           # key -> [etag, size] of the copies made

    @property
    def missing(self) -> list[ObjectInfo]:
        return [o for o in self.objects if self.state.get(o.key) != [o.etag, o.size]
                or not (self.folder / o.key).is_file() or (self.folder / o.key).stat().st_size != o.size]

    def bring(self, on_bytes: Callable[[int], None] | None = None) -> str:
        """Download what is missing (each file whole, then renamed); the local path to import from."""
        for info in self.missing:
            download(self.store, info.key, self.folder / info.key, on_bytes)
            self.state[info.key] = [info.etag, info.size]
            _write_state(self.folder / STATE, self.state)
        return str(self.folder / self.key)


def source_copy(url: str, cache_dir: str | None = None) -> SourceCopy:
    """The objects `url` names (one, or those under it as a folder): UserError when there are none."""
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
    folder = cache_root(cache_dir) / "sources" / store.scheme / store.bucket
    return SourceCopy(store, named.prefix, folder, objects, _read_state(folder / STATE))


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
