"""Per-sample randomness: independent of batching, distinct across ids, seeds and streams; balanced labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.noise import churn_noise_fn, labels_for, latents_for, noise_for, one_hot, sample_generator, stream_seed

SHAPE = (3, 4, 4)


def test_latents_independent_of_batching():
    whole = latents_for(range(10), SHAPE, seed=5)
    parts = torch.cat([latents_for([i], SHAPE, seed=5) for i in range(10)])
    shuffled = latents_for([7, 2, 9], SHAPE, seed=5)
    assert whole.shape == (10, *SHAPE) and whole.dtype == torch.float32
    assert torch.equal(whole, parts)
    assert torch.equal(shuffled, whole[[7, 2, 9]])
    assert torch.equal(latents_for(np.array([3, 4]), SHAPE, 5), latents_for(torch.tensor([3, 4]), SHAPE, 5))


def test_ids_seeds_and_streams_differ():
    a = latents_for(range(50), SHAPE, seed=0)
    assert len({tuple(row.flatten().tolist()) for row in a}) == 50
    assert not torch.equal(a, latents_for(range(50), SHAPE, seed=1))
    assert not torch.equal(noise_for(range(5), SHAPE, 0, 100, "fp"), a[:5])
    assert not torch.equal(noise_for(range(5), SHAPE, 0, 100, "fp"), noise_for(range(5), SHAPE, 0, 200, "fp"))
    assert len({stream_seed(0, i, s) for i in range(100) for s in ("latents", "labels")}) == 200


def test_latents_are_standard_normal():
    x = latents_for(range(256), SHAPE, seed=3, dtype=torch.float64)
    assert x.dtype == torch.float64
    assert abs(x.mean().item()) < 5 / np.sqrt(x.numel())
    assert abs(x.var().item() - 1) < 5 * np.sqrt(2 / x.numel())


def test_generator_is_deterministic():
    a = torch.randn(4, generator=sample_generator(1, 2, "x"))
    assert torch.equal(a, torch.randn(4, generator=sample_generator(1, 2, "x")))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(1, 3, "x")))


@pytest.mark.parametrize("k", [10, 7])
def test_labels_balanced_and_per_id(k):
    labels = labels_for(range(20 * k), k, seed=11)
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < k
    for start in range(0, 20 * k, k):  # every K-aligned block holds each class once
        assert sorted(labels[start:start + k].tolist()) == list(range(k))
    assert torch.equal(labels_for([5 * k + 3, 2], k, 11), labels[[5 * k + 3, 2]])
    blocks = {tuple(labels[i:i + k].tolist()) for i in range(0, 20 * k, k)}
    assert len(blocks) > 1  # blocks are permuted independently
    assert not torch.equal(labels, labels_for(range(20 * k), k, seed=12))


def test_one_hot():
    assert torch.equal(one_hot(torch.tensor([2, 0]), 3), torch.tensor([[0., 0., 1.], [1., 0., 0.]]))


def test_churn_noise_per_sample_and_step():
    x = torch.zeros(4, *SHAPE, dtype=torch.float64)
    fn = churn_noise_fn([10, 11, 12, 13], seed=2)
    full = fn(x, 3)
    assert full.dtype == torch.float64 and full.shape == x.shape
    assert torch.equal(churn_noise_fn([12], seed=2)(x[:1], 3), full[2:3])
    assert not torch.equal(fn(x, 4), full)
    with pytest.raises(ValueError, match="batch"):
        fn(x[:2], 3)


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_bad_ids_rejected(bad):
    with pytest.raises(ValueError):
        latents_for([bad], SHAPE, seed=0)


def test_feature_noise_is_keyed_by_image_set():
    """Real image i and generated image i must not share their eps; a mixed batch gets each row's set's noise."""
    real = noise_for(range(4), SHAPE, 0, 100, "real-fp")
    generated = noise_for(range(4), SHAPE, 0, 100, "gen-fp")
    assert not torch.equal(real, generated)
    mixed = noise_for(range(4), SHAPE, 0, 100, ["real-fp", "gen-fp", "real-fp", "gen-fp"])
    assert torch.equal(mixed[0::2], real[0::2]) and torch.equal(mixed[1::2], generated[1::2])
    with pytest.raises(ValueError, match="2 noise streams for 4 ids"):
        noise_for(range(4), SHAPE, 0, 100, ["a", "b"])
