"""Layers of the EDM U-Nets, written from Karras et al. (2022, appendix F) and the DDPM++/NCSN++
(Song et al. 2021) and ADM (Dhariwal & Nichol 2021) papers.

The attribute names that hold tensors (`weight`, `bias`, `resample_filter`, `freqs`, and in a block
`norm0`, `conv0`, `affine`, `norm1`, `conv1`, `skip`, `norm2`, `qkv`, `proj`) are the names used
in the published checkpoints, so those tensors load by name. Each layer casts its parameters to the
dtype of its input, so a float16 input runs the layer in float16; attention scores and their softmax
are always formed in float32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A random tensor with variance 1 / fan, from a uniform or a normal law.

    `xavier_*` take fan as the mean of fan_in and fan_out, `kaiming_*` take fan_in. U(-a, a) with
    a = sqrt(3 / fan) has the same variance as N(0, 1 / fan).
    """
    family, _, law = mode.partition("_")
    if family not in ("xavier", "kaiming") or law not in ("uniform", "normal"):
        raise ValueError(f"unknown init mode {mode!r}: use xavier_uniform, xavier_normal, "
                         f"kaiming_uniform or kaiming_normal")
    fan = fan_in if family == "kaiming" else (fan_in + fan_out) / 2
    if law == "normal":
        return math.sqrt(1 / fan) * torch.randn(*shape)
    return math.sqrt(3 / fan) * (2 * torch.rand(*shape) - 1)


def _init_param(shape: Sequence[int], gain: float, **law) -> nn.Parameter:
    """A parameter drawn by `weight_init` and multiplied by `gain` (0 gives a zero start)."""
    return nn.Parameter(weight_init(shape, **law) * gain)


def resample_kernel(taps: Sequence[float]) -> torch.Tensor:
    """The 2-D FIR kernel (1, 1, k, k) of 1-D taps: their outer product, scaled to sum to one."""
    t = torch.as_tensor(list(taps), dtype=torch.float32)                       # (k,)
    return (t[:, None] * t[None, :] / t.sum() ** 2).reshape(1, 1, len(t), len(t))


class Linear(nn.Module):
    """Affine map y = x W^T + b; W is (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        law = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = _init_param((out_features, in_features), init_weight, **law)
        self.bias = _init_param((out_features,), init_bias, **law) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(nn.Module):
    """k x k convolution ("same" padding), optionally with a 2x FIR up- or downsampling.

    `kernel=0` leaves only the resampling (no parameters). The plain order resamples first and then
    convolves; `fused_resample` (the NCSN++ residual encoder) instead convolves at full size with
    the filter's padding added and then downsamples, or upsamples before the convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False,
                 resample_filter: Sequence[float] = (1, 1),  # 1-D taps of the resampling filter
                 fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d resamples up or down, not both")
        super().__init__()
        area = kernel * kernel
        law = dict(mode=init_mode, fan_in=in_channels * area, fan_out=out_channels * area)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.weight = _init_param((out_channels, in_channels, kernel, kernel), init_weight, **law) if kernel else None
        self.bias = _init_param((out_channels,), init_bias, **law) if kernel and bias else None
        self.register_buffer("resample_filter", resample_kernel(resample_filter) if up or down else None)

    def _schedule(self, weight: torch.Tensor | None, fir: torch.Tensor | None) -> list[tuple[str, int]]:
        """The steps to run, in order, as ("conv" | "fir", padding)."""
        conv_pad = 0 if weight is None else weight.shape[-1] // 2
        fir_pad = 0 if fir is None else (fir.shape[-1] - 1) // 2
        if fir is None:
            return [] if weight is None else [("conv", conv_pad)]
        if weight is None:
            return [("fir", fir_pad)]
        if not self.fused_resample:
            return [("fir", fir_pad), ("conv", conv_pad)]
        if self.up:
            return [("fir", max(fir_pad - conv_pad, 0)), ("conv", max(conv_pad - fir_pad, 0))]
        return [("conv", conv_pad + fir_pad), ("fir", 0)]

    def _fir(self, x: torch.Tensor, fir: torch.Tensor, pad: int) -> torch.Tensor:
        """Per-channel filtering with stride 2; upsampling is transposed, with gain 4 to keep the mean."""
        channels = x.shape[1]
        if self.up:
            return F.conv_transpose2d(x, (4 * fir).expand(channels, 1, -1, -1), stride=2, padding=pad, groups=channels)
        return F.conv2d(x, fir.expand(channels, 1, -1, -1), stride=2, padding=pad, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H', W')
        weight = None if self.weight is None else self.weight.to(x.dtype)
        fir = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        for step, pad in self._schedule(weight, fir):
            x = F.conv2d(x, weight, padding=pad) if step == "conv" else self._fir(x, fir, pad)
        if self.bias is None:
            return x
        return x + self.bias.to(x.dtype)[None, :, None, None]


class GroupNorm(nn.GroupNorm):
    """torch's GroupNorm with the group count capped so that every group has enough channels."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        groups = min(num_groups, num_channels // min_channels_per_group)
        super().__init__(groups, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of each query position over all key positions: (N, c, L) each -> (N, c, L)."""
    scores = torch.bmm(q.float().transpose(1, 2), k.float() / math.sqrt(k.shape[1]))  # (N, Lq, Lk)
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.bmm(v, probs.transpose(1, 2))                                      # (N, c, Lq)


class UNetBlock(nn.Module):
    """Pre-activation residual block conditioned on an embedding, with optional resampling and attention.

    One class for all three architectures: DDPM++/NCSN++ add the embedding as a per-channel bias and
    scale every residual sum by sqrt(1/2); ADM lets it predict a scale and a shift after norm1.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int,
                 up: bool = False, down: bool = False,
                 attention: bool = False,           # follow the residual part with self-attention
                 num_heads: int | None = None,      # attention heads; None = out_channels // channels_per_head
                 channels_per_head: int = 64,
                 dropout: float = 0,
                 skip_scale: float = 1,             # multiplier after each residual sum
                 eps: float = 1e-5,                 # GroupNorm epsilon
                 resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False,       # 1x1 conv on a resampled shortcut even if widths match
                 adaptive_scale: bool = True,       # embedding gives scale and shift (ADM), not a bias
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        plain = dict(init or {})
        zeroed = {"init_weight": 0} if init_zero is None else dict(init_zero)
        heads = 0
        if attention:
            heads = out_channels // channels_per_head if num_heads is None else num_heads
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads, self.dropout = heads, dropout
        self.skip_scale, self.adaptive_scale = float(skip_scale), adaptive_scale
        resampling = dict(up=up, down=down, resample_filter=resample_filter)
        modulation_width = 2 * out_channels if adaptive_scale else out_channels

        # Residual branch; the order of registration is the order of the checkpoint's parameters.
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resampling, **plain)
        self.affine = Linear(emb_channels, modulation_width, **plain)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **zeroed)
        # Shortcut: identity unless the width or the size changes.
        reshapes = in_channels != out_channels or up or down
        project = resample_proj or in_channels != out_channels
        self.skip = Conv2d(in_channels, out_channels, 1 if project else 0, **resampling, **plain) if reshapes else None
        if heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, **(plain if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, 1, **zeroed)

    def _residual_branch(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))                                 # (B, Cout, H', W')
        modulation = self.affine(emb)[:, :, None, None].to(h.dtype)           # (B, Cout or 2 Cout, 1, 1)
        if self.adaptive_scale:
            scale, shift = modulation.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm1(h), scale + 1)                # norm1(h) * (1 + scale) + shift
        else:
            h = self.norm1(h + modulation)
        h = F.dropout(F.silu(h), p=self.dropout, training=self.training)
        return self.conv1(h)

    def _self_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        per_head = c // self.num_heads
        # qkv channels are laid out (head, channel, q/k/v)
        q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, per_head, 3, height * width).unbind(2)
        return self.proj(attention(q, k, v).reshape(b, c, height, width))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W), (B, E)
        shortcut = x if self.skip is None else self.skip(x)
        x = (self._residual_branch(x, emb) + shortcut) * self.skip_scale
        if self.num_heads:
            x = (self._self_attention(x) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoids [cos(x w_i) | sin(x w_i)], w_i = max_positions^(-i / n), i < C/2.

    n is C/2 (or C/2 - 1 with `endpoint`, so that the last frequency is exactly 1 / max_positions).
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, C)
        count = self.num_channels // 2
        exponents = torch.arange(count, dtype=torch.float32, device=x.device) / (count - 1 if self.endpoint else count)
        angular = (1 / self.max_positions) ** exponents                       # (C/2,)
        phase = x[:, None] * angular.to(x.dtype)[None, :]                     # (B, C/2)
        return torch.cat([phase.cos(), phase.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x w) | sin(2 pi x w)] with fixed w ~ N(0, scale^2) (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", scale * torch.randn(num_channels // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, C)
        phase = x[:, None] * (2 * math.pi * self.freqs).to(x.dtype)[None, :]  # (B, C/2)
        return torch.cat([phase.cos(), phase.sin()], dim=1)
