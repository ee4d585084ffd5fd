"""The diffusion model the configuration names: `model.spec`, where `fit` means the model fit-diffusion trains
with the configured settings on the real training set."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.workflow import real_train_set
from stores.errors import UserError
from stores.images import ImageSet


def fit_settings(cfg: Config):
    from stages.fit_diffusion import FitSettings          # torch: loaded when a command needs it
    f = cfg.fit_diffusion
    return FitSettings(model_channels=f.model_channels, channel_mult=tuple(f.channel_mult), num_blocks=f.num_blocks,
                       batch_size=f.batch_size, lr=f.lr, ema_halflife_kimg=f.ema_halflife_kimg,
                       duration_kimg=f.duration_kimg, dropout=f.dropout, seed=f.seed)


def fitted_model_dir(cfg: Config, images_name: str | None = None) -> Path:
    from stages.fit_diffusion import model_key
    images = ImageSet.open(Path(cfg.root), images_name or real_train_set(cfg))
    return Path(cfg.root) / "models" / model_key(images, fit_settings(cfg))


def resolve_model_spec(cfg: Config) -> str:
    """`fit` means the model fit-diffusion trains with the configured settings on the real training set."""
    if cfg.model.spec != "fit":
        return cfg.model.spec
    folder = fitted_model_dir(cfg)
    if not (folder / "config.json").exists():
        raise UserError(f"model spec 'fit': no fitted model at {folder} yet; run `dra-pipe fit-diffusion` (or `dra-pipe run`)")
    return f"dra:{folder}"
