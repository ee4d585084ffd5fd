"""What every command shares: the --config and --root options, the console, resolving the configuration."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.config import Config, load_config
from pipeline.console import console, interrupt_reported, report_interrupt  # noqa: F401  (console: for the commands)
from stores.errors import UserError
from stores.objectstore import is_url
from stores.remote import attach

ConfigOpt = typer.Option(Path("pipeline.yaml"), "--config", "-c", help="pipeline.yaml to read "
                                                                       "(defaults apply if ./pipeline.yaml is absent)")
def given(text: str) -> str:
    """Option parser: an explicit empty value is refused, never read as "the default" (`--name ''`)."""
    if not text.strip():
        raise typer.BadParameter("is empty; give a value, or leave the option out for the default")
    return text


def given_path(text: str) -> Path:
    return Path(given(text))


def given_root(text: str) -> Path | str:
    """A folder, or an object-store URL kept as text (Path would fold s3:// into s3:/)."""
    return text if is_url(given(text)) else Path(text)


RootOpt = typer.Option(None, "--root", parser=given_root, help="workspace root, a folder or s3://BUCKET/PREFIX "
                       "(gs:// too); overrides `root:` of the config")
WaitOpt = typer.Option(False, "--wait", help="if another process is writing the same output, wait until it finishes "
                       "(default: refuse, naming its host and pid)")


def resolve(config: Path, root: Optional[Path], overrides: dict[str, Any] | None = None) -> Config:
    over = dict(overrides or {})
    if root is not None:
        over["root"] = str(root)
    cfg = load_config(config, over)
    if is_url(cfg.root):                         # work through this node's mirror of the bucket (stores.remote)
        cfg["root"] = str(attach(cfg.root, cfg.store.cache_dir, cfg.store.cache_gb, cfg.store.lease_seconds))
        return cfg
    cfg["root"] = str(Path(cfg.root).expanduser().resolve())   # Ray workers run elsewhere: absolute paths only
    if Path(cfg.root).exists() and not Path(cfg.root).is_dir():
        raise UserError(f"workspace root {cfg.root} is a file, not a folder; pass --root DIR "
                        "(or set root: in the config)")
    return cfg


@contextmanager
def exit_once_reported():
    """A Ctrl-C the library has reported (pipeline.console.report_interrupt) ends the command with status 130 and
    no second line; one it has not reported goes on to main(), which says what is kept."""
    try:
        yield
    except KeyboardInterrupt:
        if interrupt_reported():
            raise typer.Exit(130) from None
        raise
