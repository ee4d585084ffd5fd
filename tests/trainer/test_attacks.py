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


@pytest.mark.parametrize("beta, smoothing", [(1.5, 0.0), (7.0, 0.3)])
def test_trades_loss_at_other_beta_and_smoothing(beta, smoothing):
    """beta scales the KL term and nothing else; smoothing s moves the CE by its closed form
    (1 - s) CE + s mean_j(-log p_j) (a loss that kept 5.0 or 0.1 fails here)."""
    torch.manual_seed(1)
    clean, adv = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    total, ce, kl = trades_loss(clean, adv, y, beta=beta, label_smoothing=smoothing)
    _, _, kl_default = trades_loss(clean, adv, y)
    log_p = F.log_softmax(clean, 1)
    plain = F.nll_loss(log_p, y)
    torch.testing.assert_close(ce, (1 - smoothing) * plain + smoothing * (-log_p.mean(1)).mean())
    torch.testing.assert_close(kl, kl_default)                       # beta does not change the KL itself
    torch.testing.assert_close(total - ce, beta * kl)


def test_the_kl_term_alone_sends_gradient_to_the_clean_logits():
    """With the CE term taken out, the KL(p_clean || p_adv) gradient must still reach the clean logits (TRADES
    and DM-AT do not detach p_clean): the gradient equals the closed form of d KL / d clean."""
    torch.manual_seed(2)
    clean, adv = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    _, _, kl = trades_loss(clean, adv, torch.zeros(6, dtype=torch.long), beta=1.0, label_smoothing=0.0)
    kl.backward()
    p, log_p, log_q = F.softmax(clean, 1), F.log_softmax(clean, 1), F.log_softmax(adv, 1)
    inner = log_p - log_q                                                           # (B, K)
    closed = p * (inner - (p * inner).sum(1, keepdim=True)) / clean.shape[0]         # d KL / d clean
    assert clean.grad.abs().max() > 1e-3
    torch.testing.assert_close(clean.grad, closed.detach())


def test_uniform_start_fills_the_ball_and_normal_start_hugs_x(trained):
    """attack_start: uniform draws the start uniformly in the eps-ball (DM-AT), normal x + 0.001 N(0, 1) (TRADES)."""
    model, x, _ = trained
    deltas = {start: trades_adversary(model, x, EPS, EPS / 4, 0, generator=_gen(3), start=start) - x
              for start in ("uniform", "normal")}
    uniform, normal = deltas["uniform"].abs(), deltas["normal"].abs()
    assert uniform.max() <= EPS + 1e-6
    inside = ((x > EPS) & (x < 1 - EPS))                          # pixels the [0, 1] clamp cannot touch
    assert 0.4 * EPS < uniform[inside].mean() < 0.6 * EPS          # E|U(-eps, eps)| = eps / 2
    assert normal.mean() < 0.002


def test_the_trades_attack_steps_up_the_kl_gradient(trained):
    """One step of the TRADES adversary from its normal start is sign(d KL(p(x) || p(x')) / d x'): the step of an
    attack that ascended the cross-entropy instead (against any label) points elsewhere in many pixels."""
    model, x, y = trained
    x_adv = trades_adversary(model, x, EPS, EPS / 4, 1, generator=_gen(4), start="normal")
    start = (x + 0.001 * torch.randn(x.shape, generator=_gen(4))).clamp(x - EPS, x + EPS).clamp(0, 1)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
    start.requires_grad_(True)
    kl = F.kl_div(F.log_softmax(model(start), 1), p, reduction="sum")
    grad, = torch.autograd.grad(kl, [start])
    expected = (start.detach() + EPS / 4 * grad.sign()).clamp(x - EPS, x + EPS).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected)
    start.grad = None
    ce_grad, = torch.autograd.grad(F.cross_entropy(model(start), y, reduction="sum"), [start])
    assert (ce_grad.sign() != grad.sign()).float().mean() > 0.05     # the two objectives do step differently


def test_the_margin_attack_lowers_the_margin_more_than_the_ce_attack(trained):
    model, x, y = trained
    found = {}
    for loss in ("ce", "margin"):
        x_adv = pgd_attack(model, x, y, EPS / 2, EPS / 8, 10, loss=loss, generator=_gen(6))
        with torch.no_grad():
            found[loss] = margin_loss(model(x_adv), y).mean().item()       # higher: further past the boundary
    assert found["margin"] > found["ce"] + 0.1, found
