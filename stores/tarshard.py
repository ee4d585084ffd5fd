"""WebDataset tar shards: writing them deterministically and reading them fast.

A shard holds, per sample, `<key>.png` (or `<key>.npy`) and `<key>.cls`, key = the zero-padded global id.
Files are plain POSIX tar, readable by the `webdataset` library; our own reader walks the 512-byte headers
of a buffer read in one call, which avoids `tarfile`'s 20-25 us per member.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stores import remote, remote_checks
from stores.checksums import checksum_cache
from stores.errors import IntegrityError
from stores.manifest import ShardRecord, worker_name

KEY_DIGITS = 10
BLOCK = 512


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(global_id: int) -> str:
    return f"{global_id:0{KEY_DIGITS}d}"


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    """(H, W, C) uint8 -> PNG (lossless) or .npy bytes."""
    if image_format == "png":
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[2]]
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, mode=mode)
        buf = io.BytesIO()
        pil.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0          # fixed metadata: the same samples always give the same bytes
    info.mode = 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def write_tar_shard(set_dir: Path, index: int, first_id: int, images: np.ndarray, labels: np.ndarray,
                    image_format: str = "png", started: float | None = None) -> ShardRecord:
    """Write one complete shard under a temporary name, fsync, rename. Returns its manifest record.

    images: (N, H, W, C) uint8; labels: (N,) integers. Safe to call from any worker process: each shard
    index is owned by exactly one writer, and the final name appears only when the file is complete.
    """
    started = time.perf_counter() if started is None else started
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C) uint8, got {images.dtype} {images.shape}")
    final = Path(set_dir) / shard_name(index)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    final.parent.mkdir(parents=True, exist_ok=True)      # a worker on another node: the set's first file there
    ext = "png" if image_format == "png" else "npy"
    with open(tmp, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, (image, label) in enumerate(zip(images, labels)):
                key = sample_key(first_id + offset)
                _add_member(tar, f"{key}.{ext}", encode_image(image, image_format))
                _add_member(tar, f"{key}.cls", str(int(label)).encode())
        raw.flush()
        os.fsync(raw.fileno())
    digest, size = file_sha256_and_size(tmp)
    os.replace(tmp, final)
    remote.published(final)                  # on an object store: the whole object, before anyone records it
    return ShardRecord(index=index, first_id=first_id, count=len(labels), bytes=size, sha256=digest,
                       seconds=time.perf_counter() - started, worker=worker_name())


def file_sha256_and_size(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


_INTACT: dict[tuple, tuple] = {}     # (path, size, sha256) -> the file's stat when this process last hashed it intact


def file_stat(path: Path) -> tuple:
    """What identifies a file's present contents cheaply: inode, size, mtime, ctime (FileNotFoundError if gone)."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def known_intact(path: Path, size: int, sha256: str, stat: tuple) -> bool:
    """True if the file was hashed intact before and has not changed since: in this process (same stat), or in
    an earlier one (the persistent cache's (path, size, mtime, inode))."""
    if _INTACT.get((str(path), size, sha256)) == stat:
        return True
    ino, actual, mtime_ns = stat[:3]
    return actual == size and checksum_cache().lookup(path, _StatView(actual, mtime_ns, ino)) == sha256


def mark_intact(path: Path, size: int, sha256: str, stat: tuple, stat_taken_ns: int | None = None) -> None:
    """Record that the file, as it was at `stat` (taken at `stat_taken_ns`, before it was read), hashed to its
    record. Without the time the persistent cache is left alone (a hash right after a write is not trusted)."""
    _INTACT[(str(path), size, sha256)] = stat
    if stat_taken_ns is not None:
        ino, actual, mtime_ns = stat[:3]
        checksum_cache().record(path, _StatView(actual, mtime_ns, ino), sha256, stat_taken_ns)


class _StatView:
    """The fields of an os.stat_result the checksum cache compares."""

    def __init__(self, size: int, mtime_ns: int, ino: int):
        self.st_size, self.st_mtime_ns, self.st_ino = size, mtime_ns, ino


def file_problem(path: Path, size: int, sha256: str, rehash: bool = False) -> str | None:
    """What is wrong with a stored file against its record (existence, size, sha256), or None when it is intact.

    A file found intact before is not hashed again while its stat is unchanged (see known_intact: a writer checks
    its set when it opens it and again under the lock, a rerun in a new process trusts the persistent cache);
    `rehash` always hashes (verify), and forgets the cached digest of a file it finds damaged."""
    if not isinstance(size, int) or not isinstance(sha256, str):
        return "not validly recorded"
    if remote.mirror_of(path) is not None:   # on an object store the object is the file; the mirror only a cache
        return remote_checks.object_problem(path, size, sha256, rehash)
    taken = time.time_ns()
    try:
        seen = file_stat(path)
    except FileNotFoundError:
        return "deleted"
    if not rehash and known_intact(path, size, sha256, seen):
        return None
    problem = _hashed_problem(path, size, sha256)
    if problem is None:
        mark_intact(path, size, sha256, seen, taken)
    else:
        _INTACT.pop((str(path), size, sha256), None)
        checksum_cache().forget(path)
    return problem


def _hashed_problem(path: Path, size: int, sha256: str) -> str | None:
    digest, actual = file_sha256_and_size(path)
    if actual < size:
        return f"truncated ({actual} of {size} bytes)"
    if actual != size:
        return f"wrong size ({actual}, expected {size} bytes)"
    if digest != sha256:
        return "corrupted (sha256 differs)"
    return None


class ShardBuffer:
    """A reusable read buffer: first writes into fresh memory are slow on this VM, reused memory is fast."""

    def __init__(self) -> None:
        self._buf = bytearray(0)

    def read(self, path: Path, expected_bytes: int) -> memoryview:
        if len(self._buf) < expected_bytes:
            self._buf = bytearray(int(expected_bytes * 1.25) + BLOCK)
        view = memoryview(self._buf)[:expected_bytes]
        with open(path, "rb", buffering=0) as f:
            got = f.readinto(view)
            extra = f.read(1)
        if got != expected_bytes or extra:
            actual = os.path.getsize(path)
            raise IntegrityError(f"{path}: {actual} bytes on disk, manifest says {expected_bytes} (truncated or "
                                 f"overwritten); run `dra-pipe verify` and regenerate the shard")
        return view


def iter_members(data: memoryview, path: Path, check_headers: bool = True):
    """Yield (name, payload memoryview) for each regular member of a tar held in memory.

    check_headers=False skips the per-header checksum when the whole file's sha256 was already verified.
    """
    offset, end = 0, len(data)
    while offset + BLOCK <= end:
        header = bytes(data[offset:offset + 512])
        if header[0] == 0 and header == _ZERO_BLOCK:
            return
        if check_headers and _header_checksum(header) != _octal(header[148:156]):
            raise IntegrityError(f"{path}: corrupt tar header at byte {offset}")
        name = header[0:100].split(b"\0", 1)[0].decode()
        if header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        start = offset + BLOCK
        if start + size > end:
            raise IntegrityError(f"{path}: truncated tar member {name}")
        if header[156] in (48, 0):          # b"0" or NUL: a regular file
            yield name, data[start:start + size]
        offset = start + (size + BLOCK - 1) // BLOCK * BLOCK
    raise IntegrityError(f"{path}: tar ends without its end-of-archive blocks (truncated)")


_ZERO_BLOCK = bytes(BLOCK)


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:])


_NPY_HEADERS: dict[bytes, tuple[int, np.dtype, tuple]] = {}


def decode_image(payload: memoryview, ext: str) -> np.ndarray:
    """PNG or .npy bytes -> (H, W, C) uint8."""
    if ext == "npy":
        return _decode_npy(payload)
    with Image.open(io.BytesIO(payload)) as pil:
        array = np.asarray(pil)
    return array[:, :, None] if array.ndim == 2 else array


def _decode_npy(payload: memoryview) -> np.ndarray:
    header_len = 10 + int.from_bytes(payload[8:10], "little")   # format 1.0: magic(6) ver(2) len(2)
    header = bytes(payload[:header_len])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        shape, fortran, dtype = read_npy_header(io.BytesIO(header))
        if fortran:
            raise IntegrityError("npy image stored in Fortran order; shards hold C-order arrays")
        parsed = _NPY_HEADERS.setdefault(header, (header_len, dtype, shape))
    start, dtype, shape = parsed
    return np.frombuffer(payload[start:], dtype=dtype).reshape(shape)


def read_npy_header(stream) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream positioned at its start; leaves it at the data."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)
