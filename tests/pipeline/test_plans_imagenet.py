"""pipeline.imagenet64.yaml (issue 25 item 3): the recipe's shape validates, and its dry runs plan 1,281,167 real
and 1M generated 64x64 images with the published ADM where neither the checkpoint nor ImageNet is here."""
from __future__ import annotations

import re

import pytest
from conftest import REPO

from pipeline.config import load_config
from pipeline.estimates import gpu_hours
from pipeline.plans.costs import classifier_line
from pipeline.plans.train import describe, make_job
from pipeline.workflow import real_test_set

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGENET_YAML = REPO / "pipeline.imagenet64.yaml"


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1).replace(",", ""))


def test_the_recipe_states_imagenet_64_at_4_over_255_on_a_balanced_val_subset():
    cfg = load_config(IMAGENET_YAML)
    assert (cfg.data.importer, cfg.data.resolution) == ("imagenet", 64) and real_test_set(cfg) == "imagenet-val"
    assert cfg.model.spec.endswith("edm-imagenet-64x64-cond-adm.pkl") and cfg.features.layer == "dec.8x8_in1"
    assert cfg.train.epsilon == pytest.approx(4 / 255) and cfg.train.arch == "vit-b/4"
    assert (cfg.eval.n, cfg.eval.subset, cfg.eval.autoattack) == (5000, "per-class", True)


def test_the_train_plan_reads_the_planned_imagenet_sets(tmp_path):
    cfg = load_config(IMAGENET_YAML, overrides={"root": str(tmp_path / "ws")})
    job = make_job(cfg, planned=[])
    text = " ".join([*describe(job), classifier_line(job)])
    assert "real imagenet-train 1271167 images (+10000 held out" in text
    assert "generated imagenet-gen-1m 1000000 images" in text
    assert "1242 steps per epoch (ceil(1271167 / 1024)) x 100 epochs = 124200 steps" in text
    assert "L-inf eps 0.0156863" in text and "optimizer auto: adamw" in text
    assert "classifier layer block6 -> head (hidden 2048, depth 3) -> targets 768x8x8" in text
    assert "classifier vit-b/4: 1,264 GFLOP per image per TRADES step" in text                # README


def test_generate_dry_run_plans_1m_images_with_the_published_adm(cli, tmp_path):
    """The plan times a randomly initialised 296M-parameter ADM on this CPU (about 15 s)."""
    code, out, err = cli("generate", "--dry-run", "-c", IMAGENET_YAML, "--root", tmp_path / "ws")
    assert code == 0, err
    text = " ".join(out.split())
    assert "plan: 1,000,000 images -> imagenet-gen-1m: 100 shards" in text
    assert "published architecture of edm-imagenet-64x64-cond-adm.pkl (295,899,267 parameters" in text
    per_eval = number(r"79 network evaluations x ([\d.]+) GFLOP", text)
    assert number(r"~([\d,.]+) GPU-hours", text) == pytest.approx(gpu_hours(1e6 * 79 * per_eval * 1e9), rel=0.1)


def test_extract_dry_run_plans_the_bytes_of_both_sets(cli, tmp_path):
    code, out, err = cli("extract-features", "--dry-run", "-c", IMAGENET_YAML, "--root", tmp_path / "ws")
    assert code == 0, err
    text = " ".join(out.split())
    assert "planned as 1,281,167 images of 3x64x64, 1000 classes" in text
    assert "targets 768x8x8 float16 per view at t=100" in text          # 768 * 64 * 2 bytes = 98.3 KB per view
    assert "imagenet-train: 1,281,167 images x 4 view(s) x 1 noise level(s) x 98.3 KB = 393.2 KB per image" in text
    assert "imagenet-gen-1m: 1,000,000 images x 2 view(s) x 1 noise level(s) x 98.3 KB" in text
    assert not (tmp_path / "ws").exists()
