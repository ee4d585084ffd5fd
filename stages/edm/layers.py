"""Building blocks of the EDM networks (DDPM++, NCSN++ and ADM U-Nets).

Module and tensor names follow the official NVlabs/edm code (`weight`, `bias`, `resample_filter`,
`norm0`, `conv0`, `affine`, `qkv`, ...) so that official state dicts load by name. Every layer casts
its parameters to the input dtype, so a float16 input runs the layer in float16; attention
weights are always computed in float32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random initial weights for `shape` by one of the four EDM init modes."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}: use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal")


def resample_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Separable 2-D resampling filter from 1-D taps, normalised to sum 1: (1, 1, k, k)."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Linear(nn.Module):
    """Fully connected layer y = x W^T + b with EDM initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """Square convolution with optional 2x up- or downsampling through a fixed FIR filter.

    `kernel=0` gives a parameter-free resampler. With `fused_resample` the filter and the
    convolution are applied in the cheaper order (filter after a downsampling conv, before an
    upsampling one); the unfused order resamples first.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False,
                 resample_filter: Sequence[float] = (1, 1),  # 1-D taps of the resampling filter
                 fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        w = weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight if kernel else None
        b = weight_init([out_channels], **fans) * init_bias if kernel and bias else None
        self.weight = None if w is None else nn.Parameter(w)
        self.bias = None if b is None else nn.Parameter(b)
        self.register_buffer("resample_filter", resample_kernel(resample_filter) if up or down else None)

    def _resample(self, x: torch.Tensor, f: torch.Tensor, pad: int) -> torch.Tensor:
        """Depthwise 2x up- or downsampling of x with filter f."""
        c = x.shape[1]
        if self.up:
            return F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
        return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H', W')
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and self.up and w is not None:
            x = self._resample(x, f, max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = self._resample(x, f, 0)
        else:
            if f is not None:
                x = self._resample(x, f, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most 32 groups and at least 4 channels per group."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over positions; q, k, v: (N, c, L) -> (N, c, L), weights in float32."""
    logits = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(k.shape[1]))  # (N, Lq, Lk)
    w = logits.softmax(dim=2).to(q.dtype)
    return torch.einsum("nqk,nck->ncq", w, v)


class UNetBlock(nn.Module):
    """Residual block with noise-embedding modulation, optional 2x resampling and self-attention.

    Covers DDPM++/NCSN++ (additive embedding, skip_scale sqrt(1/2)) and ADM (adaptive scale/shift).
    Order: norm0 -> SiLU -> conv0 (resamples) -> + affine(emb) -> norm1 -> SiLU -> dropout -> conv1,
    plus skip(x); then optionally norm2 -> qkv -> attention -> proj, plus the residual.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int,
                 up: bool = False, down: bool = False,
                 attention: bool = False,           # add a self-attention layer after the residual part
                 num_heads: int | None = None,      # attention heads; None = out_channels // channels_per_head
                 channels_per_head: int = 64,
                 dropout: float = 0,
                 skip_scale: float = 1,             # multiplier after each residual sum
                 eps: float = 1e-5,                 # GroupNorm epsilon
                 resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False,       # 1x1 conv on a resampled skip even if channels match
                 adaptive_scale: bool = True,       # emb gives scale and shift (ADM) instead of a bias
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def _residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))                                  # (B, Cout, H', W')
        params = self.affine(emb)[:, :, None, None].to(h.dtype)                # (B, Cout or 2*Cout, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        return (h + (x if self.skip is None else self.skip(x))) * self.skip_scale

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm2(x))                                          # (B, 3C, H, W)
        q, k, v = qkv.reshape(b * self.num_heads, c // self.num_heads, 3, hgt * wid).unbind(2)  # (B*heads, C/heads, HW)
        a = attention(q, k, v).reshape(b, c, hgt, wid)
        return (self.proj(a) + x) * self.skip_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W), (B, E)
        x = self._residual(x, emb)
        return self._attend(x) if self.num_heads else x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(x f), sin(x f)] with f = (1/max_positions)^(i / (C/2 - endpoint))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, C)
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2) kept as a buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, C)
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
