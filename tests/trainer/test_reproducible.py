"""Figures reproduce bit for bit on one machine and build: the same short training, run twice in one process
environment, writes the same metrics.jsonl values and the same weights (only the wall-clock rate differs)."""
import pytest
import torch
import yaml
from trainsets import workspace

from pipeline.config import load_config
from pipeline.plans.train import make_job
from trainer.loop import train
from trainer.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"epochs": 2, "batch_size": 32, "attack_steps": 2, "dra": True, "dra_hidden": 32, "holdout": 20,
         "holdout_pgd_steps": 2, "crop_pad": 1, "checkpoint_every": 2}
TIMING = {"images_per_s"}                       # wall-clock: the one field that may differ


def trained(tmp_path, name: str, loader_workers: int) -> RunFolder:
    config = load_config(tmp_path / "pipeline.yaml", {"train.loader_workers": loader_workers})
    job = make_job(config, name)
    run = RunFolder(job.run_dir)
    run.prepare(job.identity(), job.config)
    train(job)
    return run


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_the_same_training_twice_gives_bit_identical_metrics_and_weights(tmp_path, loader_workers):
    workspace(tmp_path / "ws", n_real=116, views=2, pad=1)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(tmp_path / "ws"), "train": SHORT}))
    first, second = (trained(tmp_path, name, loader_workers) for name in ("first", "second"))
    rows = [[{k: v for k, v in r.items() if k not in TIMING} for r in run.read_metrics()] for run in (first, second)]
    assert len(rows[0]) == SHORT["epochs"] and any("dra" in k for k in rows[0][0])     # DRA's term is logged
    assert rows[0] == rows[1]                                                        # floats compared exactly
    for weights in ("final", "best"):
        a, b = (torch.load(run.weights(weights), weights_only=True)["state_dict"] for run in (first, second))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
