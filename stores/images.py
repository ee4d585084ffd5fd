"""Image sets: `images/<name>/` = tar shards + manifest.parquet + dataset.json (the identity)."""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stores import remote, remote_checks
from stores.errors import IntegrityError, UserError
from stores.identity import canonical_json, read_json_record, write_json_atomic
from stores.locks import LockedWriter, holds_only_the_lock
from stores.manifest import ShardRecord, read_manifest, write_manifest
from stores.plans import ShardPlan, ShardPlans, plan_shards  # noqa: F401  (re-exported: the sets' plan)
from stores.tarshard import (
    ShardBuffer,
    decode_image,
    file_problem,
    file_stat,
    iter_members,
    known_intact,
    mark_intact,
    shard_name,
    write_tar_shard,
)

DATASET_JSON = "dataset.json"
FORMAT_VERSION = 1


def image_set_dir(root: Path, name: str) -> Path:
    return Path(root) / "images" / name


def eval_set_name(root: Path, prefix: str) -> str:
    """The evaluation split next to <prefix>-train: <prefix>-test, else <prefix>-val (ImageNet's) when only it is
    here; <prefix>-test when neither is (for the error that follows)."""
    test, val = f"{prefix}-test", f"{prefix}-val"
    if not (image_set_dir(root, test) / DATASET_JSON).exists() and (image_set_dir(root, val) / DATASET_JSON).exists():
        return val
    return test


MAX_NAME_BYTES = 128      # folder names stop at 255 bytes; prefixes, suffixes and `.NAME.tmp-PID` siblings need room


def validate_set_name(name: str, what: str = "set") -> str:
    """A folder name inside the workspace: no separators, no leading dot (so no `..` escapes), not too long."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise UserError(f"invalid {what} name {name[:60]!r}: use letters, digits, '-', '_' and '.'")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise UserError(f"invalid {what} name {name[:40]!r}...: {len(name.encode())} bytes long; use at most "
                        f"{MAX_NAME_BYTES}")
    return name


def make_identity(kind: str, source: dict, resolution: int, channels: int, classes: int, class_names: list[str] | None,
                  split: str, shard_size: int, image_format: str) -> dict:
    """What the images are, without their count. The fingerprint adds n."""
    if kind not in ("real", "generated"):
        raise ValueError(kind)
    return {"format_version": FORMAT_VERSION, "kind": kind, "source": source, "resolution": resolution,
            "channels": channels, "classes": classes, "class_names": class_names, "split": split,
            "shard_size": shard_size, "image_format": image_format}


def dataset_fingerprint(identity: dict, n: int) -> str:
    return hashlib.sha256(canonical_json({**identity, "n": n}).encode()).hexdigest()


@dataclass
class ShardData:
    ids: np.ndarray      # (N,) int64 global ids
    images: np.ndarray   # (N, H, W, C) uint8
    labels: np.ndarray   # (N,) int64


class ImageSet:
    """Read access to a complete or partial image set. Only shards in the manifest are visible."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta_path = self.path / DATASET_JSON
        if not meta_path.exists():
            raise UserError(f"no image set at {self.path} (missing {DATASET_JSON}); `dra-pipe ls` lists the sets")
        meta = read_json_record(meta_path, {"identity": dict, "n": int, "fingerprint": str}, "the set's identity")
        self.meta = meta
        self.identity: dict = meta["identity"]
        self.n: int = meta["n"]
        self.fingerprint: str = meta["fingerprint"]
        if dataset_fingerprint(self.identity, self.n) != self.fingerprint:
            raise IntegrityError(f"{meta_path}: fingerprint does not match the identity it records (edited by hand?)")
        self._check_belongs_here(meta_path)
        self.records: dict[int, ShardRecord] = read_manifest(self.path)
        self._buffer = ShardBuffer()

    def _check_belongs_here(self, meta_path: Path) -> None:
        """dataset.json names its set (sets written before it did: a real set's folder ends with its split); a
        record copied from another set would have repair rewrite this set's shards with that set's data."""
        recorded = self.meta.get("name")
        split = self.identity.get("split")
        foreign = recorded != self.name if recorded is not None else (
            self.identity.get("kind") == "real" and self.name.rsplit("-", 1)[-1] in ("train", "test", "val")
            and not self.name.endswith(f"-{split}"))
        if foreign:
            was = f"set {recorded!r}" if recorded is not None else f"the {split} split"
            raise IntegrityError(f"{meta_path} describes {was}, not {self.name} (copied from another set?); restore "
                                 f"this set's dataset.json, or delete {self.path} and make the set again")

    @classmethod
    def open_complete(cls, root: Path, name: str, missing: str, fix: str) -> ImageSet:
        """The set, complete: UserError naming `missing` (how to make it) when absent, and require_complete's
        errors (naming `fix`) when its shards are not all there."""
        if not (image_set_dir(root, name) / DATASET_JSON).exists():
            raise UserError(f"no image set {name} under {root}/images; {missing}")
        images = cls.open(root, name)
        images.require_complete(fix)
        return images

    @classmethod
    def open(cls, root: Path, name: str) -> ImageSet:
        return cls(image_set_dir(root, name))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def shard_size(self) -> int:
        return self.identity["shard_size"]

    @property
    def resolution(self) -> int:
        return self.identity["resolution"]

    @property
    def channels(self) -> int:
        return self.identity["channels"]

    @property
    def classes(self) -> int:
        return self.identity["classes"]

    def plan(self) -> list[ShardPlan]:
        return plan_shards(self.n, self.shard_size)

    def missing_shards(self) -> list[ShardPlan]:
        return [p for p in self.plan() if not self._record_matches(p)]

    def _record_matches(self, p: ShardPlan) -> bool:
        r = self.records.get(p.index)
        return r is not None and r.first_id == p.first_id and r.count == p.count

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def foreign_records(self) -> list[int]:
        """Manifest rows that contradict the set's own plan (another id range or count, or a shard past its end):
        records copied from another set, or damaged, not work still to do."""
        total = -(-self.n // self.shard_size)
        return sorted(i for i, r in self.records.items() if not 0 <= i < total or (r.first_id, r.count)
                      != (i * self.shard_size, min(self.shard_size, self.n - i * self.shard_size)))

    def require_complete(self, fix: str) -> None:
        """IntegrityError (exit 1) when its records contradict its identity; UserError naming `fix` when shards
        are still to be written."""
        foreign = self.foreign_records()
        if foreign:
            raise IntegrityError(f"image set {self.name}: manifest.parquet records shard(s) {foreign[:10]} that its "
                                 f"dataset.json does not plan (another set's records?); `dra-pipe verify {self.name}` "
                                 f"names the damage")
        missing = self.missing_shards()
        if missing:
            raise UserError(f"image set {self.name} is incomplete ({len(missing)} shards missing); {fix}")

    def bytes_on_disk(self) -> int:
        """Bytes of the recorded shards, as the manifest has them."""
        return sum(r.bytes for r in self.records.values())

    def completed_samples(self) -> int:
        return sum(p.count for p in self.plan() if self._record_matches(p))

    def read_shard(self, index: int, verify: bool = True) -> ShardData:
        """Decode one shard; with verify, its sha256 must equal the manifest's.

        A shard verified before is not hashed again while its stat is unchanged (this process: inode, size, mtime,
        ctime; earlier ones: the persistent checksum cache): a reader pays the hash once, not once per read."""
        record = self.records.get(index)
        if record is None:
            raise IntegrityError(f"{self.path}: shard {index} is not complete (not in the manifest); rerun the stage "
                                 f"that writes this set")
        path = self.path / shard_name(index)
        fetched = remote.fetch(path, record.bytes, record.sha256)      # an object store's shard: into the cache
        taken = time.time_ns()
        try:
            stat = file_stat(path)
        except FileNotFoundError:
            raise IntegrityError(f"{path}: missing, though the manifest lists it; "
                                 f"run `dra-pipe verify {self.name}`") from None
        data = self._buffer.read(path, record.bytes)
        if fetched:
            mark_intact(path, record.bytes, record.sha256, stat)
        if verify and not known_intact(path, record.bytes, record.sha256, stat):
            if hashlib.sha256(data).hexdigest() != record.sha256:
                raise IntegrityError(f"{path}: sha256 differs from the manifest (corrupted); "
                                     f"run `dra-pipe verify {self.name}`")
            mark_intact(path, record.bytes, record.sha256, stat, taken)
        return self._decode(data, record, path, check_headers=not verify)

    def _decode(self, data: memoryview, record: ShardRecord, path: Path, check_headers: bool) -> ShardData:
        h = w = self.resolution
        images = np.empty((record.count, h, w, self.channels), dtype=np.uint8)
        labels = np.full(record.count, -1, dtype=np.int64)
        seen = np.zeros(record.count, dtype=bool)
        for name, payload in iter_members(data, path, check_headers):
            key, _, ext = name.partition(".")
            slot = int(key) - record.first_id
            if not 0 <= slot < record.count:
                raise IntegrityError(f"{path}: member {name} outside the shard's id range")
            if ext == "cls":
                labels[slot] = int(bytes(payload))
            elif ext in ("png", "npy"):
                images[slot] = decode_image(payload, ext)
                seen[slot] = True
        if not seen.all() or (labels < 0).any():
            raise IntegrityError(f"{path}: {int((~seen).sum())} images or {int((labels < 0).sum())} labels missing")
        ids = np.arange(record.first_id, record.first_id + record.count, dtype=np.int64)
        return ShardData(ids, images, labels)

    def read_range(self, start: int, stop: int) -> ShardData:
        """Samples with global ids in [start, stop)."""
        if not 0 <= start <= stop <= self.n:
            raise UserError(f"id range [{start}, {stop}) outside the set's [0, {self.n})")
        parts = []
        for p in self.plan():
            lo, hi = max(start, p.first_id), min(stop, p.first_id + p.count)
            if lo < hi:
                shard = self.read_shard(p.index)
                sl = slice(lo - p.first_id, hi - p.first_id)
                parts.append(ShardData(shard.ids[sl], shard.images[sl], shard.labels[sl]))
        if not parts:
            return ShardData(np.empty(0, np.int64), np.empty((0, self.resolution, self.resolution, self.channels),
                                                             np.uint8), np.empty(0, np.int64))
        return ShardData(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "images", "labels")))

    def plan_indices(self) -> list[int]:
        return [p.index for p in self.plan()]


class ImageSetWriter(LockedWriter):
    """Creates or resumes an image set. The driver owns the manifest; any process may write shard files.

    A recorded shard whose file is deleted, truncated or corrupted (against its manifest row) counts as not done:
    `damaged` names those, and `pending()` includes them, so a rerun redoes them. `provenance` (where the images
    came from: a source path, a model spec) goes into dataset.json next to the identity, for `dra-pipe repair`.
    """

    def __init__(self, root: Path, name: str, identity: dict, n: int, provenance: dict | None = None):
        self.path = image_set_dir(root, validate_set_name(name))
        self.identity = identity
        self.n = n
        self.provenance = provenance
        self.created = False
        self.damaged: list[int] = []
        self.what = f"image set '{self.path.name}'"
        self._read_existing()

    def _read_existing(self) -> None:
        """Refuse a set that holds another identity or more samples; read its completed shards."""
        name, existing = self.path.name, self.path / DATASET_JSON
        if existing.exists():
            old = read_json_record(existing, {"identity": dict, "n": int}, "the set's identity")
            if not self.provenance and isinstance(old.get("provenance"), dict):
                self.provenance = old["provenance"]                      # kept unless this writer records anew
            if old["identity"] != self.identity:
                raise UserError(f"image set '{name}' already exists at {self.path} with another identity "
                                f"({_identity_diff(old['identity'], self.identity)}); "
                                "choose another --name or delete that folder")
            if old["n"] > self.n:
                raise UserError(f"image set '{name}' already holds {old['n']} samples, more than the {self.n} asked "
                                f"for; pass --n {old['n']} or more, or another --name")
        records = read_manifest(self.path)
        self.damaged = damaged_shards(self.path, records)
        self.records = {i: r for i, r in records.items() if i not in self.damaged}

    def _reread(self) -> None:
        self.created = holds_only_the_lock(self.path)       # new: abort() may remove the folder
        self._read_existing()

    def begin(self, wait: bool = False) -> None:
        """Lock the set, then create the folder and write dataset.json (with the possibly grown n). Call after
        validating inputs, and `pending()` after it: the set is read again under the lock."""
        self.lock(wait)
        self.path.mkdir(parents=True, exist_ok=True)
        # A grown set: the old last shard may be short; it is redone with its full range.
        self.records = {i: r for i, r in self.records.items() if self._fits(r)}
        record = {"identity": self.identity, "n": self.n, "fingerprint": dataset_fingerprint(self.identity, self.n),
                  "name": self.path.name}
        write_json_atomic(self.path / DATASET_JSON,
                          {**record, **({"provenance": self.provenance} if self.provenance else {})})

    def _fits(self, r: ShardRecord) -> bool:
        plans = plan_shards(self.n, self.identity["shard_size"])
        return r.index < len(plans) and plans[r.index].first_id == r.first_id and plans[r.index].count == r.count

    def pending(self) -> ShardPlans:
        done = [i for i, r in self.records.items() if self._fits(r)]
        return ShardPlans(self.n, self.identity["shard_size"], done)

    def write(self, plan: ShardPlan, images: np.ndarray, labels: np.ndarray) -> ShardRecord:
        """Write and record one shard in this process."""
        if len(images) != plan.count or len(labels) != plan.count:
            raise ValueError(f"shard {plan.index} expects {plan.count} samples, got {len(images)} images and "
                             f"{len(labels)} labels")
        record = write_tar_shard(self.path, plan.index, plan.first_id, images, labels, self.identity["image_format"])
        self.record(record)
        return record

    def record(self, record: ShardRecord) -> None:
        """Add a completed shard to the manifest (after its data is in place)."""
        self.records[record.index] = record
        write_manifest(self.path, self.records)

    def abort(self) -> None:
        """Remove what this writer created (bad input found midway): nothing half-written stays."""
        if self._lock is not None and self.created and self.path.exists():
            shutil.rmtree(self.path)                # under the lock: a waiting writer sees the folder gone
            remote.removed(self.path)
        self.close()


def damaged_shards(set_dir: Path, records: dict[int, ShardRecord]) -> list[int]:
    """Indices of recorded shards whose file is missing or differs from its record (size, sha256)."""
    remote_checks.forget_listing(set_dir)
    return sorted(i for i, r in records.items() if file_problem(Path(set_dir) / shard_name(i), r.bytes, r.sha256))


def _identity_diff(old: dict, new: dict, prefix: str = "") -> str:
    """The differing fields, dotted: `source.steps: 6 there vs 2 here`."""
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _identity_diff(a, b, f"{prefix}{k}.")
            parts += [inner] if inner else []
        elif a != b:
            parts.append(f"{prefix}{k}: {a!r} there vs {b!r} here")
    return ", ".join(parts)


def list_image_sets(root: Path) -> list[Path]:
    base = Path(root) / "images"
    return sorted(p for p in base.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and not holds_only_the_lock(p)) \
        if base.exists() else []                   # a folder with just its lock: a writer is only starting there


def generated_set_names(root: Path) -> list[str]:
    """Names of the workspace's generated image sets (kind generated: `generate`, `select`, `import npz
    --generated`), sorted; a set whose dataset.json is damaged is left out (`ls` and `verify` name it)."""
    names = []
    for path in list_image_sets(root):
        try:
            record = read_json_record(path / DATASET_JSON, {"identity": dict}, "the set's identity")
        except (UserError, IntegrityError):
            continue
        if record["identity"].get("kind") == "generated":
            names.append(path.name)
    return names
