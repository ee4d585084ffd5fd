"""What `verify` asks of a workspace on an object store: is each recorded shard object there, whole and unchanged,
and which objects did no record name (a writer stopped between its upload and its record)."""
from __future__ import annotations

from pathlib import Path

from stores.errors import IntegrityError
from stores.remote import fetch, is_shard_data, mirror_of, set_folder


def object_problem(path: Path, size: int, sha256: str, rehash: bool) -> str | None:
    """What is wrong with a recorded shard object (absent, another size; with rehash its sha256), or None."""
    mirror, key = mirror_of(path)
    folder = set_folder(key)                     # one LIST per set, not one per shard folder of a zarr array
    if folder not in mirror.listings:
        mirror.listings[folder] = {o.key: (o.size, o.etag) for o in mirror.store.list(folder + "/")}
    actual, etag = mirror.listings[folder].get(key, (None, None))
    if actual is None:
        return "missing"
    if actual != size:
        return f"{actual} bytes, the record says {size}"
    known = mirror.synced.get(key, [None])[0]
    if rehash or key in mirror.damaged or (known is not None and known != etag):   # changed since this node saw it
        Path(path).unlink(missing_ok=True)       # check the object itself, not an older local copy
        try:
            fetch(path, size, sha256)
        except IntegrityError:
            mirror.damaged.add(key)
            return "sha256 differs from the record (corrupted)"
        mirror.synced[key] = [etag, size, Path(path).stat().st_mtime_ns]
        mirror.damaged.discard(key)
    return None


def forget_listing(folder: Path) -> None:
    """The next object_problem in `folder` lists it afresh (workers may have uploaded into it meanwhile)."""
    found = mirror_of(folder)
    if found is not None:
        found[0].listings = {k: v for k, v in found[0].listings.items()
                             if k != found[1] and not k.startswith(found[1] + "/")}


def unreferenced_objects(set_dir: Path, recorded: set[str]) -> list[str]:
    """Shard objects in a set's folder that no record names: left by a writer stopped between upload and record."""
    mirror, key = mirror_of(set_dir)
    return sorted(o.key[len(key) + 1:] for o in mirror.store.list(key + "/")
                  if is_shard_data(o.key) and o.key[len(key) + 1:] not in recorded)
