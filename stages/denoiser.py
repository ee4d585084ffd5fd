"""The one interface stage 1 needs from any diffusion model: an EDM-form denoiser with named feature taps."""
from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
from torch import nn


class Denoiser(nn.Module, metaclass=ABCMeta):
    """D(x_sigma; sigma, labels) -> estimate of the clean image, in EDM form (images in [-1, 1]).

    Subclasses set `img_resolution`, `img_channels`, `label_dim` (0 = unconditional) and implement `forward`,
    `layer_names` and `layer_module`. `stages.taps.features` runs a forward with hooks on the named modules.
    """

    img_resolution: int
    img_channels: int
    label_dim: int

    @abstractmethod
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        ...

    @abstractmethod
    def layer_names(self) -> list[str]:
        """Names accepted by `features`, in forward order."""
        ...

    @abstractmethod
    def layer_module(self, name: str) -> nn.Module:
        """The module whose output is the feature called `name`."""
        ...
