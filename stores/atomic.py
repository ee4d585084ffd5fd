"""Files replaced whole: written under a temporary sibling, flushed to disk, renamed over the old one. A reader
sees the old file or the new one; a writer that dies leaves only the temporary (removed by the next writer that
takes the folder's lock, stores.locks)."""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from stores import remote


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` fills the temporary; on any failure (a full disk: OSError ENOSPC) it is removed and the error
    raised as it came."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        remote.published(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def torch_save_atomically(obj, path: Path) -> None:
    """torch.save into memory first: its own writer reports a failed write (a full disk) as a RuntimeError about
    a file position, where Python's file writes raise the OSError that says what happened."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    replace_atomically(path, lambda f: f.write(buffer.getbuffer()))
