"""Model fingerprint: a sha256 that identifies a network's architecture and exact weights."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import PurePath

import torch
from torch import nn


def _plain(value):
    """JSON-ready copy of a config value (tuples as lists, numpy scalars as numbers, non-finite floats as strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _plain(value.item())
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"config value {value!r} of type {type(value).__name__} has no canonical JSON form")


def architecture_config(model: nn.Module) -> dict:
    """Class name and constructor keywords (the model's `config` mapping, if any)."""
    config = getattr(model, "config", None)
    return {"class": type(model).__name__, "config": _plain(config) if isinstance(config, Mapping) else {}}


def canonical_json(obj) -> str:
    """Sorted keys, no whitespace, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 hex over the architecture config and every state-dict tensor (sorted names, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(canonical_json(architecture_config(model)).encode() + b"\n")
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        header = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                  "nbytes": t.numel() * t.element_size()}
        h.update(canonical_json(header).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy
    return h.hexdigest()
