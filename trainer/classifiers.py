"""Classifiers for adversarial training: WideResNets (DM-AT's SiLU variant), PreAct/ResNet-18, a small digits CNN.

Every model takes images in [0, 1], (B, C, H, W), normalises inside with buffers `mean`/`std`, and returns
logits. The body is an ordered `stages` ModuleDict; any stage's output can be read out by name for DRA
(`forward_features`) in the same pass that produces the logits. After the last stage come global average
pooling (`penultimate`) and the linear layer `fc`.

Stage names and shapes at the standard resolutions (default DRA layer marked *):

- `wrn-D-W` at 32x32: stem 16x32x32, block1 16Wx32x32, block2 32Wx16x16, *block3 64Wx8x8 (last block group,
  pre-activation output), final 64Wx8x8 (after the closing BN + SiLU). WRN-28-10: block3 = 640x8x8.
- `preact-resnet18` / `resnet18` at 32x32: stem 64x32x32, layer1 64x32x32, layer2 128x16x16, *layer3 256x8x8,
  layer4 512x4x4 (+ final 512x4x4 for the pre-activation net).
- `small-cnn` at 8x8: conv1 32x8x8, conv2 64x8x8, *conv3 64x4x4 (stride 2): matches a 4x4 diffusion target
  such as the digits EDM bottleneck `dec.4x4_in1`.

The ViTs (`vit-s/2` .. `vit-b/4`) are Classifiers too, in trainer/vit.py.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from stores.errors import UserError
from trainer.architectures import ARCHITECTURES, architecture  # noqa: F401  ARCHITECTURES re-exported

BN_MOMENTUM = 0.01   # DM-AT / Gowal et al. WideResNet (Haiku's 0.99 decay); the ResNets keep PyTorch's 0.1


class Classifier(nn.Module):
    """Normalisation -> named stages -> global average pool -> linear.

    Subclasses fill `self.stages` (ordered) and `self.fc`, and set `default_dra_layer`.
    """

    default_dra_layer: str = ""

    def __init__(self, arch: str, num_classes: int, in_channels: int, resolution: int,
                 mean: float | Sequence[float], std: float | Sequence[float]):
        super().__init__()
        self.arch, self.num_classes = arch, num_classes
        self.in_channels, self.resolution = in_channels, resolution
        self.register_buffer("mean", _channel_stats(mean, in_channels, "mean"))   # (1, C, 1, 1)
        self.register_buffer("std", _channel_stats(std, in_channels, "std"))      # (1, C, 1, 1)
        self.stages = nn.ModuleDict()
        self.fc: nn.Linear
        self._layer_shapes: dict[str, tuple[int, int, int]] | None = None

    def _body(self, x: torch.Tensor, layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last stage output (B, C, h, w) and, if `layer` is given, that stage's output."""
        h = (x - self.mean) / self.std                                          # (B, C, H, W)
        captured = None
        for name, stage in self.stages.items():
            h = stage(h)
            if name == layer:
                captured = h
        return h, captured

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean(dim=(2, 3)))                                      # (B, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) for images x in [0, 1], (B, C, H, W)."""
        return self._head(self._body(x)[0])

    def forward_features(self, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, classes), output of stage `layer` (B, C, h, w)) from one forward pass."""
        self._check_layer(layer)
        h, feature = self._body(x, layer)
        return self._head(h), feature

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) that the last linear layer sees."""
        return self._body(x)[0].mean(dim=(2, 3))

    def feature_layers(self) -> dict[str, tuple[int, int, int]]:
        """{stage name: (C, h, w)} for one input of the configured resolution, in forward order.

        Found by a forward on the meta device: no compute, no change to parameters or BN statistics.
        """
        if self._layer_shapes is None:
            probe = _ShapeProbe(self)
            state = {f"net.{n}": torch.empty_like(t, device="meta")
                     for n, t in [*self.named_parameters(), *self.named_buffers()]}
            x = torch.zeros(2, self.in_channels, self.resolution, self.resolution, device="meta")
            self._layer_shapes = functional_call(probe, state, (x,))
        return dict(self._layer_shapes)

    def _check_layer(self, layer: str) -> None:
        if layer not in self.stages:
            raise UserError(f"unknown classifier layer {layer!r} for {self.arch}: "
                            f"valid layers are {', '.join(self.stages)}")


class _ShapeProbe(nn.Module):
    """Runs a classifier's stages and returns each stage's per-sample output shape."""

    def __init__(self, net: Classifier):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, tuple[int, int, int]]:
        h = (x - self.net.mean) / self.net.std
        shapes = {}
        for name, stage in self.net.stages.items():
            h = stage(h)
            shapes[name] = tuple(h.shape[1:])
        return shapes


def _channel_stats(value: float | Sequence[float], channels: int, name: str) -> torch.Tensor:
    """Per-channel statistic as a (1, C, 1, 1) tensor; one value is used for every channel."""
    values = np.asarray(value, dtype=np.float64).ravel().tolist()
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise UserError(f"{name} has {len(values)} values but the images have {channels} channels")
    if name == "std" and min(values) <= 0:
        raise UserError(f"std must be positive, got {values}")
    return torch.tensor(values, dtype=torch.float32).reshape(1, channels, 1, 1)


# --- WideResNet (DM-AT / Gowal et al. 2020, SiLU) -------------------------------------------------------------

class _WideBlock(nn.Module):
    """Pre-activation wide block: BN-SiLU-conv3x3(stride)-BN-SiLU-conv3x3, plus identity or 1x1 shortcut.

    As in DM-AT, a block that changes width applies its shortcut to the pre-activated input, and a stride-2
    conv pads (0, 1, 0, 1) like TensorFlow's SAME.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(cin, momentum=BN_MOMENTUM)
        self.conv0 = nn.Conv2d(cin, cout, 3, stride=stride, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)
        self.conv1 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout else None
        self.pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.silu(self.bn0(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        out = self.conv0(F.pad(a, self.pad))
        out = self.conv1(F.silu(self.bn1(out)))
        return skip + out


class _NormAct(nn.Module):
    """Closing BN + activation of a pre-activation network."""

    def __init__(self, channels: int, momentum: float, act: type[nn.Module]):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, momentum=momentum)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class WideResNet(Classifier):
    """WRN-depth-width with SiLU, DM-AT's variant. Stages: stem, block1, block2, block3, final."""

    default_dra_layer = "block3"

    def __init__(self, depth: int, width: int, **common):
        super().__init__(**common)
        if (depth - 4) % 6:
            raise UserError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stages["stem"] = nn.Conv2d(self.in_channels, widths[0], 3, padding=1, bias=False)
        for g, stride in enumerate((1, 2, 2), start=1):
            blocks = [_WideBlock(widths[g - 1] if i == 0 else widths[g], widths[g], stride if i == 0 else 1)
                      for i in range(n)]
            self.stages[f"block{g}"] = nn.Sequential(*blocks)
        self.stages["final"] = _NormAct(widths[3], BN_MOMENTUM, nn.SiLU)
        self.fc = nn.Linear(widths[3], self.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """DM-AT's initialisation: conv N(0, 2 / (k*k*out)), BN (1, 0), linear bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


# --- ResNet-18, pre-activation and standard (CIFAR variants: 3x3 stem, no max-pool) --------------------------

class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return skip + out


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(Classifier):
    """CIFAR ResNet-18 (`preact=False`: stem, layer1..layer4) or PreAct ResNet-18 (adds `final` BN + ReLU)."""

    default_dra_layer = "layer3"

    def __init__(self, preact: bool, **common):
        super().__init__(**common)
        block = _PreActBlock if preact else _BasicBlock
        stem = nn.Conv2d(self.in_channels, 64, 3, padding=1, bias=False)
        self.stages["stem"] = stem if preact else nn.Sequential(stem, nn.BatchNorm2d(64), nn.ReLU())
        cin = 64
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            self.stages[f"layer{i}"] = nn.Sequential(block(cin, cout, stride), block(cout, cout, 1))
            cin = cout
        if preact:
            self.stages["final"] = _NormAct(512, 0.1, nn.ReLU)
        self.fc = nn.Linear(512, self.num_classes)


# --- small CNN for 8x8 digits --------------------------------------------------------------------------------

def _conv_bn_act(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.SiLU())


class SmallCNN(Classifier):
    """conv1 32 -> conv2 64 -> conv3 64 stride 2 (3x3, BN, SiLU); about 56k parameters. 8x8 in -> conv3 4x4."""

    default_dra_layer = "conv3"

    def __init__(self, **common):
        super().__init__(**common)
        self.stages["conv1"] = _conv_bn_act(self.in_channels, 32, 1)
        self.stages["conv2"] = _conv_bn_act(32, 64, 1)
        self.stages["conv3"] = _conv_bn_act(64, 64, 2)
        self.fc = nn.Linear(64, self.num_classes)


def build_classifier(arch: str, num_classes: int, in_channels: int, resolution: int,
                     mean: float | Sequence[float], std: float | Sequence[float]) -> Classifier:
    """A freshly initialised classifier of architecture `arch` (trainer.architectures) for images in [0, 1]."""
    entry = architecture(arch)
    if num_classes < 2 or in_channels < 1 or resolution < 1:
        raise UserError(f"bad classifier shape: {num_classes} classes, {in_channels} channels, "
                        f"resolution {resolution}")
    common = dict(arch=arch, num_classes=num_classes, in_channels=in_channels, resolution=resolution,
                  mean=mean, std=std)
    return entry.builder()(**entry.options, **common)
