"""Crop/flip augmentation and the cached-target adjustment, checked exactly on local targets and measured on a
real (small, randomly initialised) EDM SongUNet against targets recomputed on the augmented images."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.augment import apply_augment, cell_shifts, draw_params, shift_images

pytestmark = pytest.mark.usefixtures("one_thread_for_module")   # tiny models: see conftest.one_thread


def _images(batch=6, size=16, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, channels), dtype=torch.uint8, generator=g)


def _cell_means(images: torch.Tensor, cells: int) -> torch.Tensor:
    """A local 'feature': mean of each cell, (B, C, cells, cells) float16 (like a cached target)."""
    return F.adaptive_avg_pool2d(images.permute(0, 3, 1, 2).double(), cells).half()


# --- the transform itself -------------------------------------------------------------------------------------

def test_output_shapes_dtypes_and_range():
    images = _images()
    targets = torch.randn(6, 5, 8, 8).half()
    x, adj, mask = augment(images, targets, None, torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert adj.shape == targets.shape and adj.dtype == torch.float16
    assert mask.shape == (6, 8, 8) and mask.dtype == torch.bool
    x2, none_t, none_m = augment(images, None, None, torch.Generator().manual_seed(0))
    assert none_t is None and none_m is None and torch.equal(x, x2)


def test_crop_and_flip_match_definition():
    images = _images(batch=2)
    flips, shifts = torch.tensor([True, False]), torch.tensor([[3, -2], [-4, 1]])
    x, _, _ = apply_augment(images, None, None, flips, shifts)
    padded = F.pad(images.permute(0, 3, 1, 2), (4, 4, 4, 4))                # zero padding 4, (B, C, 24, 24)
    crop0 = padded[0:1].flip(-1)[:, :, 4 + 3:4 + 3 + 16, 4 - 2:4 - 2 + 16]  # flip, then crop at offset (7, 2)
    crop1 = padded[1:2][:, :, 4 - 4:4 - 4 + 16, 4 + 1:4 + 1 + 16]
    assert torch.equal((x * 255).round().to(torch.uint8), torch.cat([crop0, crop1]))


def test_random_parameters_are_per_sample_and_reproducible():
    flips, shifts = draw_params(4000, torch.Generator().manual_seed(3), pad=4)
    assert 0.45 < flips.float().mean() < 0.55
    assert shifts.min() == -4 and shifts.max() == 4 and len(set(shifts[:, 0].tolist())) == 9
    again = draw_params(4000, torch.Generator().manual_seed(3), pad=4)
    assert torch.equal(flips, again[0]) and torch.equal(shifts, again[1])
    no_flip, same_shifts = draw_params(4000, torch.Generator().manual_seed(3), pad=4, flip=False)
    assert not no_flip.any() and torch.equal(same_shifts, shifts)
    assert not draw_params(50, torch.Generator().manual_seed(0), pad=0)[1].any()
    images = _images()
    a = augment(images, None, None, torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, augment(images, None, None, torch.Generator().manual_seed(1))[0])
    assert not torch.equal(a, augment(images, None, None, torch.Generator().manual_seed(2))[0])


def test_cell_shift_rounding_half_away_from_zero():
    shifts = torch.tensor([[1, -1], [2, -2], [3, -3], [4, 0]])
    assert cell_shifts(shifts, (32, 32), (8, 8)).tolist() == [[0, 0], [1, -1], [1, -1], [1, 0]]
    assert cell_shifts(shifts, (16, 16), (8, 8)).tolist() == [[1, -1], [1, -1], [2, -2], [2, 0]]


def test_shift_images_zero_fill():
    grid = torch.arange(16.).reshape(1, 4, 4, 1)
    out = shift_images(grid, torch.tensor([[1, -2]]))[0, :, :, 0]
    assert out.tolist() == [[0, 0, 4, 5], [0, 0, 8, 9], [0, 0, 12, 13], [0, 0, 0, 0]]


@pytest.mark.parametrize("pixels", [2, 4, -2, -6])
def test_whole_cell_shift_is_exact_for_local_targets(pixels):
    """Cell means: adjusted cached target == target of the augmented image on every kept cell."""
    images = _images(batch=3)
    targets = _cell_means(images, 8)                                         # cells of 2x2 pixels
    flips = torch.tensor([False, True, True])
    shifts = torch.tensor([[pixels, 0], [0, pixels], [pixels, -pixels]])
    x, adj, mask = apply_augment(images, targets, _cell_means(images.flip(2), 8), flips, shifts)
    fresh = _cell_means((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1), 8)
    keep = mask[:, None].expand_as(adj)
    assert torch.equal(adj[keep], fresh[keep])
    assert not adj[~keep].any()
    lost = abs(pixels) // 2                                                  # cells of padding per shifted axis
    assert mask[0].sum() == (8 - lost) * 8 and mask[2].sum() == (8 - lost) ** 2


def test_partial_cell_shift_masks_padding_and_lost_cells():
    images = _images(batch=1)
    targets = torch.arange(16.).reshape(1, 1, 4, 4)                          # cells of 4x4 pixels
    _, adj, mask = apply_augment(images, targets, None, torch.tensor([False]), torch.tensor([[3, -2]]))
    # dy = 3 -> 1 cell down the target grid, dx = -2 -> -1 cell (half away from zero)
    assert mask[0].int().tolist() == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert adj[0, 0, 0, 1:].tolist() == [4, 5, 6] and adj[0, 0, 2, 1:].tolist() == [12, 13, 14]
    _, _, mask_margin = apply_augment(images, targets, None, torch.tensor([False]), torch.tensor([[3, -2]]), margin=1)
    assert mask_margin[0].int().tolist() == [[0] * 4, [0, 0, 1, 0], [0] * 4, [0] * 4]   # 1 cell off every edge


def test_flip_uses_stored_variant_or_mirrors():
    targets, stored = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    images, flips, still = _images(batch=2), torch.tensor([True, False]), torch.zeros(2, 2, dtype=torch.long)
    _, adj, mask = apply_augment(images, targets, stored, flips, still)
    assert mask.all() and torch.equal(adj[0], stored[0]) and torch.equal(adj[1], targets[1])
    _, approx, _ = apply_augment(images, targets, None, flips, still)
    assert torch.equal(approx[0], targets[0].flip(-1)) and torch.equal(approx[1], targets[1])


# --- measured against a real diffusion network ----------------------------------------------------------------

def _songunet():
    from conftest import songunet_small
    return songunet_small()[0]


@pytest.fixture(scope="module")
def setting():
    """A frozen SongUNet (16x16x3, 8x8 layers), smooth random images, noise on a canvas padded like the crop."""
    torch.manual_seed(0)
    net = _songunet()
    B, H, P = 16, 16, 4
    g = torch.Generator().manual_seed(0)
    img = (0.7 * F.interpolate(torch.rand(B, 3, 4, 4, generator=g), size=H, mode="bilinear")
           + 0.3 * F.interpolate(torch.rand(B, 3, 8, 8, generator=g), size=H, mode="bilinear"))
    images = (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()   # (B, H, W, C)
    labels = torch.randint(0, 10, (B,), generator=g)
    canvas = torch.randn(B, 3, H + 2 * P, H + 2 * P, generator=g)           # eps of pixel (i, j) = canvas[P + i, P + j]
    return dict(net=net, images=images, labels=labels, canvas=canvas, B=B, H=H, P=P, sigma=0.3423)  # sigma(t=100)


def _targets(s, x01: torch.Tensor, eps: torch.Tensor, layer: str) -> torch.Tensor:
    """The extract-features computation: layer output at x_sigma = (2x - 1) + sigma eps, (B, C, h, w) float32."""
    from stages.taps import features
    sigma = torch.full((s["B"],), s["sigma"])
    with torch.no_grad():
        return features(s["net"], (2 * x01 - 1) + s["sigma"] * eps, sigma, s["labels"], [layer])[layer]


def _augmented_noise(s, flips: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The same eps, flipped and cropped exactly like the image."""
    P, H = s["P"], s["H"]
    canvas = torch.where(flips[:, None, None, None], s["canvas"].flip(-1), s["canvas"])
    return torch.stack([c[:, P + dy:P + dy + H, P + dx:P + dx + H] for c, (dy, dx) in zip(canvas, shifts.tolist())])


def _cached(s, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, target of the flipped image) as stored: float16."""
    P, H = s["P"], s["H"]
    x, eps = s["images"].permute(0, 3, 1, 2).float() / 255, s["canvas"][:, :, P:P + H, P:P + H]
    return _targets(s, x, eps, layer).half(), _targets(s, x.flip(-1), eps.flip(-1), layer).half()


def _errors(s, layer: str, flips, shifts, use_stored_flip=True, margin=0) -> tuple[float, float, torch.Tensor]:
    """(relative error of the adjusted target, of the unadjusted target, max abs error), over kept cells."""
    cached, cached_flip = _cached(s, layer)
    x, adj, mask = apply_augment(s["images"], cached, cached_flip if use_stored_flip else None, flips, shifts, margin)
    fresh = _targets(s, x, _augmented_noise(s, flips, shifts), layer).half().float()
    keep = mask[:, None].float()

    def rel(t):
        return (((t.float() - fresh) * keep).norm() / (fresh * keep).norm()).item()

    return rel(adj), rel(cached), ((adj.float() - fresh) * keep).abs().max()


def test_flip_with_stored_variant_is_exact(setting):
    flips = torch.arange(setting["B"]) % 2 == 0
    still = torch.zeros(setting["B"], 2, dtype=torch.long)
    for layer in ("enc.8x8_block0", "dec.8x8_in1"):
        rel_adj, rel_raw, max_abs = _errors(setting, layer, flips, still)
        print(f"\nflip, stored variant, {layer}: max abs error {max_abs.item()} (unadjusted: rel {rel_raw:.3f})")
        assert max_abs.item() == 0.0
        approx, _, _ = _errors(setting, layer, flips, still, use_stored_flip=False)
        print(f"flip, torch.flip approximation, {layer}: rel error {approx:.3f}")
        assert 0 < approx < rel_raw                                          # an approximation, better than nothing


def _whole_cell_shifts(s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([-4, -2, 2, 4])[torch.randint(0, 4, (s["B"], 2), generator=g)]   # 1 or 2 cells, both axes


def test_whole_cell_crop_is_exact_for_a_local_layer(setting):
    """enc.16x16_conv is one 3x3 conv: with a 1-cell margin (its receptive field) the shift rule is exact."""
    shifts, flips = _whole_cell_shifts(setting), torch.zeros(setting["B"], dtype=torch.bool)
    rel_adj, rel_raw, _ = _errors(setting, "enc.16x16_conv", flips, shifts, margin=1)
    print(f"\nwhole-cell crop, enc.16x16_conv, margin 1: rel error {rel_adj:.2e} (unshifted {rel_raw:.3f})")
    assert rel_adj < 1e-3 and rel_raw > 0.5


BOUND = 0.8      # relative error of the shifted target on kept cells, dec.8x8_in1, whole-cell crops of 16 px images


def test_whole_cell_crop_error_of_shifted_targets(setting):
    """Deep U-Net layers are not shift-equivariant (GroupNorm statistics, attention, receptive field > image):
    the shifted target is an approximation. It must beat the unshifted target clearly and stay under BOUND."""
    shifts, flips = _whole_cell_shifts(setting), torch.zeros(setting["B"], dtype=torch.bool)
    shifted, unshifted, _ = _errors(setting, "dec.8x8_in1", flips, shifts)
    margin1, _, _ = _errors(setting, "dec.8x8_in1", flips, shifts, margin=1)
    standard = torch.randint(-2, 3, (setting["B"], 2), generator=torch.Generator().manual_seed(2))
    std_shifted, std_unshifted, _ = _errors(setting, "dec.8x8_in1", flips, standard)
    print(f"\nwhole-cell crop (1-2 cells), dec.8x8_in1: rel error shifted {shifted:.3f}, unshifted {unshifted:.3f}, "
          f"shifted with margin 1 {margin1:.3f}; "
          f"standard crop pad 2 (rounded): {std_shifted:.3f} vs {std_unshifted:.3f}")
    assert shifted < 0.8 * unshifted and shifted < BOUND
    assert margin1 < shifted
    assert std_shifted < std_unshifted


def augment(images: torch.Tensor, targets: torch.Tensor | None, targets_flip: torch.Tensor | None,
            generator: torch.Generator, pad: int = 4, flip: bool = True, margin: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Random crop (zero padding `pad`) and horizontal flip per sample; the cached target follows (module doc).

    images (B, H, W, C) uint8 -> x (B, C, H, W) float32 in [0, 1]; targets, targets_flip (B, Ct, h, w) or None
    -> targets_adj (same dtype) and mask (B, h, w) bool, both None when targets is None.
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    flips, shifts = draw_params(images.shape[0], generator, pad, flip)
    return apply_augment(images, targets, targets_flip, flips, shifts, margin)
