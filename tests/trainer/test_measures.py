"""The representation measures (trainer/analysis) on inputs whose answer is known independently of the code."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.analysis.cka import CrossMoments, linear_cka
from trainer.analysis.geometry import alignment, uniformity
from trainer.analysis.rows import TensorRows
from trainer.analysis.saliency import FrequencySpectrum
from trainer.analysis.spectrum import Moments, effective_rank, singular_distribution


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_effective_rank_of_known_matrices():
    n = 6
    assert effective_rank(torch.eye(n), center=False) == pytest.approx(n)
    assert effective_rank(torch.eye(n)) == pytest.approx(n - 1)              # centring removes the mean direction
    u, v = torch.randn(50, 1, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(u @ v + 3.0) == pytest.approx(1.0, abs=1e-6)      # a constant offset is not a direction
    assert effective_rank(7 * torch.eye(n), center=False) == pytest.approx(n)  # scale-free
    assert effective_rank(torch.zeros(5, 3)) == 0.0


def test_effective_rank_and_spectrum_of_a_chosen_spectrum():
    """X = U diag(s) V^T with orthonormal U, V: p = s / sum(s) and erank = exp(-sum p log p), by hand."""
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    u, v = _orthogonal(40, 1)[:, :5], _orthogonal(5, 2)
    x = u @ torch.diag(s) @ v.T
    p = s / s.sum()
    expected = math.exp(-sum(float(q) * math.log(float(q)) for q in p))
    assert effective_rank(x, center=False) == pytest.approx(expected, rel=1e-9)
    assert singular_distribution(x, center=False).tolist() == pytest.approx(p.tolist(), rel=1e-9)
    centred = x - x.mean(0)                                       # streamed moments see the centred matrix
    moments = Moments(5)
    for part in centred.split(7):
        moments.add(part)
    assert moments.effective_rank() == pytest.approx(effective_rank(centred), rel=1e-6)
    assert moments.spectrum()[:5].tolist() == pytest.approx(singular_distribution(centred).tolist(), abs=1e-9)


def test_cka_is_one_for_identical_and_rotated_features_and_near_zero_for_independent_ones():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3, 12, dtype=torch.float64)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 5 * x @ _orthogonal(12, 3) + 2.0) == pytest.approx(1.0, abs=1e-9)   # rotation, scale, shift
    assert linear_cka(x, torch.randn(2000, 8, generator=gen, dtype=torch.float64)) < 0.02
    partly = x[:, :6]                                              # half the directions: strictly between
    assert 0.1 < linear_cka(x, partly) < 0.95
    streamed = CrossMoments(12, 12)
    for a, b in zip(x.split(300), (x @ _orthogonal(12, 3)).split(300)):
        streamed.add(a, b)
    assert streamed.cka() == pytest.approx(1.0, abs=1e-9)


def test_ridge_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    m = CrossMoments(6, 3)
    m.add(x, x @ w + 1.5)
    fitted, bias = m.ridge(1e-9)
    assert torch.allclose(fitted, w, atol=1e-6) and torch.allclose(bias, torch.full((3,), 1.5, dtype=torch.float64))


@pytest.mark.parametrize("t", [1.0, 2.0, 3.5])
def test_uniformity_matches_its_closed_form_on_the_circle(t):
    """N points evenly on the unit circle: |z_i - z_j|^2 = 2 - 2 cos(theta_ij). The mean of exp(-t |z_i - z_j|^2)
    over all N^2 ordered pairs is an N-point rule for the mean over the circle, exp(-2t) I_0(2t) (modified Bessel
    function; exact to rounding for smooth periodic integrands); the N pairs i = j contribute 1 each, so over the
    N (N - 1) distinct pairs the mean is (N exp(-2t) I_0(2t) - 1) / (N - 1)."""
    n = 720
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    z = torch.stack([angles.cos(), angles.sin()], 1) * 3.0          # the scale is normalised away
    circle = math.exp(-2 * t) * float(torch.special.i0(torch.tensor(2 * t, dtype=torch.float64)))
    assert uniformity(z, t, block=100) == pytest.approx(math.log((n * circle - 1) / (n - 1)), abs=1e-9)
    assert uniformity(torch.ones(4, 2), t) == pytest.approx(0.0, abs=1e-12)      # collapsed: log E exp(0) = 0
    two = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])                                  # antipodal: |d|^2 = 4
    assert uniformity(two, t) == pytest.approx(-4 * t)


def test_alignment_of_known_pairs():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert alignment(a, 3 * a) == pytest.approx(0.0)
    assert alignment(a, -a) == pytest.approx(4.0)                    # antipodal pairs: |2|^2
    assert alignment(a, a.flip(1)) == pytest.approx(2.0)             # orthogonal pairs: sqrt(2)^2


@pytest.mark.parametrize("size, freq, low", [(8, 1, True), (8, 3, False), (32, 5, True), (32, 12, False)])
def test_saliency_puts_a_sinusoid_in_its_band(size, freq, low):
    x = torch.arange(size, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * freq * x / size)[None, :].expand(size, size)       # varies along the width
    grads = torch.stack([wave, 2 * wave])[:, None]                                    # (2, 1, H, W)
    spectrum = FrequencySpectrum(size, size)
    spectrum.add(grads)
    radial = spectrum.radial()
    assert max(range(len(radial)), key=radial.__getitem__) == freq
    assert radial[freq] == pytest.approx(1.0)
    assert spectrum.low_fraction() == pytest.approx(1.0 if low else 0.0)
    assert spectrum.frequencies()[freq] == pytest.approx(freq / size)


def test_row_stores_agree(tmp_path):
    from trainer.analysis.rows import FileRows, ProjectedRows
    data = torch.randn(10, 4)
    stored = FileRows(tmp_path, "x", 10, 4)
    for lo in range(0, 10, 3):
        stored.put(lo, data[lo:lo + 3])
    index = torch.tensor([7, 2, 2, 9])
    assert torch.equal(stored[index], TensorRows(data)[index])
    basis = torch.eye(4)[:, :2]
    assert torch.allclose(ProjectedRows(stored, data.mean(0), basis)[index], (data[index] - data.mean(0))[:, :2])
