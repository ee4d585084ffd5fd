"""Frequency saliency: the radially averaged power spectrum of input gradients of the loss, and the fraction of
their energy at low spatial frequencies (robust models are expected to lean on lower frequencies; Yin et al. 2019,
"A Fourier Perspective on Model Robustness in Computer Vision"; the paper's exact definition is not public).

Frequencies are in cycles per pixel: the radial frequency of the 2-D DFT coefficient (ky, kx) of an H x W image is
r = sqrt((ky / H)^2 + (kx / W)^2), with |ky / H|, |kx / W| <= 1/2 (Nyquist). Ring i collects the coefficients with
round(r * max(H, W)) = i; "low" is r <= 1/4, the lower half of [0, Nyquist].
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def radial_frequency(h: int, w: int) -> torch.Tensor:
    """(H, W) r in cycles per pixel of every DFT coefficient (torch.fft.fft2's layout)."""
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    return (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()


class FrequencySpectrum:
    """Power |DFT|^2 of gradient maps (B, C, H, W), summed per ring over images and channels, batch by batch."""

    def __init__(self, h: int, w: int):
        self.r = radial_frequency(h, w)
        self.ring = (self.r * max(h, w)).round().long()                      # (H, W)
        self.rings = int(self.ring.max()) + 1
        self.power = torch.zeros(self.rings, dtype=torch.float64)
        self.low = torch.zeros((), dtype=torch.float64)
        self.maps = 0

    def add(self, grads: torch.Tensor) -> None:
        power = torch.fft.fft2(grads.detach().double().cpu()).abs().pow(2).sum(dim=(0, 1))      # (H, W)
        self.power += torch.zeros(self.rings, dtype=torch.float64).index_add_(0, self.ring.reshape(-1),
                                                                              power.reshape(-1))
        self.low += power[self.r <= 0.25 + 1e-12].sum()
        self.maps += grads.shape[0] * grads.shape[1]

    def radial(self) -> list[float]:
        """Mean power per DFT coefficient of each ring, normalised to sum 1 over the rings (the curve's shape)."""
        counts = torch.bincount(self.ring.reshape(-1), minlength=self.rings).double()
        mean = self.power / counts.clamp_min(1)
        return (mean / mean.sum()).tolist() if mean.sum() > 0 else mean.tolist()

    def low_fraction(self) -> float:
        """Energy at r <= 1/4 cycles per pixel over all energy (Parseval: the gradients' squared norm)."""
        total = self.power.sum()
        return float(self.low / total) if total > 0 else 0.0

    def frequencies(self) -> list[float]:
        """Each ring's radial frequency in cycles per pixel."""
        return [i / max(self.r.shape) for i in range(self.rings)]


def loss_gradients(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx of the summed cross-entropy of model(x) against y: (B, C, H, W), the model's mode left as it is."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), [x])
    return grad.detach()
