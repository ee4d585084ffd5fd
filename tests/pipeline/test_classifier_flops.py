"""The train plan's classifier line: GFLOP per image per TRADES step, counted, beside WRN-28-10's; checked against
a count by hand for ViT-B/2 at 32x32 (the paper's ViT), and printed by a dry run of a ViT recipe."""
from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO

from pipeline.config import load_config
from pipeline.plans.costs import classifier_line, trades_step_flops
from pipeline.plans.train import describe, make_job

CIFAR_YAML = REPO / "pipeline.cifar10.yaml"


def vit_flops_by_hand(tokens: int, dim: int, depth: int, patch_inputs: int, classes: int, attack_steps: int) -> int:
    """A matmul of (m, k) by (k, n) is 2mkn FLOPs. Per block: qkv 3ND^2, projection ND^2, MLP 8ND^2 multiply-adds,
    and the two attention matmuls (N x N scores, then the weighted values) N^2 D each; plus the patch embedding and
    the head. Backward to the input alone (the attack): each linear layer once more, each attention matmul twice
    (both its operands depend on the input). Backward to the weights too (training): linear layers twice, the
    patch embedding once (the image needs no gradient). TRADES: p(x) once, then per attack step a forward and a
    backward to the input, then the clean and adversarial forwards and both backwards."""
    n, d, c, k = tokens, dim, patch_inputs, classes
    dense, attention = 12 * n * d * d, 2 * n * n * d
    forward = 2 * (depth * (dense + attention) + n * c * d + d * k)
    to_input = 2 * (depth * (dense + 2 * attention) + n * c * d + d * k)
    to_weights = 2 * (depth * (2 * dense + 2 * attention) + n * c * d + 2 * d * k)
    return (attack_steps + 3) * forward + attack_steps * to_input + 2 * to_weights


def test_vit_b2_at_32x32_counts_what_a_hand_count_gives():
    """256 tokens of 768 channels, 12 blocks: 45.9 GFLOP per forward, 1,264 GFLOP per TRADES-10 step."""
    with torch.device("meta"):
        from trainer.classifiers import build_classifier
        model = build_classifier("vit-b/2", 10, 3, 32, 0.5, 0.25)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(86e6, rel=0.01)
    counted = trades_step_flops("vit-b/2", 3, 32, 10, 10)
    assert counted == vit_flops_by_hand(256, 768, 12, 3 * 2 * 2, 10, 10)
    assert counted / 1e9 == pytest.approx(1263.6, abs=0.1)                    # README


def test_the_plan_of_a_vit_recipe_states_its_trades_step_beside_wrn_28_10_and_its_optimizer(tmp_path):
    """The CIFAR-10 recipe with a ViT (planned stores: nothing there yet) and the per-optimizer lr and decay:
    AdamW chosen by auto, the middle block aligned with the teacher's 8x8 grid. (`dra-pipe train --dry-run` prints
    these lines: tests/trainer/test_train.py::test_dry_run_prints_plan_and_trains_nothing.)"""
    config = yaml.safe_load(CIFAR_YAML.read_text())
    config["root"] = str(tmp_path / "ws")
    config["train"].update(arch="vit-s/4", lr=None, weight_decay=None)          # null: the optimizer's
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    job = make_job(load_config(tmp_path / "pipeline.yaml"), planned=[])
    text = " ".join([*describe(job), classifier_line(job)])
    assert ("classifier vit-s/4: 76.24 GFLOP per image per TRADES step (10 attack steps, no DRA head), "
            "wrn-28-10 283.1 on the same 32x32 images (0.27x)") in text                  # README
    assert "optimizer auto: adamw (betas 0.9, 0.999), peak lr 0.001 (warmup, then cosine to 0), weight decay 0.05" \
        in text
    assert "classifier layer block6 -> head" in text and "-> targets 256x8x8" in text


def test_attention_on_the_cpu_is_counted_as_on_the_meta_device():
    """torch's CPU attention kernel is missing from its FLOP registry: without pipeline.estimates' alias a ViT's
    training step counted on the CPU (the plan's `compute:` line) would leave attention out."""
    from pipeline.estimates import count_flops
    from trainer.vit import ViT
    torch.manual_seed(0)
    model = ViT(dim=32, depth=2, heads=2, patch=2, arch="vit-s/2", num_classes=10, in_channels=3, resolution=8,
                mean=0.5, std=0.25)
    with torch.device("meta"):
        meta = ViT(dim=32, depth=2, heads=2, patch=2, arch="vit-s/2", num_classes=10, in_channels=3, resolution=8,
                   mean=0.5, std=0.25)
    on_cpu = count_flops(lambda: model(torch.rand(1, 3, 8, 8)))
    assert on_cpu == count_flops(lambda: meta(torch.rand(1, 3, 8, 8, device="meta")))
    assert on_cpu == 2 * (2 * (12 * 16 * 32 * 32 + 2 * 16 * 16 * 32) + 16 * 12 * 32 + 32 * 10)
