"""DM-AT's generated-data `.npz` (arrays `image` (N, H, W, C) uint8 and `label` (N,)), read without loading it:
memory-mapped where the member is stored uncompressed, streamed in order where it is deflated. Several files (DM-AT's
20M set comes in two halves) read as one split: ids 0..n_1-1 from the first, then n_1.. from the second, and so on."""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np

from stages.sources import MAX_CLASSES, ReadFn, SplitSource, class_labels
from stores.errors import UserError
from stores.tarshard import read_npy_header

DMAT_MEMBERS = {"image.npy", "label.npy"}      # the arrays of DM-AT's published files, and nothing else


def has_dmat_layout(path: Path) -> bool:
    """Whether `path` is a zip holding exactly DM-AT's arrays `image` and `label` (its headers only are read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return set(archive.namelist()) == DMAT_MEMBERS
    except (zipfile.BadZipFile, OSError):
        return False


def npz_files_split(paths: list[Path]) -> SplitSource:
    """One training split over several .npz files, appended in the order given; every file holds one image shape."""
    parts = [npz_splits(p)[0] for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        if (part.resolution, part.channels) != (first.resolution, first.channels):
            raise UserError(f"{path}: images are {_shape_text(part)}, but {paths[0]} holds {_shape_text(first)}; "
                            f"every --from file of one set must hold images of one shape")
    if len(parts) == 1:
        return dataclasses.replace(first, file_counts=(first.n,))
    starts = np.cumsum([0] + [p.n for p in parts])     # (files + 1,) global id where each file begins

    def read(start: int, count: int):
        images, labels = [], []
        for k, part in enumerate(parts):
            lo, hi = max(start, int(starts[k])), min(start + count, int(starts[k + 1]))
            if lo < hi:
                got = part.read(lo - int(starts[k]), hi - lo)
                images.append(got[0])
                labels.append(got[1])
        return np.concatenate(images), np.concatenate(labels)

    return SplitSource("train", int(starts[-1]), first.resolution, first.channels, max(p.classes for p in parts),
                       None, read, tuple(p.n for p in parts))


def _shape_text(part: SplitSource) -> str:
    return f"{part.channels}x{part.resolution}x{part.resolution}"


def npz_splits(path: Path) -> list[SplitSource]:
    """`image` (N, H, W, C) uint8 and `label` (N,): memory-mapped when stored, streamed when compressed."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"{path}: not an .npz file (zip archive of .npy arrays); "
                        "expected DM-AT's format with 'image' and 'label'") from None
    with archive:
        members = set(archive.namelist())
        for key in ("image", "label"):
            if f"{key}.npy" not in members:
                raise UserError(f"{path}: no array '{key}' "
                                f"(has {', '.join(sorted(m.removesuffix('.npy') for m in members))}); "
                                f"expected DM-AT's format with 'image' and 'label'")
        labels = _read_npz_labels(archive, path)
        shape, dtype = _npy_member_header(archive, "image.npy")
    if len(shape) != 4 or shape[3] not in (1, 3) or shape[1] != shape[2] or shape[1] == 0 or dtype != np.uint8:
        raise UserError(f"{path}: 'image' is {dtype} {shape}; "
                        "expected (N, H, W, C) uint8 with square images of at least 1x1 and C 1 or 3")
    if shape[0] != len(labels):
        raise UserError(f"{path}: {shape[0]} images but {len(labels)} labels; the arrays must have the same length")
    if shape[0] == 0:
        raise UserError(f"{path}: 'image' holds no images; nothing to import")
    classes = int(labels.max()) + 1
    if (labels < 0).any():
        raise UserError(f"{path}: negative labels; labels must be class indices 0..K-1")
    if classes > MAX_CLASSES:
        raise UserError(f"{path}: label {classes - 1} makes {classes:,} classes (at most {MAX_CLASSES:,}); "
                        "use indices 0..K-1")
    _check_stored_length(path, shape)
    reader = _npz_reader(path, shape)
    return [SplitSource("train", shape[0], shape[1], shape[3], max(classes, 1), None, reader)]


def _read_npz_labels(archive: zipfile.ZipFile, path: Path) -> np.ndarray:
    try:
        with archive.open("label.npy") as f:
            raw = np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: 'label' is not a readable array ({str(exc)[:80]}); "
                        "save integer labels with np.savez") from None
    return class_labels(raw.reshape(-1) if raw.ndim == 2 and 1 in raw.shape else raw, f"{path}: 'label'")


def _check_stored_length(path: Path, shape) -> None:
    """The 'image' member must hold all N*H*W*C bytes its header promises (a memmap past them fails late)."""
    with zipfile.ZipFile(path) as archive, archive.open("image.npy") as member:
        read_npy_header(member)
        stored = archive.getinfo("image.npy").file_size - member.tell()
    if stored < int(np.prod(shape)):
        raise UserError(f"{path}: 'image' ends early ({stored:,} of {int(np.prod(shape)):,} bytes); "
                        "save the file again")


def _npy_member_header(archive: zipfile.ZipFile, member: str):
    with archive.open(member) as f:
        shape, fortran, dtype = read_npy_header(f)
    if fortran:
        raise UserError(f"{archive.filename}: '{member}' is in Fortran order; save it in C order")
    return shape, dtype


def _npz_reader(path: Path, shape) -> ReadFn:
    archive = zipfile.ZipFile(path)
    info = archive.getinfo("image.npy")
    if info.compress_type == zipfile.ZIP_STORED:
        offset = _stored_data_offset(path, info, archive)
        images = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=tuple(shape))
        return lambda start, count: (np.ascontiguousarray(images[start:start + count]),
                                     _labels(path)[start:start + count])
    return _StreamingReader(archive, shape, path)


def _labels(path: Path, _cache={}) -> np.ndarray:  # noqa: B006 (the dict is the cache, shared by design)
    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)      # a file written again at the same path is read again
    if key not in _cache:
        with zipfile.ZipFile(path) as archive, archive.open("label.npy") as f:
            _cache[key] = np.lib.format.read_array(f, allow_pickle=False).astype(np.int64).reshape(-1)
    return _cache[key]


def _stored_data_offset(path: Path, info: zipfile.ZipInfo, archive: zipfile.ZipFile) -> int:
    """Byte offset of the array data of an uncompressed .npy member inside the zip file."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        member_start = info.header_offset + 30 + name_len + extra_len
    with archive.open(info) as m:
        read_npy_header(m)
        header_len = m.tell()
    return member_start + header_len


class _StreamingReader:
    """Sequential reads of a compressed member: shards are requested in order, so we never seek back; a resumed
    import skips forward (decompressing what it passes) to its first pending shard."""

    def __init__(self, archive: zipfile.ZipFile, shape, path: Path):
        self.archive, self.shape, self.path = archive, shape, path
        self.stream = archive.open("image.npy")
        read_npy_header(self.stream)
        self.position = 0

    def __call__(self, start: int, count: int):
        per = int(np.prod(self.shape[1:]))
        if start < self.position:
            raise RuntimeError("compressed .npz members are read in order")
        self._skip_to(start, per)
        raw = self.stream.read(per * count)
        if len(raw) != per * count:
            raise UserError(f"{self.path}: 'image' ends early at sample {start + len(raw) // per}")
        self.position += count
        return np.frombuffer(raw, np.uint8).reshape(count, *self.shape[1:]), _labels(self.path)[start:start + count]

    def _skip_to(self, start: int, per: int, chunk: int = 4096) -> None:
        while self.position < start:
            step = min(chunk, start - self.position)
            if len(self.stream.read(per * step)) != per * step:
                raise UserError(f"{self.path}: 'image' ends early at sample {self.position}")
            self.position += step
