"""Stage 2's device choices, checked without a GPU: where availability is mocked, it is because this torch is a
CPU-only build (torch.cuda.is_available() is always False here)."""
import types

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.plans.train import make_job
from stores.errors import UserError
from trainer import distributed
from trainer.loop import Dist, Trainer, ddp_device_ids
from trainer.runs import RunFolder
from trainsets import workspace

pytestmark = pytest.mark.usefixtures("one_thread")


def gpu_visible(monkeypatch, visible: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)


@pytest.mark.parametrize("visible, device", [(True, torch.device("cuda", 0)), (False, torch.device("cpu"))])
def test_single_process_training_takes_the_first_gpu_else_the_cpu(monkeypatch, visible, device):
    gpu_visible(monkeypatch, visible)
    dist = Dist.local()
    assert dist.device == device and (dist.rank, dist.world_size) == (0, 1)


def test_ddp_gets_the_ranks_own_gpu_and_no_device_ids_on_the_cpu(monkeypatch):
    assert ddp_device_ids(torch.device("cpu")) is None
    assert ddp_device_ids(torch.device("cuda", 3)) == [3]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)    # `cuda` alone: the current device
    assert ddp_device_ids(torch.device("cuda")) == [2]


@pytest.mark.parametrize("visible, backend, resources", [(True, "nccl", {"CPU": 1, "GPU": 1}),
                                                         (False, "gloo", {"CPU": 1})])
def test_ray_train_gets_nccl_and_a_gpu_per_worker_only_where_there_are_gpus(monkeypatch, visible, backend, resources):
    """train_distributed's TorchTrainer is replaced by a recorder: NCCL cannot start on a CPU-only build, and what
    is checked is what the trainer is asked for (gloo really runs in test_train's two-worker test)."""
    import ray
    import ray.train.torch
    asked = {}

    class Recorder:
        def __init__(self, fn, train_loop_config, scaling_config, torch_config, run_config):
            asked.update(scaling=scaling_config, torch=torch_config)

        def fit(self):
            return None

    gpu_visible(monkeypatch, visible)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Recorder)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4, "GPU": 2})
    distributed.train_distributed(types.SimpleNamespace(name="r", run_dir="/nonexistent/r"), 2)
    assert asked["torch"].backend == backend
    assert asked["scaling"].use_gpu is visible and asked["scaling"].resources_per_worker == resources
    assert distributed.worker_resources(visible) == resources and distributed.process_group_backend(visible) == backend


def test_a_checkpoint_written_on_another_device_kind_is_refused_in_one_line(tmp_path):
    """The attack stream is a CUDA generator on a GPU (its state does not fit a CPU generator): resuming a GPU
    checkpoint on the CPU must say so, not fail inside torch with a traceback."""
    workspace(tmp_path / "ws", n_real=116)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(tmp_path / "ws"), "train": {
        "epochs": 1, "batch_size": 32, "attack_steps": 1, "dra_hidden": 8, "holdout": 0, "loader_workers": 0}}))
    job = make_job(load_config(tmp_path / "pipeline.yaml", {}), "moved")
    RunFolder(job.run_dir).prepare(job.identity(), job.config)
    trainer = Trainer(job, Dist())
    own = trainer.rng_state()
    trainer.set_rng_state(own)                                          # the same kind: resumes
    with pytest.raises(UserError, match="written training on cuda.*resume it on cuda"):
        trainer.set_rng_state({**own, "cuda": torch.zeros(16, dtype=torch.uint8)})
