"""The training loop: adversarial training (TRADES or PGD-AT) on mixed real + generated batches, plus DRA.

One step on a batch of B images (real rows first, then generated) with their cached targets:

    x, t, mask = align(images, targets)                      # (B, C, H, W) in [0, 1]; (B, Ct, h, w); mask or None
    x_adv      = attack(model, x, y)                         # TRADES: max KL(p(x) || p(x')); PGD-AT: max CE
    logits     = model(x), model(x_adv)                      # (B, classes); the DRA view also yields f (B, Cf, h', w')
    loss       = AT loss + lambda * mean over kept tokens of 1 - cos(head(match_grid(f)), t)
    SGD or AdamW step at lr_at(step), EMA update

`align` (trainer/views.py, `train.dra_targets`): a stored view's augmentation and its exact target (views), a
random crop/flip and the online teacher's target of it (online), or the whole-cell shift (shifted).
An epoch is ceil(N_real / B) steps (DM-AT). At its end: clean and PGD accuracy of the EMA model on the held-out
split, one line in metrics.jsonl, a checkpoint (also every `checkpoint_every` steps). `dra: off` or lambda 0
builds no head and reads no targets; every random stream (init, loader, augmentation, attacks) is the same.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stores.errors import UserError
from stores.images import ImageSet
from trainer.attacks import pgd_at_loss, pgd_attack, trades_adversary, trades_loss
from trainer.classifiers import Classifier, build_classifier
from trainer.dra import ProjectionHead, dra_loss, match_grid
from trainer.job import Job
from trainer.loader import MixPlan, make_loader
from trainer.optim import EMA, lr_at, make_optimizer
from trainer.runs import RunFolder
from trainer.trackers import Trackers, open_for_training
from trainer.views import Teacher, align, views_seen

EMA_WARMUP = 0.025            # DM-AT: the EMA copies the weights for the first 2.5% of the steps


@dataclass
class Dist:
    """This process's place in data-parallel training."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def local(cls) -> Dist:
        """A single process on the first GPU when one is visible, else on the CPU."""
        return cls(device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """DistributedDataParallel's device_ids: this rank's one GPU (`cuda` alone: the current one), None on the CPU."""
    if device.type != "cuda":
        return None
    return [device.index if device.index is not None else torch.cuda.current_device()]


class TrainNet(nn.Module):
    """Classifier + projection head: one forward for everything the loss needs (so DDP sees a single call)."""

    def __init__(self, model: Classifier, head: nn.Module | None, layer: str | None, target_hw: tuple | None,
                 view: str):
        super().__init__()
        self.model, self.head, self.layer, self.target_hw, self.view = model, head, layer, target_hw, view

    def forward(self, x: torch.Tensor | None, x_adv: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {}
        for view, inputs in (("clean", x), ("adversarial", x_adv)):
            if inputs is None:
                continue
            if self.head is not None and view == self.view:
                out[view], f = self.model.forward_features(inputs, self.layer)      # (B, classes), (B, Cf, h', w')
                out["projected"] = self.head(match_grid(f, self.target_hw))         # (B, Ct, h, w)
            else:
                out[view] = self.model(inputs)
        return out


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class Trainer:
    """Model, head, optimizer, EMA and random streams of one rank, and the step that moves them."""

    def __init__(self, job: Job, dist: Dist, teacher: Teacher | None = None):
        s, self.job, self.dist, self.s = job.settings, job, dist, job.settings
        if job.dra_targets == "online" and teacher is None:
            raise ValueError("train.dra_targets: online needs the teacher callable (built by pipeline.plans.teacher)")
        self.teacher = teacher
        device = dist.device
        torch.manual_seed(s.seed)
        self.model = build_classifier(s.arch, job.classes, job.channels, job.resolution, job.mean, job.std).to(device)
        self.head = None
        if job.dra:
            f_channels = self.model.feature_layers()[job.dra_layer][0]
            self.head = ProjectionHead(f_channels, job.target_shape[0], s.dra_hidden, s.dra_depth).to(device)
        view = "clean" if s.objective == "clean" else s.dra_view
        self.net = TrainNet(self.model, self.head, job.dra_layer, job.target_shape[1:] if job.dra else None, view)
        self.ddp = self.net
        if dist.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(self.net, device_ids=ddp_device_ids(device))
        self.opt = make_optimizer(self.model, self.head, s.peak_lr, s.decay, optimizer=s.optimizer_name,
                                  betas=s.adam_betas)
        self.ema = EMA(self.model, s.ema_decay, warmup_steps=round(EMA_WARMUP * job.total_steps))
        self.aug_gen = torch.Generator().manual_seed(derived_seed(s.seed, dist.rank, 1))
        self.attack_gen = torch.Generator(device).manual_seed(derived_seed(s.seed, dist.rank, 2))
        self.needs_clean = s.objective in ("trades", "clean") or view == "clean"
        self.step = 0

    def autocast(self, setting: str = "precision"):
        """bf16 autocast on this rank's device (CPU or CUDA) when train.<setting> is bf16, else float32."""
        bf16 = getattr(self.s, setting) == "bf16"
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=bf16)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step on a batch; returns the detached loss terms."""
        s, dev = self.s, self.dist.device
        on_dev = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        # random draws on the CPU generator, pixels moved wherever the batch is: the same stream on any device
        mode = self.job.dra_targets if self.head is not None else None
        aligned = align(mode, on_dev, s.crop_pad, s.flip, self.aug_gen, self.job.view_seed, self.teacher, host=batch)
        x, t, mask = aligned.x, aligned.targets, aligned.mask
        y = on_dev["labels"]                                                                 # x (B, C, H, W), y (B,)
        with self.autocast("attack_precision"):
            x_adv = self.attack(x, y)                                                        # (B, C, H, W) or None
        with self.autocast("precision"):
            out = self.ddp(x if self.needs_clean else None, x_adv)
            loss, terms = self.objective(out, y)
            if self.head is not None:
                # t (B, Ct, h, w), mask (B, h, w)
                terms["dra"] = dra_loss(out["projected"], t, mask)
                loss = loss + s.dra_lambda * terms["dra"]
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.job.total_steps, s.peak_lr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        terms["loss"] = loss
        return {k: v.detach().float() for k, v in terms.items()}

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Adversarial examples for the objective; TRADES attacks in train mode, PGD-AT in eval mode (DM-AT)."""
        s = self.s
        if s.objective == "trades":
            return trades_adversary(self.model, x, s.epsilon, s.attack_step_size, s.attack_steps, self.attack_gen,
                                    start=s.attack_start)
        if s.objective == "pgd-at":
            self.model.eval()
            x_adv = pgd_attack(self.model, x, y, s.epsilon, s.attack_step_size, s.attack_steps,
                               generator=self.attack_gen)
            self.model.train()
            return x_adv
        return None

    def objective(self, out: dict[str, torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        s = self.s
        if s.objective == "trades":
            total, ce, kl = trades_loss(out["clean"], out["adversarial"], y, s.trades_beta, s.label_smoothing)
            return total, {"ce": ce, "kl": kl}
        if s.objective == "pgd-at":
            ce = pgd_at_loss(out["adversarial"], y, s.label_smoothing)
            return ce, {"ce": ce}
        ce = F.cross_entropy(out["clean"], y, label_smoothing=s.label_smoothing)
        return ce, {"ce": ce}

    # --- state --------------------------------------------------------------------------------------------
    def rng_state(self) -> dict:
        state = {"aug": self.aug_gen.get_state(), "attack": self.attack_gen.get_state(), "torch": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return state

    def set_rng_state(self, state: dict) -> None:
        written_on = "cuda" if "cuda" in state else "cpu"
        if written_on != self.dist.device.type:        # the attack stream is a generator of the device's own kind
            raise UserError(f"run {self.job.name}'s checkpoint was written training on {written_on}, this process "
                            f"trains on {self.dist.device.type}: resume it on {written_on}, or delete its "
                            f"checkpoint.pt to train from the start")
        self.aug_gen.set_state(state["aug"])
        self.attack_gen.set_state(state["attack"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.dist.device)

    def state(self, rng: list[dict]) -> dict:
        return {"step": self.step, "model": self.model.state_dict(),
                "head": self.head.state_dict() if self.head else None,
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(), "rng": rng,
                "loader": {"batches": self.step, "world_size": self.dist.world_size,
                           "loader_workers": self.s.loader_workers}}

    def load(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.set_rng_state(state["rng"][self.dist.rank])

    def mix_plan(self) -> MixPlan:
        """This rank's loader, positioned at the current step."""
        return mix_plan(self.job, self.dist, self.step)


def mix_plan(job: Job, dist: Dist, start: int = 0) -> MixPlan:
    """What rank `dist.rank` streams from batch `start` on: views mode a drawn stored view per sample, shifted mode
    view 0 (and view 1, the mirror, with flips), online and no DRA no targets."""
    s = job.settings
    real_rows, gen_rows = job.mix()
    mode = job.dra_targets
    targets = {"views": ("targets", "views"), "online": (), None: (),
               "shifted": ("targets", "targets_v1") if s.flip and job.mirror_view else ("targets",)}[mode]
    return MixPlan(job.real, job.generated, real_rows, gen_rows, s.seed, dist.rank, dist.world_size,
                   s.loader_workers, start, ("ids", "images", "labels") + targets,
                   job.view_counts if mode == "views" else (0, 0))


# --- evaluation on the held-out split --------------------------------------------------------------------------

def load_holdout(job: Job) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, H, W) float in [0, 1], labels (N,)) of the held-out real training images."""
    from pathlib import Path
    data = ImageSet(Path(job.real.images)).read_range(*job.holdout)
    return torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(data.labels)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int, seed: int,
             device: torch.device, batch: int = 512) -> dict[str, float]:
    """Clean and PGD-`steps` (step 2.5 eps / steps, random start, fixed seed) accuracy of `model` in eval mode.

    An image counts as robust only when it is classified correctly both clean and after the attack, as in
    `dra-pipe eval`, so the held-out PGD accuracy that picks best.pt is never above the clean one."""
    if len(labels) == 0:
        return {}
    model.eval()
    gen = torch.Generator(device).manual_seed(seed)
    clean = robust = 0
    for lo in range(0, len(labels), batch):
        x, y = images[lo:lo + batch].to(device), labels[lo:lo + batch].to(device)
        with torch.no_grad():
            right = model(x).argmax(1) == y                                              # (B,) bool
        clean += int(right.sum())
        x_adv = pgd_attack(model, x, y, eps, 2.5 * eps / steps, steps, generator=gen)
        with torch.no_grad():
            robust += int((right & (model(x_adv).argmax(1) == y)).sum())
    return {"clean_acc": clean / len(labels), "pgd_acc": robust / len(labels)}


class EpochMeter:
    """Running sums of the loss terms over an epoch's steps, and the time spent training."""

    def __init__(self, sums: dict | None = None, steps: int = 0, seconds: float = 0.0):
        self.sums, self.steps, self.seconds = dict(sums or {}), steps, seconds

    def add(self, terms: dict[str, torch.Tensor], seconds: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.seconds += seconds

    def row(self, batch_size: int) -> dict:
        means = {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}
        return {**means, "images_per_s": batch_size * self.steps / max(self.seconds, 1e-9)}

    def state(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps, "seconds": self.seconds}


# --- the loop ----------------------------------------------------------------------------------------------

StepHook = Callable[[int, int, dict], None]     # (step, images in the step, loss terms)


def train(job: Job, dist: Dist | None = None, on_step: StepHook | None = None,
          on_epoch: Callable[[dict], None] | None = None, teacher: Teacher | None = None) -> dict:
    """Train (or resume) the run in job.run_dir to the end; rank 0 writes metrics, checkpoints and final.pt.

    teacher: the online teacher (train.dra_targets: online), built by the pipeline; picklable for Ray Train."""
    dist = dist or Dist()
    run = RunFolder(job.run_dir)
    trainer = Trainer(job, dist, teacher)
    meter = EpochMeter()
    state = run.load_checkpoint()
    if state is not None:
        trainer.load(state)
        meter = EpochMeter(**state["meter"])
        if dist.main:
            run.truncate_metrics(state["metrics_bytes"])
    holdout = load_holdout(job) if dist.main else None
    with open_for_training(job, dist.rank, trainer.step) as trackers:
        _loop(job, trainer, meter, run, holdout, trackers, on_step, on_epoch)
        if not dist.main:
            return {}
        run.save_final(_final_record(job, trainer))
        trackers.finish(trainer.step)
    rows = run.read_metrics()
    return rows[-1] if rows else {}


def _loop(job: Job, trainer: Trainer, meter: EpochMeter, run: RunFolder, holdout, trackers: Trackers,
          on_step: StepHook | None, on_epoch: Callable[[dict], None] | None) -> None:
    """Steps to the end: per epoch a metrics row (and its tracked scalars) and a checkpoint."""
    s, dist = job.settings, trainer.dist
    batches = iter(make_loader(trainer.mix_plan(), pin_memory=dist.device.type == "cuda", borrow=True))
    trainer.model.train()
    while trainer.step < job.total_steps:
        started = time.perf_counter()
        batch = next(batches)
        terms = trainer.train_step(batch)
        meter.add(terms, time.perf_counter() - started)
        if on_step:
            on_step(trainer.step, s.batch_size, terms)
        epoch_end = trainer.step % job.steps_per_epoch == 0
        if epoch_end:
            row = _epoch_row(job, trainer, meter, holdout)
            meter = EpochMeter()
            if dist.main:
                _keep_if_best(run, job, trainer, row)
                run.append_metrics(row)
                trackers.row(row)
                if on_epoch:
                    on_epoch(row)
        every = s.checkpoint_every
        if epoch_end or (every and trainer.step % every == 0):
            _checkpoint(run, trainer, meter)


def _epoch_row(job: Job, trainer: Trainer, meter: EpochMeter, holdout) -> dict:
    s = job.settings
    row = {"epoch": trainer.step // job.steps_per_epoch, "step": trainer.step,
           "lr": lr_at(trainer.step - 1, job.total_steps, s.peak_lr), **meter.row(s.batch_size)}
    if job.dra:
        row.update(views_seen(job, trainer.step))
    if holdout is not None:
        row.update(evaluate(trainer.ema.module, *holdout, s.epsilon, s.holdout_pgd_steps, s.seed,
                            trainer.dist.device))
    return row


def _checkpoint(run: RunFolder, trainer: Trainer, meter: EpochMeter) -> None:
    """Every rank contributes its RNG states; rank 0 writes."""
    rng = [trainer.rng_state()]
    if trainer.dist.world_size > 1:
        rng = [None] * trainer.dist.world_size
        torch.distributed.all_gather_object(rng, trainer.rng_state())
    if trainer.dist.main:
        run.save_checkpoint({**trainer.state(rng), "meter": meter.state(), "metrics_bytes": run.metrics_bytes()})


def _keep_if_best(run: RunFolder, job: Job, trainer: Trainer, row: dict) -> None:
    """best.pt: the EMA weights of the epoch with the highest held-out PGD accuracy so far (ties: the later epoch),
    as DM-AT selects its checkpoint. A resumed run replays its epochs exactly, so best.pt stays consistent."""
    if "pgd_acc" not in row:
        return
    earlier = [r["pgd_acc"] for r in run.read_metrics() if "pgd_acc" in r]
    if earlier and row["pgd_acc"] < max(earlier):
        return
    selected = {"epoch": row["epoch"], "by": f"held-out PGD-{job.settings.holdout_pgd_steps}",
                "pgd_acc": row["pgd_acc"], "clean_acc": row["clean_acc"]}
    run.save_best({**_final_record(job, trainer), "selected": selected})


def _final_record(job: Job, trainer: Trainer) -> dict:
    s = job.settings
    weights = {k: v.detach().cpu() for k, v in trainer.ema.module.state_dict().items()}   # loads on a CPU-only host
    return {"arch": s.arch, "num_classes": job.classes, "in_channels": job.channels, "resolution": job.resolution,
            "mean": list(job.mean), "std": list(job.std), "state_dict": weights,
            "threat_model": {"norm": "Linf", "epsilon": s.epsilon}, "run": job.name, "dra": job.dra,
            "objective": s.objective, "steps": trainer.step, "image_set": job.identity()["real"]}


def set_cpu_threads(loader_workers: int) -> None:
    """On the CPU, leave the loader workers their cores: OpenMP threads spinning against them cost more than
    they give on small models. Counts the cores this process may run on (its affinity), not the machine's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores - loader_workers))
