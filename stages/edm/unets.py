"""The two U-Nets of EDM (Karras et al. 2022, appendix F.2): DDPM++/NCSN++ (`SongUNet`) and ADM
(`DhariwalUNet`).

Both are laid out level by level: level 0 works at the input resolution, each further level at half
the previous one. A level's layers are keyed `<res>x<res>_<role>` (`16x16_block0`, `8x8_down`,
`4x4_in1`, `32x32_aux_conv`, ...) inside the `enc` and `dec` ModuleDicts, as in the published
checkpoints. The decoder concatenates, before each of its `_block<i>` layers, the most recent encoder
output not yet used (a stack).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from stages.edm.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from stores.errors import UserError


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not supported: use one of {', '.join(choices)}")


def level_plan(img_resolution: int, model_channels: int, channel_mult: Sequence[int],
               attn_resolutions: Sequence[int]) -> list[tuple[str, int, bool]]:
    """(key prefix, block width, has attention) per level, finest first: e.g. ('16x16', 256, True)."""
    plan = []
    for depth, mult in enumerate(channel_mult):
        side = img_resolution >> depth
        plan.append((f"{side}x{side}", model_channels * mult, side in attn_resolutions))
    return plan


def _label_dropout(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """While training, replace each sample's label vector by zeros with probability p (classifier-free guidance)."""
    if not training or not p:
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p       # (B, 1)
    return labels * keep.to(labels.dtype)


class _LevelUNet(nn.Module):
    """Layout and forward pass shared by both U-Nets.

    Subclasses call `_build` and may add layers through `_side_layers` (after a level's downsampling
    block) and `_head_layers` (after a decoder level).
    """

    encoder_type = "standard"          # SongUNet sets 'skip' or 'residual' per instance
    attend_every_decoder_block = True  # False: only a level's last decoder block has attention
    tags: list[str]                    # key prefix per level, finest first
    num_blocks: int

    def _build(self, plan, block, in_channels: int, stem_width: int, out_channels: int, **aux) -> None:
        """Fill `enc` and `dec` from the level plan; `block` makes a UNetBlock(in, out, **options)."""
        self.tags = [tag for tag, _, _ in plan]
        self.enc = nn.ModuleDict(self._encoder_layers(plan, block, in_channels, stem_width, aux))
        stack = [layer.out_channels for key, layer in self.enc.items() if "_aux_" not in key]
        self.dec = nn.ModuleDict(self._decoder_layers(plan, block, stack, out_channels, aux))

    def _encoder_layers(self, plan, block, in_channels, stem_width, aux) -> Iterator[tuple[str, nn.Module]]:
        width, side_width = stem_width, in_channels
        for depth, (tag, level_width, attend) in enumerate(plan):
            if depth == 0:
                yield f"{tag}_conv", Conv2d(in_channels, stem_width, 3, **aux["plain"])
            else:
                yield f"{tag}_down", block(width, width, down=True)
                extra, side_width = self._side_layers(tag, width, side_width, aux)
                yield from extra
            for i in range(self.num_blocks):
                yield f"{tag}_block{i}", block(width, level_width, attention=attend)
                width = level_width

    def _decoder_layers(self, plan, block, stack, out_channels, aux) -> Iterator[tuple[str, nn.Module]]:
        width = stack[-1]
        deepest = len(plan) - 1
        for depth in range(deepest, -1, -1):
            tag, level_width, attend = plan[depth]
            if depth == deepest:
                yield f"{tag}_in0", block(width, width, attention=True)
                yield f"{tag}_in1", block(width, width)
            else:
                yield f"{tag}_up", block(width, width, up=True)
            for i in range(self.num_blocks + 1):
                with_attention = attend and (self.attend_every_decoder_block or i == self.num_blocks)
                yield f"{tag}_block{i}", block(width + stack.pop(), level_width, attention=with_attention)
                width = level_width
            yield from self._head_layers(depth, deepest, tag, width, out_channels, aux)

    def _side_layers(self, tag, width, side_width, aux) -> tuple[list[tuple[str, nn.Module]], int]:
        return [], side_width

    def _head_layers(self, depth, deepest, tag, width, out_channels, aux) -> list[tuple[str, nn.Module]]:
        return []

    def _encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The bottleneck activation and the stack of encoder outputs for the decoder."""
        stack: list[torch.Tensor] = []
        # Second input path of NCSN++-style encoders: the input image, downsampled level by level
        # ('skip'), or the running sum of the main path and the downsampled residual ('residual').
        side = x
        for depth, tag in enumerate(self.tags):
            if depth == 0:
                x = self.enc[f"{tag}_conv"](x)
            else:
                x = self.enc[f"{tag}_down"](x, emb)
                if self.encoder_type == "skip":
                    side = self.enc[f"{tag}_aux_down"](side)
                    x = x + self.enc[f"{tag}_aux_skip"](side)
                elif self.encoder_type == "residual":
                    side = x = (x + self.enc[f"{tag}_aux_residual"](side)) / math.sqrt(2)
            stack.append(x)
            for i in range(self.num_blocks):
                x = self.enc[f"{tag}_block{i}"](x, emb)
                stack.append(x)
        return x, stack

    def _decode_level(self, depth: int, x: torch.Tensor, stack: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        tag = self.tags[depth]
        if depth == len(self.tags) - 1:
            x = self.dec[f"{tag}_in1"](self.dec[f"{tag}_in0"](x, emb), emb)
        else:
            x = self.dec[f"{tag}_up"](x, emb)
        for i in range(self.num_blocks + 1):
            x = self.dec[f"{tag}_block{i}"](torch.cat([x, stack.pop()], dim=1), emb)
        return x


class SongUNet(_LevelUNet):
    """DDPM++ and NCSN++ of Song et al. (2021) in EDM's form.

    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
    resample_filter=[1, 1]. NCSN++: 'fourier', 2, 'residual', [1, 3, 3, 1].
    """

    attend_every_decoder_block = False

    def __init__(self,
                 img_resolution: int,                              # image side at input and output
                 in_channels: int,                                 # colour channels at input
                 out_channels: int,                                # colour channels at output
                 label_dim: int = 0,                               # number of classes, 0 = unconditional
                 augment_dim: int = 0,                             # augmentation label size, 0 = none
                 model_channels: int = 128,                        # base channel count
                 channel_mult: Sequence[int] = (1, 2, 2, 2),       # channel multiplier per resolution
                 channel_mult_emb: int = 4,                        # embedding size = model_channels * this
                 num_blocks: int = 4,                              # residual blocks per resolution
                 attn_resolutions: Sequence[int] = (16,),          # resolutions with self-attention
                 dropout: float = 0.10,                            # dropout inside the blocks
                 label_dropout: float = 0,                         # class-label dropout while training
                 embedding_type: str = "positional",               # 'positional' (DDPM++) or 'fourier' (NCSN++)
                 channel_mult_noise: int = 1,                      # noise embedding = model_channels * this
                 encoder_type: str = "standard",                   # 'standard', 'skip' or 'residual'
                 decoder_type: str = "standard",                   # 'standard' or 'skip'
                 resample_filter: Sequence[float] = (1, 1),        # FIR taps for up/downsampling
                 ):
        check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        check_choice("decoder_type", decoder_type, ("standard", "skip"))
        super().__init__()
        self.label_dropout = label_dropout
        self.encoder_type, self.decoder_type = encoder_type, decoder_type
        self.num_blocks = num_blocks
        # Xavier-uniform everywhere; output convolutions start near zero, attention inputs at gain sqrt(0.2).
        plain = {"init_mode": "xavier_uniform"}
        small = {"init_mode": "xavier_uniform", "init_weight": 1e-5}
        fir = list(resample_filter)
        emb_width = model_channels * channel_mult_emb
        block = partial(
            UNetBlock, emb_channels=emb_width, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=fir, resample_proj=True, adaptive_scale=False, init=plain, init_zero=small,
            init_attn={"init_mode": "xavier_uniform", "init_weight": math.sqrt(0.2)})

        # Embedding of the noise level (and labels): noise_width -> emb_width -> emb_width.
        noise_width = model_channels * channel_mult_noise
        positional = embedding_type == "positional"
        self.map_noise = (PositionalEmbedding(noise_width, endpoint=True) if positional
                          else FourierEmbedding(noise_width))
        self.map_label = Linear(label_dim, noise_width, **plain) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_width, bias=False, **plain) if augment_dim else None
        self.map_layer0 = Linear(noise_width, emb_width, **plain)
        self.map_layer1 = Linear(emb_width, emb_width, **plain)

        plan = level_plan(img_resolution, model_channels, channel_mult, attn_resolutions)
        self._build(plan, block, in_channels, model_channels, out_channels, plain=plain, small=small, fir=fir)

    def _side_layers(self, tag, width, side_width, aux):
        plain, fir = aux["plain"], aux["fir"]
        if self.encoder_type == "skip":  # the input image at this level, projected onto the main path
            return [(f"{tag}_aux_down", Conv2d(side_width, side_width, 0, down=True, resample_filter=fir)),
                    (f"{tag}_aux_skip", Conv2d(side_width, width, 1, **plain))], side_width
        if self.encoder_type == "residual":  # a strided 3x3 conv of the previous level's sum
            conv = Conv2d(side_width, width, 3, down=True, resample_filter=fir, fused_resample=True, **plain)
            return [(f"{tag}_aux_residual", conv)], width
        return [], side_width

    def _head_layers(self, depth, deepest, tag, width, out_channels, aux):
        """The skip decoder adds an image output at every level, the standard one only at level 0."""
        if self.decoder_type != "skip" and depth != 0:
            return []
        head = []
        if self.decoder_type == "skip" and depth < deepest:  # upsamples the coarser levels' image
            head.append((f"{tag}_aux_up", Conv2d(out_channels, out_channels, 0, up=True, resample_filter=aux["fir"])))
        head.append((f"{tag}_aux_norm", GroupNorm(width, eps=1e-6)))
        head.append((f"{tag}_aux_conv", Conv2d(width, out_channels, 3, **aux["small"])))
        return head

    def _embed(self, noise_labels, class_labels, augment_labels) -> torch.Tensor:
        emb = self.map_noise(noise_labels)                                     # (B, N) as [cos | sin]
        emb = emb.roll(emb.shape[1] // 2, dims=1)                              # DDPM++ orders it [sin | cos]
        if self.map_label is not None:
            labels = _label_dropout(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))          # (B, E)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        """x: (B, Cin, H, W), noise_labels: (B,), class_labels: (B, label_dim) -> (B, Cout, H, W)."""
        emb = self._embed(noise_labels, class_labels, augment_labels)
        x, stack = self._encode(x, emb)
        image = None  # sum of the output heads, upsampled from coarser levels (skip decoder)
        for depth in range(len(self.tags) - 1, -1, -1):
            x = self._decode_level(depth, x, stack, emb)
            tag = self.tags[depth]
            if f"{tag}_aux_conv" not in self.dec:
                continue
            head = self.dec[f"{tag}_aux_conv"](F.silu(self.dec[f"{tag}_aux_norm"](x)))
            image = head if image is None else head + self.dec[f"{tag}_aux_up"](image)
        return image


class DhariwalUNet(_LevelUNet):
    """ADM U-Net of Dhariwal & Nichol (2021) in EDM's form (the ImageNet-64 model)."""

    def __init__(self,
                 img_resolution: int,                              # image side at input and output
                 in_channels: int,                                 # colour channels at input
                 out_channels: int,                                # colour channels at output
                 label_dim: int = 0,                               # number of classes, 0 = unconditional
                 augment_dim: int = 0,                             # augmentation label size, 0 = none
                 model_channels: int = 192,                        # base channel count
                 channel_mult: Sequence[int] = (1, 2, 3, 4),       # channel multiplier per resolution
                 channel_mult_emb: int = 4,                        # embedding size = model_channels * this
                 num_blocks: int = 3,                              # residual blocks per resolution
                 attn_resolutions: Sequence[int] = (32, 16, 8),    # resolutions with self-attention
                 dropout: float = 0.10,                            # dropout inside the blocks
                 label_dropout: float = 0,                         # class-label dropout while training
                 ):
        super().__init__()
        self.label_dropout = label_dropout
        self.num_blocks = num_blocks
        # Kaiming-uniform at gain sqrt(1/3) (PyTorch's default for conv and linear layers); output layers start at zero.
        gain = math.sqrt(1 / 3)
        plain = {"init_mode": "kaiming_uniform", "init_weight": gain, "init_bias": gain}
        zeroed = {"init_mode": "kaiming_uniform", "init_weight": 0, "init_bias": 0}
        emb_width = model_channels * channel_mult_emb
        block = partial(UNetBlock, emb_channels=emb_width, channels_per_head=64, dropout=dropout,
                        init=plain, init_zero=zeroed)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **zeroed) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_width, **plain)
        self.map_layer1 = Linear(emb_width, emb_width, **plain)
        self.map_label = None
        if label_dim:  # one-hot labels times sqrt(label_dim) weights: unit-variance class embeddings
            self.map_label = Linear(label_dim, emb_width, bias=False, init_mode="kaiming_normal",
                                    init_weight=math.sqrt(label_dim))

        plan = level_plan(img_resolution, model_channels, channel_mult, attn_resolutions)
        self._build(plan, block, in_channels, model_channels * channel_mult[0], out_channels, plain=plain)
        width = plan[0][1]
        self.out_norm = GroupNorm(width)
        self.out_conv = Conv2d(width, out_channels, 3, **zeroed)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        """x: (B, Cin, H, W), noise_labels: (B,), class_labels: (B, label_dim) -> (B, Cout, H, W)."""
        emb = self.map_noise(noise_labels)                                     # (B, model_channels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_label_dropout(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)                                                      # (B, E)
        x, stack = self._encode(x, emb)
        for depth in reversed(range(len(self.tags))):
            x = self._decode_level(depth, x, stack, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
