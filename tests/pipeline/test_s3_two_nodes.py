"""Two Ray nodes without a shared filesystem, a bucket as the workspace root (slow: about two minutes).

Each node has its own working directory and its own cache folder; the only thing they share is the S3 server.
Stage 1 runs on both nodes, node B is killed (SIGKILL, its whole process group) in the middle of generate, the
rerun finishes, and the shards equal those of an undisturbed run byte for byte. Then extract-features on both
nodes and training with two Ray Train workers, one per node.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from raynodes import stop, two_nodes

from stores import remote

CONFIG = ("data:\n  shard_size: 128\n  test_fraction: 0.2\n"
          "fit_diffusion:\n  model_channels: 8\n  channel_mult: [1, 2]\n  num_blocks: 1\n  batch_size: 16\n"
          "  duration_kimg: 0.032\n"
          "generate:\n  n: 3072\n  name: gen\n  steps: 12\n  batch_size: 64\n"
          "features:\n  timesteps: [100]\n  batch_size: 256\n"
          "train:\n  arch: small-cnn\n  epochs: 1\n  batch_size: 64\n  attack_steps: 2\n  holdout: 64\n"
          "  holdout_pgd_steps: 2\n  dra_hidden: 16\n  dra_depth: 2\n  loader_workers: 0\n  workers: 2\n"
          "ray:\n  cpu_actors: 2\n  num_cpus: 2\n")


def dra_pipe(*args: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("dra-pipe")), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def shard_objects(s3_server, bucket: str, folder: str) -> dict[str, bytes]:
    found = s3_server.objects(bucket)
    return {k.rsplit("/", 1)[1]: v for k, v in found.items() if k.startswith(f"ws/images/{folder}/shard-")}


@pytest.mark.slow
def test_two_nodes_share_only_the_bucket(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    root = f"s3://{bucket}/ws"
    folders = {name: tmp_path / name for name in ("driver", "node-a", "node-b")}
    for folder in folders.values():
        folder.mkdir()
    (folders["driver"] / "pipeline.yaml").write_text(CONFIG)
    base = {**__import__("os").environ, **s3_server.env(), "DRA_PIPE_CACHE": str(folders["driver"] / "cache")}
    node_env = tuple({"DRA_PIPE_CACHE": str(folders[n] / "cache")} for n in ("node-a", "node-b"))
    with two_nodes(tmp_path, base, node_env, (folders["node-a"], folders["node-b"])) as (address, env, nodes):
        def run(*args, check=True):
            done = dra_pipe(*args, "--root", root, env=env, cwd=folders["driver"])
            assert not check or done.returncode == 0, f"{args}: {done.stderr[-3000:]}"
            return done
        run("import", "digits")
        run("fit-diffusion")
        interrupted = subprocess.Popen([str(Path(sys.executable).with_name("dra-pipe")), "generate", "--address",
                                        address, "--root", root], env=env, cwd=folders["driver"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while len(shard_objects(s3_server, bucket, "gen")) < 4 and interrupted.poll() is None:
            assert time.time() < deadline
            time.sleep(0.2)
        at_kill = len(shard_objects(s3_server, bucket, "gen"))
        stop(nodes[1], kill=True)                         # node B lost mid-generate
        _, err = interrupted.communicate(timeout=300)     # node A finishes alone, or the job stops: either is fine
        assert at_kill < 24, "generate finished before node B was killed"
        assert "worker w" in err and "died" in err, err[-2000:]
        assert list((folders["node-b"] / "cache").rglob("shard-*.tar")), "node B wrote no shard"
    with two_nodes(tmp_path, base, node_env, (folders["node-a"], folders["node-b"])) as (address, env, nodes):
        run("generate", "--address", address)                          # resumes, or finds it complete
        done = run("generate", "--name", "gen-ref", "--address", address)     # undisturbed: the same samples
        assert "2 nodes" in done.stdout, done.stdout
        resumed, undisturbed = shard_objects(s3_server, bucket, "gen"), shard_objects(s3_server, bucket, "gen-ref")
        assert len(resumed) == 24 and resumed == undisturbed
        run("extract-features", "--address", address)
        b_cache = folders["node-b"] / "cache"
        assert list(b_cache.rglob("features.zarr/targets/c/*/0/0/0")), "node B extracted nothing"
        (folders["driver"] / "train.yaml").write_text(CONFIG.replace("ray:\n", f"ray:\n  address: {address}\n"))
        done = run("train", "--name", "two", "-c", "train.yaml")
        assert "over 2 worker(s)" in done.stdout, done.stdout[-2000:]       # one CPU per node: one rank on each
    stored = s3_server.objects(bucket)
    assert {"ws/runs/two/final.pt", "ws/runs/two/checkpoint.pt"} <= set(stored)
    assert run("verify").returncode == 0
    remote.detach_all()
