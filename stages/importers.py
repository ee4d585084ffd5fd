"""Real data sets into image stores: digits (embedded), CIFAR-10/100 tarballs, DM-AT .npz, image folders.

Each importer validates its whole source before the first shard is written, then streams it shard by shard,
so a 61 GB .npz is never held in memory. Importing the same source again is a no-op.
"""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from stages import imagenet64
from stages.npz_source import npz_files_split
from stages.sources import SplitSource, check_labels, class_labels
from stores.checksums import cached_file_sha256
from stores.errors import UserError
from stores.images import DATASET_JSON, ImageSet, ImageSetWriter, dataset_fingerprint, make_identity
from stores.workspace import check_writable


@dataclass
class ImportResult:
    name: str
    n: int
    shards_written: int
    skipped: bool
    fingerprint: str
    redone: list[int] = field(default_factory=list)      # shard indices written by this run
    damaged: list[int] = field(default_factory=list)     # of them, shards that were recorded but damaged


def import_source(root: Path, importer: str, source: str | list[str] | None, name: str | None, shard_size: int,
                  image_format: str, test_fraction: float = 0.2, split_seed: int = 0,
                  progress: Callable[[int], None] | None = None, wait: bool = False,
                  generated: bool = False, recorded: list[str] | None = None) -> list[ImportResult]:
    """Import every split of `source` as image sets `<name>-<split>` (each locked while written; `wait` waits for
    another writer of it instead of refusing). npz takes several files, appended in order into one split;
    `generated` (npz only) writes them as one generated set named `name`, as DM-AT's published data is. Shards of
    an earlier import that are damaged are redone; dataset.json records the source paths (for `dra-pipe repair`),
    or `recorded` (the object-store URLs a node's cached copies came from)."""
    paths = _source_paths(importer, source, generated)
    splits = _splits(importer, paths, test_fraction, split_seed)  # every file validated, and the root, before hashing
    check_writable(Path(root))
    checksums = _checksums(importer, paths)
    provenance = {"sources": recorded or [str(p.resolve()) for p in paths]} if paths else None
    if generated:
        split = splits[0]
        return [_write_split(root, name or "npz-gen",
                             _generated_npz_identity(checksums, split, shard_size, image_format),
                             split, progress, wait, provenance)]
    base = name or importer
    return [_write_split(root, f"{base}-{split.split}",
                         split_identity(importer, checksums, split, shard_size, image_format, test_fraction,
                                        split_seed),
                         split, progress, wait, provenance) for split in splits]


def _source_paths(importer: str, source: str | list[str] | None, generated: bool) -> list[Path]:
    """The files or folder to read, checked: one for every importer but npz (several, in order), none for digits."""
    sources = [source] if isinstance(source, (str, Path)) else list(source or [])
    if importer not in IMPORTERS:
        raise UserError(f"unknown importer {importer!r}; use one of {', '.join(IMPORTERS)}")
    if generated and importer != "npz":
        raise UserError(f"--generated applies to import npz (DM-AT's generated data); import {importer} writes real "
                        f"sets, drop --generated")
    if importer != "digits" and not sources:
        raise UserError(f"import {importer} needs --from PATH (the file or folder to import)")
    if len(sources) > 1 and importer != "npz":
        one = "folder" if importer in FOLDER_IMPORTERS else "file"
        raise UserError(f"import {importer} reads one --from {one}, got "
                        f"{len(sources)}; give one --from (only import npz appends several files)")
    paths = [Path(s) for s in sources]
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: no such file or folder; check --from")
        if path.is_dir() != (importer in FOLDER_IMPORTERS):
            kind = "folder" if importer in FOLDER_IMPORTERS else "file"
            raise UserError(f"{path}: import {importer} reads a {kind}; check --from")
    twice = [p for k, p in enumerate(paths) if any(p.resolve() == q.resolve() for q in paths[:k])]
    if twice:
        raise UserError(f"{twice[0]}: given twice as --from; give each file once")
    return paths


IMPORTERS = ("digits", "cifar10", "cifar100", "npz", "folder", "imagenet64")
FOLDER_IMPORTERS = ("folder", "imagenet64")      # --from names a folder


def _npz_provenance(checksums: list[str], split: SplitSource) -> dict:
    """Where a generated set from .npz files came from: DM-AT's format, each file's sha256 and image count, in
    order (file names are left out: renaming a file does not change its images)."""
    return {"importer": "npz", "format": "DM-AT npz", "checksums": checksums, "counts": list(split.file_counts)}


def split_identity(importer: str, checksums: list[str], split: SplitSource, shard_size: int, image_format: str,
                   test_fraction: float, split_seed: int) -> dict:
    """Identity of a real set imported from these sources."""
    settings = {"test_fraction": test_fraction, "split_seed": split_seed} if importer == "digits" else {}
    origin = {"checksum": checksums[0]} if len(checksums) == 1 else {"checksums": checksums}
    return make_identity("real", {"importer": importer, **origin, **settings}, split.resolution,
                         split.channels, split.classes, split.class_names, split.split, shard_size, image_format)


def _generated_npz_identity(checksums: list[str], split: SplitSource, shard_size: int, image_format: str) -> dict:
    return make_identity("generated", _npz_provenance(checksums, split), split.resolution, split.channels,
                         split.classes, None, "train", shard_size, image_format)


def _splits(importer: str, paths: list[Path], test_fraction: float, split_seed: int) -> list[SplitSource]:
    described = {"digits": lambda: _digits(test_fraction, split_seed), "cifar10": lambda: _cifar(paths[0], 10),
                 "cifar100": lambda: _cifar(paths[0], 100), "npz": lambda: [npz_files_split(paths)],
                 "folder": lambda: _folder(paths[0]),
                 "imagenet64": lambda: imagenet64.splits(paths[0], _NumpyOnlyUnpickler)}
    return described[importer]()


def _checksums(importer: str, paths: list[Path]) -> list[str]:
    if importer == "imagenet64":
        return [imagenet64.checksum(paths[0])]
    return [_source_checksum(importer, p) for p in paths] if paths and importer != "digits" else \
        [_source_checksum(importer, None)]


def recorded_checksums(identity: dict) -> list[str]:
    src = identity["source"]
    return list(src["checksums"]) if "checksums" in src else [src.get("checksum")]


def source_matches(identity: dict, sources: list[str]) -> bool:
    """Whether `sources` (none for the embedded digits) have the checksums the imported set records."""
    importer = identity["source"]["importer"]
    paths = _source_paths(importer, sources, identity["kind"] == "generated")
    return _checksums(importer, paths) == recorded_checksums(identity)


def repair_imported(root: Path, name: str, identity: dict, n: int, sources: list[str],
                    progress: Callable[[int], None] | None = None, wait: bool = False,
                    recorded: list[str] | None = None) -> ImportResult:
    """Redo the damaged or missing shards of imported set `name` from its sources (checked by `source_matches`)."""
    src = identity["source"]
    generated = identity["kind"] == "generated"
    paths = _source_paths(src["importer"], sources, generated)
    fraction, seed = src.get("test_fraction", 0.2), src.get("split_seed", 0)
    splits = _splits(src["importer"], paths, fraction, seed)
    split = splits[0] if generated else next((s for s in splits if s.split == identity["split"]), None)
    checksums = recorded_checksums(identity)
    rebuilt = None if split is None else \
        _generated_npz_identity(checksums, split, identity["shard_size"], identity["image_format"]) if generated else \
        split_identity(src["importer"], checksums, split, identity["shard_size"], identity["image_format"], fraction,
                       seed)
    if rebuilt != identity or split.n != n:
        raise UserError(f"{', '.join(sources) or src['importer']}: not the source image set {name} was imported "
                        f"from; pass --from the original source")
    provenance = {"sources": recorded or [str(p.resolve()) for p in paths]} if paths else None
    return _write_split(root, name, identity, split, progress, wait, provenance)


def _write_split(root: Path, name: str, identity: dict, split: SplitSource, progress, wait: bool,
                 provenance: dict | None = None) -> ImportResult:
    writer = ImageSetWriter(root, name, identity, split.n, provenance)
    if not writer.pending() and (writer.path / DATASET_JSON).exists():
        return ImportResult(name, split.n, 0, True, dataset_fingerprint(identity, split.n))
    writer.begin(wait)
    pending = writer.pending()     # read under the lock: what a writer before us finished is kept
    damaged = list(writer.damaged)
    try:
        for plan in pending:
            images, labels = split.read(plan.first_id, plan.count)
            check_labels(labels, split.classes, plan.first_id)
            writer.write(plan, images, labels)
            if progress:
                progress(plan.count)
    except KeyboardInterrupt:
        raise                      # completed shards stay recorded: the same command resumes
    except Exception:
        writer.abort()             # bad input found midway: remove the set this run created
        raise
    finally:
        writer.close()
    return ImportResult(name, split.n, len(pending), False, ImageSet(writer.path).fingerprint,
                        [p.index for p in pending], damaged)


# The official CIFAR python tarballs: training images, classes, channels, resolution (for plans without them).
CIFAR_TRAIN_SHAPE = {"cifar10": (50_000, 10, 3, 32), "cifar100": (50_000, 100, 3, 32)}
IMAGENET_TRAIN_IMAGES = 1_281_167          # ILSVRC-2012 train (also Downsampled ImageNet's 10 batches together)
IMAGENET_CLASSES = 1000
TEST_SPLITS = {"imagenet": "val", "imagenet64": "val"}      # the split a classifier is evaluated on; else "test"


def eval_split(importer: str) -> str:
    """The importer's evaluation split: ImageNet's is val (its test labels are not public), the others' test."""
    return TEST_SPLITS.get(importer, "test")


def planned_train_split(importer: str, test_fraction: float, split_seed: int,
                        resolution: int = 64) -> tuple[int, int, int, int] | None:
    """(n, classes, channels, resolution) of the training split an import would write, when knowable without
    its source file (the embedded digits, the official CIFAR tarballs, ILSVRC-2012 at `resolution`, Downsampled
    ImageNet at 64); None for npz and folder sources."""
    if importer == "digits":
        train = _digits(test_fraction, split_seed)[0]
        return train.n, train.classes, train.channels, train.resolution
    if importer in ("imagenet", "imagenet64"):
        return IMAGENET_TRAIN_IMAGES, IMAGENET_CLASSES, 3, resolution if importer == "imagenet" else 64
    return CIFAR_TRAIN_SHAPE.get(importer)


def _source_checksum(importer: str, path: Path | None) -> str:
    """sha256 of the source, streamed (a 31 GB .npz is read once, never held)."""
    if importer == "digits":
        return cached_file_sha256(_digits_file())
    if path.is_dir():
        return _folder_checksum(path)
    return cached_file_sha256(path)


# --- digits -------------------------------------------------------------------------------------------------

def _digits_file() -> Path:
    import sklearn.datasets
    return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"


def _digits(test_fraction: float, seed: int) -> list[SplitSource]:
    """scikit-learn's 1,797 handwritten digits: 8x8, 17 grey levels (0..16) mapped onto 0..255."""
    with gzip.open(_digits_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    images = np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
    labels = table[:, 64].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    names = [str(i) for i in range(10)]
    return [_in_memory("train", images[train], labels[train], 10, names),
            _in_memory("test", images[test], labels[test], 10, names)]


def _in_memory(split: str, images: np.ndarray, labels: np.ndarray, classes: int, names) -> SplitSource:
    return SplitSource(split, len(labels), images.shape[1], images.shape[3], classes, names,
                       lambda start, count: (images[start:start + count], labels[start:start + count]))


# --- CIFAR python tarballs -----------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches hold numpy arrays and lists; anything else in them is refused, never executed."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # encode: bytes in protocol-2 pickles

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _load_batch(tar: tarfile.TarFile, member: str, archive: Path) -> dict:
    try:
        raw = tar.extractfile(member).read()
        data = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (KeyError, AttributeError):
        raise UserError(f"{archive}: member {member} missing; "
                        "is this the python version of the CIFAR tarball?") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{archive}: member {member} is not a CIFAR batch ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{archive}: member {member} is a {type(data).__name__}, not a CIFAR batch (a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar(path: Path, classes: int) -> list[SplitSource]:
    """cifar-10-python.tar.gz / cifar-100-python.tar.gz: both splits, class names. Rows are CHW, 3072 bytes."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError):
        raise UserError(f"{path}: not a tar archive; "
                        f"expected the python version of the CIFAR-{classes} tarball") from None
    with tar:
        if classes == 10:
            folder, label_key = "cifar-10-batches-py", "labels"
            train = [_load_batch(tar, f"{folder}/data_batch_{i}", path) for i in range(1, 6)]
            test = [_load_batch(tar, f"{folder}/test_batch", path)]
            names = [n.decode() for n in _load_batch(tar, f"{folder}/batches.meta", path)["label_names"]]
        else:
            folder, label_key = "cifar-100-python", "fine_labels"
            train = [_load_batch(tar, f"{folder}/train", path)]
            test = [_load_batch(tar, f"{folder}/test", path)]
            names = [n.decode() for n in _load_batch(tar, f"{folder}/meta", path)["fine_label_names"]]
    if len(names) != classes:
        raise UserError(f"{path}: {len(names)} class names, expected {classes}; is this the CIFAR-{classes} tarball?")
    return [_cifar_split(split, batches, label_key, classes, names, path)
            for split, batches in (("train", train), ("test", test))]


def _cifar_split(split, batches, label_key, classes, names, path) -> SplitSource:
    if any("data" not in b or label_key not in b for b in batches):
        raise UserError(f"{path}: a {split} batch lacks 'data' or '{label_key}'; is this the python CIFAR tarball?")
    try:
        raw = [np.asarray(b["data"]) for b in batches]
    except (TypeError, ValueError):
        raise UserError(f"{path}: {split} 'data' is not an array of bytes; is this the python CIFAR tarball?") from None
    wrong = next((r.dtype for r in raw if r.dtype != np.uint8), None)
    if wrong is not None:               # a cast would zero floats in [0, 1] and wrap 16-bit values modulo 256
        raise UserError(f"{path}: {split} 'data' is {wrong}, not uint8 bytes; is this the python CIFAR tarball?")
    data = np.concatenate(raw)
    labels = np.concatenate([class_labels(b[label_key], f"{path} ({split})") for b in batches])
    if data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: {split} rows have shape {data.shape[1:]}, expected 3072 bytes (3x32x32)")
    if len(data) != len(labels):
        raise UserError(f"{path}: {split} has {len(data)} images but {len(labels)} labels")
    check_labels(labels, classes, 0)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)     # (N, H, W, C)
    return _in_memory(split, np.ascontiguousarray(images), labels, classes, names)


# --- image folders -------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _folder_files(path: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{path}: no class subfolders; expected DIR/<class>/*.png|jpg")
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((path / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"{path}: the class subfolders hold no .png or .jpg files")
    empty = sorted(set(classes) - {classes[k] for _, k in files})
    if empty:
        raise UserError(f"{path}: class folder {empty[0]} holds no .png or .jpg files; add its images or remove it")
    return classes, files


def _folder_checksum(path: Path) -> str:
    import hashlib
    _, files = _folder_files(path)
    h = hashlib.sha256()
    for f, k in files:
        h.update(f"{f.relative_to(path)}\0{k}\0{cached_file_sha256(f)}\n".encode())
    return h.hexdigest()


def _folder(path: Path) -> list[SplitSource]:
    """One subfolder per class (sorted names = class indices). Every image must have the same size."""
    if not path.is_dir():
        raise UserError(f"{path}: not a folder; import folder expects DIR/<class>/*.png|jpg")
    classes, files = _folder_files(path)
    modes, sizes = set(), set()
    for f, _ in files:
        mode, size = _image_header(f)
        modes.add(mode)
        sizes.add(size)
    if len(sizes) != 1 or len({w == h for w, h in sizes}) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise UserError(f"{path}: images must all be square and the same size; found {sorted(sizes)[:4]}")
    grey = modes <= {"L", "1"}
    resolution = next(iter(sizes))[0]
    labels = np.array([k for _, k in files], dtype=np.int64)

    def read(start: int, count: int):
        chunk = files[start:start + count]
        images = np.stack([_load_image(f, grey) for f, _ in chunk])
        return images, labels[start:start + count]

    return [SplitSource("train", len(files), resolution, 1 if grey else 3, len(classes), classes, read)]


EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr"}


def _image_header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, size) from the file's header, refusing what the store cannot hold as 8-bit pixels without loss."""
    try:
        with Image.open(path) as im:
            mode, size = im.mode, im.size
    except Image.DecompressionBombError:
        raise UserError(f"{path}: the image is too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} "
                        "pixels); resize it first") from None
    except OSError:
        raise UserError(f"{path}: not a readable image") from None
    if mode not in EIGHT_BIT_MODES:       # 16-bit and float modes: converting would clip every pixel to 255
        raise UserError(f"{path}: image mode {mode} is not 8 bits per channel; convert the images to 8-bit first")
    return mode, size


def _load_image(path: Path, grey: bool) -> np.ndarray:
    with Image.open(path) as im:
        array = np.asarray(im.convert("L" if grey else "RGB"))
    return array[:, :, None] if grey else array

