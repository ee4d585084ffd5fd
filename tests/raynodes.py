"""A Ray cluster of two nodes on this machine for the slow multi-node tests: `ray start --block` twice, each in its
own process group (so a node can be killed whole), with token authentication and ports of their own.

Each node may get its own environment (`node_env`): its working directory and $DRA_PIPE_CACHE, as two machines
without a shared filesystem would have.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(count: int) -> int:
    """First of `count` consecutive ports that are free now."""
    for _ in range(200):
        base = 20000 + secrets.randbelow(40000)
        if all(_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def ray_node(args: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """`ray start --block` in its own process group, so that it and its children stop together."""
    ray_cli = Path(sys.executable).with_name("ray")
    return subprocess.Popen([str(ray_cli), "start", "--block", "--disable-usage-stats", *args], env=env, cwd=cwd,
                            start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_nodes(address: str, env: dict, count: int, nodes: list, timeout: float = 120) -> None:
    script = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); " \
             f"print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(node.poll() is None for node in nodes), "a `ray start` exited; see head.log / worker.log"
        try:
            done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            continue
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {count} nodes")


def stop(node: subprocess.Popen, kill: bool = False) -> None:
    """SIGTERM and wait (or SIGKILL the node's whole process group at once: a machine lost)."""
    if not kill:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(node.pid, signal.SIGKILL)      # whatever of this node's own group is left
    except ProcessLookupError:
        pass
    node.wait()


@contextmanager
def two_nodes(logs: Path, env: dict, node_env: tuple[dict, dict] = ({}, {}), cwd: tuple = (None, None)):
    """Yields (address, driver environment, [head, worker] processes); stops both at the end."""
    env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    base = free_port_range(60)
    address = f"127.0.0.1:{base}"
    head_ports = ["--head", f"--port={base}", f"--ray-client-server-port={base + 1}", f"--dashboard-port={base + 2}",
                  f"--dashboard-agent-listen-port={base + 3}", f"--min-worker-port={base + 10}",
                  f"--max-worker-port={base + 29}"]
    worker_ports = [f"--address={address}", f"--dashboard-agent-listen-port={base + 4}",
                    f"--min-worker-port={base + 30}", f"--max-worker-port={base + 49}"]
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1"]
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")        # Ray's socket paths must stay under 108 bytes
    nodes = [ray_node(head_ports + common + ["--include-dashboard=false", f"--temp-dir={temp}"],
                      {**env, **node_env[0]}, logs / "head.log", cwd[0])]
    try:
        wait_for_nodes(address, env, 1, nodes)
        nodes.append(ray_node(worker_ports + common, {**env, **node_env[1]}, logs / "worker.log", cwd[1]))
        wait_for_nodes(address, env, 2, nodes)
        yield address, env, nodes
    finally:
        for node in reversed(nodes):
            stop(node)
        shutil.rmtree(temp, ignore_errors=True)
