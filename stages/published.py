"""Architectures of published EDM checkpoints, for planning without the file.

A dry run of the real recipe should work on a machine that lacks the checkpoint (a laptop planning a cluster
job). When a spec names a missing file whose name is one of the official EDM pickles, the plan uses a randomly
initialised network of that published architecture: FLOPs, layer shapes and timings do not depend on the weights.
The configurations are checked in tests: the CIFAR-10 conditional VP one against the official network's outputs
(conformance data), the others by their published parameter counts.
"""
from __future__ import annotations

from pathlib import Path

from stages.edm.networks import EDMPrecond
from stages.specs import parse_spec
from stores.errors import UserError

_EDM = dict(use_fp16=False, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)

# edm-cifar10-32x32-cond-vp.pkl: DDPM++, 55,735,299 parameters (conformance file edm-cifar10-cond-vp.json).
CIFAR10_COND_VP = dict(img_resolution=32, img_channels=3, label_dim=10, **_EDM, model_type="SongUNet",
                       embedding_type="positional", encoder_type="standard", decoder_type="standard",
                       channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2],
                       augment_dim=9, dropout=0.13)

PUBLISHED = {
    "edm-cifar10-32x32-cond-vp.pkl": CIFAR10_COND_VP,
    # NCSN++, 56,400,643 parameters
    "edm-cifar10-32x32-cond-ve.pkl": dict(CIFAR10_COND_VP, embedding_type="fourier", channel_mult_noise=2,
                                          encoder_type="residual", resample_filter=[1, 3, 3, 1]),
    # ADM, 295,899,267 parameters
    "edm-imagenet-64x64-cond-adm.pkl": dict(img_resolution=64, img_channels=3, label_dim=1000, **_EDM,
                                            model_type="DhariwalUNet", model_channels=192,
                                            channel_mult=[1, 2, 3, 4], dropout=0.10),
}


def published_name(spec: str) -> str | None:
    """The checkpoint's file name when `spec` is `edm:PATH` naming a published EDM pickle, else None (also for
    a spec that does not parse: loading it reports that)."""
    try:
        parsed = parse_spec(spec)
    except UserError:
        return None
    name = Path(parsed.path).name
    return name if parsed.kind == "edm" and name in PUBLISHED else None


def published_stand_in(spec: str) -> EDMPrecond:
    """A randomly initialised network of the published architecture `spec` names (see published_name)."""
    name = published_name(spec)
    if name is None:
        raise KeyError(spec)
    return EDMPrecond(**PUBLISHED[name]).eval().requires_grad_(False)
