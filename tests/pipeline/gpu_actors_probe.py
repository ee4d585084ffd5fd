"""Run as a script by test_gpu_actors.py: a local Ray with fake GPUs (`ray.init(num_gpus=...)`, no GPU needed),
the shard runner's actors as it creates them, and what each sees. Prints one JSON line.

Its own process because a test session may already hold a Ray instance without GPUs (conftest's ray_local).
"""
from __future__ import annotations

import json
import logging
import os
import sys

import ray

GPUS = int(sys.argv[1]) if len(sys.argv) > 1 else 2


class EnvProbe:
    """A shard worker that reports the actor's view of the GPUs instead of computing."""

    def compute(self, job, progress):
        import torch

        from stages.models import pick_device
        torch.cuda.is_available = lambda: True        # a CPU-only torch: pretend the visible GPU is usable
        return {"pid": os.getpid(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(pick_device()),
                "threads": torch.get_num_threads()}

    def finish(self, job, intermediate):
        return intermediate


def main() -> None:
    from pipeline.shards.cluster import cluster_nodes, plan_actors
    from pipeline.shards.runner import run_shards
    from stores.manifest import ShardJob
    ray.init(num_cpus=2, num_gpus=GPUS, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        plan = plan_actors(cluster_nodes(), cpu_actors=2)
        seen = []
        run_shards([ShardJob(i, i, 1, None) for i in range(plan.actors)], EnvProbe, plan, max_attempts=1,
                   record=lambda job, result: seen.append(result), in_flight=1)
        cpu_actor = ray.remote(num_cpus=0, num_gpus=0)(CpuProbe).remote()
        print(json.dumps({"plan": [plan.actors, plan.num_cpus, plan.num_gpus, plan.threads], "actors": seen,
                          "cpu_actor_visible": ray.get(cpu_actor.visible.remote())}))
    finally:
        ray.shutdown()


class CpuProbe:
    def visible(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES")


if __name__ == "__main__":
    main()
