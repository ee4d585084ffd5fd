"""Stage 2's device choices, checked without a GPU: where availability is mocked, it is because this torch is a
CPU-only build (torch.cuda.is_available() is always False here)."""
import types

import pytest
import torch
import yaml
from trainsets import workspace

from pipeline.config import load_config
from pipeline.plans.train import make_job
from stores.errors import UserError
from trainer import distributed
from trainer.loop import Dist, Trainer, ddp_device_ids
from trainer.runs import RunFolder

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


def meta_copy(batch: dict) -> dict:
    """The batch as train_step's non_blocking copy hands it over on a GPU; "meta" stands in for CUDA: its tensors
    hold no data, so any host-side lookup of them (.tolist(), numpy) raises instead of waiting for the copy."""
    return {k: v.to("meta") for k, v in batch.items()}


PAD, FLIP = 2, True                  # train.crop_pad, train.flip


def host_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"ids": torch.arange(5), "images": torch.randint(0, 256, (5, 8, 8, 1), generator=g, dtype=torch.uint8),
            "labels": torch.arange(5) % 3, "generated": torch.tensor([False, False, True, True, True]),
            "views": torch.tensor([0, 3, 1, 2, 0]), "targets": torch.randn(5, 4, 2, 2, generator=g)}


def test_views_mode_looks_views_up_on_the_host_batch_and_augments_on_the_device():
    from stores.views import view_augmentations
    from trainer.views import align
    host = host_batch()
    out = align("views", meta_copy(host), PAD, FLIP, torch.Generator(), view_seed=9, host=host)
    flips, shifts = view_augmentations(9, host["ids"], host["views"], 2, True)
    assert out.x.device.type == "meta" and out.targets.device.type == "meta"
    assert torch.equal(out.flips, flips) and torch.equal(out.shifts, shifts)


def test_online_mode_gives_the_teacher_host_ids_and_device_images():
    from trainer.views import align
    host, seen = host_batch(), {}

    def teacher(views, ids, labels, generated):
        seen.update(views=views.device.type, lookups={t.device.type for t in (ids, labels, generated)})
        return torch.zeros(len(ids), 4, 2, 2)                     # a CPU answer: align moves it to the batch

    out = align("online", meta_copy(host), PAD, FLIP, torch.Generator().manual_seed(1), teacher=teacher, host=host)
    assert seen == {"views": "meta", "lookups": {"cpu"}}
    assert out.targets.device.type == "meta" and out.x.device.type == "meta"


@pytest.mark.parametrize("mode", [None, "shifted"])
def test_no_dra_and_shifted_modes_never_read_device_tensors_on_the_host(mode):
    """Reading a GPU tensor on the host (int(shifts.max()) for the padding) would wait for the GPU every step."""
    from trainer.views import align
    host = host_batch()
    out = align(mode, meta_copy(host), PAD, FLIP, torch.Generator().manual_seed(1), host=host)
    assert out.x.device.type == "meta" and out.flips.device.type == "cpu"
    if mode == "shifted":
        assert out.targets.device.type == "meta" and out.mask.device.type == "meta"
