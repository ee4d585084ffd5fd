"""`dra-pipe generate` on Ray with a tiny model: determinism, resume, growth, a killed worker, bad input."""
import os
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import save_tiny_generator
from raynodes import two_nodes

from pipeline.config import load_config
from stages.generate import GenerateSettings, GenerateWorker, generated_identity, sample_floats
from stages.models import load_model
from stores.images import ImageSet, ImageSetWriter
from stores.manifest import ShardJob

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

SHARD, BATCH, STEPS, SEED, CLASSES = 16, 4, 3, 7, 4
NAME = "digits-gen"


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return save_tiny_generator(tmp_path_factory, seed=0, classes=CLASSES)


def settings(seed=SEED) -> GenerateSettings:
    return GenerateSettings("heun", STEPS, 0.0, seed, BATCH, "png")


def write_in_process(root: Path, spec: str, n: int, seed=SEED) -> ImageSet:
    """An undisturbed single-worker run without Ray: the reference for every Ray run."""
    model = load_model(spec)
    writer = ImageSetWriter(root, NAME, generated_identity(model, settings(seed), SHARD, None), n)
    writer.begin()
    worker = GenerateWorker(spec, settings(seed), str(writer.path))
    for p in writer.pending():
        job = ShardJob(p.index, p.first_id, p.count)
        writer.record(worker.finish(job, worker.compute(job, lambda k: None)))
    return ImageSet(writer.path)


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory):
    return write_in_process(tmp_path_factory.mktemp("ref"), spec, 56)


def write_config(folder: Path, spec: str, **generate) -> Path:
    cfg = {"root": str(folder / "ws"), "data": {"shard_size": SHARD}, "model": {"spec": spec},
           "generate": {"n": 40, "steps": STEPS, "batch_size": BATCH, "seed": SEED, **generate},
           "ray": {"num_cpus": 2, "cpu_actors": 2, "max_retries": 3}}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_matches_reference(got: ImageSet, reference: ImageSet) -> None:
    """Same ids, labels and pixels; shards with the same id range have the same bytes."""
    assert got.complete and got.fingerprint != "" and got.identity == reference.identity
    a, b = got.read_range(0, got.n), reference.read_range(0, got.n)
    assert np.array_equal(a.ids, np.arange(got.n)) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.images, b.images)
    for index, record in got.records.items():
        ref = reference.records[index]
        if (ref.first_id, ref.count) == (record.first_id, record.count):
            assert record.sha256 == ref.sha256, f"shard {index} differs"


def member_ids(s: ImageSet) -> Counter:
    """How often each id occurs as an image member over all shard files."""
    ids = Counter()
    for index in s.records:
        with tarfile.open(s.path / f"shard-{index:06d}.tar") as tar:
            ids.update(int(m.name.split(".")[0]) for m in tar.getmembers() if m.name.endswith(".png"))
    return ids


@pytest.mark.usefixtures("ray_local")
def test_resume_noop_and_growth_match_an_undisturbed_run(cli, tmp_path, spec, reference):
    from pipeline.generate import run_generate
    config = write_config(tmp_path, spec)

    def interrupt(progress):
        if progress.shards_done:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_generate(load_config(config), on_progress=interrupt, poll_seconds=0.01)
    partial = ImageSet.open(tmp_path / "ws", NAME)
    assert 1 <= len(partial.records) < 3 and not partial.complete

    code, out, _ = cli("generate", "-c", config)
    assert code == 0 and f"{len(partial.records)} complete, skipping them" in out and "complete, 40 images" in out
    assert_matches_reference(ImageSet.open(tmp_path / "ws", NAME), reference)

    code, out, _ = cli("generate", "-c", config)
    assert code == 0 and "is complete: 40 images in 3 shards - nothing to do" in out

    code, out, _ = cli("generate", "-c", config, "--n", "56", "--workers", "1")       # one worker, two threads
    assert code == 0 and "2 complete, skipping them; 2 to generate" in out
    grown = ImageSet.open(tmp_path / "ws", NAME)
    assert grown.n == 56 and len(grown.records) == 4
    assert_matches_reference(grown, reference)
    assert np.bincount(grown.read_range(0, 56).labels).tolist() == [14] * CLASSES      # balanced


@pytest.mark.usefixtures("ray_local")
def test_killed_worker_is_replaced_and_the_set_is_exact(tmp_path, spec, reference, capsys):
    from pipeline.generate import run_generate
    killed = []

    def kill_a_busy_worker(progress):
        for w in progress.workers:
            if not killed and w.shard is not None and w.pid:
                os.kill(w.pid, signal.SIGKILL)
                killed.append(w.pid)
    summary = run_generate(load_config(write_config(tmp_path, spec)), on_progress=kill_a_busy_worker, poll_seconds=0.01)
    assert killed and summary.replaced >= 1
    assert "died" in capsys.readouterr().err
    got = ImageSet.open(tmp_path / "ws", NAME)
    assert member_ids(got) == Counter(range(40))                      # each id exactly once, no gaps
    assert_matches_reference(got, reference)


def test_sample_is_the_same_whatever_the_batch(spec):
    model = load_model(spec)
    whole, labels = sample_floats(model, list(range(12)), settings(), torch.device("cpu"))
    parts = [sample_floats(model, ids, settings(), torch.device("cpu")) for ids in (list(range(5)), list(range(5, 12)))]
    assert torch.allclose(whole, torch.cat([p[0] for p in parts]), atol=1e-6, rtol=0)
    assert torch.equal(labels, torch.cat([p[1] for p in parts]))


def test_dry_run_prints_the_plan_and_writes_nothing(cli, tmp_path, spec):
    code, out, err = cli("generate", "-c", write_config(tmp_path, spec), "--n", "1.5k", "--dry-run")
    assert code == 0 and err == ""
    assert "plan: 1,500 images -> digits-gen: 94 shards" in out
    assert "on disk" in out and "images/s" in out and "probe" in out and "dry run: nothing written" in out
    assert not (tmp_path / "ws").exists()


def _one_line_exit_2(cli, *args):
    code, _, err = cli("generate", *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("n, needle", [("0", "invalid count '0'"), ("-5", "invalid count '-5'"),
                                       ("3x", "invalid count '3x'")])
def test_bad_count(cli, tmp_path, spec, n, needle):
    assert needle in _one_line_exit_2(cli, "-c", write_config(tmp_path, spec), "--n", n)
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("model, needle", [("dra:/no/such/model", "does not exist"), ("nonsense", "not understood")])
def test_unknown_model(cli, tmp_path, model, needle):
    assert needle in _one_line_exit_2(cli, "-c", write_config(tmp_path, model))
    assert not (tmp_path / "ws").exists()


def test_unwritable_root(cli, tmp_path, spec):
    blocker = tmp_path / "file"
    blocker.write_text("x")                      # a path under a regular file cannot be created, even by root
    assert "not writable" in _one_line_exit_2(cli, "-c", write_config(tmp_path, spec), "--root", blocker / "ws")


def test_existing_set_with_another_identity_is_refused(cli, tmp_path, spec):
    model = load_model(spec)
    other = ImageSetWriter(tmp_path / "ws", NAME, generated_identity(model, settings(seed=99), SHARD, None), 40)
    other.begin()
    before = {p.name: p.read_bytes() for p in other.path.iterdir()}
    err = _one_line_exit_2(cli, "-c", write_config(tmp_path, spec))
    assert "another identity" in err and "choose another --name or delete that folder" in err
    assert {p.name: p.read_bytes() for p in other.path.iterdir()} == before


# --- two nodes on one machine ------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_nodes_both_work(tmp_path, spec, reference):
    with two_nodes(tmp_path, dict(os.environ)) as (address, env, _):
        config = write_config(tmp_path, spec)
        done = subprocess.run([str(Path(sys.executable).with_name("dra-pipe")), "generate", "-c", str(config),
                               "--address", address],
                              env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 CPU workers x 1 thread, 2 nodes" in done.stdout
    assert_matches_reference(ImageSet.open(tmp_path / "ws", NAME), reference)
