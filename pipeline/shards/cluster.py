"""Where shard workers run: the connected Ray cluster's resources, the actor plan, the Ray session."""
from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from stores.errors import Terminated, UserError, install_sigterm_handler
from stores.remote import worker_environment


@dataclass(frozen=True)
class ActorPlan:
    actors: int          # how many actors
    num_cpus: float      # Ray CPUs per actor
    num_gpus: float      # Ray GPUs per actor (1 on GPU nodes, else 0)
    threads: int         # torch threads per actor

    def describe(self) -> str:
        kind = "GPU" if self.num_gpus else "CPU"
        return (f"{self.actors} {kind} worker{'s' if self.actors != 1 else ''} x "
                f"{self.threads} thread{'s' if self.threads != 1 else ''}")


def plan_actors(nodes: Sequence[dict], cpu_actors: int) -> ActorPlan:
    """One actor per GPU where there are GPUs; else `cpu_actors` actors with the CPUs split between them.

    nodes: each alive node's resources ({"CPU": .., "GPU": ..}). CPU actors get the largest CPU count
    that still lets every actor fit on some node.
    """
    gpu_nodes = [n for n in nodes if int(n.get("GPU", 0)) > 0]
    if gpu_nodes:
        threads = min(max(1, int(n.get("CPU", 1)) // int(n["GPU"])) for n in gpu_nodes)
        return ActorPlan(sum(int(n["GPU"]) for n in gpu_nodes), 1, 1, threads)
    cpus = [int(n.get("CPU", 0)) for n in nodes if int(n.get("CPU", 0)) > 0]
    if not cpus:
        raise UserError("the Ray cluster has no CPUs or GPUs to run workers on")
    if cpu_actors > sum(cpus):
        raise UserError(f"{cpu_actors} CPU workers asked (ray.cpu_actors) but the Ray cluster has {sum(cpus)} CPUs; "
                        f"pass --workers {sum(cpus)} or fewer")
    actors = max(1, cpu_actors)
    per = next(c for c in range(max(cpus), 0, -1) if sum(n // c for n in cpus) >= actors)
    return ActorPlan(actors, per, 0, per)


def cluster_nodes() -> list[dict]:
    """Resources of every alive node of the connected Ray cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


@contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[None]:
    """Reuse a Ray instance this process already holds (tests, `run`); else start a local one with
    `num_cpus` CPUs, or join the cluster at `address`, and shut it down afterwards.

    Ray's own logging and the workers' output stay off the user's terminal; worker errors come back as
    exceptions.
    """
    if ray.is_initialized():
        yield
        return
    _init(address, num_cpus)
    keep_sigterm_handler()
    try:
        yield
    finally:
        ray.shutdown()
        keep_sigterm_handler()


def keep_sigterm_handler() -> None:
    """Ray's core installs its own C-level SIGTERM handler (a stack dump, then exit 1): put back the CLI's, which
    unwinds like Ctrl-C, when the CLI installed one."""
    if Terminated.handled:
        install_sigterm_handler()


def _init(address: str | None, num_cpus: int) -> None:
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    quiet.update(remote_env())
    if address:
        check_reachable(address)
    try:
        ray.init(address=address, **quiet) if address else ray.init(num_cpus=num_cpus, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot start or join {where}: {first}; check --address "
                        f"(auto joins a `ray start --head` cluster on this machine)") from None


def remote_env() -> dict:
    """Ray options that give workers on every node the object-store root this process works in (its URL and
    the driver's mirror, stores.remote) and the store settings it was started with (endpoint, credentials:
    unset them on the driver to let the nodes use their own, an instance role): {} for a local root."""
    variables = worker_environment()
    return {"runtime_env": {"env_vars": variables}} if variables else {}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """UserError unless something listens at HOST:PORT (Ray itself would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep:
        return
    if not port.isdigit():
        raise UserError(f"--address {address!r}: expected auto or HOST:PORT (the head's GCS port, 6379 by default)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                        f"`ray start --head` or check --address") from None
