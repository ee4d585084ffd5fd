"""The generic Ray shard driver: overlap of compute and finish, retries, dead actors, start errors, Ctrl-C."""
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import ray

from pipeline.shards.actor import ShardActor
from pipeline.shards.cluster import ActorPlan, plan_actors
from pipeline.shards.runner import ShardFailed, WorkerStartError, run_shards
from stores.errors import UserError
from stores.manifest import ShardJob

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import the tests folder
ONE = ActorPlan(actors=1, num_cpus=1, num_gpus=0, threads=1)
TWO = ActorPlan(actors=2, num_cpus=1, num_gpus=0, threads=1)


@pytest.fixture(autouse=True)
def two_cpus(ray_local):
    """The session's shared local Ray (conftest), with its 2 CPUs."""
    assert ray.cluster_resources().get("CPU") == 2


class Sleepy:
    """compute sleeps, finish sleeps; fails or dies where told to (once, if `once` names a marker folder)."""

    def __init__(self, compute_s=0.0, finish_s=0.0, fail_on=None, die_on=None, once=None):
        self.compute_s, self.finish_s, self.fail_on, self.die_on, self.once = compute_s, finish_s, fail_on, die_on, once

    def _first_time(self, what: str, index: int) -> bool:
        if self.once is None:
            return True
        marker = Path(self.once) / f"{what}-{index}"
        if marker.exists():
            return False
        marker.touch()
        return True

    def compute(self, job, progress):
        if job.index == self.die_on and self._first_time("die", job.index):
            os.kill(os.getpid(), signal.SIGKILL)
        if job.index == self.fail_on and self._first_time("fail", job.index):
            raise ValueError(f"boom in shard {job.index}")
        time.sleep(self.compute_s)
        progress(job.count)
        return list(range(job.first_id, job.first_id + job.count))

    def finish(self, job, ids):
        time.sleep(self.finish_s)
        return ids


def jobs(n_shards, size=4):
    return [ShardJob(i, i * size, size) for i in range(n_shards)]


def collect():
    got = {}
    return got, lambda job, result: got.setdefault(job.index, result)


def test_finish_overlaps_the_next_compute():
    got, record = collect()
    work = partial(Sleepy, compute_s=0.2, finish_s=0.2)
    overlapped = run_shards(jobs(5), work, ONE, max_attempts=1, record=record, in_flight=2)
    serial = run_shards(jobs(5), work, ONE, max_attempts=1, record=lambda j, r: None, in_flight=1)
    assert sorted(got) == list(range(5))
    assert serial.seconds >= 1.95                        # 5 x (0.2 + 0.2)
    assert overlapped.seconds < 1.6                      # about 5 x 0.2 + 0.2
    assert overlapped.busy_fraction > 0.6 > serial.busy_fraction


def test_every_shard_recorded_once_across_workers():
    got, record = collect()
    summary = run_shards(jobs(9), partial(Sleepy), TWO, max_attempts=1, record=record)
    assert sorted(got) == list(range(9)) and summary.shards == 9 and summary.items == 36
    assert [i for k in sorted(got) for i in got[k]] == list(range(36))


def test_failing_shard_stops_the_job_naming_it():
    got, record = collect()
    with pytest.raises(ShardFailed) as info:
        run_shards(jobs(6), partial(Sleepy, compute_s=0.05, fail_on=3), TWO, max_attempts=2, record=record)
    assert info.value.index == 3 and info.value.attempts == 2
    assert "shard 3 failed 2 time(s)" in str(info.value) and "ValueError: boom in shard 3" in str(info.value)
    assert 3 not in got


def test_a_failure_is_retried(tmp_path):
    got, record = collect()
    events = []
    summary = run_shards(jobs(4), partial(Sleepy, fail_on=1, once=str(tmp_path)), ONE, max_attempts=2,
                         record=record, on_event=events.append)
    assert sorted(got) == [0, 1, 2, 3] and summary.retries == 1
    assert any("shard 1 failed (ValueError: boom in shard 1)" in e for e in events)


def test_dead_actor_is_replaced_and_its_shards_redone(tmp_path):
    got, record = collect()
    events = []
    summary = run_shards(jobs(6), partial(Sleepy, compute_s=0.05, die_on=2, once=str(tmp_path)), ONE, max_attempts=2,
                         record=record, on_event=events.append)
    assert sorted(got) == list(range(6)) and summary.replaced == 1
    assert any("worker w0 died" in e for e in events)


def test_factory_error_is_a_start_error():
    with pytest.raises(WorkerStartError, match="ValueError: boom in shard 0"):
        run_shards(jobs(2), partial(_bad_factory), ONE, max_attempts=1, record=lambda j, r: None)


def test_workers_that_cannot_start_give_up_within_the_bound():
    """Three 1-CPU actors on a 2-CPU Ray: the third never starts; the run stops with one line, not a hang."""
    three = ActorPlan(actors=3, num_cpus=1, num_gpus=0, threads=1)
    started = time.perf_counter()
    with pytest.raises(WorkerStartError, match="of 3 CPU workers x 1 thread did not start within 2 s"):
        run_shards(jobs(3), partial(Sleepy), three, max_attempts=1, record=lambda j, r: None, start_wait=2.0)
    assert time.perf_counter() - started < 30


def _bad_factory():
    raise ValueError("boom in shard 0")


def test_interrupt_stops_and_frees_the_actors():
    got, record = collect()

    def interrupt(progress):
        if progress.shards_done:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_shards(jobs(20), partial(Sleepy, compute_s=0.1), TWO, max_attempts=1, record=record,
                   on_progress=interrupt, poll_seconds=0.05)
    assert 1 <= len(got) < 20
    deadline = time.time() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_progress_reports_workers_and_counts():
    seen = []
    run_shards(jobs(6), partial(Sleepy, compute_s=0.2), TWO, max_attempts=1, record=lambda j, r: None,
               on_progress=seen.append, poll_seconds=0.05)
    assert seen and all(p.items_total == 24 and 0 <= p.items_done <= 24 for p in seen)
    assert [p.items_done for p in seen] == sorted(p.items_done for p in seen)      # never goes back
    assert {w.name for p in seen for w in p.workers} == {"w0", "w1"}
    assert any(w.pid and w.shard is not None for p in seen for w in p.workers)


def test_plan_actors():
    assert plan_actors([{"CPU": 16, "GPU": 4}, {"CPU": 8, "GPU": 2}], 3) == ActorPlan(6, 1, 1, 4)
    assert plan_actors([{"CPU": 2}], 1) == ActorPlan(1, 2, 0, 2)
    assert plan_actors([{"CPU": 2}], 2) == ActorPlan(2, 1, 0, 1)
    with pytest.raises(UserError, match="5 CPU workers asked .* has 2 CPUs; pass --workers 2"):
        plan_actors([{"CPU": 2}], 5)                                         # no more actors than CPUs: refused
    assert plan_actors([{"CPU": 16}, {"CPU": 16}], 3) == ActorPlan(3, 8, 0, 8)   # 16 each would not fit 3
    assert plan_actors([{"CPU": 1}, {"CPU": 1}], 2) == ActorPlan(2, 1, 0, 1)     # one per node
    with pytest.raises(UserError):
        plan_actors([{"memory": 1}], 1)


def test_actor_class_runs_in_process():
    import torch
    threads = torch.get_num_threads()
    actor = ShardActor(partial(Sleepy), threads=1)
    try:
        assert actor.run(ShardJob(0, 10, 3)) == [10, 11, 12]
    finally:
        torch.set_num_threads(threads)
    state = actor.status()
    assert state["computed"] == 3 and state["shard"] is None and state["pid"] == os.getpid()
