"""Sample i of a generated set is a function of (seed, i) alone, not of where it sits: every shard holds other
images, and image i is the same whatever the shard size and the number of workers."""
import numpy as np
import pytest
import yaml
from conftest import save_tiny_generator

from stages.generate import GenerateSettings, GenerateWorker, generated_identity
from stages.models import load_model
from stores.images import ImageSet, ImageSetWriter
from stores.manifest import ShardJob

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, STEPS, SEED, CLASSES, N = 4, 3, 11, 4, 24     # shard sizes below are multiples of BATCH: same batches


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return save_tiny_generator(tmp_path_factory, seed=1, classes=CLASSES)


def one_worker_set(root, spec: str, shard_size: int) -> ImageSet:
    settings = GenerateSettings("heun", STEPS, 0.0, SEED, BATCH, "png")
    writer = ImageSetWriter(root, "gen", generated_identity(load_model(spec), settings, shard_size, None), N)
    writer.begin()
    worker = GenerateWorker(spec, settings, str(writer.path))
    for p in writer.pending():
        job = ShardJob(p.index, p.first_id, p.count)
        writer.record(worker.finish(job, worker.compute(job, lambda k: None)))
    return ImageSet(writer.path)


def test_no_two_shards_hold_the_same_image(tmp_path, spec):
    images = one_worker_set(tmp_path, spec, 4).read_range(0, N)
    assert len(images.ids) == N and images.images.std() > 10                   # real samples, not a blank
    distinct = {row.tobytes() for row in images.images}
    assert len(distinct) == N, f"{N - len(distinct)} repeated images across shards"


@pytest.mark.usefixtures("ray_local")
def test_image_i_is_the_same_for_any_shard_size_and_worker_count(cli, tmp_path, spec):
    small = one_worker_set(tmp_path / "s8", spec, 8).read_range(0, N)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(tmp_path / "ws"), "data": {"shard_size": 12}, "model": {"spec": spec},
        "generate": {"n": N, "name": "gen", "steps": STEPS, "batch_size": BATCH, "seed": SEED},
        "ray": {"num_cpus": 2, "cpu_actors": 2}}))
    code, out, err = cli("generate", "-c", config)
    assert code == 0, err
    large = ImageSet.open(tmp_path / "ws", "gen")
    assert large.shard_size == 12 and len(large.records) == 2
    got = large.read_range(0, N)
    assert np.array_equal(got.ids, small.ids) and np.array_equal(got.labels, small.labels)
    assert np.array_equal(got.images, small.images)
