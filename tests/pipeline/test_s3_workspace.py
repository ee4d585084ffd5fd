"""Every stage with `--root s3://...` against a real S3 API server on localhost (moto, tests/s3server.py).

One module build: digits (6 shards), a generated set and a 2-view feature set, written once on a local disk and
once into a bucket. Each test works on its own copy of that bucket and its own cache folder (a fresh node).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from stores import remote

CONFIG = ("model:\n  spec: dra:{model}\n"
          "data:\n  shard_size: 32\n  test_fraction: 0.9\n"
          "generate:\n  n: 96\n  name: gen\n  steps: 2\n  sampler: euler\n  batch_size: 32\n"
          "features:\n  views: 2\n  timesteps: [100]\n  batch_size: 64\n"
          "train:\n  crop_pad: 1\n  arch: small-cnn\n  epochs: 1\n  batch_size: 32\n  attack_steps: 2\n"
          "  holdout: 32\n  holdout_pgd_steps: 2\n  dra_hidden: 16\n  dra_depth: 2\n  loader_workers: 0\n"
          "eval:\n  n: 8\n  pgd_steps: 2\n  batch_size: 8\n  autoattack: false\n"
          "ray:\n  cpu_actors: 1\n")
STAGES = (("import", "digits"), ("generate",), ("extract-features",))


@pytest.fixture(scope="module")
def built(s3_server, tiny_model_dir, ray_local, tmp_path_factory):
    """(bucket, local workspace): the same three stages into each."""
    base = tmp_path_factory.mktemp("s3ws")
    config = base / "pipeline.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir))
    bucket = s3_server.new_bucket()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**s3_server.env(), "DRA_PIPE_CACHE": str(base / "cache")}.items():
            env.setenv(key, value)
        for root in (base / "local", f"s3://{bucket}/ws"):
            for stage in STAGES:
                run_cli(*stage, "--config", config, "--root", root)
            remote.detach_all()
    return bucket, base / "local", config


@pytest.fixture
def ws(built, s3_server, s3_root, tmp_path):
    """s3_root (a fresh bucket, this test's cache folder) holding a copy of the built bucket."""
    bucket, _, config = built
    s3 = s3_server.client()
    target = s3_root.split("/")[2]
    for key in s3_server.objects(bucket):
        s3.copy_object(Bucket=target, Key=key, CopySource={"Bucket": bucket, "Key": key})
    shutil.copy(config, tmp_path / "pipeline.yaml")
    return s3_root


def objects(s3_server, url: str) -> dict[str, bytes]:
    bucket, prefix = url.split("/")[2], url.split("/", 3)[3]
    return {k[len(prefix) + 1:]: v for k, v in s3_server.objects(bucket).items() if k.startswith(prefix + "/")}


def shard_data(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if remote.is_shard_data(k)}


def test_every_stage_writes_into_the_bucket_the_bytes_it_writes_on_a_local_disk(built, s3_server, ws):
    _, local, _ = built
    stored = objects(s3_server, ws)
    on_disk = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert len(shard_data(on_disk)) == 6 + 51 + 3 + 3 * (6 + 3)     # tars; 2 view arrays + ids per shard
    assert shard_data(stored) == shard_data(on_disk)
    for record in ("images/gen/dataset.json", "images/digits-train/dataset.json"):
        assert stored[record] == on_disk[record]
    assert not [k for k in stored if ".lock" in k or ".lease" in k or ".tmp-" in k]


def test_a_fresh_node_lists_and_verifies_from_the_bucket_alone(cli, ws, tmp_path):
    code, out, err = cli("ls", "--root", ws)
    assert code == 0 and ws in out and "digits-train" in out and "gen" in out, err
    assert not list((tmp_path / "cache").rglob("shard-*.tar"))      # listing reads records, never shard data
    code, out, err = cli("verify", "--root", ws)
    assert code == 0 and "all 5 set(s) intact" in out, err


def test_verify_names_damaged_objects_and_repair_restores_them_byte_for_byte(cli, ws, s3_server):
    before = objects(s3_server, ws)
    s3, bucket = s3_server.client(), ws.split("/")[2]
    flipped = bytearray(before["images/digits-train/shard-000001.tar"])
    flipped[700] ^= 1
    s3.put_object(Bucket=bucket, Key="ws/images/digits-train/shard-000001.tar", Body=bytes(flipped))
    s3.delete_object(Bucket=bucket, Key="ws/images/gen/shard-000000.tar")
    code, out, err = cli("verify", "--root", ws)
    assert code == 1, out + err
    assert "digits-train: shard 1 sha256 differs from the record (corrupted)" in out and "gen: shard 0 missing" in out
    code, out, err = cli("repair", "--root", ws)
    assert code == 0, err
    assert shard_data(objects(s3_server, ws)) == shard_data(before)
    code, out, err = cli("verify", "--root", ws)
    assert code == 0, out + err


def test_a_writer_stopped_between_upload_and_record_leaves_an_object_that_verify_names_and_a_rerun_redoes(
        cli, ws, s3_server):
    from stores.manifest import read_manifest, write_manifest
    before = objects(s3_server, ws)
    root = remote.attach(ws)
    gen = root / "images" / "gen"
    records = read_manifest(gen)
    del records[1]
    write_manifest(gen, records)                      # as if the driver died before recording shard 1
    remote.detach_all()
    code, out, err = cli("verify", "--root", ws)
    assert code == 1 and "gen: shard 1 missing (never recorded: an unreferenced object is there" in out + err
    code, out, err = cli("generate", "--root", ws)
    assert code == 0 and "1 shard" in out, err
    assert shard_data(objects(s3_server, ws)) == shard_data(before)
    assert cli("verify", "--root", ws)[0] == 0


HOLD = """
import sys, time
from stores import remote
from stores.locks import writer_lock
root = remote.attach(sys.argv[1])
with writer_lock(root / "images" / "gen", "image set 'gen'"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_on_another_node_is_refused_naming_the_first(cli, ws, s3_server, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DRA_PIPE_CACHE": str(tmp_path / "node-b")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, ws], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {k: v for k, v in objects(s3_server, ws).items() if not k.endswith(".lease")}
        code, out, err = cli("generate", "--n", "128", "--root", ws)
        assert code == 2 and f"image set 'gen' is being written by pid {holder.pid}" in err, err
        assert len(err.strip().splitlines()) == 1
        assert {k: v for k, v in objects(s3_server, ws).items() if not k.endswith(".lease")} == before
    finally:
        holder.kill()


def test_a_run_killed_on_one_node_resumes_exactly_on_a_fresh_node(cli, built, ws, s3_server, tmp_path, request):
    """Train straight on a local disk; train from the bucket, stop at step 7 (checkpoints every 2 steps), delete
    the node's cache, resume from the bucket with `dra-pipe train`: the final weights and the metrics rows are equal
    to the last bit."""
    import torch

    from pipeline.cli.common import resolve
    from pipeline.plans.train import make_job
    from trainer.loop import set_cpu_threads, train
    from trainer.runs import RunFolder
    request.addfinalizer(partial(torch.set_num_threads, torch.get_num_threads()))
    set_cpu_threads(0)          # the threads `dra-pipe train` sets: another count sums in another order
    _, local, config = built
    copy = tmp_path / "local"
    shutil.copytree(local, copy)
    over = {"train.epochs": 2, "train.checkpoint_every": 2, "train.loggers": []}
    straight = make_job(resolve(config, copy, over), "r")
    RunFolder(straight.run_dir).prepare(straight.identity(), straight.config)
    train(straight)

    def stop_at_step_7(step, images, terms):       # 5 steps per epoch: in the second, after a checkpoint at 6
        if step == 7:
            raise KeyboardInterrupt
    killed = make_job(resolve(config, ws, over), "r")
    RunFolder(killed.run_dir).prepare(killed.identity(), killed.config)
    with pytest.raises(KeyboardInterrupt):
        train(killed, on_step=stop_at_step_7)
    remote.detach_all()
    shutil.rmtree(tmp_path / "cache")                 # another node: only the bucket has the checkpoint
    fresh = RunFolder(remote.attach(ws) / "runs" / "r")
    assert fresh.metrics.exists() and not fresh.checkpoint.exists()   # a command's start pulls no run weights
    remote.detach_all()
    settings = yaml.safe_load(config.read_text())
    settings["train"].update(epochs=2, checkpoint_every=2, loggers=[])
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(settings))
    code, out, err = cli("train", "--name", "r", "--root", ws, "--config", tmp_path / "resume.yaml")
    assert code == 0 and "resuming from" in out, out + err        # train brought the run's checkpoint
    resumed = make_job(resolve(config, ws, over), "r")
    assert same(torch.load(RunFolder(resumed.run_dir).final, weights_only=True),
                torch.load(RunFolder(straight.run_dir).final, weights_only=True))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]   # noqa: E731
    rows = strip(RunFolder(resumed.run_dir).read_metrics())
    assert len(rows) == 2 and rows == strip(RunFolder(straight.run_dir).read_metrics())
    remote.detach_all()
    shutil.rmtree(tmp_path / "cache")                 # a third node evaluates: eval brings the run's weights
    code, out, err = cli("eval", "r", "--root", ws)
    assert code == 0, err
    assert {"runs/r/final.pt", "runs/r/checkpoint.pt", "runs/r/eval.json", "runs/r/metrics.jsonl"} <= set(
        objects(s3_server, ws))


def same(a, b) -> bool:
    """Checkpoints equal to the last bit: tensors with torch.equal, everything else with ==."""
    import torch
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("root, env, says", [
    ("s3://no-such-bucket/ws", {}, "the bucket does not exist"),
    (None, {"AWS_SECRET_ACCESS_KEY": "wrong"}, "the secret key is wrong"),
    (None, {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "connection refused"),
    ("s3://", {}, "names no bucket"),
])
def test_an_unusable_bucket_is_one_line_and_exit_2_with_nothing_written(cli, s3_root, monkeypatch, tmp_path, root,
                                                                         env, says):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, err = cli("import", "digits", "--root", root or s3_root)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists()


def test_the_store_settings_act(cli, ws, tmp_path):
    """store.cache_dir holds the cache, store.cache_gb bounds its shard data, store.lease_seconds is the lease's
    life without a refresh."""
    import json
    import time

    from pipeline.cli.common import resolve
    from stores.locks import writer_lock
    from stores.objectstore import ObjectStore
    (tmp_path / "small.yaml").write_text(f"store:\n  cache_dir: {tmp_path / 'elsewhere'}\n  cache_gb: 0.001\n"
                                         "  lease_seconds: 7\n")
    code, out, err = cli("verify", "-c", "small.yaml", "--root", ws)     # reads every shard of every set
    assert code == 0, err
    kept = [p.stat().st_size for p in (tmp_path / "elsewhere").rglob("*")
            if p.is_file() and remote.is_shard_data(p.as_posix())]
    assert kept and sum(kept) <= 1_000_000 and not (tmp_path / "cache").exists()
    remote.detach_all()
    root = Path(resolve(tmp_path / "small.yaml", ws).root)
    with writer_lock(root / "images" / "gen", "image set 'gen'"):
        lease = json.loads(ObjectStore(ws).get("images/gen/.lease"))
        assert 6 < lease["expires"] - time.time() <= 7


def test_the_trainers_reader_downloads_the_next_shards_ahead(ws):
    """The trainer's slot reader names the shards it reads next: while one is decoded, the next two download."""
    from stores.features import FeatureSet, list_feature_sets
    from stores.images import ImageSet
    from trainer.loader import SlotReader, Source
    root = remote.attach(ws)
    images = ImageSet.open(root, "digits-train")
    features = next(FeatureSet(p) for p in list_feature_sets(root)
                    if FeatureSet(p).identity["image_set_name"] == "digits-train")
    slot = SlotReader(Source.open(images, features, 0), seed=0, slot=0, slots=1)
    order = list(dict.fromkeys(index for index, _, _ in slot.pieces))
    slot._shard(order[0])
    ahead = slot.reader.prefetch.pending
    assert list(ahead) == order[1:3]
    for future in ahead.values():
        future.result()
    for index in order[1:3]:
        assert (images.path / f"shard-{index:06d}.tar").exists() and features.file_path("targets", index).exists()
    assert not (images.path / f"shard-{order[3]:06d}.tar").exists()
    slot.reader.close()


def test_bench_extract_on_a_bucket_uploads_its_shards_and_judges_against_the_mean_of_before_and_after(
        cli, ws, s3_server):
    code, out, err = cli("bench", "extract", "--root", ws)
    assert code == 0, err
    rates = {row: float(rate.replace(",", "")) for row, rate in
             re.findall(r"(bare loop before|pipeline|bare loop after)\s+│[^│]+│[^│]+│\s+([\d,.]+)", out)}
    assert len(rates) == 3, out
    ratio = float(re.search(r"pipeline / bare \(mean of before and after\): ([\d.]+)", out).group(1))
    mean = (rates["bare loop before"] + rates["bare loop after"]) / 2
    assert ratio == pytest.approx(rates["pipeline"] / mean, abs=1.5e-3)
    uploaded = [k for k in shard_data(objects(s3_server, ws)) if k.startswith("bench/extract/root/features/")]
    assert len(uploaded) == 6 * 3                       # digits-train's 6 shards: 2 view arrays + ids each


def test_a_feature_worker_brings_a_bucket_sets_metadata_once_not_per_shard(ws, s3_server, tiny_model_dir,
                                                                           monkeypatch):
    """A listing per shard would grow with the set: quadratic in requests at the DM-AT size."""
    from stages.extract import FeaturePayload, FeatureWorker, NoiseLevel, feature_identity, target_shape
    from stages.fingerprint import model_fingerprint
    from stages.models import load_model
    from stores.features import FeatureSetWriter
    from stores.images import ImageSet
    from stores.manifest import ShardJob
    from stores.objectstore import ObjectStore
    from stores.views import ViewSpec
    root = remote.attach(ws)
    images, spec, level, views = ImageSet.open(root, "gen"), f"dra:{tiny_model_dir}", NoiseLevel.from_timestep(100), \
        ViewSpec(1, 0, False, seed=0)
    net = load_model(spec)
    identity = feature_identity(images, model_fingerprint(net), "dec.4x4_in1", level, 3, "none", views, True)
    writer = FeatureSetWriter(root, identity, images.n, images.shard_size, target_shape(net, "dec.4x4_in1", "none"))
    writer.begin()
    listed = []
    real_list = ObjectStore.list
    monkeypatch.setattr(ObjectStore, "list", lambda store, under="": listed.append(under) or real_list(store, under))
    worker = FeatureWorker(spec, "dec.4x4_in1", "none", 3, 32)
    for p in images.plan():
        job = ShardJob(p.index, p.first_id, p.count, FeaturePayload(str(images.path), ((str(writer.path), level),),
                                                                    views))
        for record in worker.finish(job, worker.compute(job, lambda n: None)):
            writer.record(record)
    writer.close()
    set_key = remote.mirror_of(writer.path)[1]
    assert len(images.plan()) == 3 and sum(under.endswith(set_key + "/") for under in listed) == 1, listed
    assert len([k for k in shard_data(objects(s3_server, ws)) if k.startswith(set_key + "/")]) == 3 * 2
