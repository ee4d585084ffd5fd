"""What is under the workspace root (`ls`) and whether it is intact (`verify`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stores import remote, remote_checks
from stores.errors import IntegrityError, UserError
from stores.features import FeatureSet, list_feature_sets
from stores.images import ImageSet, list_image_sets
from stores.tarshard import file_problem, shard_name


@dataclass
class Entry:
    kind: str          # "images" or "features"
    name: str
    what: str          # real | generated | targets
    samples: int       # completed samples
    total: int         # planned samples
    shards_done: int
    shards_total: int
    bytes: int
    summary: str
    error: str | None = None
    fingerprint: str = ""   # image sets: the set's fingerprint

    @property
    def complete(self) -> bool:
        return self.error is None and self.shards_done == self.shards_total


def catalog(root: Path) -> list[Entry]:
    entries = [_image_entry(p) for p in list_image_sets(root)]
    by_fingerprint = {e.fingerprint: e.name for e in entries if e.fingerprint}
    entries += [_feature_entry(p, by_fingerprint) for p in list_feature_sets(root)]
    return entries


def _image_entry(path: Path) -> Entry:
    try:
        s = ImageSet(path)
    except (UserError, IntegrityError, KeyError) as exc:
        return Entry("images", path.name, "?", 0, 0, 0, 0, 0, "", error=str(exc))
    plan = s.plan()
    missing = s.missing_shards()
    src = s.identity["source"]
    origin = src.get("format") or src.get("importer") or src.get("model", "")[:12]
    summary = (f"{s.identity['split']} {s.resolution}x{s.resolution}x{s.channels} {s.classes} classes "
               f"from {origin} fp {s.fingerprint[:12]}")
    return Entry("images", s.name, s.identity["kind"], s.completed_samples(), s.n, len(plan) - len(missing), len(plan),
                 sum(r.bytes for r in s.records.values()), summary, fingerprint=s.fingerprint)


def _feature_entry(path: Path, image_sets: dict[str, str]) -> Entry:
    try:
        f = FeatureSet(path)
    except (UserError, IntegrityError, KeyError) as exc:
        return Entry("features", path.name, "?", 0, 0, 0, 0, 0, "", error=str(exc))
    ident = f.identity
    n, size = f.layout["n"], f.layout["shard_size"]
    shards_total = -(-n // size)
    images = image_sets.get(ident.get("image_set"), (ident.get("image_set") or "?")[:12])
    shape = "x".join(map(str, f.shape))
    sigma = ident.get("sigma")
    summary = (f"of {images}: {ident.get('layer', '?')} {shape} t={ident.get('timestep', '?')} "
               f"sigma={sigma if sigma is None else round(sigma, 4)} pool={ident.get('pool', '?')} views={f.views}")
    nbytes = sum(v["bytes"] for r in f.records.values() for v in r.files.values())
    return Entry("features", f.key, "targets", sum(r.count for r in f.records.values()), n, len(f.records),
                 shards_total, nbytes, summary)


@dataclass
class Problem:
    set_name: str
    shard: int
    path: str
    what: str      # missing | deleted | truncated | corrupted | unreadable

    def __str__(self) -> str:
        return f"{self.set_name}: shard {self.shard} {self.what}: {self.path}"


def verify_image_set(path: Path) -> list[Problem]:
    remote_checks.forget_listing(path)
    s = ImageSet(path)
    problems = []
    orphans = _unreferenced(s.path, {shard_name(i) for i in s.records})
    for plan in s.plan():
        file = s.path / shard_name(plan.index)
        record = s.records.get(plan.index)
        if record is None or record.first_id != plan.first_id or record.count != plan.count:
            problems.append(Problem(s.name, plan.index, str(file), _never_completed(shard_name(plan.index) in orphans)))
            continue
        problems += _check_file(s.name, plan.index, file, record.bytes, record.sha256)
    return problems


def verify_feature_set(path: Path) -> list[Problem]:
    remote_checks.forget_listing(path)
    f = FeatureSet(path)
    n, size = f.layout["n"], f.layout["shard_size"]
    problems = []
    orphans = {name.split("/")[3] for name in _unreferenced(f.path, {
        f.file_path(a, i).relative_to(f.path).as_posix() for i in f.records for a in f.array_names()})}
    for index in range(-(-n // size)):
        record = f.records.get(index)
        if record is None:
            problems.append(Problem(f.key, index, str(f.path), _never_completed(str(index) in orphans)))
            continue
        for array, facts in record.files.items():
            problems += _check_file(f.key, index, f.file_path(array, index), facts["bytes"], facts["sha256"])
    return problems


def _unreferenced(set_dir: Path, recorded: set[str]) -> list[str]:
    return remote_checks.unreferenced_objects(set_dir, recorded) if remote.mirror_of(set_dir) else []


def _never_completed(object_left: bool) -> str:
    return ("missing (never recorded: an unreferenced object is there, left by a writer stopped between its upload "
            "and its record)" if object_left else "missing (never completed)")


def _check_file(set_name: str, index: int, file: Path, size: int, sha256: str) -> list[Problem]:
    what = file_problem(file, size, sha256, rehash=True)
    return [Problem(set_name, index, str(file), what)] if what else []


def resolve_set(root: Path, name: str) -> tuple[str, Path]:
    """A set name or feature key -> ("images"|"features", path)."""
    for kind in ("images", "features"):
        path = Path(root) / kind / name
        if path.is_dir():
            return kind, path
    raise UserError(f"no image or feature set named {name!r} under {root}; `dra-pipe ls` lists them")
