"""fit-diffusion: train a class-conditional EDM (SongUNet, DDPM++) on an image set.

EDM training (Karras et al. 2022): ln sigma ~ N(-1.2, 1.2^2), loss weight (sigma^2 + sigma_d^2) / (sigma sigma_d)^2,
Adam with a linear learning-rate ramp, EMA with a half-life in images (ramped up early, as EDM does).
Checkpoints hold everything the next step depends on (weights, EMA, optimizer, RNG states, data position),
so a resumed run continues bit for bit where the interrupted one stopped.
"""
from __future__ import annotations

import copy
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stages.edm.networks import EDMPrecond
from stages.models import save_own
from stores.atomic import torch_save_atomically
from stores.errors import Terminated, UserError
from stores.identity import short_key
from stores.images import ImageSet
from stores.stream import ShardStream

P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5


@dataclass(frozen=True)
class FitSettings:
    """How fit-diffusion trains; the defaults are sized for the digits set (8x8x1) on a 2-core CPU. The README gives
    the measured time and sample quality (class agreement) by training length.
    """

    model_channels: int = 32          # base channel count
    channel_mult: tuple = (1, 2)      # multiplier per resolution level
    num_blocks: int = 2               # residual blocks per level
    batch_size: int = 128             # images per step
    lr: float = 1e-3                  # Adam peak learning rate (linear ramp over the first 5% of the run)
    ema_halflife_kimg: float = 10.0   # EMA half-life, thousands of images (at most 5% of the images seen)
    duration_kimg: float = 120.0      # training length, thousands of images
    seed: int = 0                     # initialisation, noise and data order
    dropout: float = 0.1              # dropout in the U-Net blocks
    checkpoint_seconds: float = 60.0  # wall time between checkpoints

    @property
    def total_steps(self) -> int:
        return math.ceil(self.duration_kimg * 1000 / self.batch_size)


def network_config(images: ImageSet, s: FitSettings) -> dict:
    """EDMPrecond keywords for a small DDPM++ network fitting the image set's shape."""
    lowest = images.resolution // 2 ** (len(s.channel_mult) - 1)
    if lowest < 1 or images.resolution % 2 ** (len(s.channel_mult) - 1):
        raise UserError(f"fit_diffusion.channel_mult has {len(s.channel_mult)} levels, but {images.resolution}x"
                        f"{images.resolution} images cannot be halved {len(s.channel_mult) - 1} times; "
                        "use fewer levels")
    config = dict(img_resolution=images.resolution, img_channels=images.channels, label_dim=images.classes,
                  sigma_data=SIGMA_DATA, model_type="SongUNet", model_channels=s.model_channels,
                  channel_mult=list(s.channel_mult), num_blocks=s.num_blocks, attn_resolutions=[lowest],
                  dropout=s.dropout, embedding_type="positional", encoder_type="standard", decoder_type="standard",
                  channel_mult_noise=1, resample_filter=[1, 1], augment_dim=0)
    _check_builds(config)
    return config


def _check_builds(config: dict) -> None:
    """Build the network and run one forward on the meta device (no memory, no compute): widths that the
    positional embedding or a GroupNorm cannot split are refused here, before anything is written."""
    c, r = config["img_channels"], config["img_resolution"]
    try:
        with torch.device("meta"):
            EDMPrecond(**config)(torch.zeros(1, c, r, r), torch.ones(1), torch.zeros(1, config["label_dim"]))
    except (ValueError, RuntimeError):
        raise UserError(f"fit_diffusion.model_channels {config['model_channels']} with channel_mult "
                        f"{config['channel_mult']} makes layers the network cannot split into its normalisation "
                        f"groups; use a multiple of 8 (e.g. 16 or 32)") from None


def model_key(images: ImageSet, s: FitSettings) -> str:
    """Folder name of the fitted model: the same data and settings always give the same key."""
    identity = {k: v for k, v in asdict(s).items() if k != "checkpoint_seconds"}
    return "fit-" + short_key({"image_set": images.fingerprint, "settings": identity}, 12)


def edm_loss(net: EDMPrecond, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """images: (B, C, H, W) in [-1, 1]; labels: (B,) class indices. Returns the mean weighted loss."""
    b = images.shape[0]
    sigma = (torch.randn(b, 1, 1, 1, generator=generator) * P_STD + P_MEAN).exp()        # (B, 1, 1, 1)
    weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
    noise = torch.randn(images.shape, generator=generator) * sigma
    denoised = net(images + noise, sigma.flatten(), labels)
    return (weight * (denoised - images) ** 2).mean()


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1


def training_dir(out_dir: Path) -> Path:
    """Where a fit keeps its checkpoint and writer lock: out_dir itself appears only when the model is saved."""
    return Path(out_dir).with_name(f".{Path(out_dir).name}.training")


class Trainer:
    def __init__(self, images: ImageSet, settings: FitSettings, out_dir: Path):
        self.images, self.s, self.out_dir = images, settings, Path(out_dir)
        self.checkpoint_path = training_dir(self.out_dir) / "checkpoint.pt"
        torch.manual_seed(settings.seed)
        self.net = EDMPrecond(**network_config(images, settings)).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=settings.lr, betas=(0.9, 0.999), eps=1e-8)
        self.noise = torch.Generator().manual_seed(settings.seed + 1)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.resumed = self._load_checkpoint()

    # --- state --------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"settings": _plain(asdict(self.s)), "image_set": self.images.fingerprint, "net": self.net.state_dict(),
                "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "noise": self.noise.get_state(),
                "torch_rng": torch.get_rng_state(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch}

    def save_checkpoint(self) -> None:
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomically(self._state(), self.checkpoint_path)

    def _load_checkpoint(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, weights_only=True)
        if state["image_set"] != self.images.fingerprint or _identity(state["settings"]) != _identity(asdict(self.s)):
            return False                  # another fit's checkpoint (checkpoint_seconds may differ: it changes nothing)
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.noise.set_state(state["noise"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        return True

    # --- loop ---------------------------------------------------------------------------------------------
    def batches(self):
        """Endless (images, labels) stream; the position (epoch, batch) is part of the checkpoint."""
        stream = ShardStream(self.images.path, None, self.images.plan_indices(), self.s.batch_size,
                             seed=self.s.seed, shuffle=True, drop_last=True)
        while True:
            stream.set_epoch(self.epoch)
            produced = 0
            for i, batch in enumerate(stream):
                if i < self.batch_in_epoch:
                    continue                      # resuming inside an epoch: skip what was consumed
                produced += 1
                self.batch_in_epoch = i + 1
                yield to_model_range(batch["images"]), batch["labels"]
            if produced == 0 and self.batch_in_epoch == 0:
                raise ValueError(f"image set {self.images.name} has fewer samples than one batch ({self.s.batch_size})")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        s = self.s
        seen = self.step * s.batch_size
        rampup = max(0.05 * s.duration_kimg * 1000, 1)
        for group in self.opt.param_groups:
            group["lr"] = s.lr * min(seen / rampup, 1.0)
        loss = edm_loss(self.net, images, labels, self.noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.opt.step()
        self._update_ema(seen + s.batch_size)
        self.step += 1
        return loss.item()

    def _update_ema(self, seen: int) -> None:
        halflife = min(self.s.ema_halflife_kimg * 1000, seen * 0.05)       # EDM's EMA ramp-up
        beta = 0.5 ** (self.s.batch_size / max(halflife, 1e-8))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters()):
                e.copy_(p.detach().lerp(e, beta))

    def run(self, on_step: Callable[[int, float], None] | None = None) -> str:
        """Train to the end (checkpointing along the way), save the EMA network; returns its fingerprint.

        Ctrl-C (or SIGTERM) is held until the current step ends, then the checkpoint is written and
        KeyboardInterrupt (Terminated) raised: a checkpoint written mid-step (a batch consumed but not trained on,
        weights stepped but not counted) would resume into another model than the uninterrupted fit. A second
        signal stops at once, keeping the last checkpoint."""
        last_save = time.monotonic()
        data = self.batches()
        with interrupt_at_step_end() as interrupted:
            while self.step < self.s.total_steps:
                images, labels = next(data)
                loss = self.train_step(images, labels)
                if on_step:
                    on_step(self.s.batch_size, loss)
                stop = interrupted()
                if stop is not None:
                    self.save_checkpoint()
                    raise stop
                if time.monotonic() - last_save > self.s.checkpoint_seconds:
                    self.save_checkpoint()
                    last_save = time.monotonic()
        self.save_checkpoint()
        provenance = {"made_by": "fit-diffusion", "image_set": self.images.fingerprint,
                      "image_set_name": self.images.name, "settings": asdict(self.s), "steps": self.step}
        return save_own(self.ema, self.out_dir, provenance)


@contextmanager
def interrupt_at_step_end():
    """Yields `interrupted()`: the KeyboardInterrupt (Terminated for SIGTERM) to raise once the step is done, or
    None. The first SIGINT or SIGTERM is only noted; a second raises at once. Outside the main thread (no signal
    handlers there) nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    received: list[int] = []

    def hold(signum, frame):
        received.append(signum)
        if len(received) > 1:
            raise _unwinding(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: _unwinding(received[0]) if received else None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _unwinding(signum: int) -> KeyboardInterrupt:
    if signum == signal.SIGTERM:
        Terminated.seen = True
        return Terminated()
    return KeyboardInterrupt()


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _identity(settings: dict) -> dict:
    """The settings that decide the result (all but how often it checkpoints)."""
    return {k: v for k, v in _plain(settings).items() if k != "checkpoint_seconds"}
