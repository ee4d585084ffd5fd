"""The workspace root: where every store lives."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from stores.errors import UserError


def check_writable(root: Path, what: str = "workspace root", flag: str = "--root") -> None:
    """Refuse, before anything is written, a root that cannot be created or written."""
    root = Path(root)
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {root} is not writable ({existing} is a file, not a folder); pass {flag} DIR")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {root} is not writable (no write permission on {existing}); pass {flag} DIR")
    try:                                       # root bypasses permission bits; /proc, /sys, read-only mounts do not
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"{what} {root} is not writable ({existing}: {exc.strerror}); pass {flag} DIR") from None
