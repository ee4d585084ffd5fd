"""The workspace root: where every store lives."""
from __future__ import annotations

import os
from pathlib import Path

from stores.errors import UserError


def check_writable(root: Path) -> None:
    """Refuse, before anything is written, a root that cannot be created or written."""
    root = Path(root)
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"workspace root {root} is not writable ({existing} is a file, not a folder); pass --root DIR")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"workspace root {root} is not writable (no write permission on {existing}); pass --root DIR")
