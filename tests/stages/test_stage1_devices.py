"""Stage 1 on a device other than the CPU, without a GPU: random draws come from CPU generators by a documented
formula (so they cannot depend on the device), and the computation follows the model onto its device.

The "meta" device stands in for CUDA: tensors there have shapes but no data, so a forward runs anywhere, and a
CPU tensor meeting a meta one raises as a CPU tensor meeting a CUDA one does.
"""
import numpy as np
import torch
from conftest import tiny_edm_config

from stages.edm.networks import EDMPrecond
from stages.extract import FeatureWorker, NoiseLevel, default_layer, view_targets
from stages.generate import GenerateSettings, sample_floats
from stages.models import device_of, pick_device
from stages.noise import churn_noise_fn, labels_for, latents_for, noise_for, stream_seed

META = torch.device("meta")


def cpu_normal(shape, seed: int, key: int, stream: str) -> torch.Tensor:
    """The documented stream: torch.randn on a CPU generator seeded with stream_seed(seed, key, stream)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(stream_seed(seed, key, stream)))


def test_pick_device_is_the_first_visible_gpu_else_the_cpu(monkeypatch):
    """Mocked availability (no GPU here): `cuda` without an index is device 0 of the visible set, which in a
    Ray actor that reserved one GPU is that GPU; a hard-coded index would pick another actor's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device().type == "cuda" and pick_device().index in (None, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")


def test_latents_churn_and_feature_noise_are_the_cpu_generator_formula():
    ids, shape = [3, 0, 11], (1, 8, 8)
    assert torch.equal(latents_for(ids, shape, 7), torch.stack([cpu_normal(shape, 7, i, "latents") for i in ids]))
    churn = churn_noise_fn(ids, 7)(torch.zeros(3, *shape, device=META), 2)
    assert churn.device == META                                   # moved to the batch's device after the draw
    on_cpu = churn_noise_fn(ids, 7)(torch.zeros(3, *shape), 2)
    assert torch.equal(on_cpu, torch.stack([cpu_normal(shape, 7, i, "churn/2") for i in ids]))
    eps = noise_for(ids, shape, 5, 40, "setA")
    assert torch.equal(eps, torch.stack([cpu_normal(shape, 5, i, "feature-noise/setA/40") for i in ids]))
    perm = torch.randperm(10, generator=torch.Generator("cpu").manual_seed(stream_seed(7, 1, "labels")))
    assert labels_for([13], 10, 7).tolist() == [int(perm[3])]


def test_generate_samples_on_the_model_device_with_cpu_drawn_noise_and_labels():
    """The sampler runs where the model is (churn noise included); the labels written come back on the CPU."""
    model = EDMPrecond(**tiny_edm_config()).eval().to(META)
    ids = [4, 5, 6]
    x, labels = sample_floats(model, ids, GenerateSettings("heun", 3, churn=5.0, batch_size=3), META)
    assert x.device == META and x.shape == (3, 1, 8, 8)
    assert labels.device.type == "cpu" and torch.equal(labels, labels_for(ids, 10, 0))


def test_feature_targets_follow_the_model_onto_its_device():
    """CPU images and CPU-drawn eps meet a model on another device: they move to it (the extract workers' path,
    whose images come from numpy) instead of raising."""
    model = EDMPrecond(**tiny_edm_config()).eval().to(META)
    views = torch.zeros(2, 8, 8, 1, dtype=torch.uint8)
    out = view_targets(model, torch.tensor([0, 1]), views, np.array([1, 2]), default_layer(model),
                       NoiseLevel(0.5, None), 0, "none", "setA")
    assert out.device == META and out.shape[0] == 2


def test_feature_worker_puts_its_model_on_the_picked_device(monkeypatch, tiny_model_dir):
    """Before, the worker kept the model on the CPU inside a GPU actor. pick_device is patched to meta (no GPU)."""
    monkeypatch.setattr("stages.extract.pick_device", lambda: META)
    worker = FeatureWorker(f"dra:{tiny_model_dir}", "dec.4x4_in1", "none", 0, 8)
    assert device_of(worker.model) == META
