"""Files a user names with `--out`: what the pipeline may write there.

Only a regular file, never one of the workspace's own stored files (sets, features, models, runs: `--out` on
another run's final.pt would silently hand it this run's weights), and an existing file only with `--force`.
The write itself goes to a temporary sibling and is renamed over the target (stores.atomic), so a device node or
a FIFO at the path is refused before anything happens, not replaced.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from stores.errors import UserError

STORED = ("images", "features", "models", "runs")      # the workspace's stores: written by their stages only


def check_output_file(path: Path, root: Path | None = None, flag: str = "--out", force: bool = False,
                      default: Path | None = None) -> Path:
    """UserError unless `path` may be written; returns it. `default` is the file written when no --out is given:
    that one may be inside the workspace (a run's own eval.json) and replaced without --force."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; pass {flag} FILE")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; pass {flag} in an existing folder")
    if default is not None and _same(path, default):
        return path
    _check_kind(path, flag)
    if root is not None:
        _check_outside_stores(path, Path(root), flag)
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to replace it, or {flag} with another file")
    _check_writable_folder(path, flag)
    return path


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _check_kind(path: Path, flag: str) -> None:
    try:
        mode = os.stat(path).st_mode                     # follows links: a link to /dev/full is /dev/full
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise UserError(f"cannot write {path}: it is not a regular file (a device, a pipe or a socket); pass {flag} "
                        f"with a file path")


def _check_outside_stores(path: Path, root: Path, flag: str) -> None:
    target, base = path.resolve(), root.resolve()
    for store in STORED:
        if target.is_relative_to(base / store):
            raise UserError(f"cannot write {path}: it is inside the workspace's {store}/, whose files only their "
                            f"stages write; pass {flag} with a path outside {base / store}")


def _check_writable_folder(path: Path, flag: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}; pass {flag} in a writable folder") from None
