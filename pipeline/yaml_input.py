"""Reading YAML a user hands us without trusting its size or shape: bounded reads, no aliases, bounded nesting,
bounded reprs in messages."""
from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from stores.errors import UserError


def _bounded_repr() -> reprlib.Repr:
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxstring, bounded.maxother, bounded.maxlong = 2, 60, 60, 40
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 6
    return bounded


_BRIEF = _bounded_repr()


def brief(value: Any) -> str:
    """A bounded repr for messages: a value from a file or a flag can be arbitrarily large (or deep)."""
    return _BRIEF.repr(value)


MAX_DEPTH = 16                 # nesting levels a pipeline.yaml may have (it needs 3)


def check_yaml_shape(text: str, where: str) -> None:
    """Refuse aliases and deep nesting before PyYAML builds anything: an alias bomb of a few hundred bytes expands
    to gigabytes, and PyYAML composes nested collections recursively (thousands of `[` overflow the stack)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise UserError(f"{where}: YAML aliases (*{brief(event.anchor)[1:-1]}) are not accepted; "
                            "write the value out")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep; a pipeline.yaml has 3")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


MAX_CONFIG_BYTES = 1 << 20


def read_config_text(path: Path) -> str:
    """The file's text; a device, a FIFO or a file over 1 MiB (/dev/zero, a data file) is refused, not read forever."""
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; pass --config with a pipeline.yaml file")
    if not path.is_file():
        raise UserError(f"config file {path} is not a regular file; pass --config with a pipeline.yaml file")
    with path.open("rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} is over {MAX_CONFIG_BYTES >> 20} MiB, not a pipeline.yaml; "
                        "pass --config with the right file")
    return raw.decode("utf-8")
