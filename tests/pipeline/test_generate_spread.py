"""Generation spreads small jobs: with fewer shards than workers every worker samples part of a shard, and the
set holds the same bytes as one worker's."""
import numpy as np
import pytest
import yaml
from conftest import save_tiny_generator

from pipeline.shards.parts import ShardAssembler, split_jobs
from stages.generate import GenerateSettings, GenerateWorker, generated_identity
from stages.models import load_model
from stores.images import ImageSet, ImageSetWriter
from stores.manifest import ShardJob
from stores.plans import part_ranges

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, STEPS, SEED, CLASSES, N, SHARD = 4, 3, 5, 4, 50, 64     # one shard of 50 for two workers


@pytest.mark.parametrize("count,parts,align", [(50, 2, 4), (3000, 2, 64), (10, 3, 4), (7, 5, 4), (64, 2, 64)])
def test_parts_cover_the_range_in_whole_batches(count, parts, align):
    ranges = part_ranges(1000, count, parts, align)
    assert ranges[0][0] == 1000 and sum(c for _, c in ranges) == count
    assert all(a + c == b for (a, c), (b, _) in zip(ranges, ranges[1:]))          # contiguous, in order
    assert all((a - 1000) % align == 0 and c > 0 for a, c in ranges)             # starts on a batch boundary
    assert len(ranges) == min(parts, -(-count // align))
    assert max(c for _, c in ranges) - min(c for _, c in ranges[:-1] or ranges) <= align   # even


def test_jobs_split_only_when_workers_would_idle():
    jobs = [ShardJob(0, 0, 64), ShardJob(1, 64, 36)]
    assert split_jobs(jobs, 2, 4) == jobs
    parts = split_jobs(jobs, 3, 4)
    assert [(p.index, p.first_id, p.count) for p in parts] == [(0, 0, 32), (0, 32, 32), (1, 64, 20), (1, 84, 16)]
    written = []
    assembler = ShardAssembler(jobs, parts, lambda job, results: written.append((job.index, results)))
    for part in reversed(parts):                                                  # any arrival order
        assembler.record(part, part.first_id)
    assert written == [(1, [64, 84]), (0, [0, 32])] and assembler.written == 2


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return save_tiny_generator(tmp_path_factory, seed=2, classes=CLASSES)


def one_worker_set(root, spec: str) -> ImageSet:
    settings = GenerateSettings("heun", STEPS, 0.0, SEED, BATCH, "png")
    writer = ImageSetWriter(root, "gen", generated_identity(load_model(spec), settings, SHARD, None), N)
    writer.begin()
    worker = GenerateWorker(spec, settings, str(writer.path))
    for p in writer.pending():
        job = ShardJob(p.index, p.first_id, p.count)
        writer.record(worker.finish(job, worker.compute(job, lambda k: None)))
    writer.close()
    return ImageSet(writer.path)


@pytest.mark.usefixtures("ray_local")
def test_one_shard_is_sampled_by_both_workers_with_the_same_bytes(cli, tmp_path, spec):
    alone = one_worker_set(tmp_path / "alone", spec)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(tmp_path / "ws"), "data": {"shard_size": SHARD}, "model": {"spec": spec},
        "generate": {"n": N, "name": "gen", "steps": STEPS, "batch_size": BATCH, "seed": SEED},
        "ray": {"num_cpus": 2, "cpu_actors": 2}}))
    code, out, err = cli("generate", "-c", config)
    assert code == 0, err
    assert "per worker w0 28 / w1 22" in out and "(1 shards)" in out
    spread = ImageSet.open(tmp_path / "ws", "gen")
    assert spread.fingerprint == alone.fingerprint and list(spread.records) == [0]
    assert (spread.path / "shard-000000.tar").read_bytes() == (alone.path / "shard-000000.tar").read_bytes()
    assert spread.records[0].sha256 == alone.records[0].sha256
    assert np.array_equal(spread.read_range(0, N).images, alone.read_range(0, N).images)
