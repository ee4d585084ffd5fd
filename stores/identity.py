"""Cache identity: canonical JSON, fingerprints and short keys."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from stores import remote
from stores.errors import IntegrityError


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, floats as repr: the same object always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def fingerprint(obj: Any) -> str:
    """sha256 hex of the canonical JSON of obj."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def short_key(obj: Any, length: int = 16) -> str:
    return fingerprint(obj)[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json_record(path: Path, keys: dict[str, type], what: str) -> dict:
    """A JSON object the pipeline wrote, with `keys` of the given types; anything else is damaged data."""
    try:
        record = json.loads(Path(path).read_bytes())
    except (ValueError, OSError):                       # JSONDecodeError, UnicodeDecodeError, a folder
        raise IntegrityError(f"{path}: not valid JSON; {what} is damaged") from None
    wrong = [k for k, kind in keys.items() if not isinstance(record, dict) or not isinstance(record.get(k), kind)]
    if wrong:
        raise IntegrityError(f"{path}: no valid '{wrong[0]}' field; {what} is damaged")
    return record


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    remote.published(path)
