"""Adversaries and AT losses on a small CNN trained for a few seconds on scikit-learn's digits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from trainer.attacks import margin_loss, pgd_at_loss, pgd_attack, trades_adversary, trades_loss
from trainer.classifiers import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread_for_module")   # tiny models: see conftest.one_thread

EPS = 0.1


@pytest.fixture(scope="module")
def trained():
    """(model in eval mode, held-out x (128, 1, 8, 8) in [0, 1], y): about 96% clean accuracy."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target)
    model = build_classifier("small-cnn", 10, 1, 8, mean=0.3, std=0.35)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        perm = torch.randperm(1500)
        for i in range(0, 1500, 100):
            idx = perm[i:i + 100]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval().zero_grad(set_to_none=True)
    return model, x[1500:1628], y[1500:1628]


def _ce_acc(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _assert_in_ball(x_adv, x, eps):
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_raises_loss_and_stays_in_ball(trained, loss):
    model, x, y = trained
    clean_ce, clean_acc = _ce_acc(model, x, y)
    x_adv = pgd_attack(model, x, y, EPS, EPS / 4, 10, loss=loss, generator=_gen())
    _assert_in_ball(x_adv, x, EPS)
    adv_ce, adv_acc = _ce_acc(model, x_adv, y)
    assert clean_acc > 0.9
    assert adv_ce > clean_ce + 0.8 and adv_acc < clean_acc - 0.25, (clean_ce, adv_ce, clean_acc, adv_acc)
    with torch.no_grad():
        assert margin_loss(model(x_adv), y).mean() > margin_loss(model(x), y).mean() + 2
    assert not x_adv.requires_grad and model.fc.weight.grad is None          # no parameter gradients


def test_margin_loss_values():
    logits = torch.tensor([[2.0, 5.0, 1.0], [0.0, -1.0, 3.0]])
    torch.testing.assert_close(margin_loss(logits, torch.tensor([1, 2])), torch.tensor([-3.0, -3.0]))
    torch.testing.assert_close(margin_loss(logits, torch.tensor([0, 1])), torch.tensor([3.0, 4.0]))


def test_restarts_never_make_things_worse(trained):
    model, x, y = trained
    kw = dict(eps=EPS / 2, step_size=EPS / 8, steps=3)
    one = pgd_attack(model, x, y, restarts=1, generator=_gen(5), **kw)
    four = pgd_attack(model, x, y, restarts=4, generator=_gen(5), **kw)       # first restart draws the same start
    _assert_in_ball(four, x, EPS / 2)
    with torch.no_grad():
        l1, l4 = (F.cross_entropy(model(a), y, reduction="none") for a in (one, four))
        w1, w4 = (model(a).argmax(1) != y for a in (one, four))
    assert bool((w4 >= w1).all())
    same = w1 == w4
    assert bool((l4[same] >= l1[same] - 1e-6).all())
    assert w4.sum() + (l4[same] > l1[same] + 1e-6).sum() > w1.sum()      # some sample got strictly worse


def test_deterministic_with_generator(trained):
    model, x, y = trained
    a = pgd_attack(model, x, y, EPS, EPS / 4, 2, generator=_gen(1))
    b = pgd_attack(model, x, y, EPS, EPS / 4, 2, generator=_gen(1))
    c = pgd_attack(model, x, y, EPS, EPS / 4, 2, generator=_gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    t1 = trades_adversary(model, x, EPS, EPS / 4, 2, generator=_gen(1))
    assert torch.equal(t1, trades_adversary(model, x, EPS, EPS / 4, 2, generator=_gen(1)))


def test_no_random_start_zero_steps_is_identity(trained):
    model, x, y = trained
    assert torch.equal(pgd_attack(model, x, y, EPS, EPS / 4, 0, random_start=False), x)


def test_mode_untouched_and_bn_statistics_not_updated_in_train_mode():
    torch.manual_seed(0)
    model = build_classifier("small-cnn", 10, 1, 8, mean=0.5, std=0.5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    pgd_attack(model, x, y, EPS, EPS / 4, 2, generator=_gen())
    trades_adversary(model, x, EPS, EPS / 4, 2, generator=_gen())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # running stats unchanged
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.track_running_stats for m in bns)
    model(x)                                                                        # a training forward still updates
    assert not torch.equal(before["stages.conv1.1.running_mean"], model.stages.conv1[1].running_mean)
    model.eval()
    pgd_attack(model, x, y, EPS, EPS / 4, 1, generator=_gen())
    assert not model.training


@pytest.mark.parametrize("start", ["normal", "uniform"])
def test_trades_adversary_increases_kl_within_ball(trained, start):
    model, x, _ = trained
    x_adv = trades_adversary(model, x, EPS, EPS / 4, 10, generator=_gen(), start=start)
    _assert_in_ball(x_adv, x, EPS)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        start_kl = F.kl_div(F.log_softmax(model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)), 1), p,
                            reduction="batchmean")
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="batchmean")
    assert kl > 0.3 and kl > 100 * start_kl, (kl, start_kl)


def test_trades_loss_matches_definition():
    torch.manual_seed(0)
    clean, adv = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    total, ce, kl = trades_loss(clean, adv, y, beta=5.0, label_smoothing=0.1)
    p = F.softmax(clean, 1)
    expected_kl = (p * (F.log_softmax(clean, 1) - F.log_softmax(adv, 1))).sum(1).mean()
    smooth = torch.full((6, 4), 0.1 / 4).scatter_(1, y[:, None], 0.9 + 0.1 / 4)
    expected_ce = -(smooth * F.log_softmax(clean, 1)).sum(1).mean()
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(ce, expected_ce)
    torch.testing.assert_close(total, expected_ce + 5.0 * expected_kl)
    total.backward()
    assert clean.grad is not None                                                   # KL gradient reaches clean logits
    _, _, zero = trades_loss(clean.detach(), clean.detach(), y, beta=5.0, label_smoothing=0.0)
    assert abs(zero.item()) < 1e-6


def test_pgd_at_loss_is_cross_entropy():
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(pgd_at_loss(logits, y, 0.0), F.cross_entropy(logits, y))
    torch.testing.assert_close(pgd_at_loss(logits, y, 0.2), F.cross_entropy(logits, y, label_smoothing=0.2))
