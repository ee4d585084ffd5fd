"""Feature sets: `features/<key>/` = features.zarr (targets, targets_v1 .. targets_v{V-1}, ids) + meta.json.

One float16 (or float32: layout["dtype"]) array [N, C, h, w] per stored view (stores/views.py): `targets` is
view 0 (the image itself), `targets_v<v>` view v. layout["views"] = V.

One zarr shard per image shard, so each writer owns whole files; zarr's local store writes every shard file
under a temporary name and renames it. Inner chunks carry a crc32c, so a flipped byte fails the read instead
of returning wrong numbers. A shard counts only once meta.json lists it, with the sha256 of each file:
zarr reads a missing shard back as fill values without error, so readers never trust the directory.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from stores import remote, remote_checks
from stores.errors import IntegrityError, UserError
from stores.identity import read_json_record, short_key, write_json_atomic
from stores.locks import LockedWriter, holds_only_the_lock
from stores.manifest import worker_name
from stores.tarshard import ShardBuffer, file_problem, file_sha256_and_size

META_JSON = "meta.json"
META_KEYS = {"identity": dict, "layout": dict, "shards": dict}    # what a readable meta.json holds
ZARR_NAME = "features.zarr"
MIN_CHUNK_BYTES = 1 << 20
STORED_DTYPES = ("float16", "float32")      # what targets can be stored as (numpy and zarr have no bfloat16)


def view_array(v: int) -> str:
    """Name of the array holding view v's targets."""
    return "targets" if v == 0 else f"targets_v{v}"


def feature_key(identity: dict) -> str:
    """Directory name: a short hash of the identity, so the same settings always land in the same place."""
    return short_key(identity)


def feature_set_dir(root: Path, identity: dict) -> Path:
    return Path(root) / "features" / feature_key(identity)


def inner_chunk_samples(shard_size: int, bytes_per_sample: int) -> int:
    """Smallest divisor of the shard size whose chunk holds >= 1 MB (or the whole shard)."""
    need = math.ceil(MIN_CHUNK_BYTES / bytes_per_sample)
    for k in range(min(need, shard_size), shard_size + 1):
        if shard_size % k == 0:
            return k
    return shard_size


def _compressors(name: str) -> tuple:
    extra = {"none": (), "zstd": (ZstdCodec(level=3),),
             "blosc": (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)}[name]
    return (*extra, Crc32cCodec())


@dataclass(frozen=True)
class FeatureShardRecord:
    index: int            # the image shard it belongs to
    first_id: int
    count: int
    files: dict           # array name -> {"sha256": ..., "bytes": ...}
    seconds: float
    worker: str


class FeatureSet:
    """Read access: one image shard's slab at a time, by image-shard index."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta_path = self.path / META_JSON
        if not meta_path.exists():
            raise UserError(f"no feature set at {self.path} (missing {META_JSON}); `dra-pipe ls` lists the sets")
        self.meta = read_json_record(meta_path, META_KEYS, "the feature set's record")
        self.identity: dict = self.meta["identity"]
        if feature_key(self.identity) != self.path.name:
            raise IntegrityError(f"{self.path}: folder name does not match the identity in {META_JSON}")
        self.layout: dict = self.meta["layout"]
        self.records = _shard_records(self.meta, meta_path)
        self.group = zarr.open_group(self.path / ZARR_NAME, mode="r")

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def views(self) -> int:
        """Stored views per image (sets made before views: 1)."""
        return int(self.layout.get("views", 1))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.layout["sample_shape"])

    @property
    def dtype(self) -> np.dtype:
        """Stored dtype of the targets (float16 or float32)."""
        return np.dtype(self.layout.get("dtype", "float16"))

    def target_names(self) -> tuple[str, ...]:
        return tuple(view_array(v) for v in range(self.views))

    def array_names(self) -> tuple[str, ...]:
        return (*self.target_names(), "ids")

    def read_shard(self, index: int) -> dict[str, np.ndarray]:
        """{'ids': (N,), 'targets': (N, C, h, w) in the stored dtype[, 'targets_v1', ...]} for image shard `index`."""
        record = self.records.get(index)
        if record is None:
            raise IntegrityError(f"{self.path}: feature shard {index} is not complete (not in {META_JSON}); "
                                 "rerun extract-features")
        for name in self.array_names():
            path = self.file_path(name, index)
            expected = record.files[name]["bytes"]
            remote.fetch(path, expected, record.files[name]["sha256"])
            if not path.exists() or path.stat().st_size != expected:
                actual = path.stat().st_size if path.exists() else "missing"
                raise IntegrityError(f"{path}: {actual} on disk, {META_JSON} says {expected} bytes; "
                                     f"run `dra-pipe verify {self.key}`")
        out = {}
        stop = record.first_id + record.count
        for name in self.array_names():
            try:
                out[name] = self.group[name][record.first_id:stop]
            except ValueError as exc:  # crc32c mismatch inside zarr
                raise IntegrityError(f"{self.file_path(name, index)}: corrupted ({exc}); "
                                     f"run `dra-pipe verify {self.key}`") from None
        return out

    def file_path(self, array: str, index: int) -> Path:
        return shard_file(self.path, array, index)

    def read_shard_ids(self, index: int) -> np.ndarray:
        record = self.records.get(index)
        if record is None:
            raise IntegrityError(f"{self.path}: feature shard {index} is not complete (not in {META_JSON}); "
                                 "rerun extract-features")
        ids_file = record.files["ids"]
        remote.fetch(self.file_path("ids", index), ids_file["bytes"], ids_file["sha256"])
        ids = self.group["ids"][record.first_id:record.first_id + record.count]
        if (ids < 0).any():
            raise IntegrityError(f"{self.file_path('ids', index)}: ids missing (fill values); "
                                 f"run `dra-pipe verify {self.key}`")
        return ids

    def read_targets_fast(self, index: int, array: str, buffer: ShardBuffer, out: np.ndarray) -> np.ndarray:
        """Decode an uncompressed targets shard straight from one read into a reused buffer.

        Same result as `read_shard` (tested), without zarr's fresh allocation per read: the shard file is
        [chunk bytes + crc32c] * chunks + index (offset, nbytes per chunk) + crc32c. Every crc is checked.
        Returns out[:count] filled; `out` must have the stored dtype (>= count, C, h, w).
        """
        record = self.records.get(index)
        if record is None:
            raise IntegrityError(f"{self.path}: feature shard {index} is not complete (not in {META_JSON}); "
                                 "rerun extract-features")
        if self.layout["compression"] != "none":
            out[:record.count] = self.read_shard(index)[array]
            return out[:record.count]
        path = self.file_path(array, index)
        remote.fetch(path, record.files[array]["bytes"], record.files[array]["sha256"])
        data = buffer.read(path, record.files[array]["bytes"])
        chunk = self._chunk_samples()
        n_chunks = self.layout["shard_size"] // chunk
        index_bytes = data[len(data) - 4 - 16 * n_chunks:]
        _check_crc(index_bytes[:-4], index_bytes[-4:], path, "chunk index")
        table = np.frombuffer(index_bytes[:-4], dtype="<u8").reshape(n_chunks, 2)
        flat = out.reshape(len(out), -1)
        for j in range(-(-record.count // chunk)):
            offset, nbytes = int(table[j, 0]), int(table[j, 1])
            if offset == 2**64 - 1 or offset + nbytes > len(data) - len(index_bytes):
                raise IntegrityError(f"{path}: chunk {j} missing or out of range")
            body = data[offset:offset + nbytes - 4]
            _check_crc(body, data[offset + nbytes - 4:offset + nbytes], path, f"chunk {j}")
            rows = min(chunk, record.count - j * chunk)
            values = np.frombuffer(body, dtype=self.dtype.newbyteorder("<")).reshape(chunk, -1)
            flat[j * chunk:j * chunk + rows] = values[:rows]
        return out[:record.count]

    def _chunk_samples(self) -> int:
        c, h, w = self.layout["sample_shape"]
        return inner_chunk_samples(self.layout["shard_size"], c * h * w * self.dtype.itemsize)

    def missing_shards(self, shard_indices: list[int]) -> list[int]:
        return [i for i in shard_indices if i not in self.records]


class FeatureSetWriter(LockedWriter):
    """Create or resume a feature set for one image set. The driver owns meta.json."""

    def __init__(self, root: Path, identity: dict, n: int, shard_size: int, sample_shape: tuple[int, int, int],
                 views: int = 1, compression: str = "none", provenance: dict | None = None, dtype: str = "float16"):
        if isinstance(views, bool) or int(views) < 1:      # the pre-views signature passed a flip flag here
            raise ValueError(f"views must be a count >= 1, got {views!r}")
        if dtype not in STORED_DTYPES:
            raise UserError(f"targets cannot be stored as {dtype!r}; choose one of: {', '.join(STORED_DTYPES)}")
        self.path = feature_set_dir(root, identity)
        self.identity = identity
        self.provenance = provenance or {}       # how to recompute (e.g. the model spec); not part of the identity
        self.layout = {"n": n, "shard_size": shard_size, "sample_shape": list(sample_shape), "views": int(views),
                       "dtype": dtype, "compression": compression}
        self.records: dict[int, FeatureShardRecord] = {}
        self.damaged: list[int] = []             # recorded shards whose files differ from their records: redone
        self.what = f"feature set {self.path.name}"
        self._reread()

    def _reread(self) -> None:
        """Refuse a folder that holds another identity or layout; read its completed shards."""
        meta_path = self.path / META_JSON
        if meta_path.exists():
            meta = read_json_record(meta_path, META_KEYS, "the feature set's record")
            if meta["identity"] != self.identity:
                raise IntegrityError(f"{self.path}: holds another identity (hash collision or hand edit); move it away")
            records = _shard_records(meta, meta_path)
            self.damaged = damaged_feature_shards(self.path, records)
            self.records = {i: r for i, r in records.items() if i not in self.damaged}
            if meta["layout"] != self.layout:
                raise UserError(f"feature set {self.path.name} exists with layout {meta['layout']}, not {self.layout}; "
                                f"delete {self.path} to rebuild it")

    def begin(self, wait: bool = False) -> None:
        """Lock the set, then create the zarr arrays (idempotent) and meta.json; `pending()` after it."""
        self.lock(wait)
        self.path.mkdir(parents=True, exist_ok=True)
        store = self.path / ZARR_NAME
        if not (store / "zarr.json").exists():
            self._create_arrays(store)
            for metadata in sorted(store.rglob("zarr.json")):
                remote.published(metadata)
        self._write_meta()

    def _create_arrays(self, store: Path) -> None:
        n, s = self.layout["n"], self.layout["shard_size"]
        c, h, w = self.layout["sample_shape"]
        dtype = self.layout["dtype"]
        k = inner_chunk_samples(s, c * h * w * np.dtype(dtype).itemsize)
        group = zarr.open_group(store, mode="w")
        for name in (view_array(v) for v in range(self.layout["views"])):
            group.create_array(name, shape=(n, c, h, w), dtype=dtype, chunks=(k, c, h, w), shards=(s, c, h, w),
                               compressors=_compressors(self.layout["compression"]), filters=None, fill_value=np.nan,
                               dimension_names=("sample", "channel", "y", "x"))
        group.create_array("ids", shape=(n,), dtype="int64", chunks=(s,), shards=(s,), compressors=(Crc32cCodec(),),
                           filters=None, fill_value=-1, dimension_names=("sample",))

    def _write_meta(self) -> None:
        shards = {str(i): asdict(r) for i, r in sorted(self.records.items())}
        write_json_atomic(self.path / META_JSON, {"identity": self.identity, "key": self.path.name,
                                                   "layout": self.layout, "provenance": self.provenance,
                                                   "shards": shards})

    def pending(self, shard_indices: list[int]) -> list[int]:
        return [i for i in shard_indices if i not in self.records]

    def record(self, record: FeatureShardRecord) -> None:
        self.records[record.index] = record
        self._write_meta()


def shard_file(set_dir: Path, array: str, index: int) -> Path:
    """The zarr shard file of `array` for image shard `index`."""
    tail = [str(index)] + (["0", "0", "0"] if array != "ids" else [])
    return Path(set_dir) / ZARR_NAME / array / "c" / Path(*tail)


def damaged_feature_shards(set_dir: Path, records: dict[int, FeatureShardRecord]) -> list[int]:
    """Indices of recorded shards with any array file missing or differing from its record (size, sha256)."""
    remote_checks.forget_listing(set_dir)
    return sorted(i for i, r in records.items()
                  if any(file_problem(shard_file(set_dir, name, i), f.get("bytes"), f.get("sha256"))
                         for name, f in r.files.items()))


def write_feature_shard(set_dir: Path, index: int, first_id: int, ids: np.ndarray, targets: np.ndarray,
                        started: float | None = None) -> FeatureShardRecord:
    """Write one image shard's slab (any process); return the record the driver adds to meta.json.

    targets: (N, V, C, h, w), or (N, C, h, w) for a one-view set. Refuses slabs with inf or nan in the set's
    stored dtype (float16 overflow) and names the count.
    """
    started = time.perf_counter() if started is None else started
    group = zarr.open_group(Path(set_dir) / ZARR_NAME, mode="r+")
    targets = targets[:, None] if targets.ndim == 4 else targets
    arrays = {view_array(v): targets[:, v] for v in range(targets.shape[1])}
    if view_array(targets.shape[1]) in group or view_array(targets.shape[1] - 1) not in group:
        raise ValueError(f"{targets.shape[1]} views written into a feature set that stores another number")
    arrays["ids"] = ids
    stop = first_id + len(ids)
    for name, values in arrays.items():    # zarr 3.1 silently keeps a corner of a larger slab: refuse it here
        region = (len(ids), *group[name].shape[1:])
        if tuple(np.shape(values)) != region:
            raise ValueError(f"feature shard {index}: {name} slab {tuple(np.shape(values))} does not fit the set's "
                             f"{region} for ids {first_id}..{stop - 1}")
    for name in arrays:                    # a damaged earlier file of this shard: write the whole shard afresh
        shard_file(set_dir, name, index).unlink(missing_ok=True)
    for name, values in arrays.items():
        if name != "ids":
            stored = group[name].dtype
            with np.errstate(over="ignore"):
                bad = int((~np.isfinite(np.asarray(values, dtype=stored))).sum())
            if bad:
                raise IntegrityError(f"feature shard {index}: {bad} values are inf or nan in {stored} (overflow); "
                                     f"pool, pick another layer, store float32 (features.dtype), or check the model")
        group[name][first_id:stop] = values
    files = {}
    for name in arrays:
        digest, size = file_sha256_and_size(shard_file(set_dir, name, index))
        files[name] = {"sha256": digest, "bytes": size}
        remote.published(shard_file(set_dir, name, index))     # whole, before the driver records the shard
    return FeatureShardRecord(index=index, first_id=first_id, count=len(ids), files=files,
                              seconds=time.perf_counter() - started, worker=worker_name())


def _check_crc(body, stored, path: Path, what: str) -> None:
    if google_crc32c.value(np.frombuffer(body, np.uint8)).to_bytes(4, "little") != bytes(stored):
        raise IntegrityError(f"{path}: {what} fails its crc32c (corrupted); run `dra-pipe verify`")


def _shard_records(meta: dict, meta_path: Path) -> dict[int, FeatureShardRecord]:
    try:
        return {int(i): FeatureShardRecord(**r) for i, r in meta["shards"].items()}
    except (TypeError, ValueError):
        raise IntegrityError(f"{meta_path}: malformed shard records; the feature set's record is damaged") from None


def list_feature_sets(root: Path) -> list[Path]:
    base = Path(root) / "features"
    return sorted(p for p in base.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not holds_only_the_lock(p)) \
        if base.exists() else []                   # a folder with just its lock: a writer is only starting there

