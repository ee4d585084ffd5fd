"""EDM networks: the DDPM++/NCSN++ U-Net (`SongUNet`), the ADM U-Net (`DhariwalUNet`) and the EDM
preconditioning wrapper (`EDMPrecond`).

Constructor keywords and parameter names equal those of the official NVlabs/edm networks, so the
keyword dict of an official `EDMPrecond` builds the same architecture here and its state dict loads
by name (`model.enc.16x16_block0.conv0.weight`, `model.map_label.weight`, ...).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stages.denoiser import Denoiser
from stages.edm.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from stores.errors import UserError


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not supported: use one of {', '.join(choices)}")


def _drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole label vectors with probability p while training (classifier-free guidance)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. (2021) as reimplemented in EDM.

    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
    resample_filter=[1, 1]. NCSN++: 'fourier', 2, 'residual', [1, 3, 3, 1].
    """

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
        _check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        super().__init__()
        self.label_dropout = label_dropout
        self.encoder_type = encoder_type
        self.decoder_type = decoder_type
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        self.init = dict(init_mode="xavier_uniform")
        self.init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        self.block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=list(resample_filter), resample_proj=True, adaptive_scale=False,
            init=self.init, init_zero=self.init_zero, init_attn=dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2)),
        )
        self._build_mapping(embedding_type, noise_channels, emb_channels, label_dim, augment_dim)
        self.enc = nn.ModuleDict()
        self.dec = nn.ModuleDict()
        cout = self._build_encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                   attn_resolutions, resample_filter)
        self._build_decoder(img_resolution, cout, out_channels, model_channels, channel_mult, num_blocks,
                            attn_resolutions, resample_filter)

    def _build_mapping(self, embedding_type: str, noise_channels: int, emb_channels: int,
                       label_dim: int, augment_dim: int) -> None:
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **self.init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **self.init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **self.init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **self.init)

    def _build_encoder(self, img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                       attn_resolutions, resample_filter) -> int:
        """Fill self.enc; return the channel count at the bottleneck."""
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv2d(cout, model_channels, 3, **self.init)
                cout = model_channels
            else:
                self.enc[f"{tag}_down"] = UNetBlock(cout, cout, down=True, **self.block_kwargs)
                if self.encoder_type == "skip":
                    self.enc[f"{tag}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{tag}_aux_skip"] = Conv2d(caux, cout, 1, **self.init)
                if self.encoder_type == "residual":
                    self.enc[f"{tag}_aux_residual"] = Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                                             fused_resample=True, **self.init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{tag}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **self.block_kwargs)
        return cout

    def _build_decoder(self, img_resolution, cout, out_channels, model_channels, channel_mult, num_blocks,
                       attn_resolutions, resample_filter) -> None:
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]
        last = len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == last:
                self.dec[f"{tag}_in0"] = UNetBlock(cout, cout, attention=True, **self.block_kwargs)
                self.dec[f"{tag}_in1"] = UNetBlock(cout, cout, **self.block_kwargs)
            else:
                self.dec[f"{tag}_up"] = UNetBlock(cout, cout, up=True, **self.block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{tag}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **self.block_kwargs)
            if self.decoder_type == "skip" or level == 0:
                if self.decoder_type == "skip" and level < last:
                    self.dec[f"{tag}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                       resample_filter=resample_filter)
                self.dec[f"{tag}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{tag}_aux_conv"] = Conv2d(cout, out_channels, 3, **self.init_zero)

    def _embed(self, noise_labels, class_labels, augment_labels) -> torch.Tensor:
        emb = self.map_noise(noise_labels)                                     # (B, N) as [cos, sin]
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)      # -> [sin, cos]
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))                                    # (B, E)

    def _encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run self.enc; return the bottleneck activation and the skip activations."""
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return x, skips

    def _decode(self, x: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """Run self.dec; the output is the sum of the auxiliary (skip-decoder) outputs."""
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if "_block" in name:  # every decoder block takes the matching encoder output
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        """x: (B, Cin, H, W), noise_labels: (B,), class_labels: (B, label_dim) -> (B, Cout, H, W)."""
        emb = self._embed(noise_labels, class_labels, augment_labels)
        x, skips = self._encode(x, emb)
        return self._decode(x, skips, emb)


class DhariwalUNet(nn.Module):
    """ADM U-Net of Dhariwal & Nichol (2021) as reimplemented in EDM (ImageNet-64 model)."""

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
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        self.block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                                 init=init, init_zero=init_zero)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)
        self.enc = nn.ModuleDict()
        self.dec = nn.ModuleDict()
        cout = self._build_encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                   attn_resolutions, init)
        cout = self._build_decoder(img_resolution, cout, model_channels, channel_mult, num_blocks, attn_resolutions)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def _build_encoder(self, img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                       attn_resolutions, init) -> int:
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv2d(cout, model_channels * mult, 3, **init)
                cout = model_channels * mult
            else:
                self.enc[f"{tag}_down"] = UNetBlock(cout, cout, down=True, **self.block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{tag}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **self.block_kwargs)
        return cout

    def _build_decoder(self, img_resolution, cout, model_channels, channel_mult, num_blocks, attn_resolutions) -> int:
        skips = [m.out_channels for m in self.enc.values()]
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == len(channel_mult) - 1:
                self.dec[f"{tag}_in0"] = UNetBlock(cout, cout, attention=True, **self.block_kwargs)
                self.dec[f"{tag}_in1"] = UNetBlock(cout, cout, **self.block_kwargs)
            else:
                self.dec[f"{tag}_up"] = UNetBlock(cout, cout, up=True, **self.block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{tag}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **self.block_kwargs)
        return cout

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        """x: (B, Cin, H, W), noise_labels: (B,), class_labels: (B, label_dim) -> (B, Cout, H, W)."""
        emb = self.map_noise(noise_labels)                                     # (B, model_channels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)                                                      # (B, E)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:  # every decoder block takes the matching encoder output
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


_WRAPPER_SUPPLIED = ("img_resolution", "in_channels", "out_channels", "label_dim")  # set by EDMPrecond


def _model_kwargs(model_type: str, given: dict) -> dict:
    """All keywords of the inner network, defaults filled in; bad names or keywords are UserErrors."""
    _check_choice("model_type", model_type, tuple(MODEL_TYPES))
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
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=img_channels, label_dim=label_dim, **model_kwargs)
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
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4                                    # (B,)
        F_x = self.model((c_in * x).to(dtype), c_noise, self._labels(class_labels, batch, x.device),
                         augment_labels=self._augment_labels(augment_labels, batch, x.device))
        return c_skip * x + c_out * F_x.to(torch.float32)

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
