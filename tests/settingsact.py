"""Shared by tests/pipeline/test_settings_act*.py: every recipe setting proven to act (issue 22).

A table row names a non-default value of one key (`Change`); the test runs the smallest real computation of the
key's section twice, with the base settings and with only that key changed, and compares the results part by
part, exactly. `shards_in_process` runs stage 1's shard jobs in this process, so generate and extract-features
go the pipeline's whole way (configuration -> settings -> worker -> stores) in a fraction of a second.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.config import SCHEMA
from pipeline.shards import cluster, progress
from pipeline.shards.runner import RunSummary


@dataclass(frozen=True)
class Change:
    """A non-default value and how to compare it: `context` holds other keys set in both runs (where the key acts
    only with them), `also` keys the changed run needs besides (e.g. feature sets made for its crop pad), `moves`
    parts of the result it must change (None: the section's default), `same` parts it must leave exactly as they
    are, `run` the harness's model (eval)."""

    value: Any
    context: dict = field(default_factory=dict)
    also: dict = field(default_factory=dict)
    moves: tuple | None = None
    same: tuple = ()
    run: str | None = None


def rows(table: dict) -> list:
    """pytest params (key, Change) of a table of non-default values: a value, a Change, or a list of them (a list
    value itself is given as a Change)."""
    out = []
    for key, entry in table.items():
        for change in entry if isinstance(entry, list) else [entry]:
            change = change if isinstance(change, Change) else Change(change)
            out.append(pytest.param(key, change, id=f"{key}={change.value}"))
    return out


def check_tables(sections: tuple, base: dict, **tables: dict) -> None:
    """Every key of the sections is in exactly one table, every row names a schema key, and each non-default
    value differs from the value the base (with the row's context) runs with."""
    keys = {f"{s}.{k}" for s in sections for k in SCHEMA[s]}
    for key in sorted(keys):
        homes = [name for name, table in tables.items() if key in table]
        assert len(homes) == 1, f"{key} is in {homes or 'no table'}: say how it acts, or why it cannot be compared"
    for name, table in tables.items():
        assert set(table) <= keys, f"{name} names keys the schema lacks: {sorted(set(table) - keys)}"
    for param in rows(tables["NON_DEFAULT"]):
        key, change = param.values
        section, name = key.split(".")
        before = {**base, **change.context}.get(key, SCHEMA[section][name].default)
        assert change.value != before, f"{key}: {change.value!r} is the base's own value"


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested results: tensors and arrays by dtype, shape and every element."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype \
            and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def differing(a: dict, b: dict) -> set[str]:
    """The parts of two results that differ."""
    return {k for k in a.keys() | b.keys() if k not in a or k not in b or not same(a[k], b[k])}


def assert_acts(key: str, change: Change, base: dict, changed: dict, moves: tuple = ()) -> None:
    """`changed` differs from `base` at least in the parts the change moves (default: `moves`), not in its `same`."""
    moved = differing(base, changed)
    assert moved, f"{key}: {change.value!r} gives exactly the base's result (is the key ignored?)"
    still = set(change.moves if change.moves is not None else moves) - moved
    assert not still, f"{key}: {change.value!r} leaves {sorted(still)} as they are (moved only {sorted(moved)})"
    kept = set(change.same) & moved
    assert not kept, f"{key}: {change.value!r} must leave {sorted(kept)} as they are"


@contextlib.contextmanager
def recording(module, name: str, into: list) -> Iterator[list]:
    """Call-through spy on module.name (an attack): every tensor it returns is appended to `into`."""
    real = getattr(module, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        into.append(out.detach().cpu().clone())
        return out
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, spy)
        yield into


def _run_here(jobs, factory, plan, *, record, **_) -> RunSummary:
    worker = factory()
    for job in jobs:
        record(job, worker.finish(job, worker.compute(job, lambda items: None)))
    return RunSummary(shards=len(jobs), items=sum(j.count for j in jobs), seconds=1e-3)


@contextlib.contextmanager
def shards_in_process() -> Iterator[None]:
    """Stage 1's Ray shard runner replaced by a loop here: the stage's own worker factory, compute and finish."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(progress, "run_shards", _run_here)
        patch.setattr(cluster, "ray_session", lambda address, num_cpus: contextlib.nullcontext())
        patch.setattr(cluster, "cluster_nodes", lambda: [{"CPU": 2}])
        yield
