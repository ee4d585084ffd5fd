"""Data-parallel training through Ray Train: a TorchTrainer whose workers each run `loop.train` as one rank.

Ray Train sets up the process group (gloo on the CPU, nccl on GPUs); each rank streams its own split of the
shards, DDP averages gradients, rank 0 writes metrics, checkpoints and final.pt into the run folder. Results
are read from the run folder, not from Ray's Result (in Ray 2.60 its `metrics` can come back None when
`ray.train.report` carries no checkpoint). A rank's UserError or IntegrityError is raised again here as itself.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from stores.errors import IntegrityError, UserError
from stores.remote import worker_environment
from trainer.job import Job
from trainer.loop import Dist, train


def _worker(config: dict) -> None:
    """One rank: runs inside a Ray Train worker process."""
    import ray.train
    import ray.train.torch
    ctx = ray.train.get_context()
    dist = Dist(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())   # cuda:<its GPU> or cpu
    if dist.device.type == "cuda":
        torch.cuda.set_device(dist.device)    # NCCL's object collectives (the checkpoint's RNG states) use it
    torch.set_num_threads(config["threads"])
    os.environ.update(config["store_environment"])     # an object-store root: this node's mirror of it
    on_epoch = (lambda row: print(_epoch_line(row), flush=True)) if dist.main else None
    summary = train(config["job"].localized(), dist, on_epoch=on_epoch, teacher=config.get("teacher"))
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))})


def _epoch_line(row: dict) -> str:
    terms = " ".join(f"{k} {row[k]:.4f}" for k in ("loss", "ce", "kl", "dra") if k in row)
    acc = f" clean {row['clean_acc']:.3f} pgd {row['pgd_acc']:.3f}" if "clean_acc" in row else ""
    return f"epoch {row['epoch']}: {terms}{acc} ({row['images_per_s']:,.0f} images/s)"


@contextmanager
def training_cluster(workers: int, address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """The Ray instance the workers will run on, checked to hold them: joined or started here (and shut down
    after), or the one this process already holds. Enter it before anything is written for the run."""
    import ray
    started_here = not ray.is_initialized()
    if started_here:
        with _sigint_ignored():        # Ray's processes inherit it: Ctrl-C reaches the driver alone, not the raylet
            ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                     log_to_driver=True, configure_logging=False)
    try:
        use_gpu = use_gpus()
        check_capacity(workers, use_gpu, _alive_resources())
        reserve_or_refuse(workers, use_gpu, RESOURCE_WAIT_S)
        yield
    finally:
        if started_here:
            ray.shutdown()


def train_distributed(job: Job, workers: int, teacher=None) -> None:
    """Run the job on `workers` Ray Train workers (one GPU each when there are GPUs) and wait for the end;
    inside `training_cluster`. teacher: the online teacher callable (train.dra_targets: online); it is pickled
    to every worker and loads its model there, lazily."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    use_gpu = use_gpus()
    cpus = max(1, int(ray.cluster_resources().get("CPU", workers)) // workers)
    trainer = _interruptible(TorchTrainer)(
        _worker, train_loop_config={"job": job, "threads": cpus, "teacher": teacher,
                                    "store_environment": worker_environment()},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(use_gpu)),
        torch_config=TorchConfig(backend=process_group_backend(use_gpu)),
        run_config=RunConfig(name=job.name, storage_path=str(Path(job.run_dir).resolve() / "ray"),
                             failure_config=FailureConfig(max_failures=0)))
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit()
    except Exception as exc:
        raise _user_facing(exc) from None
    finally:
        signal.signal(signal.SIGINT, previous)


def use_gpus() -> bool:
    """Whether the workers train on GPUs: when this process sees one (the driver runs where the GPUs are)."""
    return torch.cuda.is_available()


def worker_resources(use_gpu: bool) -> dict:
    """What each training worker holds: one CPU, and one GPU of its own where there are GPUs."""
    return {"CPU": 1, **({"GPU": 1} if use_gpu else {})}


def process_group_backend(use_gpu: bool) -> str:
    """NCCL between GPU ranks; gloo between CPU ranks (NCCL has no CPU tensors)."""
    return "nccl" if use_gpu else "gloo"


def _interruptible(trainer_cls: type) -> type:
    """The trainer class with Ray Train's Ctrl-C handler replaced: Ray's aborts the run and exits the process
    (status 0 or 1, no word); ours aborts the run too, then raises KeyboardInterrupt, so the CLI says
    "interrupted; rerun to resume" and exits 130 as single-process training does."""
    import ray

    class Interruptible(trainer_cls):
        def _register_sigint_handler(self, controller) -> None:
            def on_sigint(signum, frame):
                signal.signal(signal.SIGINT, signal.default_int_handler)    # a second Ctrl-C stops at once
                try:
                    ray.get(controller.abort.remote(), timeout=60)
                except Exception:                                            # the controller is gone already
                    pass
                raise KeyboardInterrupt
            signal.signal(signal.SIGINT, on_sigint)

    return Interruptible


RESOURCE_WAIT_S = 60.0          # how long the workers may wait for free CPUs/GPUs before the run is refused


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while Ray starts its processes. They inherit the disposition (and Python keeps an ignored
    SIGINT ignored), so a Ctrl-C in the terminal interrupts only this driver, which shuts Ray down cleanly,
    instead of killing the raylet and workers mid-call with native stack dumps."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _alive_resources() -> list[dict]:
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_capacity(workers: int, use_gpu: bool, nodes: list[dict]) -> None:
    """Refuse a worker count the cluster can never hold (Ray Train would wait for it without end)."""
    kind = "GPU" if use_gpu else "CPU"
    have = sum(int(n.get(kind, 0)) for n in nodes)
    if workers > have:
        raise UserError(f"train.workers is {workers} but the Ray cluster has {have} {kind}{'s' if have != 1 else ''} "
                        f"(one per worker); pass --workers {max(1, have)} or fewer, or join a larger cluster")


def reserve_or_refuse(workers: int, use_gpu: bool, timeout: float) -> None:
    """Wait at most `timeout` s for the workers' resources to be free at once (other jobs may hold them); the
    reservation is released right away and Ray Train makes its own."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    bundle = worker_resources(use_gpu)
    group = placement_group([bundle] * workers, strategy="SPREAD")
    try:
        ready, _ = ray.wait([group.ready()], timeout=timeout)
        if not ready:
            raise UserError(f"{workers} training workers ({bundle}) found no free resources within {timeout:.0f} s: "
                            f"other jobs hold them (`ray status`); pass a smaller --workers or free the cluster")
    finally:
        remove_placement_group(group)


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

