"""The diffusion model the configuration names: `model.spec`, where `fit` means the model fit-diffusion trains
with the configured settings on the real training set."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.workflow import real_train_set
from stages.specs import FIT, parse_spec
from stores.errors import UserError
from stores.images import ImageSet


def fit_settings(cfg: Config):
    from stages.fit_diffusion import FitSettings  # torch: loaded when a command needs it
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
    if cfg.model.spec != FIT:
        return cfg.model.spec
    folder = fitted_model_dir(cfg)
    if not (folder / "config.json").exists():
        raise UserError(f"model spec 'fit': no fitted model at {folder} yet; run `dra-pipe fit-diffusion` "
                        "(or `dra-pipe run`)")
    return f"dra:{folder}"


def model_provenance(spec: str, root: Path) -> dict:
    """How a set records its model for `dra-pipe repair`: the spec, and its path relative to the workspace when
    the model lives there (a fitted model), so a moved or copied workspace still finds it."""
    record = {"model_spec": spec}
    try:
        record["model_in_workspace"] = str(Path(parse_spec(spec).path).resolve().relative_to(Path(root).resolve()))
    except (UserError, ValueError):
        pass
    return record


def recorded_model(provenance: dict, root: Path) -> tuple[str | None, bool]:
    """(spec, whether it is the workspace's own stored model) from a set's provenance; spec None if unrecorded."""
    spec = provenance.get("model_spec") if isinstance(provenance, dict) else None
    inside = provenance.get("model_in_workspace") if isinstance(provenance, dict) else None
    if spec and inside:
        return str(parse_spec(spec).with_path(Path(root) / inside)), True
    return spec, False
