"""`bench gpu` scale: the real generate stage (Ray actors, shard runner, image store) on one actor per GPU, against
one actor, in images/s per actor. With --smoke the actors are two CPU actors: the same code, so it cannot rot."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.bench.generate import pipeline_run
from pipeline.config import load_config
from pipeline.shards.cluster import ActorPlan, cluster_nodes, plan_actors, ray_session
from stages.generate import GenerateSettings
from stages.models import save_own


def bench_scale(net, work: Path, smoke: bool) -> dict:
    """Generate the same number of images per actor with every actor, then with one; the ratio of per-actor
    rates is the scaling efficiency (1.0 = linear)."""
    work = Path(work).resolve()
    spec_dir = work / "model"
    save_own(net.cpu().eval(), spec_dir, {"bench": "gpu"})
    net.to("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    settings = GenerateSettings("heun", 2 if smoke else 18, 0.0, 0, 4 if smoke else 512, "npy").check()
    shard = 8 if smoke else 2048
    cfg = load_config(None, {"root": str(work), "data.shard_size": shard, "ray.max_retries": 1})
    with ray_session(None, 2 if smoke else (os.cpu_count() or 2)):
        every = plan_actors(cluster_nodes(), 2)             # one per GPU on GPU nodes; else 2 CPU actors
        one = ActorPlan(1, every.num_cpus, every.num_gpus, every.threads)
        per_actor = 2 * shard
        runs = {}
        for name, plan in (("one", one), ("all", every)):
            run = pipeline_run(f"dra:{spec_dir}", net, settings, cfg, plan, work / name, per_actor * plan.actors)
            runs[name] = {"actors": plan.actors, "images_per_s": run["rate"], "per_actor": run["rate"] / plan.actors,
                          "busy": run["busy"], "startup_s": run["startup_s"]}
    kind = "GPU" if every.num_gpus else "CPU"
    return {"gpus": every.actors if every.num_gpus else 0, "kind": kind, "runs": runs,
            "efficiency": runs["all"]["per_actor"] / runs["one"]["per_actor"],
            "note": f"{runs['all']['actors']} {kind} actors: {runs['all']['per_actor']:,.1f} images/s each, "
                    f"{runs['one']['per_actor']:,.1f} alone ({runs['all']['per_actor'] / runs['one']['per_actor']:.2f} "
                    f"of linear)"}
