"""DRA projection head, token-wise cosine loss and grid matching."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stores.errors import UserError
from trainer.dra import ProjectionHead, dra_loss, match_grid


def test_head_structure_and_shapes():
    head = ProjectionHead(640, 256)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(640, 2048), (2048, 2048), (2048, 256)]
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    small = ProjectionHead(64, 32, hidden=16, depth=2)
    assert small(torch.randn(3, 64, 4, 4)).shape == (3, 32, 4, 4)
    assert [type(m).__name__ for m in ProjectionHead(8, 4, depth=1).mlp] == ["Linear"]
    with pytest.raises(ValueError):
        ProjectionHead(8, 4, depth=0)


def test_head_is_applied_per_token():
    torch.manual_seed(0)
    head = ProjectionHead(6, 5, hidden=7)
    x = torch.randn(2, 6, 3, 4)
    out = head(x)
    for b, i, j in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        torch.testing.assert_close(out[b, :, i, j], head.mlp(x[b, :, i, j]))
    moved = x.clone()
    moved[:, :, 0, 0] += 1                                                  # a token changes, one output token changes
    diff = (head(moved) - out).abs().sum(1)
    assert diff[:, 0, 0].min() > 0 and diff.flatten(1)[:, 1:].max() == 0


def test_loss_values():
    t = torch.randn(2, 4, 3, 3)
    assert dra_loss(t, t).abs().item() < 1e-6
    assert dra_loss(3 * t, t).abs().item() < 1e-6                           # scale-invariant
    torch.testing.assert_close(dra_loss(-t, t), torch.tensor(2.0))
    p = torch.randn(2, 4, 3, 3)
    expected = (1 - F.cosine_similarity(p, t, dim=1)).mean()
    torch.testing.assert_close(dra_loss(p, t), expected)


def test_mask_averages_over_kept_tokens_only():
    torch.manual_seed(0)
    p, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 0, 0] = True
    per_token = 1 - F.cosine_similarity(p, t, dim=1)
    torch.testing.assert_close(dra_loss(p, t, mask), (per_token[0, 1, 2] + per_token[1, 0, 0]) / 2)
    p_garbage = p.clone()
    p_garbage[~mask.unsqueeze(1).expand_as(p)] = float("nan")               # masked tokens cannot leak in
    torch.testing.assert_close(dra_loss(p_garbage, t, mask), dra_loss(p, t, mask))


def test_all_masked_is_zero_without_nan():
    p = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = dra_loss(p, torch.randn(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.bool))
    assert loss.item() == 0
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().max() == 0


def test_float16_targets_computed_in_float32():
    torch.manual_seed(0)
    p = torch.randn(2, 8, 4, 4)
    t = torch.randn(2, 8, 4, 4).mul(300).half()                             # large fp16: squares overflow in fp16
    loss = dra_loss(p, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, dra_loss(p, t.float()))


def test_gradient_trains_head_towards_targets():
    torch.manual_seed(0)
    feature, target = torch.randn(8, 6, 4, 4), torch.randn(8, 5, 4, 4)
    head = ProjectionHead(6, 5, hidden=32)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    first = dra_loss(head(feature), target).item()
    for _ in range(100):
        opt.zero_grad()
        dra_loss(head(feature), target).backward()
        opt.step()
    assert dra_loss(head(feature), target).item() < 0.5 * first


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 8\) and targets \(2, 4, 4, 4\) differ"):
        dra_loss(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        dra_loss(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.ones(2, 8, 8, dtype=torch.bool))


def test_match_grid_pools_integer_multiples():
    f = torch.randn(2, 3, 8, 8)
    assert match_grid(f, (8, 8)) is f
    pooled = match_grid(f, (4, 4))
    assert pooled.shape == (2, 3, 4, 4)
    torch.testing.assert_close(pooled[:, :, 1, 2], f[:, :, 2:4, 4:6].mean(dim=(2, 3)))
    torch.testing.assert_close(match_grid(f, (1, 1)), f.mean(dim=(2, 3), keepdim=True))


@pytest.mark.parametrize("hw, target", [((8, 8), (3, 3)), ((4, 4), (8, 8)), ((6, 6), (4, 4))])
def test_match_grid_refuses_incompatible_grids(hw, target):
    with pytest.raises(UserError, match=f"grid {hw[0]}x{hw[1]} cannot be matched .* grid {target[0]}x{target[1]}"):
        match_grid(torch.randn(1, 2, *hw), target)
