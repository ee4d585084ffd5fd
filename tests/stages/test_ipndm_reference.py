"""iPNDM against the published reference implementation on the CIFAR-shaped conformance network.

tests/fixtures/ipndm-reference.npz holds the outputs of `ipndm_sampler` in zju-pi/diff-sampler
(diff-solvers-main/solvers.py, commit 68d5ce4; Apache-2.0, run outside this repository, not copied into it) with
`num_steps` N, EDM's polynomial schedule (rho 7, sigma 80 to 0.002, in float64), `max_order` 4 and
`denoise_to_zero` (its last evaluation returns D, as our last step to sigma 0 does: N NFE both), for the latents
and labels below, with the network called in float32 as our samplers call it. The two agreed to 7.5e-7 when the
fixture was made; float32 storage keeps about 1e-7.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO

from pipeline.bench.fidelity import conformance_network
from stages.samplers import sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net():
    return conformance_network().eval().requires_grad_(False)


@pytest.mark.parametrize("steps", [5, 8])
def test_ipndm_matches_the_published_implementation(net, steps):
    stored = np.load(REPO / "tests" / "fixtures" / "ipndm-reference.npz")[f"ipndm_{steps}"]
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ours = sample("ipndm", net, latents, torch.tensor([3, 7]), num_steps=steps)
    np.testing.assert_allclose(ours.numpy(), stored, rtol=0, atol=1e-5)
