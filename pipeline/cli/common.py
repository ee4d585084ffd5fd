"""What every command shares: the --config and --root options, the consoles, resolving the configuration."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from pipeline.config import Config, load_config
from stores.errors import StoppedWaiting, UserError

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

ConfigOpt = typer.Option(Path("pipeline.yaml"), "--config", "-c", help="pipeline.yaml to read (defaults apply if ./pipeline.yaml is absent)")
RootOpt = typer.Option(None, "--root", help="workspace root; overrides `root:` of the config")
WaitOpt = typer.Option(False, "--wait", help="if another process is writing the same output, wait until it finishes "
                       "(default: refuse, naming its host and pid)")


def resolve(config: Path, root: Optional[Path], overrides: dict[str, Any] | None = None) -> Config:
    over = dict(overrides or {})
    if root is not None:
        over["root"] = str(root)
    cfg = load_config(config, over)
    cfg["root"] = str(Path(cfg.root).expanduser().resolve())   # Ray workers run elsewhere: absolute paths only
    if Path(cfg.root).exists() and not Path(cfg.root).is_dir():
        raise UserError(f"workspace root {cfg.root} is a file, not a folder; pass --root DIR (or set root: in the config)")
    return cfg


_interrupt_reported = False


def report_interrupt(detail: str) -> None:
    """Ctrl-C: one line on stderr saying what is kept and how to resume (main() then adds no line of its own)."""
    global _interrupt_reported
    waiting = stopped_waiting(sys.exc_info()[1])
    print(f"interrupted: {waiting or detail}", file=sys.stderr)
    _interrupt_reported = True


def interrupted(detail: str) -> typer.Exit:
    """report_interrupt, then raise the Exit(130) this returns."""
    report_interrupt(detail)
    return typer.Exit(130)


def stopped_waiting(exc: BaseException | None) -> str | None:
    """The message of a StoppedWaiting behind `exc` (itself, or what click's Abort was raised from), else None."""
    while exc is not None:
        if isinstance(exc, StoppedWaiting):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def interrupt_reported() -> bool:
    return _interrupt_reported


def check_output_file(path: Path, flag: str = "--out") -> None:
    """Before any work: the file an --out names must be writable (its folder exists and takes a new file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; pass {flag} FILE")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; pass {flag} in an existing folder")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}; pass {flag} in a writable folder") from None


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
