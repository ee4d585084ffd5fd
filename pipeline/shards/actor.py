"""The Ray actor that holds one shard worker (one model per actor) and runs its jobs."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import ray

from stores.manifest import ShardJob


class ShardWorker(Protocol):
    def compute(self, job: ShardJob, progress: Callable[[int], None]) -> Any: ...

    def finish(self, job: ShardJob, intermediate: Any) -> Any: ...


class ShardActor:
    """Holds one worker; runs up to `in_flight` jobs at once, one at a time inside compute.

    Its state counts `computed` items: those of successful or running computes whose finish has not
    failed, so that computed - (items the driver recorded from this actor) = work in progress.
    """

    def __init__(self, factory: Callable[[], ShardWorker], threads: int):
        self._factory, self._threads = factory, threads
        self._worker: ShardWorker | None = None
        self._lock = threading.Lock()
        self._state = {"pid": os.getpid(), "node": _node_id(), "shard": None, "done": 0, "count": 0,
                       "computed": 0, "busy": 0.0, "since": None}

    def setup(self) -> dict:
        with self._lock:
            self._ensure_worker()
        return dict(self._state)

    @ray.method(concurrency_group="status")
    def status(self) -> dict:
        """Answers while both job threads are busy (its own concurrency group)."""
        return dict(self._state)

    def run(self, job: ShardJob) -> Any:
        with self._lock:
            self._ensure_worker()
            intermediate = self._compute(job)
        try:
            return self._worker.finish(job, intermediate)
        except BaseException:
            self._state["computed"] -= job.count
            raise

    def _compute(self, job: ShardJob) -> Any:
        s = self._state
        started = time.perf_counter()
        s["since"] = s["since"] or time.time()
        s.update(shard=job.index, done=0, count=job.count)
        try:
            intermediate = self._worker.compute(job, self._progress)
        except BaseException:
            s["computed"] -= s["done"]                 # lost: the shard will be redone
            raise
        finally:
            s["shard"] = None
            s["busy"] += time.perf_counter() - started
        s["computed"] += job.count - s["done"]         # the whole shard, however often progress was called
        return intermediate

    def _progress(self, n: int) -> None:
        self._state["done"] += n
        self._state["computed"] += n

    def _ensure_worker(self) -> None:
        if self._worker is None:
            _set_threads(self._threads)
            self._worker = self._factory()


def _set_threads(threads: int) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def _node_id() -> str:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:           # outside Ray (the class used directly)
        return "local"
