"""Evaluation of a trained classifier: clean accuracy, PGD-k (cross-entropy and CW margin), AutoAttack; export.

Everything runs on the EMA weights in eval mode, on images in [0, 1], at the threat model stored with the weights
(L-inf eps). A test image counts as robust under an attack when it is classified correctly both clean and after
the attack, so every robust accuracy is at most the clean one; `worst` counts an image robust only if it survives
every attack that was run. AutoAttack comes from the optional `pyautoattack` package.

Classifier files (final.pt, best.pt, exports) are read and written by `trainer.classifier_files`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stores.errors import UserError
from stores.identity import write_json_atomic
from stores.images import ImageSet, ShardData
from trainer.attacks import pgd_attack
from trainer.classifier_files import now_text, package_version, state_fingerprint, threat_model
from trainer.classifiers import Classifier

AUTOATTACK_LOGGER = "auto-attack"
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class EvalSettings:
    """The `eval` section of pipeline.yaml."""

    n: int = 0                          # test images (0 = all)
    subset: str = "first"               # which n: the first n, or n / classes per class (per-class)
    pgd_steps: int = 20
    pgd_step_size: float | None = None  # None: 2.5 eps / steps (Madry et al.)
    pgd_restarts: int = 1
    autoattack: bool = True
    autoattack_version: str = "standard"
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    cpu_threads: int = 1                # torch threads on the CPU (0 = torch's default)
    rank_n: int = 0                     # test images for the effective rank (0 = all)
    weights: str = "best"               # a run's best.pt (held-out PGD selection) or final.pt

    @classmethod
    def from_config(cls, section: dict) -> EvalSettings:
        return cls(**{k: section[k] for k in cls.__dataclass_fields__ if k in section})

    def step_size(self, eps: float) -> float:
        return self.pgd_step_size if self.pgd_step_size is not None else 2.5 * eps / self.pgd_steps

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("eval.device is cuda but no GPU is visible here; set eval.device: auto or cpu")
        return torch.device(self.device)

    def apply_threads(self) -> None:
        """On the CPU, use cpu_threads torch threads. Attacks on small models run many tiny batches, where
        OpenMP threads spinning against other processes cost far more than they give (measured here: APGD-CE on
        359 digits 11.9 s with 1 thread, 48 s with 2, on a shared 2-core machine)."""
        if self.torch_device().type == "cpu" and self.cpu_threads > 0:
            torch.set_num_threads(self.cpu_threads)


def open_test_set(root: Path, name: str) -> ImageSet:
    return ImageSet.open_complete(root, name, "import the data first (`dra-pipe import`) or name another set with "
                                  "--images", "import it again, or name another set with --images")


def check_fits(record: dict, images: ImageSet) -> None:
    """The classifier must take the set's images and predict its classes."""
    have = (record["num_classes"], record["in_channels"], record["resolution"])
    need = (images.classes, images.channels, images.resolution)
    if have != need:
        raise UserError(f"image set {images.name} has {need[0]} classes of {need[1]}x{need[2]}x{need[2]} images; the "
                        f"classifier predicts {have[0]} classes of {have[1]}x{have[2]}x{have[2]} images")


def read_images(images: ImageSet, n: int, subset: str = "first") -> tuple[torch.Tensor, torch.Tensor]:
    """n images (0 = all), the first n or n / classes per class: (N, C, H, W) float in [0, 1] and labels (N,)."""
    if n <= 0 or n >= images.n:
        data = images.read_range(0, images.n)
    elif subset == "per-class":
        data = per_class_subset(images, n)
    else:
        data = images.read_range(0, n)
    return torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(data.labels)


def per_class_subset(images: ImageSet, n: int) -> ShardData:
    """n / classes images of each class, its lowest sample ids, in id order: a fixed, balanced subset that does not
    depend on how the set is ordered (ImageNet's val in class folders would give the first n/50 classes only).
    Reads shard by shard until every class has its share."""
    per, left = divmod(n, images.classes)
    if left or per == 0:
        raise UserError(f"eval.n {n} with eval.subset per-class: give a multiple of the {images.classes} classes of "
                        f"{images.name}")
    taken, parts = np.zeros(images.classes, dtype=np.int64), []
    for p in images.plan():
        shard = images.read_shard(p.index)
        keep = np.zeros(len(shard.labels), dtype=bool)
        for i, label in enumerate(shard.labels):
            if taken[label] < per:
                taken[label] += 1
                keep[i] = True
        parts.append(ShardData(shard.ids[keep], shard.images[keep], shard.labels[keep]))
        if (taken == per).all():
            break
    if (taken < per).any():
        short = int(np.argmin(taken))
        raise UserError(f"image set {images.name} holds {taken[short]} images of class {short}, fewer than the {per} "
                        f"eval.subset per-class takes of each; lower eval.n or use eval.subset: first")
    return ShardData(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "images", "labels")))


# --- attacks -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def inference_only(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside (attacks need input gradients only); restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """(N,) bool: the model's prediction on x equals y."""
    out = []
    with torch.no_grad():
        for lo in range(0, len(y), batch):
            logits = model(x[lo:lo + batch].to(device))
            out.append((logits.argmax(1) == y[lo:lo + batch].to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def pgd_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, s: EvalSettings, loss: str,
               device: torch.device) -> torch.Tensor:
    """(N,) bool: still correct after L-inf PGD-k on `loss` (random starts from a seeded generator)."""
    gen = torch.Generator(device).manual_seed(s.seed)
    out = []
    for lo in range(0, len(y), s.batch_size):
        xb, yb = x[lo:lo + s.batch_size].to(device), y[lo:lo + s.batch_size].to(device)
        x_adv = pgd_attack(model, xb, yb, eps, s.step_size(eps), s.pgd_steps, loss=loss,
                           restarts=s.pgd_restarts, generator=gen)
        with torch.no_grad():
            out.append((model(x_adv).argmax(1) == yb).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def autoattack_available() -> bool:
    return importlib.util.find_spec("pyautoattack") is not None


@dataclass
class Captured:
    """What a library said while it ran: log records, Python warnings, printed lines."""

    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self, captured: Captured, on_line: Log, stdout):
        super().__init__(logging.DEBUG)
        self.captured, self.on_line, self.stdout = captured, on_line, stdout

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        (self.captured.warnings if record.levelno >= logging.WARNING else self.captured.log).append(line)
        with contextlib.redirect_stdout(self.stdout):              # live lines reach the real terminal
            self.on_line(line)


@contextlib.contextmanager
def capture(logger_name: str, on_line: Log = _quiet) -> Iterator[Captured]:
    """Collect the named logger's records (passing each to on_line), Python warnings and stdout in the block."""
    captured, printed = Captured(), io.StringIO()
    logger = logging.getLogger(logger_name)
    handler = _Collect(captured, on_line, sys.stdout)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
            warnings.simplefilter("always")
            yield captured
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        captured.warnings += [f"{w.category.__name__}: {w.message}" for w in caught]
        captured.log += [line for line in printed.getvalue().splitlines() if line.strip()]


_AFTER = re.compile(r"robust accuracy after (\S+): ([0-9.]+)%")


@dataclass
class AutoAttackResult:
    robust: torch.Tensor                 # (N,) bool
    per_attack: dict[str, float]         # robust accuracy after each attack, in AutoAttack's order
    warnings: list[str]
    log: list[str]


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, s: EvalSettings,
                   device: torch.device, on_line: Log = _quiet) -> AutoAttackResult:
    """AutoAttack (pyautoattack) at L-inf eps; the robust flags are recomputed from its adversarial examples."""
    from pyautoattack import AutoAttack
    if model.num_classes < 4:
        raise UserError(f"AutoAttack's targeted DLR loss needs at least 4 classes, the classifier has "
                        f"{model.num_classes}; pass --no-autoattack")
    adversary = AutoAttack(model, norm="Linf", eps=eps, version=s.autoattack_version, seed=s.seed, device=device)
    notes = _fit_targets(adversary, int(model.num_classes))
    with capture(AUTOATTACK_LOGGER, on_line) as said:
        x_adv, _ = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=s.batch_size)
    x_adv = x_adv.detach().cpu()
    robust = correct(model, x_adv, y, s.batch_size, device) & correct(model, x, y, s.batch_size, device)
    per_attack = {m.group(1).lower(): float(m.group(2)) / 100 for m in map(_AFTER.search, said.log) if m}
    if (x_adv - x).abs().amax().item() > eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
        notes.append(f"AutoAttack returned images outside the eps-ball or [0, 1] (max |delta| "
                     f"{(x_adv - x).abs().amax().item():.5f}, eps {eps:g})")
    return AutoAttackResult(robust, per_attack, notes + _dedupe(said.warnings), said.log)


def _fit_targets(adversary, classes: int) -> list[str]:
    """Standard AutoAttack targets 9 classes; with fewer than 10 classes target all the others (and say so)."""
    if classes >= 10:
        return []
    adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = classes - 1
    return [f"{classes} classes: APGD-T and FAB-T target {classes - 1} classes instead of AutoAttack's 9"]


def _dedupe(lines: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [line if k == 1 else f"{line} (x{k})" for line, k in counts.items()]


# --- the evaluation ----------------------------------------------------------------------------------------------

def evaluate(model: Classifier, x: torch.Tensor, y: torch.Tensor, eps: float, s: EvalSettings,
             log: Log = _quiet) -> dict:
    """Clean, PGD-CE, PGD-margin and (if s.autoattack) AutoAttack accuracy of `model` on (x, y); the eval.json body.

    Accuracies are fractions of len(y); `counts` holds the numbers of correct images, `seconds` each part's time.
    """
    device = s.torch_device()
    model = model.to(device)
    n, acc, counts, seconds, notes = len(y), {}, {}, {}, []
    flags: dict[str, torch.Tensor] = {}
    extra: dict = {}
    with inference_only(model):
        flags["clean"] = _timed(seconds, "clean", lambda: correct(model, x, y, s.batch_size, device))
        log(f"clean: {flags['clean'].float().mean():.4f} ({seconds['clean']:.1f} s)")
        for loss in ("ce", "margin"):
            key = f"pgd_{loss}"
            flags[key] = flags["clean"] & _timed(seconds, key, lambda: pgd_robust(model, x, y, eps, s, loss, device))
            log(f"PGD-{s.pgd_steps} {loss}: {flags[key].float().mean():.4f} ({seconds[key]:.1f} s)")
        if s.autoattack:
            aa = _timed(seconds, "autoattack", lambda: run_autoattack(model, x, y, eps, s, device, log))
            flags["autoattack"] = aa.robust
            extra = {"autoattack_per_attack": aa.per_attack, "autoattack_log": aa.log}
            notes += aa.warnings + consistency_notes(flags)
    flags["worst"] = torch.stack(list(flags.values())).all(0) if n else flags["clean"]
    for key, f in flags.items():
        counts[key] = int(f.sum())
        acc[key] = counts[key] / n if n else 0.0
    seconds["total"] = sum(seconds.values())
    return {**acc, "autoattack": acc.get("autoattack"), "counts": counts, "n": n, "eps": eps, "norm": "Linf",
            "steps": s.pgd_steps, "step_size": s.step_size(eps), "restarts": s.pgd_restarts,
            "autoattack_version": s.autoattack_version if s.autoattack else None,
            "batch_size": s.batch_size, "seed": s.seed, "device": str(device), "seconds": seconds,
            "warnings": notes, **extra}


def _timed(seconds: dict, key: str, fn):
    started = time.perf_counter()
    out = fn()
    seconds[key] = round(time.perf_counter() - started, 3)
    return out


def consistency_notes(flags: dict[str, torch.Tensor]) -> list[str]:
    """AutoAttack should leave no image robust that a PGD attack broke; say so when it does."""
    if "autoattack" not in flags:
        return []
    notes = []
    for key in ("pgd_ce", "pgd_margin"):
        k = int((flags["autoattack"] & ~flags[key]).sum())
        if k:
            notes.append(f"AutoAttack left {k} image(s) robust that {key} broke; `worst` counts them as broken")
    return notes


def evaluate_file(model_path: Path, record: dict, model: Classifier, images: ImageSet, s: EvalSettings,
                  log: Log = _quiet) -> dict:
    """evaluate() on s.n images of `images` (s.subset chooses which), with the provenance eval.json records."""
    check_fits(record, images)
    _, eps = threat_model(record, model_path)
    x, y = read_images(images, s.n, s.subset)
    if s.n > images.n:
        log(f"eval.n {s.n} is more than the {images.n} images of {images.name}: using all of them")
    result = evaluate(model, x, y, eps, s, log)
    return {**result, "settings": asdict(s), "fingerprint": state_fingerprint(record["state_dict"]),
            "model": {"file": str(model_path), "arch": record["arch"], "run": record.get("run"),
                      "dra": record.get("dra"), "objective": record.get("objective"),
                      "selected": record.get("selected")},
            "test_set": {"name": images.name, "fingerprint": images.fingerprint, "size": images.n},
            "versions": {"dra-pipe": package_version("dra-pipe"), "torch": torch.__version__,
                         "pyautoattack": package_version("pyautoattack") if s.autoattack else None},
            "created": now_text()}


def write_eval_json(result: dict, path: Path) -> Path:
    write_json_atomic(path, json.loads(json.dumps(result)))
    return path


# --- representation analysis -------------------------------------------------------------------------------------

def penultimate_features(model: Classifier, x: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """(N, D) pooled features that the last linear layer sees, in eval mode."""
    out = []
    with inference_only(model), torch.no_grad():
        model.to(device)
        for lo in range(0, len(x), batch):
            out.append(model.penultimate(x[lo:lo + batch].to(device)).float().cpu())
    return torch.cat(out)
