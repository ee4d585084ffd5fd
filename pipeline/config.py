"""pipeline.yaml: the schema, its validation, and flag overrides.

Every key is declared once in SCHEMA (pipeline.schema) with its type, default, bounds and a one-line help.
Loading rejects unknown keys, wrong types and out-of-range values with one line naming the key and the file.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from pipeline.schema import (  # noqa: F401  (re-exported: the schema is part of the config's interface)
    ANALYZE_MEASURES,
    DEFAULT_CONFIG_NAME,
    MAX_COUNT,
    MAX_SEED,
    RUN_STAGES,
    SCHEMA,
    Key,
)
from pipeline.yaml_input import brief, check_yaml_shape, read_config_text
from stores.errors import UserError


class Config(dict):
    """Resolved configuration: a nested dict with attribute access (cfg.train.batch_size)."""

    _origin: str = "<defaults>"   # the file it was read from (keys never start with "_")

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _wrap(d: dict, source: str) -> Config:
    out = Config({k: _wrap(v, source) if isinstance(v, dict) else v for k, v in d.items()})
    out._origin = source
    return out


def defaults() -> dict:
    """The full default configuration as plain nested dicts."""
    def walk(schema):
        return {k: walk(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()}
    return walk(SCHEMA)


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "integer", float: "number", str: "string", bool: "true/false", list: "list"}[k]
                       for k in kinds)


def check_value(dotted: str, key: Key, value: Any, where: str) -> Any:
    """Validate (and normalise int->float) one value; raise UserError naming the key and file."""
    prefix = f"{where}: key '{dotted}'"
    if value is None:
        if key.nullable:
            return None
        raise UserError(f"{prefix} must not be null (expected {_type_name(key.kind)})")
    kinds = key.kind if isinstance(key.kind, tuple) else (key.kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise UserError(f"{prefix} must be {_type_name(key.kind)}, got {brief(value)}")
    if not isinstance(value, kinds):
        raise UserError(f"{prefix} must be {_type_name(key.kind)}, got {brief(value)}")
    if isinstance(value, str) and not value.strip():
        raise UserError(f"{prefix} is empty; give a value, or leave it out (null) for the default")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{prefix} must be finite, got {brief(value)}")
    if key.choices is not None and isinstance(value, int) and str(value) in key.choices:
        value = str(value)          # `pool: 2` in YAML means the choice "2"
    if key.choices is not None and value not in key.choices:
        raise UserError(f"{prefix} must be one of {', '.join(map(str, key.choices))}; got {brief(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if key.min is not None and value < key.min:
            raise UserError(f"{prefix} must be >= {key.min}, got {brief(value)}")
        if key.max is not None and (value >= key.max if key.below_max else value > key.max):
            bound = f"< {key.max}" if key.below_max else f"<= {key.max}"
            raise UserError(f"{prefix} must be {bound}, got {brief(value)}")
    if isinstance(value, list) and len(value) < key.min_items:
        raise UserError(f"{prefix} needs at least {key.min_items} item(s), got {brief(value)}")
    if isinstance(value, list) and key.item is not None:
        for v in value:
            if isinstance(v, bool) or not isinstance(v, key.item):
                raise UserError(f"{prefix} must be a list of {_type_name(key.item)}, got {brief(value)}")
            if key.item_choices is not None and v not in key.item_choices:
                raise UserError(f"{prefix}: {brief(v)} is not one of {', '.join(key.item_choices)}")
            if key.min is not None and isinstance(v, (int, float)) and v < key.min:
                raise UserError(f"{prefix} items must be >= {key.min}, got {brief(value)}")
            if key.max is not None and isinstance(v, (int, float)) and v > key.max:
                raise UserError(f"{prefix} items must be <= {key.max}, got {brief(value)}")
    return value


def _validate(schema: dict, data: Any, where: str, path: str = "") -> dict:
    if not isinstance(data, dict):
        raise UserError(f"{where}: section '{path or '<top level>'}' must be a mapping, got {brief(data)}")
    out = {}
    for name, value in data.items():
        dotted = f"{path}.{name}" if path else str(name)
        if name not in schema:
            valid = ", ".join(schema)
            raise UserError(f"{where}: unknown key '{dotted}' (valid here: {valid})")
        spec = schema[name]
        out[name] = (_validate(spec, value, where, dotted) if isinstance(spec, dict)
                     else check_value(dotted, spec, value, where))
    return out


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def key_spec(dotted: str) -> Key:
    node: Any = SCHEMA
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"unknown configuration key '{dotted}'")
        node = node[part]
    if isinstance(node, dict):
        raise UserError(f"'{dotted}' is a section, not a key")
    return node


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- the YAML file (if it exists or was asked for) <- flag overrides (dotted keys)."""
    resolved = defaults()
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.exists():
            if path.name != DEFAULT_CONFIG_NAME or path.parent != Path("."):
                raise UserError(f"config file {path} does not exist; pass --config with an existing pipeline.yaml")
        else:
            source = str(path)
            try:
                text = read_config_text(path)
                check_yaml_shape(text, str(path))
                data = yaml.safe_load(text) or {}
            except (OSError, UnicodeDecodeError) as exc:
                why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
                raise UserError(f"config file {path}: {why}; pass --config with a pipeline.yaml") from None
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                at = f" at line {mark.line + 1}" if mark else ""
                raise UserError(f"{path}: not valid YAML{at}; fix the syntax") from None
            _merge(resolved, _validate(SCHEMA, data, str(path)))
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        checked = check_value(dotted, key_spec(dotted), value, "command line")
        node = resolved
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = checked
    return _wrap(resolved, source)


def config_from(data: dict, where: str, root: str) -> Config:
    """The defaults <- a resolved configuration another command saved (a run's config.yaml), checked, at `root`."""
    resolved = _merge(defaults(), _validate(SCHEMA, {k: v for k, v in data.items() if k != "root"}, where))
    return _wrap({**resolved, "root": root}, where)


def to_yaml(cfg: dict) -> str:
    def plain(d):
        return {k: plain(v) if isinstance(v, dict) else v for k, v in d.items()}
    return yaml.safe_dump(plain(cfg), sort_keys=False)


def explain() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key, in schema order."""
    rows = []

    def walk(schema, prefix):
        for k, v in schema.items():
            dotted = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, dotted + ".")
            else:
                rows.append((dotted, repr(v.default), v.help))
    walk(SCHEMA, "")
    return rows


def parse_count(text: str | int) -> int:
    """'20M' -> 20_000_000, '1.5k' -> 1500, '1e6' -> 1_000_000, 50000 -> 50000. Positive integers only."""
    if isinstance(text, bool):
        raise UserError(f"invalid count {brief(text)}: use a positive integer such as 50000, 1.5k, 20M or 1e6")
    if isinstance(text, int):
        value = float(text)
    else:
        s = str(text).strip()
        scale = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6,
                 "g": 1e9, "G": 1e9, "b": 1e9, "B": 1e9}.get(s[-1:] if s else "", 1.0)
        body = s[:-1] if scale != 1.0 else s
        try:
            value = float(body) * scale
        except ValueError:
            raise UserError(f"invalid count {brief(text)}: use a positive integer "
                            "such as 50000, 1.5k, 20M or 1e6") from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise UserError(f"invalid count {brief(text)}: must be a positive whole number of samples "
                        "(e.g. 50000, 1.5k, 20M)")
    if value > MAX_COUNT:
        raise UserError(f"count {brief(text)} is over {MAX_COUNT:,.0f}, the most a set can hold "
                        "(sample ids have 10 digits)")
    return int(value)
