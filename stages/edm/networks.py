"""EDM preconditioning (`EDMPrecond`) around the U-Nets of `stages.edm.unets`.

Constructor keywords equal those of the published EDM networks, so the keyword dict recorded in an
official checkpoint builds the same architecture here and its tensors load by name
(`model.enc.16x16_block0.conv0.weight`, `model.map_label.weight`, ...).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from stages.denoiser import Denoiser
from stages.edm.unets import DhariwalUNet, SongUNet, check_choice
from stores.errors import UserError

MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


_WRAPPER_SUPPLIED = ("img_resolution", "in_channels", "out_channels", "label_dim")  # set by EDMPrecond


def _model_kwargs(model_type: str, given: dict) -> dict:
    """All keywords of the inner network, defaults filled in; bad names or keywords are UserErrors."""
    check_choice("model_type", model_type, tuple(MODEL_TYPES))
    params = inspect.signature(MODEL_TYPES[model_type]).parameters
    accepted = [name for name in params if name not in _WRAPPER_SUPPLIED]
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise UserError(f"{model_type} does not take {', '.join(unknown)}: accepted keywords are {', '.join(accepted)}")
    defaults = {}
    for name in accepted:
        default = params[name].default
        defaults[name] = list(default) if isinstance(default, tuple) else default  # JSON-like config
    return {**defaults, **given}


class EDMPrecond(Denoiser):
    """EDM preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, labels) around a U-Net.

    Computes in float32; with `use_fp16` the inner network runs in float16 on CUDA devices only.
    Feature taps are the encoder and decoder blocks, named `enc.<res>x<res>_<block>` and
    `dec.<res>x<res>_<block>` (the auxiliary `*_aux_*` layers are not taps).
    """

    def __init__(self,
                 img_resolution: int,                  # image side
                 img_channels: int,                    # colour channels
                 label_dim: int = 0,                   # number of classes, 0 = unconditional
                 use_fp16: bool = False,               # run the inner network in float16 on CUDA
                 sigma_min: float = 0,                 # smallest supported noise level
                 sigma_max: float = float("inf"),      # largest supported noise level
                 sigma_data: float = 0.5,              # standard deviation of the training data
                 model_type: str = "DhariwalUNet",     # inner network class name
                 **model_kwargs,                       # keywords of the inner network
                 ):
        super().__init__()
        model_kwargs = _model_kwargs(model_type, model_kwargs)
        self.config = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                           use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                           model_type=model_type, **model_kwargs)  # every keyword, defaults included
        for key in ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data"):
            setattr(self, key, self.config[key])
        network = MODEL_TYPES[model_type]
        self.model = network(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                             label_dim=label_dim, **model_kwargs)
        self.augment_dim = model_kwargs["augment_dim"]

    def _labels(self, class_labels, batch: int, device) -> torch.Tensor | None:
        """One-hot float labels (B, label_dim); integer class indices are one-hot encoded, None gives zeros."""
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        labels = torch.as_tensor(class_labels, device=device)
        if not labels.is_floating_point():
            labels = F.one_hot(labels.reshape(-1).long(), self.label_dim)
        return labels.to(torch.float32).reshape(-1, self.label_dim)

    def _augment_labels(self, augment_labels, batch: int, device) -> torch.Tensor | None:
        if not self.augment_dim:
            return None
        if augment_labels is None:
            return torch.zeros(batch, self.augment_dim, device=device)
        return torch.as_tensor(augment_labels, device=device).to(torch.float32).reshape(-1, self.augment_dim)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, augment_labels=None,
                force_fp32: bool = False) -> torch.Tensor:
        """x: (B, C, H, W) noisy images, sigma: scalar or (B,) -> denoised (B, C, H, W) in float32."""
        x = x.to(torch.float32)
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
        if sigma.numel() != batch:
            raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}")
        sigma = sigma.reshape(-1, 1, 1, 1)                                     # (B, 1, 1, 1)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise, self._labels(class_labels, batch, x.device),
                         augment_labels=self._augment_labels(augment_labels, batch, x.device))
        return c_skip * x + c_out * F_x.to(torch.float32)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c_skip, c_out, c_in (shaped like sigma) and c_noise (flat) of EDM's Table 1 for sigma (B, 1, 1, 1)."""
        data_var = self.sigma_data ** 2
        input_var = sigma ** 2 + data_var                                      # variance of x + noise
        input_std = input_var.sqrt()
        return data_var / input_var, sigma * self.sigma_data / input_std, 1 / input_std, sigma.log().flatten() / 4

    def round_sigma(self, sigma) -> torch.Tensor:
        """EDM uses continuous noise levels: identity."""
        return torch.as_tensor(sigma)

    def _taps(self) -> dict[str, nn.Module]:
        return {f"{part}.{key}": block
                for part in ("enc", "dec")
                for key, block in getattr(self.model, part).items() if "aux" not in key}

    def layer_names(self) -> list[str]:
        """Encoder then decoder block names in forward order, e.g. `enc.16x16_block3`, `dec.8x8_in1`."""
        return list(self._taps())

    def layer_module(self, name: str) -> nn.Module:
        taps = self._taps()
        if name not in taps:
            raise UserError(f"unknown layer {name!r}: valid layers are {', '.join(taps)}")
        return taps[name]
