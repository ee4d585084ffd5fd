"""Data-parallel training through Ray Train: a TorchTrainer whose workers each run `loop.train` as one rank.

Ray Train sets up the process group (gloo on the CPU, nccl on GPUs); each rank streams its own split of the
shards, DDP averages gradients, rank 0 writes metrics, checkpoints and final.pt into the run folder. Results
are read from the run folder, not from Ray's Result (in Ray 2.60 its `metrics` can come back None when
`ray.train.report` carries no checkpoint). A rank's UserError or IntegrityError is raised again here as itself.
"""
from __future__ import annotations

from pathlib import Path

import torch

from stores.errors import IntegrityError, UserError
from trainer.job import Job
from trainer.loop import Dist, train


def _worker(config: dict) -> None:
    """One rank: runs inside a Ray Train worker process."""
    import ray.train
    import ray.train.torch
    ctx = ray.train.get_context()
    dist = Dist(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    torch.set_num_threads(config["threads"])
    on_epoch = (lambda row: print(_epoch_line(row), flush=True)) if dist.main else None
    summary = train(config["job"], dist, on_epoch=on_epoch, teacher=config.get("teacher"))
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))})


def _epoch_line(row: dict) -> str:
    terms = " ".join(f"{k} {row[k]:.4f}" for k in ("loss", "ce", "kl", "dra") if k in row)
    acc = f" clean {row['clean_acc']:.3f} pgd {row['pgd_acc']:.3f}" if "clean_acc" in row else ""
    return f"epoch {row['epoch']}: {terms}{acc} ({row['images_per_s']:,.0f} images/s)"


def train_distributed(job: Job, workers: int, address: str | None = None, num_cpus: int | None = None,
                      teacher=None) -> None:
    """Run the job on `workers` Ray Train workers (one GPU each when there are GPUs) and wait for the end.

    teacher: the online teacher callable; it is pickled to every worker and loads its model there, lazily."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    use_gpu = torch.cuda.is_available()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", workers)) // workers)
        trainer = TorchTrainer(
            _worker, train_loop_config={"job": job, "threads": cpus, "teacher": teacher},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=job.name, storage_path=str(Path(job.run_dir).resolve() / "ray"),
                                 failure_config=FailureConfig(max_failures=0)))
        try:
            trainer.fit()
        except Exception as exc:
            raise _user_facing(exc) from None
    finally:
        if started_here:
            ray.shutdown()


def _user_facing(exc: BaseException) -> BaseException:
    """The first UserError / IntegrityError inside a Ray Train failure, else the failure itself."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (UserError, IntegrityError)):
            return e
        todo += list(getattr(e, "worker_failures", {}).values())
        todo += [getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__, e.__context__]
    return exc

