"""The view function: pure, deterministic, view 0 the image, view 1 its mirror, no repeats, bad counts refused."""
import numpy as np
import pytest
import torch

from stores.errors import UserError
from stores.views import ViewSpec, all_views, apply_views, check_views, distinct_augmentations, view_augmentations


def test_view_is_a_pure_function_of_seed_id_and_v():
    ids, views = np.array([5, 5, 9, 123456789, 5]), np.array([3, 7, 3, 8, 3])
    flips, shifts = view_augmentations(11, ids, views, 2, True)
    again = view_augmentations(11, ids, views, 2, True)
    assert torch.equal(flips, again[0]) and torch.equal(shifts, again[1])
    assert torch.equal(shifts[0], shifts[4]) and flips[0] == flips[4]               # same (id, v): same view
    alone = view_augmentations(11, [9], [3], 2, True)                             # batch composition is irrelevant
    assert torch.equal(alone[1][0], shifts[2]) and alone[0][0] == flips[2]
    assert (shifts.abs() <= 2).all()
    others = [view_augmentations(s, np.arange(50), np.full(50, 4), 2, True) for s in (11, 12)]
    assert not torch.equal(others[0][1], others[1][1])                             # the seed matters
    per_image = view_augmentations(11, np.arange(50), np.full(50, 4), 2, True)
    assert len({tuple(s.tolist()) + (bool(f),) for f, s in zip(*per_image)}) > 5    # orders differ per image


@pytest.mark.parametrize("pad, flip", [(0, True), (1, False), (2, True)])
def test_views_start_with_the_image_and_its_mirror_and_never_repeat(pad, flip):
    most = distinct_augmentations(pad, flip)
    flips, shifts = all_views(ViewSpec(most, pad, flip, seed=3), np.arange(20))            # (20, V), (20, V, 2)
    assert not flips[:, 0].any() and (shifts[:, 0] == 0).all()                       # view 0: the image itself
    if flip:
        assert flips[:, 1].all() and (shifts[:, 1] == 0).all()                       # view 1: its mirror
    for i in range(20):
        seen = {(bool(f), int(dy), int(dx)) for f, (dy, dx) in zip(flips[i], shifts[i])}
        assert len(seen) == most                                                     # every augmentation once
    fewer = all_views(ViewSpec(3, pad, flip, seed=3), np.arange(20)) if most >= 3 else None
    if fewer is not None:                                                            # view v does not depend on V
        assert torch.equal(fewer[0], flips[:, :3]) and torch.equal(fewer[1], shifts[:, :3])


def test_apply_views_flips_then_shifts_rows_by_dy_and_columns_by_dx():
    images = torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(2, 4, 4, 1)
    out = apply_views(images, torch.tensor([False, True]), torch.tensor([[1, 0], [0, -1]]))
    assert torch.equal(out[0, :3, :, 0], images[0, 1:, :, 0]) and (out[0, 3] == 0).all()   # out[i] = in[i + 1]
    mirrored = images[1, :, :, 0].flip(-1)
    assert torch.equal(out[1, :, 1:, 0], mirrored[:, :3]) and (out[1, :, 0] == 0).all()    # out[:, j] = in[:, j - 1]


@pytest.mark.parametrize("count, pad, flip, needle", [
    (0, 1, False, "at least 1"), (10, 1, False, "more than the 9 distinct"), (2, 0, False, "more than the 1 distinct"),
    (3, 0, True, "more than the 2 distinct")])
def test_bad_view_counts_refused(count, pad, flip, needle):
    with pytest.raises(UserError, match=needle):
        check_views(count, pad, flip)
    assert check_views(distinct_augmentations(pad, flip), pad, flip).count == distinct_augmentations(pad, flip)


def test_view_function_is_frozen():
    """Stored feature sets hold the targets of these exact views: any change to the function (even a consistent
    relabelling such as swapping dy and dx) would silently misalign every set extracted before it."""
    flips, shifts = view_augmentations(0, [0, 0, 0, 1, 1, 7], [2, 3, 4, 2, 3, 5], 1, True)
    assert flips.tolist() == [True, True, True, True, False, False]
    assert shifts.tolist() == [[0, -1], [0, 1], [1, 0], [1, 1], [-1, 1], [0, 1]]
    flips, shifts = view_augmentations(4, [3, 10], [1, 8], 4, False)
    assert flips.tolist() == [False, False] and shifts.tolist() == [[-2, 0], [0, 4]]
