"""What every command prints with: the consoles, byte and shard-list formatting, the one interrupt line."""
from __future__ import annotations

import sys

from rich.console import Console

from stores.errors import StoppedWaiting
from stores.remote import as_url


class _Console(Console):
    """Prints an object-store workspace's paths as its bucket URL (what the user named), not the local cache's."""

    def print(self, *objects, **kwargs) -> None:
        super().print(*(as_url(o) if isinstance(o, str) else o for o in objects), **kwargs)


console = _Console(width=None if sys.stdout.isatty() else 160)

_interrupt_reported = False


def report_interrupt(detail: str) -> None:
    """Ctrl-C: one line on stderr saying what is kept and how to resume (main() then adds no line of its own)."""
    global _interrupt_reported
    waiting = stopped_waiting(sys.exc_info()[1])
    print(f"interrupted: {waiting or detail}", file=sys.stderr)
    _interrupt_reported = True


def stopped_waiting(exc: BaseException | None) -> str | None:
    """The message of a StoppedWaiting behind `exc` (itself, or what click's Abort was raised from), else None."""
    while exc is not None:
        if isinstance(exc, StoppedWaiting):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def interrupt_reported() -> bool:
    return _interrupt_reported


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def shard_list(indices: list[int], most: int = 20) -> str:
    """`1, 4, 7` (and `... (+N more)` past `most`)."""
    shown = ", ".join(map(str, indices[:most]))
    return shown + (f", ... (+{len(indices) - most} more)" if len(indices) > most else "")
