"""`bench sampler` on tiny networks: the figures it reports must be consistent with each other."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import REPO, FakeClock
from rich.console import Console

from pipeline.bench.sampler import CIFAR10_CONFIG, bench_sampler
from pipeline.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

TINY_FIT = {"fit_diffusion.model_channels": 8, "fit_diffusion.num_blocks": 1, "generate.batch_size": 6,
            "generate.steps": 3}
TINY_CIFAR = dict(CIFAR10_CONFIG, model_channels=8, channel_mult=[1, 1], num_blocks=1)


def _run(cfg, **kw):
    out = io.StringIO()
    results = bench_sampler(cfg, Console(file=out, width=240), cifar_batch=2, cifar_config=TINY_CIFAR,
                            device="cpu", min_seconds=0.0, **kw)
    return results, out.getvalue()


def test_reported_figures_are_consistent(tmp_path):
    cfg = load_config(None, {"root": str(tmp_path), **TINY_FIT})
    results, text = _run(cfg, variants=("bf16",))
    assert set(results["models"]) == {"digits", "cifar10"}
    for name, r in results["models"].items():
        b = 6 if name == "digits" else 2
        assert r["batch"] == b and r["steps"] == 3 and r["nfe"] == 2 * 3 - 1
        assert r["forward_seconds"] > 0 and r["sampler_seconds"] > 0
        assert r["forward_images_per_s"] == pytest.approx(b / r["forward_seconds"])
        assert r["forward_ms_per_image"] == pytest.approx(1000 * r["forward_seconds"] / b)
        assert r["sampler_images_per_s"] == pytest.approx(b / r["sampler_seconds"])
        assert r["overhead"] == pytest.approx(r["sampler_seconds"] / (r["nfe"] * r["forward_seconds"]))
    assert results["models"]["digits"]["shape"] == [1, 8, 8] and results["models"]["cifar10"]["shape"] == [3, 32, 32]
    assert "freshly initialised" in results["models"]["digits"]["source"]
    variant = results["variants"]["digits/bf16"]           # the GPU code path, exercised with CPU autocast
    assert variant["finite"] and variant["max_abs_diff"] >= variant["mean_abs_diff"] > 0   # bf16 did change the samples
    assert variant["speedup"] == pytest.approx(results["models"]["digits"]["sampler_seconds"]
                                               / variant["sampler_seconds"])
    assert "fp16, compile: need a CUDA GPU" in text and "sampler / (NFE x forward)" in text
    for name, r in results["models"].items():              # model.dtype bfloat16's deviation, on any device
        assert 0 < r["bf16_max_abs_diff"] < 0.1 and r["bf16_images"] == min(4, r["batch"]), (name, r)
        assert r["bf16_forward_ratio"] > 0
    cifar = results["models"]["cifar10"]
    assert f"{cifar['bf16_max_abs_diff']:.2e} (2)" in text and f"{cifar['bf16_forward_ratio']:.2f}" in text


def test_timings_are_those_of_the_timed_work(tmp_path, monkeypatch):
    """With a clock that advances 1 ms per image at every network evaluation and never otherwise, the benchmark
    must report exactly that: 1 ms per image per forward, 2N - 1 forwards per sample, overhead 1.0. A variant
    that is the same float32 computation (autocast switched off) must match the reference samples exactly and
    run at speed-up 1.0: a deviation above 0 would mean the variant and the reference saw other latents or labels."""
    import contextlib

    import torch

    from pipeline.bench import sampler as bench
    from stages.edm.networks import EDMPrecond
    clock, forward = FakeClock(), EDMPrecond.forward

    def ticking_forward(self, x, *args, **kwargs):
        clock.now += 1e-3 * x.shape[0]
        return forward(self, x, *args, **kwargs)
    monkeypatch.setattr(EDMPrecond, "forward", ticking_forward)
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    cfg = load_config(None, {"root": str(tmp_path), **TINY_FIT})
    results, _ = _run(cfg, variants=("bf16",))
    for r in results["models"].values():
        b = r["batch"]
        assert r["nfe"] == 5
        assert r["forward_seconds"] == pytest.approx(1e-3 * b) and r["forward_ms_per_image"] == pytest.approx(1.0)
        assert r["sampler_seconds"] == pytest.approx(5e-3 * b) and r["sampler_images_per_s"] == pytest.approx(200.0)
        assert r["overhead"] == pytest.approx(1.0)
    same = results["variants"]["digits/bf16"]
    assert same["max_abs_diff"] == 0 and same["mean_abs_diff"] == 0 and same["finite"]
    for r in results["models"].values():        # with autocast off, model.dtype bfloat16 is float32 on the same inputs
        assert r["bf16_max_abs_diff"] == 0 and r["bf16_images"] == min(4, r["batch"])
        assert r["bf16_forward_ratio"] == pytest.approx(1.0)                # one image's forward: 1 ms, as float32's
    assert same["speedup"] == pytest.approx(1.0) and same["sampler_seconds"] == pytest.approx(5e-3 * 6)


def test_uses_the_fitted_model_when_present(tmp_path):
    from pipeline.models import fit_settings, fitted_model_dir
    from stages.edm.networks import EDMPrecond
    from stages.fit_diffusion import network_config
    from stages.importers import import_source
    from stages.models import save_own
    from stores.images import ImageSet
    cfg = load_config(None, {"root": str(tmp_path), **TINY_FIT})
    import_source(tmp_path, "digits", None, None, 10000, "png")
    folder = fitted_model_dir(cfg)
    save_own(EDMPrecond(**network_config(ImageSet.open(tmp_path, "digits-train"), fit_settings(cfg))), folder, {})
    results, text = _run(cfg, cifar=False)
    assert list(results["models"]) == ["digits"] and results["variants"] == {}
    assert results["models"]["digits"]["source"].startswith(f"fitted model {folder.name}")
    assert "bf16, fp16, compile: need a CUDA GPU" in text


def test_cifar_config_is_the_official_one():
    conformance = REPO.parent / "shared" / "conformance" / "edm-cifar10-cond-vp.json"
    if not conformance.is_file():
        conformance = Path("/work/shared/conformance/edm-cifar10-cond-vp.json")
    if not conformance.is_file():
        pytest.skip("conformance data edm-cifar10-cond-vp not found")
    official = json.loads(conformance.read_text())["config"]
    official = {k: float("inf") if v == "inf" else v for k, v in official.items()}
    assert CIFAR10_CONFIG == official


def test_bf16_run_is_skipped_when_one_image_would_take_too_long(tmp_path, monkeypatch):
    """On a CPU that emulates bf16 the CIFAR-size network's bf16 run would take minutes: over the budget it is
    skipped and said so, with the forward ratio still measured."""
    from pipeline.bench import sampler as bench
    monkeypatch.setattr(bench, "BF16_SECONDS", 1e-6)
    results, text = _run(load_config(None, {"root": str(tmp_path), **TINY_FIT}), cifar=False)
    r = results["models"]["digits"]
    assert r["bf16_max_abs_diff"] is None and r["bf16_images"] == 0 and r["bf16_forward_ratio"] > 0
    assert "skipped (one image > 0 s)" in text
