"""SGD and AdamW parameter groups, cosine-with-warmup learning rate, EMA with warmup and copied BN statistics."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.classifiers import build_classifier
from trainer.dra import ProjectionHead
from trainer.optim import EMA, lr_at, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


def _small():
    torch.manual_seed(0)
    return build_classifier("small-cnn", 10, 1, 8, mean=0.5, std=0.5)


def test_optimizer_groups_exempt_bn_and_biases():
    model, head = _small(), ProjectionHead(64, 16, hidden=32)
    opt = make_optimizer(model, head, lr=0.1, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.SGD)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    assert decay["nesterov"] and decay["momentum"] == 0.9 and decay["lr"] == 0.1
    names = {id(p): n for n, p in [*model.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert decayed == {"stages.conv1.0.weight", "stages.conv2.0.weight", "stages.conv3.0.weight", "fc.weight",
                       "head.mlp.0.weight", "head.mlp.2.weight", "head.mlp.4.weight"}
    assert "stages.conv1.1.weight" in exempt and "fc.bias" in exempt and "head.mlp.0.bias" in exempt


def test_optimizer_without_head_and_frozen_params():
    model = _small()
    model.fc.weight.requires_grad_(False)
    opt = make_optimizer(model, None, lr=0.05, weight_decay=1e-4, nesterov=False, momentum=0.8)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == sum(p.requires_grad for p in model.parameters())
    assert opt.param_groups[0]["nesterov"] is False and opt.param_groups[0]["momentum"] == 0.8


def test_weight_decay_actually_skips_bn():
    model = _small()
    opt = make_optimizer(model, None, lr=1.0, weight_decay=0.1, momentum=0.0, nesterov=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bn_w, conv_w = model.stages.conv1[1].weight.detach().clone(), model.stages.conv1[0].weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model.stages.conv1[1].weight.detach(), bn_w)             # no decay
    torch.testing.assert_close(model.stages.conv1[0].weight.detach(), conv_w * 0.9)     # w -= lr * wd * w


def _tiny_vit():
    from trainer.vit import ViT
    torch.manual_seed(0)
    return ViT(dim=16, depth=2, heads=2, patch=2, arch="vit-s/2", num_classes=10, in_channels=1, resolution=4,
               mean=0.5, std=0.5)


def test_adamw_groups_exempt_norms_biases_and_position_embeddings():
    model = _tiny_vit()
    opt = make_optimizer(model, None, lr=1e-3, weight_decay=0.05, optimizer="adamw", betas=(0.8, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0
    assert decay["betas"] == (0.8, 0.95) and decay["lr"] == 1e-3
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {names[id(p)] for p in decay["params"]} == {
        n for n in names.values() if n.endswith("weight") and "norm" not in n}
    assert "stages.embed.pos_embed" in exempt and "stages.block1.norm1.weight" in exempt
    assert "stages.norm.norm.weight" in exempt and "stages.block2.attn.qkv.bias" in exempt


def test_adamw_decay_is_decoupled_and_skips_position_embeddings():
    """With zero gradients AdamW moves only by its decay, w -= lr * wd * w, and not on exempt parameters."""
    model = _tiny_vit()
    opt = make_optimizer(model, None, lr=0.5, weight_decay=0.1, optimizer="adamw")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pos, qkv = model.stages["embed"].pos_embed.detach().clone(), model.stages["block1"].attn.qkv.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model.stages["embed"].pos_embed.detach(), pos)
    torch.testing.assert_close(model.stages["block1"].attn.qkv.weight.detach(), qkv * 0.95)


def test_unknown_optimizer_refused():
    with pytest.raises(ValueError, match="sgd or adamw"):
        make_optimizer(_small(), None, lr=0.1, weight_decay=0.0, optimizer="adam")


def test_lr_schedule_warmup_then_cosine_to_zero():
    total, peak = 1000, 0.4
    lrs = [lr_at(s, total, peak, warmup_fraction=0.025) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / 25)                                 # 25 warmup steps
    assert lrs[24] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    assert all(b > a for a, b in zip(lrs[:24], lrs[1:25]))                    # linear increase
    assert lrs[12] - lrs[11] == pytest.approx(peak / 25)
    assert all(b <= a for a, b in zip(lrs[25:], lrs[26:]))                    # then monotone decrease
    mid = 25 + (total - 25) // 2
    assert lrs[mid] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (mid - 25) / 975)))
    assert lrs[total] == 0 and 0 < lrs[total - 1] < 1e-4 * peak
    assert lr_at(0, 10, 1.0, warmup_fraction=0.0) == 1.0
    with pytest.raises(ValueError):
        lr_at(0, 0, 1.0)


def test_ema_decay_warmup_matches_dm_at():
    ema = EMA(_small(), tau=0.995)
    assert ema.decay(1) == pytest.approx(2 / 11) and ema.decay(100) == pytest.approx(101 / 110)
    assert ema.decay(10_000) == 0.995
    delayed = EMA(_small(), tau=0.995, warmup_steps=50)
    assert delayed.decay(49) == 0 and delayed.decay(50) == pytest.approx(1 / 10)


def test_ema_averages_parameters_and_copies_bn_statistics():
    model = _small()
    ema = EMA(model, tau=0.9)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.rand(16, 1, 8, 8))                                    # moves running statistics
    ema.update(model)
    d = 2 / 11
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, d * start[name] + (1 - d) * (start[name] + 1))
    for name, b in ema.module.named_buffers():
        assert torch.equal(b, dict(model.named_buffers())[name])              # copied, not averaged
    assert ema.num_updates == 1
    for _ in range(200):
        ema.update(model)
    torch.testing.assert_close(ema.module.fc.weight, model.fc.weight.detach())  # converges to a fixed model


def test_ema_state_dict_round_trip():
    model = _small()
    ema = EMA(model, tau=0.99, warmup_steps=3)
    with torch.no_grad():
        model.fc.weight.mul_(2)
    for _ in range(5):
        ema.update(model)
    restored = EMA(_small(), tau=0.5)
    restored.load_state_dict(ema.state_dict())
    assert (restored.num_updates, restored.tau, restored.warmup_steps) == (5, 0.99, 3)
    for (n, a), (_, b) in zip(ema.module.state_dict().items(), restored.module.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        model.fc.weight.add_(1)
    ema.update(model)
    restored.update(model)
    assert torch.equal(ema.module.fc.weight, restored.module.fc.weight)
