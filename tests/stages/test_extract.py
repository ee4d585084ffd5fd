import numpy as np
import pytest
import torch

from stages.edm.networks import EDMPrecond
from stages.extract import (
    NoiseLevel,
    check_compatible,
    check_layer,
    compute_targets,
    default_layer,
    pool_targets,
    target_shape,
    to_model_range,
)
from stages.importers import import_source
from stages.noise import noise_for
from stages.taps import features
from stores.errors import UserError
from stores.images import ImageSet
from stores.views import ViewSpec, all_views, apply_views

ONE = ViewSpec(1, 0, False)

CONFIG = dict(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=8,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EDMPrecond(**CONFIG).eval()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    import_source(root, "digits", None, None, 500, "png")
    return ImageSet.open(root, "digits-train")


def test_noise_levels():
    assert NoiseLevel.from_timestep(100).sigma == pytest.approx(0.3423, abs=1e-4)
    assert NoiseLevel.from_sigma(0.7236).noise_stream == 200
    with pytest.raises(UserError, match=r"\[0, 999\]"):
        NoiseLevel.from_timestep(1000)
    with pytest.raises(UserError, match="positive"):
        NoiseLevel.from_sigma(-1.0)


def test_default_and_bad_layers(model):
    assert default_layer(model) == "dec.4x4_in1"
    with pytest.raises(UserError, match="valid layers: enc.8x8_conv"):
        check_layer(model, "dec.2x2_in1")
    assert target_shape(model, "dec.4x4_in1", "none") == (16, 4, 4)
    assert target_shape(model, "dec.4x4_in1", "2") == (16, 2, 2)
    assert target_shape(model, "dec.4x4_in1", "global") == (16, 1, 1)
    with pytest.raises(UserError, match="does not divide"):
        target_shape(EDMPrecond(**{**CONFIG, "img_resolution": 12}), "dec.6x6_in1", "4")


def _direct(model, images_uint8, ids, labels, level, seed, digits):
    """The layer output for a(x) + sigma * eps(id), one image at a time (no batching across views)."""
    x = to_model_range(images_uint8)
    x_sigma = x + level.sigma * noise_for(ids.tolist(), (1, 8, 8), seed, level.noise_stream, digits.fingerprint)
    with torch.no_grad():
        return features(model, x_sigma, torch.full((len(ids),), level.sigma), torch.from_numpy(labels),
                        ["dec.4x4_in1"])["dec.4x4_in1"].numpy()


def test_targets_equal_the_layer_output_for_x_plus_sigma_eps(model, digits):
    shard = digits.read_shard(0)
    ids, images, labels = shard.ids[:6], shard.images[:6], shard.labels[:6]
    level = NoiseLevel.from_timestep(100)
    views = ViewSpec(5, 1, True, seed=3)
    targets = compute_targets(model, ids, images, labels, "dec.4x4_in1", level, 7, "none", views, digits.fingerprint)
    assert targets.dtype == np.float16 and targets.shape == (6, 5, 16, 4, 4)
    assert np.allclose(targets[:, 0], _direct(model, images, ids, labels, level, 7, digits), atol=2e-3, rtol=1e-3)
    flips, shifts = all_views(views, ids)                                  # (6, 5), (6, 5, 2)
    for v in range(5):
        viewed = apply_views(torch.from_numpy(images), flips[:, v], shifts[:, v]).numpy()
        assert np.allclose(targets[:, v], _direct(model, viewed, ids, labels, level, 7, digits), atol=2e-3, rtol=1e-3)
    # view 1 is the mirror; its target is not just the mirrored map: storing it is what keeps flips faithful
    assert np.abs(targets[:, 1] - targets[:, 0, ..., ::-1]).max() > 1e-2
    assert np.abs(targets[:, 2] - targets[:, 0]).max() > 1e-2


def test_targets_depend_on_sample_id_not_on_batch(model, digits):
    shard = digits.read_shard(0)
    level = NoiseLevel.from_timestep(200)
    whole = compute_targets(model, shard.ids[:8], shard.images[:8], shard.labels[:8], "dec.4x4_in1",
                            level, 0, "2", ONE, digits.fingerprint)
    part = compute_targets(model, shard.ids[4:8], shard.images[4:8], shard.labels[4:8], "dec.4x4_in1",
                           level, 0, "2", ONE, digits.fingerprint)
    assert np.allclose(whole[4:8], part, atol=1e-3)
    other_seed = compute_targets(model, shard.ids[4:8], shard.images[4:8], shard.labels[4:8], "dec.4x4_in1",
                                 level, 1, "2", ONE, digits.fingerprint)
    assert np.abs(other_seed - part).max() > 1e-3


def test_pooling():
    h = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(pool_targets(h, "global")[..., 0, 0], h.mean(dim=(2, 3)))
    assert torch.equal(pool_targets(h, "2")[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_incompatible_image_set_refused(digits):
    rgb = EDMPrecond(**{**CONFIG, "img_channels": 3})
    with pytest.raises(UserError, match="1x8x8 images, the model expects 3x8x8"):
        check_compatible(rgb, digits)
