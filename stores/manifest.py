"""manifest.parquet: one row per completed shard. Readers trust it, never a directory listing."""
from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stores import remote
from stores.errors import IntegrityError

MANIFEST_NAME = "manifest.parquet"


@dataclass(frozen=True)
class ShardJob:
    """One planned shard: the unit a stage-1 worker computes and the driver records in the manifest."""

    index: int          # shard number
    first_id: int       # global id of its first item
    count: int          # items in the shard
    payload: Any = None  # anything picklable the worker needs beyond the id range


@dataclass(frozen=True)
class ShardRecord:
    index: int       # shard number: file shard-<index>.tar
    first_id: int    # global id of its first sample
    count: int       # samples in the shard
    bytes: int       # file size
    sha256: str      # of the whole file
    seconds: float   # time spent producing it
    worker: str      # who wrote it (host:pid)


SCHEMA = pa.schema([
    ("index", pa.int64()), ("first_id", pa.int64()), ("count", pa.int64()), ("bytes", pa.int64()),
    ("sha256", pa.string()), ("seconds", pa.float64()), ("worker", pa.string()),
])


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def read_manifest(set_dir: Path) -> dict[int, ShardRecord]:
    path = Path(set_dir) / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        table = pq.read_table(path, schema=SCHEMA)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise IntegrityError(f"{path}: unreadable manifest ({exc}); "
                             "run `dra-pipe verify` and rerun the stage that wrote it") from None
    rows = table.to_pylist()
    return {r["index"]: ShardRecord(**r) for r in rows}


def write_manifest(set_dir: Path, records: dict[int, ShardRecord]) -> None:
    """Rewrite the manifest atomically (temporary file, fsync, rename)."""
    path = Path(set_dir) / MANIFEST_NAME
    ordered = [asdict(records[i]) for i in sorted(records)]
    columns = {f.name: [r[f.name] for r in ordered] for f in fields(ShardRecord)}
    table = pa.table(columns, schema=SCHEMA)
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    remote.published(path)
