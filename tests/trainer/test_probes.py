"""Probes, the robust probe, the classification dimension and the TopK SAE on data whose answer is known."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.analysis.dimension import classification_dimension
from trainer.analysis.probe import ProbeSettings, fit_probe, probe_correct, robust_correct
from trainer.analysis.rows import TensorRows
from trainer.analysis.sae import SaeSettings, sae_scores, train_sae
from trainer.attacks import pgd_attack

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ProbeSettings(epochs=20, lr=0.05, batch=128, seed=0)


def _clusters(n: int, classes: int, dims: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dims, generator=gen) * 4
    y = torch.randint(0, classes, (n,), generator=gen)
    return centres[y] + spread * torch.randn(n, dims, generator=gen), y


def test_probe_is_perfect_on_separable_data_and_at_chance_on_shuffled_labels():
    x, y = _clusters(1200, 4, 10, 0.3, seed=0)
    train, test = TensorRows(x[:800]), TensorRows(x[800:])
    probe = fit_probe(train, y[:800], 4, FAST)
    assert probe_correct(probe, test, y[800:]).float().mean() == 1.0
    noise, _ = _clusters(3000, 1, 10, 1.0, seed=1)                 # one cloud: the features say nothing
    y = torch.randint(0, 4, (3000,), generator=torch.Generator().manual_seed(1))
    chance = probe_correct(fit_probe(TensorRows(noise[:2000]), y[:2000], 4, FAST), TensorRows(noise[2000:]), y[2000:])
    assert abs(float(chance.float().mean()) - 0.25) < 0.05          # 3.6 standard errors of 1000 test rows


def test_probe_is_seeded():
    x, y = _clusters(300, 3, 5, 2.0, seed=2)
    a, b = fit_probe(TensorRows(x), y, 3, FAST), fit_probe(TensorRows(x), y, 3, FAST)
    assert torch.equal(a.linear.weight, b.linear.weight)
    c = fit_probe(TensorRows(x), y, 3, ProbeSettings(epochs=20, lr=0.05, batch=128, seed=1))
    assert not torch.equal(a.linear.weight, c.linear.weight)


def _image_probe():
    """A probe on flattened 2x4x4 'images' in [0, 1] whose class is set by mean brightness of either channel."""
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 2, (400,), generator=gen)
    x = (0.3 + 0.4 * y[:, None, None, None].float() + 0.1 * torch.randn(400, 2, 4, 4, generator=gen)).clamp(0, 1)
    return x, y, fit_probe(TensorRows(x.flatten(1)), y, 2, FAST)


def test_robust_probe_on_a_teacher_that_ignores_its_input_is_fully_robust():
    x, y, probe = _image_probe()
    fixed = x.flatten(1).clone()                         # the features of the clean images, whatever the input
    clean, robust = robust_correct(lambda _: fixed, probe, x, y, eps=0.5, step_size=0.1, steps=10,
                                   generator=torch.Generator().manual_seed(0))
    assert clean.float().mean() > 0.9
    assert torch.equal(robust, clean)


def test_robust_probe_on_the_identity_teacher_equals_the_probes_own_pgd_accuracy():
    x, y, probe = _image_probe()
    eps, step, steps = 0.2, 0.05, 10
    _, robust = robust_correct(lambda images: images.flatten(1), probe, x, y, eps, step, steps,
                               generator=torch.Generator().manual_seed(5))
    direct = nn.Sequential(nn.Flatten(), probe).eval()
    x_adv = pgd_attack(direct, x, y, eps, step, steps, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        own = (direct(x).argmax(1) == y) & (direct(x_adv).argmax(1) == y)
    assert torch.equal(robust, own)
    assert robust.float().mean() < 0.6 < (direct(x).argmax(1) == y).float().mean()   # the attack does bite


def test_classification_dimension_of_classes_spread_over_three_directions():
    """8 classes at the corners of a 12 x 9 x 6 box in the first 3 of 10 dimensions (decreasing variance), the
    rest small noise: 2 components lose the third axis (at most half the classes), 3 separate them all."""
    gen = torch.Generator().manual_seed(4)
    y = torch.randint(0, 8, (1600,), generator=gen)
    bits = torch.stack([(y >> i) & 1 for i in range(3)], 1).float()
    x = torch.cat([bits * torch.tensor([12.0, 9.0, 6.0]), torch.zeros(1600, 7)], 1) + 0.3 * torch.randn(1600, 10,
                                                                                                    generator=gen)
    out = classification_dimension(TensorRows(x[:1000]), y[:1000], TensorRows(x[1000:]), y[1000:], 8, FAST)
    curve = dict(out["curve"])
    assert out["full_accuracy"] == 1.0 and out["dimension"] == 3
    assert curve[2] <= 0.55 and curve[3] == 1.0 and sorted(curve) == [1, 2, 3, 4, 8, 10]


def test_topk_sae_recovers_a_planted_sparse_dictionary():
    """Rows are nonnegative combinations of k = 2 of 24 unit atoms in 16 dimensions: the SAE's decoder directions
    find nearly every atom (cosine > 0.95) and reconstruct far better than the mean."""
    gen = torch.Generator().manual_seed(6)
    atoms = torch.randn(24, 16, generator=gen)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    n = 6000
    chosen = torch.stack([torch.randperm(24, generator=gen)[:2] for _ in range(n)])
    codes = torch.zeros(n, 24).scatter(1, chosen, 0.5 + torch.rand(n, 2, generator=gen))
    x = codes @ atoms
    sae = train_sae(TensorRows(x), SaeSettings(latents=48, k=2, epochs=30, lr=3e-3, batch=128, seed=0))
    scores = sae_scores(sae, TensorRows(x))
    best = (atoms @ sae.decoder.detach().T).max(dim=1).values                  # best cosine per true atom
    assert (best > 0.95).float().mean() >= 0.9, best
    assert scores["nmse"] < 0.1 and 0 <= scores["dead_fraction"] < 1 and scores["k"] == 2
    assert torch.allclose(sae.decoder.detach().norm(dim=1), torch.ones(48))          # unit decoder directions


def test_sae_scores_of_an_autoencoder_that_never_fires():
    """Every code zero: the reconstruction is b_pre, the data mean, so the normalised error is exactly 1 and
    every latent is dead."""
    from trainer.analysis.sae import TopKSAE
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(7)) * 3 + 5
    sae = TopKSAE(6, SaeSettings(latents=12, k=3), x.mean(0), 2.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
    scores = sae_scores(sae, TensorRows(x))
    assert scores["nmse"] == pytest.approx(1.0, rel=1e-5) and scores["dead_fraction"] == 1.0
