"""The ViT classifiers (trainer/vit.py): token grids laid out like the image, pre-norm blocks, the patch check, the
parameter counts the help states, the DRA layer `auto` picks. The Classifier contract itself is
test_classifier_contract.py's; FLOPs are tests/pipeline/test_plans.py's."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stores.errors import UserError
from trainer.architectures import ARCHITECTURES
from trainer.classifiers import build_classifier
from trainer.job import check_dra_layer
from trainer.vit import ViT

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(dim=32, depth=4, heads=2)
COMMON = dict(num_classes=10, in_channels=3, resolution=8, mean=0.5, std=0.25)


def tiny(patch: int = 2, **over) -> ViT:
    torch.manual_seed(0)
    return ViT(**{**TINY, "patch": patch, **over}, arch=f"vit-s/{patch}", **COMMON).eval()


def test_stages_are_embed_blocks_norm_with_a_grid_each_and_the_middle_block_by_default():
    model = tiny(2)
    assert list(model.feature_layers()) == ["embed", "block1", "block2", "block3", "block4", "norm"]
    assert set(model.feature_layers().values()) == {(32, 4, 4)}
    assert model.default_dra_layer == "block2"
    with torch.device("meta"):
        assert build_classifier("vit-b/4", **COMMON).default_dra_layer == "block6"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not [n for n, _ in model.named_parameters() if "cls" in n]          # pooling, no class token


def test_token_grids_follow_the_image_through_every_block():
    """Without position embeddings a transformer is equivariant to moving tokens: shifting the image by one patch
    to the right must shift every stage's grid by one cell to the right. Broken by: tokens laid back on the grid
    column-major, or a block mixing up the token order."""
    model = tiny(2)
    with torch.no_grad():
        model.stages["embed"].pos_embed.zero_()
        x = torch.rand(2, 3, 8, 8)
        shifted = torch.roll(x, shifts=2, dims=3)                                 # one 2x2 patch to the right
        for layer in model.feature_layers():
            a = model.forward_features(x, layer)[1]                               # (2, 32, 4, 4)
            b = model.forward_features(shifted, layer)[1]
            torch.testing.assert_close(b, torch.roll(a, shifts=1, dims=3), msg=layer)
            assert not torch.allclose(b, torch.roll(a, shifts=1, dims=2)), layer


def test_embed_cell_sees_only_its_patch():
    model = tiny(4)
    x = torch.rand(1, 3, 8, 8)
    y = x.clone()
    y[..., 4:, :4] += 0.5                                                         # the bottom-left patch
    with torch.no_grad():
        changed = (model.forward_features(x, "embed")[1] != model.forward_features(y, "embed")[1]).any(dim=1)[0]
    assert changed.tolist() == [[False, False], [True, False]]


def test_blocks_are_pre_norm():
    """x + attn(LN1(x)), then + MLP(LN2(.)), attention computed by hand. Broken by: post-norm, a missing
    residual, heads split wrongly."""
    model = tiny(2)
    block = model.stages["block1"]
    grid = torch.randn(2, 32, 4, 4)
    tokens = grid.flatten(2).transpose(1, 2)                                      # (2, 16, 32)
    q, k, v = block.attn.qkv(block.norm1(tokens)).reshape(2, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 16 ** 0.5, dim=-1)         # (2, heads, 16, 16)
    attended = block.attn.proj((weights @ v).transpose(1, 2).reshape(2, 16, 32))
    h = tokens + attended
    h = h + block.mlp[2](F.gelu(block.mlp[0](block.norm2(h))))
    with torch.no_grad():
        torch.testing.assert_close(block(grid), h.transpose(1, 2).reshape(2, 32, 4, 4).detach())


def test_resolution_must_be_a_multiple_of_the_patch():
    with pytest.raises(UserError, match="resolution 10 must be a multiple of 4"):
        build_classifier("vit-s/4", **{**COMMON, "resolution": 10})
    build_classifier("vit-s/2", **{**COMMON, "resolution": 10})                 # 5x5 tokens


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a.startswith("vit-")])
def test_parameter_counts_are_what_the_help_says(arch):
    with torch.device("meta"):
        model = build_classifier(arch, 10, 3, 32, 0.5, 0.25)
    stated = float(re.search(r"([\d.]+)M at 32x32", ARCHITECTURES[arch].help).group(1))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(stated, abs=0.05)
    dim = {"s": 384, "b": 768}[arch[4]]
    assert model.fc.in_features == dim and len([s for s in model.stages if s.startswith("block")]) == 12
    assert model.stages["block1"].mlp[0].out_features == 4 * dim


def test_auto_dra_layer_is_the_middle_block_when_its_grid_matches_the_target():
    digits = SimpleNamespace(classes=10, channels=1, resolution=8)
    assert check_dra_layer("vit-s/2", "auto", digits, 0.5, 0.25, (8, 4, 4)) == "block6"    # 4x4 tokens
    assert check_dra_layer("vit-s/2", "auto", digits, 0.5, 0.25, (8, 2, 2)) == "block6"    # pooled 2x2
    assert check_dra_layer("vit-s/2", "block11", digits, 0.5, 0.25, (8, 4, 4)) == "block11"
    with pytest.raises(UserError, match="grid 2x2 cannot be matched to the diffusion target grid 4x4"):
        check_dra_layer("vit-s/4", "auto", digits, 0.5, 0.25, (8, 4, 4))
