"""`bench sampler --fidelity`: its arithmetic on inputs whose answer is known, the conformance network, one tiny run."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from conftest import conformance_dir
from rich.console import Console

from pipeline.bench.fidelity import (
    bench_fidelity,
    conformance_network,
    nfe_needed,
    nfe_needed_line,
    off_fraction,
    rms_levels,
    speed_ratios,
)
from pipeline.bench.sampler import CIFAR10_CONFIG
from pipeline.config import load_config
from stages.sampler_registry import SAMPLERS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_FIT = {"fit_diffusion.model_channels": 8, "fit_diffusion.num_blocks": 1}
TINY_CIFAR = dict(CIFAR10_CONFIG, model_channels=8, channel_mult=[1, 1], num_blocks=1)


def test_rms_and_off_fraction_on_known_differences():
    reference = np.full((2, 2, 2, 1), 100, dtype=np.uint8)
    images = reference.copy()
    images[0, 0, 0, 0], images[1, 1, 1, 0] = 104, 97           # differences 4 and -3, six zeros
    assert rms_levels(images, reference) == pytest.approx(math.sqrt((16 + 9) / 8))
    assert off_fraction(images, reference) == pytest.approx(2 / 8)
    images[1, 1, 1, 0] = 98                                      # -2 is not more than 2 levels off
    assert off_fraction(images, reference) == pytest.approx(1 / 8)
    low, high = np.zeros((1, 1, 1, 1), np.uint8), np.full((1, 1, 1, 1), 255, np.uint8)
    assert rms_levels(low, high) == 255.0 and off_fraction(high, low) == 1.0     # no uint8 wrap-around


def test_nfe_needed_is_where_rms_stays_within_a_level():
    assert nfe_needed({5: 3.0, 8: 1.2, 10: 0.9, 12: 0.5, 35: 0.0}) == 10
    assert nfe_needed({5: 0.8, 8: 1.2, 10: 0.9, 35: 0.1}) == 10              # a dip at 5 that does not hold
    assert nfe_needed({5: 2.0, 35: 1.0}) == 35 and nfe_needed({5: 2.0, 35: 1.5}) is None
    assert nfe_needed_line("ipndm", 10) == "NFE needed for RMS <= 1 level: 10 (ipndm)"
    assert nfe_needed_line("euler", None) == "NFE needed for RMS <= 1 level: more than 35 (euler)"


def test_speed_ratio_at_equal_nfe_only():
    rows = [dict(sampler="heun", nfe=5, images_per_s=10.0), dict(sampler="heun", nfe=15, images_per_s=4.0),
            dict(sampler="ipndm", nfe=5, images_per_s=9.8), dict(sampler="ipndm", nfe=6, images_per_s=8.0),
            dict(sampler="ipndm", nfe=15, images_per_s=4.4)]
    assert speed_ratios(rows) == {"ipndm": {5: pytest.approx(0.98), 15: pytest.approx(1.1)}}


def test_conformance_network_matches_the_official_outputs():
    path = conformance_dir() / "edm-cifar10-cond-vp.npz"
    if not path.is_file():
        pytest.skip("conformance data edm-cifar10-cond-vp not found (set DRA_SHARED)")
    import torch
    data = np.load(path)
    net = conformance_network().eval()
    with torch.no_grad():
        d = net(torch.from_numpy(data["x"]), torch.from_numpy(data["sigma"]), torch.from_numpy(data["class_labels"]))
    np.testing.assert_allclose(d.numpy(), data["D"], rtol=1e-4, atol=1e-4)


def test_tiny_real_run(tmp_path):
    cfg = load_config(None, {"root": str(tmp_path), **TINY_FIT})
    out = io.StringIO()
    results = bench_fidelity(cfg, Console(file=out, width=240), images=3, cifar_images=1, cifar_config=TINY_CIFAR,
                             device="cpu", nfes=(5, 6, 35))
    text = out.getvalue()
    assert set(results["models"]) == {"digits", "cifar10"}
    for r in results["models"].values():
        assert {(row["sampler"], row["nfe"]) for row in r["rows"]} == (
            {(name, 5) for name in SAMPLERS} | {(name, 6) for name in SAMPLERS if name != "heun"}
            | {(name, 35) for name in SAMPLERS})
        # the reference is Heun at 199 NFE: Heun-35 is a measured row, its RMS the closeness the others must match
        heun35 = next(row for row in r["rows"] if (row["sampler"], row["nfe"]) == ("heun", 35))
        assert r["default_rms"] == heun35["rms"] > 0 and r["as_close_as_default"]["heun"] == 35
        assert r["skipped"] == {"heun": [6]}
        for row in r["rows"]:
            assert SAMPLERS[row["sampler"]].nfe(row["steps"]) == row["nfe"] and row["images_per_s"] > 0
            assert row["rms"] >= 0 and 0 <= row["off"] <= 1 and row["agreement"] is None   # no real set: no judge
        assert set(r["speed_ratio"]) == set(SAMPLERS) - {"heun"}
    for name in SAMPLERS:
        assert f"({name})" in text and "NFE needed for RMS <= 1 level: " in text
    assert text.count("NFE needed to be as close as Heun-35 (") == 2 * len(SAMPLERS)
    assert "against Heun 100 steps (199 NFE, converged)" in " ".join(text.split())
    assert "heun cannot make exactly NFE 6: skipped" in text


def test_judge_agreement_with_a_real_training_set(tmp_path):
    from stages.importers import import_source
    cfg = load_config(None, {"root": str(tmp_path), **TINY_FIT})
    import_source(tmp_path, "digits", None, None, 10000, "png")
    results = bench_fidelity(cfg, Console(file=io.StringIO(), width=240), images=10, cifar=False, device="cpu",
                             nfes=(5,))
    rows = results["models"]["digits"]["rows"]
    assert len(rows) == len(SAMPLERS) and all(0 <= row["agreement"] <= 1 for row in rows)
    # images of an untrained network: the judge sees noise, not each row's conditioning class every time
    assert min(row["agreement"] for row in rows) < 1
