"""One shard actor per GPU, each seeing only its own: Ray with fake GPUs (no GPU needed), in a child process
(tests/pipeline/gpu_actors_probe.py) so that it does not meet the session's GPU-less Ray instance."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("gpu_actors_probe.py")


@pytest.fixture(scope="module")
def probe():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROBE.parents[2]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(PROBE), "2"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_runner_makes_one_actor_per_gpu_each_with_its_own_device(probe):
    assert probe["plan"] == [2, 1, 1, 1]                       # 2 actors x (1 CPU, 1 GPU), 2 CPUs / 2 GPUs = 1 thread
    actors = probe["actors"]
    assert len({a["pid"] for a in actors}) == 2
    assert sorted(str(a["visible"]) for a in actors) == ["0", "1"]  # Ray narrows CUDA_VISIBLE_DEVICES to one GPU each
    assert all(a["gpu_ids"] == [a["visible"]] for a in actors)
    assert all(a["threads"] == 1 for a in actors)


def test_the_worker_picks_device_0_of_its_visible_set(probe):
    """`cuda` (no index) or cuda:0: inside each actor, its one visible GPU; any other index names a GPU it
    cannot see."""
    assert all(a["device"] in ("cuda", "cuda:0") for a in probe["actors"])


def test_an_actor_without_gpus_is_not_narrowed(probe):
    """What Ray does with num_gpus=0 (recorded, not ours to change): CUDA_VISIBLE_DEVICES is left as it was, so a
    CPU actor on a GPU node would see every GPU. plan_actors makes no CPU actors where there are GPUs."""
    assert probe["cpu_actor_visible"] == os.environ.get("CUDA_VISIBLE_DEVICES")
