"""A local diffusers DDPM `UNet2DModel` (eps-prediction, 1000-step linear schedule) as an EDM-form Denoiser.

Given x_sigma = x + sigma * eps, the UNet sees sqrt(alpha_bar) * x_sigma with alpha_bar = 1 / (1 + sigma^2)
at the DDPM timestep of sigma, and D = x_sigma - sigma * eps_hat. The timestep is continuous: linear in
log sigma between the discrete sigma(t) (diffusers' Euler schedulers do the same), so sigma(t) maps to t.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.denoiser import Denoiser
from stages.sigma import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, sigma_table
from stores.errors import UserError


def continuous_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """DDPM timestep of each sigma, interpolated linearly in log sigma, clamped to [0, 999]. float64 [B]."""
    log_table = torch.as_tensor(np.log(sigma_table()), device=sigma.device)  # [1000]
    log_sigma = sigma.to(torch.float64).log()
    upper = torch.searchsorted(log_table, log_sigma).clamp(1, NUM_TRAIN_TIMESTEPS - 1)
    lower = upper - 1
    frac = (log_sigma - log_table[lower]) / (log_table[upper] - log_table[lower])
    return (lower + frac).clamp(0, NUM_TRAIN_TIMESTEPS - 1)


def _resolution(sample_size) -> int:
    """UNet2DModel's sample_size (int or [h, w]) as one square resolution."""
    sizes = [sample_size] if isinstance(sample_size, int) else list(sample_size)
    if len(set(sizes)) != 1:
        raise UserError(f"only square diffusers models are supported; sample_size is {sample_size}")
    return int(sizes[0])


class DiffusersDenoiser(Denoiser):
    """EDM-form wrapper of a DDPM eps-prediction `UNet2DModel`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        config = unet.config
        if config.time_embedding_type not in ("positional", "learned"):
            raise UserError(f"time_embedding_type '{config.time_embedding_type}' is not a DDPM timestep model")
        if config.class_embed_type is not None:
            raise UserError(f"class_embed_type '{config.class_embed_type}' is not supported (use num_class_embeds)")
        if config.out_channels != config.in_channels:
            raise UserError(f"expected an eps-prediction UNet (out_channels = in_channels = {config.in_channels}); "
                            f"got out_channels {config.out_channels}")
        self.unet = unet
        self.img_resolution = _resolution(config.sample_size)
        self.img_channels = int(config.in_channels)
        self.label_dim = int(config.num_class_embeds or 0)
        self.sigma_min = float(sigma_table()[0])
        self.sigma_max = float(sigma_table()[-1])

    def _timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """UNet timestep input [B]: continuous float32, or nearest integer for a learned embedding."""
        t = continuous_timestep(sigma)
        return t.round().long() if self.unet.config.time_embedding_type == "learned" else t.to(torch.float32)

    def _labels(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """Class indices [B] for a conditional UNet (from indices or one-hot rows); None otherwise."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            raise ValueError("this diffusers model is class-conditional: pass class_labels")
        if class_labels.is_floating_point():
            class_labels = class_labels.reshape(-1, self.label_dim).argmax(dim=1)
        return class_labels.reshape(-1).to(device=device, dtype=torch.long).expand(batch)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] = x_0 + sigma eps, sigma scalar or [B] -> D [B, C, H, W] in x's dtype."""
        batch = x.shape[0]
        sigma64 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(batch)  # [B]
        scale = (1 + sigma64 ** 2).rsqrt().view(-1, 1, 1, 1)  # sqrt(alpha_bar) [B, 1, 1, 1]
        x64 = x.to(torch.float64)
        x_in = (scale * x64).to(self.unet.dtype)
        eps = self.unet(x_in, self._timesteps(sigma64), class_labels=self._labels(class_labels, batch, x.device),
                        return_dict=False)[0]
        return (x64 - sigma64.view(-1, 1, 1, 1) * eps.to(torch.float64)).to(x.dtype)

    def layer_names(self) -> list[str]:
        """UNet block paths in forward order: down_blocks.i, mid_block, up_blocks.i.

        Down blocks output (hidden_states, skip_states); their feature is hidden_states.
        """
        names = [f"down_blocks.{i}" for i in range(len(self.unet.down_blocks))]
        names += ["mid_block"] if self.unet.mid_block is not None else []
        return names + [f"up_blocks.{i}" for i in range(len(self.unet.up_blocks))]

    def layer_module(self, name: str) -> nn.Module:
        """The UNet block called `name`."""
        if name not in self.layer_names():
            raise UserError(f"unknown layer '{name}'; layers: {', '.join(self.layer_names())}")
        return self.unet.get_submodule(name)


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or UserError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _unet_dir(root: Path) -> Path:
    """The folder holding the UNet2DModel config: root/unet (a pipeline) or root itself."""
    for folder in (root / "unet", root):
        config = folder / "config.json"
        if config.is_file():
            name = _read_json(config).get("_class_name")
            if name != "UNet2DModel":
                raise UserError(f"{config} describes a {name}, not a diffusers UNet2DModel")
            return folder
    raise UserError(f"{root} is not a diffusers UNet2DModel folder (no config.json in it or in {root / 'unet'})")


def _scheduler_config(root: Path, unet_dir: Path) -> Path | None:
    """The scheduler config next to the model, if there is one."""
    for path in (root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json",
                 unet_dir.parent / "scheduler" / "scheduler_config.json"):
        if path.is_file():
            return path
    return None


def check_scheduler_config(path: Path) -> None:
    """UserError unless the scheduler is DDPM's 1000-step linear beta schedule with eps-prediction."""
    config = _read_json(path)
    expect = {"beta_schedule": "linear", "prediction_type": "epsilon", "num_train_timesteps": NUM_TRAIN_TIMESTEPS}
    for key, want in expect.items():
        got = config.get(key, want)
        if got != want:
            raise UserError(f"{path}: {key} is {got!r}; only {key} = {want!r} is supported")
    if config.get("trained_betas") is not None:
        raise UserError(f"{path}: trained_betas is set; only the linear beta schedule is supported")
    for key, want in (("beta_start", BETA_START), ("beta_end", BETA_END)):
        got = config.get(key, want)
        if not isinstance(got, (int, float)) or not math.isclose(got, want, rel_tol=1e-6):
            raise UserError(f"{path}: {key} is {got!r}; only {want} is supported")


def load_diffusers_denoiser(path) -> DiffusersDenoiser:
    """Load a local diffusers DDPM UNet2DModel (a pipeline folder or its unet/ folder); never downloads."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"diffusers model folder {root} does not exist")
    unet_dir = _unet_dir(root)
    scheduler = _scheduler_config(root, unet_dir)
    if scheduler is not None:
        check_scheduler_config(scheduler)
    if not any((unet_dir / f"diffusion_pytorch_model.{ext}").is_file() for ext in ("safetensors", "bin")):
        raise UserError(f"cannot load the diffusers UNet2DModel in {unet_dir}: it has no weights "
                        f"(diffusion_pytorch_model.safetensors); save the model with save_pretrained")
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        raise UserError(f"cannot load the diffusers UNet2DModel in {unet_dir}: "
                        f"{' '.join(str(err).split())[:200]}") from None
    return DiffusersDenoiser(unet).eval()
