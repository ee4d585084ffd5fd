"""Run shard jobs on Ray actors: a driver-owned plan, one model per actor, overlap, retries, replacement.

The driver hands shard jobs (contiguous id ranges) to actors and calls `record` for each result as it
arrives, in the driver process, so the driver alone writes the manifest. Each actor builds its worker
once (the model loads once per actor) and takes `in_flight` jobs at a time: while shard k is being
encoded and written, shard k + 1 already computes (a lock lets one job at a time into the model). A dead
actor is replaced and its shards requeued; a shard that fails `max_attempts` times stops the job with its
index and error.

A worker factory is a picklable callable (a class, or a functools.partial of one) that each actor calls
once; the worker it returns has
    compute(job, progress) -> intermediate   the model-bound part; progress(n) after every n items
    finish(job, intermediate) -> result      encode and write; returns what the driver records

Ray core actors rather than Ray Data: Ray Data's writers name files with fresh UUIDs (reruns duplicate
data) and can hang when actors hold every CPU of a small machine (DESIGN.md).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.shards.actor import ShardActor, ShardWorker
from pipeline.shards.cluster import ActorPlan, remote_env
from stores.manifest import ShardJob

START_WAIT_S = 600.0      # how long workers may wait for the cluster's resources before the stage gives up


class ShardFailed(RuntimeError):
    """A shard failed on every attempt; the job stopped."""

    def __init__(self, index: int, attempts: int, error: str):
        super().__init__(f"shard {index} failed {attempts} time(s); last error: {error}")
        self.index, self.attempts, self.error = index, attempts, error


class WorkerStartError(RuntimeError):
    """A worker could not be built (the factory raised in its actor)."""


# --- the driver -------------------------------------------------------------------------------------------

@dataclass
class WorkerState:
    name: str                 # w0, w1, ... (a replacement keeps its slot's name)
    node: str = ""            # Ray node id
    pid: int = 0
    shard: int | None = None  # shard being computed, if any
    done: int = 0             # items of that shard computed so far
    count: int = 0
    rate: float = 0.0         # items/s of this actor since its first job
    shards: int = 0           # shards this slot finished

    def describe(self) -> str:
        where = f"shard {self.shard} {self.done}/{self.count}" if self.shard is not None else "writing/idle"
        return f"{self.name}: {where} {self.rate:,.0f}/s"


@dataclass
class Progress:
    shards_done: int
    shards_total: int
    items_done: int           # recorded items plus items computed but not yet recorded
    items_total: int
    workers: list[WorkerState]


@dataclass
class RunSummary:
    shards: int = 0
    items: int = 0
    seconds: float = 0.0           # first dispatch to last record
    startup_seconds: float = 0.0   # actors created and workers built
    busy_fraction: float = 0.0     # share of `seconds` the actors spent computing (overlap check)
    retries: int = 0
    replaced: int = 0
    shards_per_node: dict[str, int] = field(default_factory=dict)
    items_per_worker: dict[str, int] = field(default_factory=dict)   # w0, w1, ...: items each slot computed


class _Slot:
    """One actor handle and what the driver knows of it."""

    def __init__(self, name: str, handle, in_flight: int):
        self.name, self.handle, self.in_flight = name, handle, in_flight
        self.running = 0
        self.recorded = 0          # items recorded from this actor
        self.state: dict = {}
        self.ready = True          # a replacement: False until its worker is built (its node may be gone)

    @property
    def free(self) -> bool:
        return self.ready and self.running < self.in_flight


class _Driver:
    def __init__(self, factory, plan: ActorPlan, max_attempts: int, record, on_progress, on_event,
                 in_flight: int, poll_seconds: float):
        self.factory, self.plan, self.max_attempts = factory, plan, max_attempts
        self.record, self.on_progress, self.on_event = record, on_progress, on_event or (lambda message: None)
        self.in_flight, self.poll_seconds = in_flight, poll_seconds
        self.actor_cls = ray.remote(max_concurrency=in_flight, concurrency_groups={"status": 1})(ShardActor).options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, scheduling_strategy="SPREAD", max_restarts=0,
            **remote_env())
        self.slots: list[_Slot] = []
        self.running: dict = {}          # object ref -> (slot, job)
        self.status_refs: dict = {}      # object ref -> slot
        self.attempts: dict[int, int] = {}
        self.summary = RunSummary()
        self.finished: dict[str, int] = {}   # shards finished per slot name
        self.last_poll = 0.0

    # -- actors ---------------------------------------------------------------------------------------------
    def _new_slot(self, name: str) -> _Slot:
        handle = self.actor_cls.remote(self.factory, self.plan.threads)
        return _Slot(name, handle, self.in_flight)

    def start(self, patience: float = 60.0, max_wait: float = START_WAIT_S) -> None:
        """Create the actors and build their workers; say so while the cluster keeps them waiting, and give up
        after `max_wait` seconds (other jobs may hold the resources for ever)."""
        started = time.perf_counter()
        self.slots = [self._new_slot(f"w{i}") for i in range(self.plan.actors)]
        waiting = {slot.handle.setup.remote(): slot for slot in self.slots}
        while waiting:
            if time.perf_counter() - started > max_wait:
                raise WorkerStartError(f"{len(waiting)} of {self.plan.describe()} did not start within "
                                       f"{max_wait:.0f} s: the cluster's CPUs/GPUs are held by other jobs "
                                       "(`ray status`); pass a smaller --workers or free the cluster")
            left = max_wait - (time.perf_counter() - started)
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=max(0.1, min(patience, left)))
            if not ready:
                self.on_event(f"still waiting for {len(waiting)} worker(s) to start ({self.plan.describe()}): "
                              f"are the cluster's CPUs/GPUs taken by other jobs? (`ray status`)")
            for ref in ready:
                slot = waiting.pop(ref)
                try:
                    slot.state = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise WorkerStartError(f"worker {slot.name} could not start: {error_text(exc)}") from None
        self.summary.startup_seconds = time.perf_counter() - started

    def _replace(self, slot: _Slot, error: str) -> None:
        if slot not in self.slots:
            return                                     # already replaced (its other job reported first)
        ray.kill(slot.handle, no_restart=True)
        fresh = self._new_slot(slot.name)
        fresh.ready = False                            # no jobs until it runs: with its node lost it never may,
        self.slots[self.slots.index(slot)] = fresh     # and the other workers finish the queue
        self.status_refs[fresh.handle.setup.remote()] = fresh
        self.summary.replaced += 1
        self.on_event(f"worker {slot.name} died ({error}); started a replacement")

    def stop(self) -> None:
        for slot in self.slots:
            ray.kill(slot.handle, no_restart=True)

    # -- jobs -----------------------------------------------------------------------------------------------
    def run(self, jobs: Sequence[ShardJob]) -> RunSummary:
        queue = deque(sorted(jobs, key=lambda j: j.index))
        total_shards, total_items = len(queue), sum(j.count for j in queue)
        started = time.perf_counter()
        while queue or self.running:
            self._dispatch(queue)
            if not self.running:
                self._wait_for_a_worker()
                continue
            if not all(s.ready for s in self.slots):
                self._poll_status()                    # a replacement becomes ready when its worker is built
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=self.poll_seconds)
            for ref in ready:
                self._collect(ref, queue)
            self._report(total_shards, total_items)
        self.summary.seconds = time.perf_counter() - started
        self._finish_summary()
        return self.summary

    def _dispatch(self, queue: deque) -> None:
        while queue and any(s.free for s in self.slots):
            for slot in self.slots:
                if queue and slot.free:
                    job = queue.popleft()
                    self.running[slot.handle.run.remote(job)] = (slot, job)
                    slot.running += 1

    def _collect(self, ref, queue: deque) -> None:
        slot, job = self.running.pop(ref)
        slot.running -= 1
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._replace(slot, error_text(exc))
            self._retry(job, queue, f"worker died: {error_text(exc)}")
            return
        except ray.exceptions.RayError as exc:
            self._retry(job, queue, error_text(exc))
            return
        self.record(job, result)
        slot.recorded += job.count
        self.summary.shards += 1
        self.summary.items += job.count
        self.finished[slot.name] = self.finished.get(slot.name, 0) + 1
        self.summary.items_per_worker[slot.name] = self.summary.items_per_worker.get(slot.name, 0) + job.count
        node = slot.state.get("node", "?")
        self.summary.shards_per_node[node] = self.summary.shards_per_node.get(node, 0) + 1

    def _wait_for_a_worker(self, max_wait: float = START_WAIT_S) -> None:
        """Every worker died and none of their replacements runs yet (their nodes lost?): wait for one."""
        started = time.perf_counter()
        while not any(s.ready for s in self.slots):
            if time.perf_counter() - started > max_wait:
                raise WorkerStartError(f"every worker died and no replacement started within {max_wait:.0f} s "
                                       "(nodes lost? `ray status`)")
            self._poll_status()
            time.sleep(self.poll_seconds)

    def _retry(self, job: ShardJob, queue: deque, error: str) -> None:
        tries = self.attempts[job.index] = self.attempts.get(job.index, 0) + 1
        if tries >= self.max_attempts:
            raise ShardFailed(job.index, tries, error)
        self.summary.retries += 1
        self.on_event(f"shard {job.index} failed ({error}); retrying, attempt {tries + 1} of {self.max_attempts}")
        queue.appendleft(job)

    # -- progress -------------------------------------------------------------------------------------------
    def _report(self, total_shards: int, total_items: int) -> None:
        if self.on_progress is None or time.perf_counter() - self.last_poll < self.poll_seconds:
            return
        self.last_poll = time.perf_counter()
        self._poll_status()
        in_progress = sum(max(0, s.state.get("computed", 0) - s.recorded) for s in self.slots)
        self.on_progress(Progress(self.summary.shards, total_shards, min(self.summary.items + in_progress, total_items),
                                  total_items, [self._worker_state(s) for s in self.slots]))

    def _poll_status(self) -> None:
        if self.status_refs:
            ready, _ = ray.wait(list(self.status_refs), num_returns=len(self.status_refs), timeout=0)
            for ref in ready:
                slot = self.status_refs.pop(ref)
                try:
                    slot.state = ray.get(ref)
                    slot.ready = True
                except ray.exceptions.RayError:
                    pass                               # a dead actor: its jobs report the death
        asked = set(self.status_refs.values())
        for slot in self.slots:
            if slot not in asked:
                self.status_refs[slot.handle.status.remote()] = slot

    def _worker_state(self, slot: _Slot) -> WorkerState:
        s = slot.state
        since = s.get("since")
        rate = s.get("computed", 0) / max(time.time() - since, 1e-9) if since else 0.0
        return WorkerState(slot.name, s.get("node", ""), s.get("pid", 0), s.get("shard"), s.get("done", 0),
                           s.get("count", 0), rate, self.finished.get(slot.name, 0))

    def _finish_summary(self) -> None:
        states = []
        for slot in self.slots:
            try:
                states.append(ray.get(slot.handle.status.remote(), timeout=10))
            except ray.exceptions.RayError:
                pass
        busy = sum(s["busy"] for s in states)
        self.summary.busy_fraction = busy / max(self.summary.seconds * max(len(states), 1), 1e-9)


def run_shards(jobs: Sequence[ShardJob], factory: Callable[[], ShardWorker], plan: ActorPlan, *,
               max_attempts: int, record: Callable[[ShardJob, Any], None],
               on_progress: Callable[[Progress], None] | None = None,
               on_event: Callable[[str], None] | None = None,
               in_flight: int = 2, poll_seconds: float = 0.5, start_wait: float = START_WAIT_S) -> RunSummary:
    """Run every job on `plan.actors` actors of the connected Ray instance; record(job, result) per finished shard.

    Raises ShardFailed when a shard fails `max_attempts` times (an actor dying during a shard counts as
    a failure of the shards it held), WorkerStartError when the factory fails or the actors cannot start
    within `start_wait` seconds, and passes
    KeyboardInterrupt on. Actors are always killed at the end; recorded shards stay recorded.
    """
    if not jobs:
        return RunSummary()
    if max_attempts < 1 or in_flight < 1:
        raise ValueError("max_attempts and in_flight must be at least 1")
    driver = _Driver(factory, plan, max_attempts, record, on_progress, on_event, in_flight, poll_seconds)
    try:
        driver.start(max_wait=start_wait)
        return driver.run(jobs)
    finally:
        driver.stop()


def error_text(exc: BaseException) -> str:
    """One line for an error from a Ray task or actor: the original exception where Ray kept it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".splitlines()[0][:300]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
