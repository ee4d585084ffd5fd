"""`dra-pipe import imagenet`: ILSVRC-2012 folders into `<name>-train` and `<name>-val`, decoded on Ray workers.

Pass 1 (Ray, `pipeline.shards`): chunks = slices of a split's sorted file list, each decoded, centre-cropped and
staged by a worker (stages.imagenet_chunks); a chunk staged by an interrupted run is not decoded again. Pass 2
(driver): once every chunk is staged, the files that decoded are known, so the set's count and identity are; its
shards are written from the staged chunks and recorded after their data, and the staging folder goes. A rerun
after Ctrl-C resumes at whichever pass stopped; a complete set whose file listing (names, sizes, mtimes) is the one
it records says nothing to do without reading the files again.
"""
from __future__ import annotations

import hashlib
import shutil
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.console import console
from stages import imagenet
from stages.imagenet_chunks import ChunkWorker, chunk_images, chunk_path, read_chunk
from stores import remote
from stores.images import DATASET_JSON, ImageSet, ImageSetWriter, image_set_dir, make_identity, validate_set_name
from stores.manifest import ShardJob
from stores.workspace import check_writable


def import_imagenet(cfg: Config, source: str | None, name: str | None, resolution: int, wait: bool = False) -> None:
    """Both splits of DIR (val when DIR has one); UserError (one line) for a layout other than stages.imagenet's."""
    from stores.errors import UserError
    if not source:
        raise UserError("import imagenet needs --from DIR (the folder holding train/ and val/)")
    if resolution < 8:
        raise UserError(f"--resolution {resolution}: give the side of the square images, at least 8")
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"{root}: import imagenet reads a folder; expected {imagenet.LAYOUT}")
    ids = imagenet.synsets(root)
    names = imagenet.human_names(root, ids)
    splits = [s for s in (imagenet.train_split(root, ids), imagenet.val_split(root, ids)) if s is not None]
    check_writable(Path(cfg.root))
    for split in splits:
        _import_split(cfg, root, split, f"{validate_set_name(name or 'imagenet')}-{split.split}", ids, names,
                      resolution, wait)


def listing_hash(split: imagenet.FolderSplit) -> str:
    """Names, sizes and mtimes of the split's files with their labels: cheap, and enough to see a changed folder."""
    h = hashlib.sha256()
    for f, label in zip(split.files, split.labels):
        st = f.stat()
        h.update(f"{f.parent.name}/{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0{int(label)}\n".encode())
    return h.hexdigest()


def _import_split(cfg: Config, source: Path, split: imagenet.FolderSplit, name: str, ids: list[str], names,
                  resolution: int, wait: bool) -> None:
    root, listing = Path(cfg.root), listing_hash(split)
    if _already_imported(root, name, listing, resolution, cfg):
        console.print(f"already imported: {name} (listing unchanged) - nothing to do", highlight=False)
        return
    staging = root / "images" / f".staging-{name}-{listing[:16]}"
    _drop_stale_staging(staging)
    staging.mkdir(parents=True, exist_ok=True)
    chunk = cfg.data.shard_size
    jobs = [ShardJob(i, lo, min(chunk, len(split.files) - lo)) for i, lo in enumerate(range(0, len(split.files),
                                                                                             chunk))]
    decode_chunks(cfg, split, staging, [j for j in jobs if not chunk_path(staging, j.index).exists()], resolution)
    chunks = [read_chunk(staging, j.index) for j in jobs]
    if any(c is None for c in chunks):
        from stores.errors import IntegrityError
        raise IntegrityError(f"{staging}: a staged chunk is unreadable; delete that folder and import again")
    identity, provenance, skipped, converted = split_identity_of(source, split, chunks, ids, names, resolution,
                                                                 listing, cfg)
    n = sum(c.kept for c in chunks)
    write_set_from_chunks(root, name, identity, provenance, n, staging, [c.kept for c in chunks], wait)
    console.print(f"imported {name}: {n:,} images ({converted} converted, {len(skipped)} skipped"
                  + (f": {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}" if skipped else "")
                  + f"; each one's note is in {name}/{DATASET_JSON}), fingerprint "
                  f"{ImageSet.open(root, name).fingerprint[:12]}", highlight=False, soft_wrap=True)
    shutil.rmtree(staging, ignore_errors=True)
    remote.removed(staging)


def _drop_stale_staging(staging: Path) -> None:
    """Staging folders of this set from another listing (the folder changed after an interrupted import) can never
    be resumed: remove them, saying so, so their decoded chunks do not stay on disk unseen."""
    prefix = staging.name[:-16]
    for old in staging.parent.glob(f"{prefix}*"):
        suffix = old.name[len(prefix):]
        if old != staging and old.is_dir() and len(suffix) == 16 and set(suffix) <= set("0123456789abcdef"):
            console.print(f"removing {old}: staged by an interrupted import of another file listing", highlight=False)
            shutil.rmtree(old, ignore_errors=True)
            remote.removed(old)


def _already_imported(root: Path, name: str, listing: str, resolution: int, cfg: Config) -> bool:
    if not (image_set_dir(root, name) / DATASET_JSON).exists():
        return False
    s = ImageSet.open(root, name)
    same = s.meta.get("provenance", {}).get("listing") == listing and s.resolution == resolution and \
        s.shard_size == cfg.data.shard_size and s.identity.get("image_format") == cfg.data.image_format
    return same and s.complete


def decode_chunks(cfg: Config, split, staging: Path, jobs: list[ShardJob], resolution: int):
    """Decode and stage the chunks `jobs` on Ray workers; returns (run summary, actor plan), or None for none."""
    from pipeline.shards.cluster import cluster_nodes, plan_actors, ray_session
    from pipeline.shards.progress import run_with_progress
    if not jobs:
        return None
    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        actors = plan_actors(cluster_nodes(), cfg.ray.cpu_actors)
        factory = partial(ChunkWorker, [str(f) for f in split.files], split.labels, resolution, str(staging))
        summary = run_with_progress(f"decode {split.split}", "images", jobs, factory, actors, cfg.ray.max_retries,
                                    lambda job, kept: None,
                                    kept=lambda: "decoded chunks are kept; rerun the same command to resume")
    console.print(f"decoded {summary.items:,} {split.split} images in {summary.seconds:.1f} s: "
                  f"{summary.items / max(summary.seconds, 1e-9):,.1f} images/s on {actors.describe()}",
                  highlight=False)
    return summary, actors


def split_identity_of(source: Path, split, chunks, ids, names, resolution, listing, cfg) -> tuple:
    """(identity, provenance, skipped files, converted count): the identity holds every file's sha256 (hashed),
    the transform, the filter and the skipped files; the provenance every converted or skipped file's note."""
    notes = [(str(f.relative_to(source)), note) for f, note in zip(split.files, _all(chunks, "notes")) if note]
    skipped = [f for f, note in notes if note.startswith("skipped")]
    h = hashlib.sha256()
    for f, digest in zip(split.files, _all(chunks, "sha256")):
        h.update(f"{f.relative_to(source)}\0{digest}\n".encode())
    origin = {"importer": "imagenet", "checksum": h.hexdigest(), "transform": imagenet.TRANSFORM,
              "filter": imagenet.FILTER, "skipped": skipped}
    identity = make_identity("real", origin, resolution, 3, len(ids), names or ids, split.split,
                             cfg.data.shard_size, cfg.data.image_format)
    provenance = {"sources": [str(source.resolve())], "listing": listing, "synsets": ids,
                  "files": [{"file": f, "note": note} for f, note in notes]}
    return identity, provenance, skipped, len(notes) - len(skipped)


def write_set_from_chunks(root: Path, name: str, identity: dict, provenance: dict, n: int, staging: Path,
                          kept: list[int], wait: bool) -> None:
    """The set's missing shards from the staged chunks (one chunk's images in memory at a time)."""
    starts = np.concatenate([[0], np.cumsum(kept)])
    writer = ImageSetWriter(root, name, identity, n, provenance)
    writer.begin(wait)
    try:
        for plan in writer.pending():
            parts = [_slice(staging, k, starts, plan.first_id, plan.first_id + plan.count) for k in range(len(kept))
                     if starts[k] < plan.first_id + plan.count and starts[k + 1] > plan.first_id]
            writer.write(plan, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    finally:
        writer.close()


def _slice(staging: Path, k: int, starts: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = chunk_images(staging, k)
    a, b = max(lo, starts[k]) - starts[k], min(hi, starts[k + 1]) - starts[k]
    return images[a:b], labels[a:b]


def _all(chunks, field: str) -> list:
    return [x for c in chunks for x in getattr(c, field)]
