"""`dra-pipe bench gpu --smoke`: the GPU check's code paths on the CPU, so the prepared script cannot rot."""
from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from pipeline.bench.gpu import RECIPE, bench_gpu, project


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, ray_local):
    work = tmp_path_factory.mktemp("gpu")
    text = io.StringIO()
    result = bench_gpu(work, Console(file=text, width=200), smoke=True)
    return work, result, text.getvalue()


def test_sampler_variants_against_float32(smoke):
    _, r, _ = smoke
    rows = r["sampler"]["variants"]
    assert list(rows) == ["float32", "tf32", "bf16", "bf16+channels_last"]
    assert rows["float32"]["max_abs_diff"] == 0 and rows["float32"]["speedup"] == 1
    assert all(v["nfe"] == 2 * r["sampler"]["steps"] - 1 for v in rows.values())          # Heun: 2N - 1
    assert 0 < rows["bf16"]["max_abs_diff"] < 0.5 and rows["bf16"]["finite"]               # reduced, not broken
    assert 0 < rows["bf16+channels_last"]["max_abs_diff"] < 0.5 and rows["bf16+channels_last"]["finite"]
    assert rows["tf32"]["max_abs_diff"] < 1e-4                          # the CPU has no TF32: float32's math
    assert "bf16+compile" in r["sampler"]["skipped"]
    for v in rows.values():
        assert math.isclose(v["images_per_s"], r["sampler"]["batch"] / v["seconds"], rel_tol=1e-9)


def test_extract_views_train_loader_rows(smoke):
    _, r, _ = smoke
    for v in r["extract"].values():
        assert math.isclose(v["forwards_per_s"], v["views"] * v["images_per_s"], rel_tol=1e-9)
    assert {v["views"] for v in r["extract"].values()} == {1, 2}
    assert sorted(r["train"]) == sorted(f"{m}/{k}" for m in ("float32", "bf16+channels_last")
                                        for k in ("DM-AT", "DRA stored", "DRA online"))
    lo = r["loader"]
    assert lo["workers"] == 2 and math.isclose(lo["ratio"], lo["samples_per_s"] / lo["step_consumes"], rel_tol=1e-9)
    assert (r["scale"]["kind"] == "CPU" and set(r["scale"]["runs"]) == {"one", "all"}
            and r["scale"]["runs"]["all"]["actors"] == 2)


def test_projection_follows_from_the_measured_rates(smoke):
    _, r, _ = smoke
    p = project(r)
    f = p["from"]
    assert math.isclose(p["hours"]["generate"], RECIPE.images / f["generate_images_per_s"] / RECIPE.gpus / 3600)
    best = max(v["images_per_s"] for v in r["sampler"]["variants"].values())
    assert math.isclose(f["generate_images_per_s"], best * (2 * r["sampler"]["steps"] - 1) / (2 * RECIPE.steps - 1))
    trained = RECIPE.epochs * RECIPE.steps_per_epoch * RECIPE.batch
    assert math.isclose(p["hours"]["train"], trained / f["train_images_per_s"] / RECIPE.gpus / 3600)
    assert math.isclose(p["total_hours"], sum(p["hours"].values()))


def test_one_table_and_its_json(smoke):
    work, r, text = smoke
    assert json.loads((work / "gpu.json").read_text()) == json.loads(json.dumps(r))
    assert "bench gpu: cpu" in text and "projection" in text and "DM-AT+DRA / DM-AT" in text


WITHOUT_RAY = """
import sys, importlib.abc, json
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('ray', 'diffusers'):
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, Block())
from pathlib import Path
import torch
from pipeline.bench.gpu import _scale
print(json.dumps(_scale(None, Path(sys.argv[1]), torch.device('cpu'), smoke=True)))
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'diffusers'))))
"""


def test_without_ray_the_check_runs_and_says_scale_was_not_measured(tmp_path):
    """A one-GPU machine without network may lack Ray (its wheel is 79 MB): only the scale section needs it."""
    import subprocess
    import sys

    from conftest import REPO
    done = subprocess.run([sys.executable, "-c", WITHOUT_RAY, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    scale, loaded = map(json.loads, done.stdout.splitlines()[-2:])
    assert "Ray is not installed" in scale["note"] and loaded == []


def test_sampler_section_starts_no_variant_past_its_budget():
    """The check must fit a short GPU lease: past the budget the remaining variants are named, not run."""
    import torch

    from pipeline.bench.gpu import SMOKE
    from pipeline.bench.gpu_parts import bench_sampler_variants
    from stages.edm.networks import EDMPrecond
    net = EDMPrecond(**SMOKE.net).eval().requires_grad_(False)
    rows, skipped = bench_sampler_variants(net, 2, 2, torch.device("cpu"), 0.0, ("float32", "bf16", "tf32"), budget_s=0)
    assert list(rows) == ["float32"] and list(skipped) == ["bf16", "tf32"] and "budget (0 s)" in skipped["bf16"]
    rows, skipped = bench_sampler_variants(net, 2, 2, torch.device("cpu"), 0.0, ("float32", "tf32"))
    assert list(rows) == ["float32", "tf32"] and skipped == {}
