"""Each measure of `dra-pipe analyze` on one run: the data it streams and the trainer.analysis function it calls.

A measure's identity (what its result depends on: the run's weights and sets, the settings it reads, the teacher)
keys its entry in analysis.json; `pipeline.analyze` computes an entry only when its identity is new.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.analyze_data import (
    AnalyzeSettings,
    Scratch,
    Tap,
    cached_target_batches,
    collect,
    count,
    image_batches,
    tap_of,
    teacher_model,
)
from stores.features import FeatureSet
from stores.images import ImageSet
from trainer.analysis.cka import CrossMoments, mean_cosine, tokens
from trainer.analysis.dimension import classification_dimension
from trainer.analysis.geometry import alignment, augmented, uniformity
from trainer.analysis.probe import ProbeSettings, fit_probe, probe_correct, robust_correct
from trainer.analysis.rows import batches
from trainer.analysis.sae import SaeSettings, sae_scores, train_sae
from trainer.analysis.saliency import FrequencySpectrum, loss_gradients
from trainer.analysis.spectrum import Moments
from trainer.classifiers import Classifier
from trainer.dra import match_grid
from trainer.evaluate import inference_only


@dataclass
class RunContext:
    """One run under analysis: its classifier (the eval.weights file), sets, teachers, eval.json, scratch rows."""

    name: str
    root: Path
    config: dict                          # the run's resolved configuration
    s: AnalyzeSettings
    model: Classifier
    fingerprint: str                      # of the analysed weights
    weights: str                          # best or final
    identity: dict                        # run.json's identity
    eps: float
    device: torch.device
    train: ImageSet
    test: ImageSet
    base_tap: Tap | None                  # the teacher whose layers and timesteps the probe spans
    feature_sets: list[FeatureSet]        # teachers CKA is measured against
    eval: dict | None
    head: nn.Module | None                # the trained DRA projection head (checkpoint.pt), if any
    named_features: bool = False          # feature_sets were named (--features): the probe adds their taps
    clean_ref: str | None = None          # the clean-trained reference run
    scratch: Scratch = field(default_factory=Scratch)
    teachers: dict = field(default_factory=dict)
    _rows: dict = field(default_factory=dict)

    def base(self) -> dict:
        """What every per-run measure depends on: the run, its weights and the images measured."""
        return {"run": self.identity, "weights": self.fingerprint, "test": [self.test.fingerprint, self.n_test],
                "train": [self.train.fingerprint, self.n_train]}

    @property
    def n_test(self) -> int:
        return count(self.test, self.s.n_test)

    @property
    def n_train(self) -> int:
        return count(self.train, self.s.n_train)

    def probe_settings(self) -> ProbeSettings:
        return ProbeSettings(self.s.probe_epochs, self.s.probe_lr, self.s.batch_size, self.s.seed)

    def attack(self) -> dict:
        """The PGD of the run's evaluation (eval.json): steps, step size, restarts, seed."""
        return {k: self.eval[k] for k in ("steps", "step_size", "restarts", "seed")}

    def batches(self, split: str):
        images, n = (self.train, self.s.n_train) if split == "train" else (self.test, self.s.n_test)
        return image_batches(images, n, self.s.batch_size)

    def penultimate(self, split: str):
        """(rows, labels) of the classifier's penultimate features on the split (computed once)."""
        if split not in self._rows:
            n = self.n_train if split == "train" else self.n_test
            with inference_only(self.model), torch.no_grad():
                self._rows[split] = collect(self.scratch, self.batches(split),
                                            lambda ids, x, y: self.model.penultimate(x.to(self.device)), n)
        return self._rows[split]


def moments_of(rows) -> Moments:
    moments = Moments(rows.dims)
    for _, part in batches(rows, 1024):
        moments.add(part)
    return moments


# --- rank, dimension, SAE, alignment and uniformity, saliency ---------------------------------------------------

def rank(ctx: RunContext) -> dict:
    """Effective rank (centred) and normalised singular values of the penultimate features of the test images."""
    rows, _ = ctx.penultimate("test")
    moments = moments_of(rows)
    return {"erank": moments.effective_rank(), "spectrum": moments.spectrum()[:min(rows.dims, len(rows))].tolist(),
            "images": len(rows), "dims": rows.dims, "test_set": ctx.test.name, "weights": ctx.weights,
            "weights_fingerprint": ctx.fingerprint, "centred": True}


def dimension(ctx: RunContext) -> dict:
    train, y_train = ctx.penultimate("train")
    test, y_test = ctx.penultimate("test")
    return classification_dimension(train, y_train, test, y_test, ctx.model.num_classes, ctx.probe_settings(),
                                    ctx.s.dimension_target)


def sae(ctx: RunContext) -> dict:
    train, _ = ctx.penultimate("train")
    test, _ = ctx.penultimate("test")
    s = SaeSettings(latents=ctx.s.sae_expansion * train.dims, k=min(ctx.s.sae_k, ctx.s.sae_expansion * train.dims),
                    epochs=ctx.s.sae_epochs, batch=ctx.s.batch_size, seed=ctx.s.seed)
    model = train_sae(train, s)
    return {**sae_scores(model, test), "train_nmse": sae_scores(model, train)["nmse"]}


def align_uniform(ctx: RunContext) -> dict:
    """Alignment over two random views (crop pad analyze.pair_crop_pad, flips as the run) of each test image, and
    uniformity of the clean test images' features."""
    gen, total, n = torch.Generator().manual_seed(ctx.s.seed), 0.0, 0
    flip = bool((ctx.config.get("train") or {}).get("flip", False))
    with inference_only(ctx.model), torch.no_grad():
        for _, x, _ in ctx.batches("test"):
            views = [augmented(x, ctx.s.pair_crop_pad, flip, gen) for _ in range(2)]
            z1, z2 = (ctx.model.penultimate(v.to(ctx.device)).cpu() for v in views)
            total += alignment(z1, z2) * len(x)
            n += len(x)
    rows, _ = ctx.penultimate("test")
    return {"alignment": total / n, "uniformity": uniformity(rows), "pad": ctx.s.pair_crop_pad, "flip": flip}


def saliency(ctx: RunContext) -> dict:
    spectrum = FrequencySpectrum(ctx.test.resolution, ctx.test.resolution)
    with inference_only(ctx.model):
        for _, x, y in ctx.batches("test"):
            spectrum.add(loss_gradients(ctx.model, x.to(ctx.device), y.to(ctx.device)))
    return {"low_fraction": spectrum.low_fraction(), "radial": spectrum.radial(),
            "frequencies": spectrum.frequencies()}


# --- alignment with the teacher ----------------------------------------------------------------------------------

def aligned_layer(ctx: RunContext) -> str:
    layer = (ctx.config.get("train") or {}).get("dra_layer", "auto")
    return ctx.model.default_dra_layer if layer == "auto" else layer


def cka(ctx: RunContext, fs: FeatureSet) -> dict:
    """Linear CKA of the classifier's aligned layer (grid-matched) and the teacher's targets, token by token, on
    the test images; the held-out cosine of a ridge map fitted on the training images' cached targets; and, for a
    DRA run, the held-out cosine of its own projection head (DRA's objective, 1 - its loss)."""
    tap, layer, hw = tap_of(fs, ctx.root), aligned_layer(ctx), tuple(fs.shape[1:])
    fit = CrossMoments(ctx.model.feature_layers()[layer][0], fs.shape[0])
    with inference_only(ctx.model), torch.no_grad():
        for _, x, _, target in cached_target_batches(ctx.train, fs, ctx.s.n_train, ctx.s.batch_size):
            fit.add(tokens(match_grid(ctx.model.forward_features(x.to(ctx.device), layer)[1], hw)), tokens(target))
        w, b = fit.ridge(ctx.s.ridge)
        held = CrossMoments(fit.xx.shape[0], fit.yy.shape[0])
        cosines = {"linear": torch.zeros(2, dtype=torch.float64), "dra": torch.zeros(2, dtype=torch.float64)}
        teacher = teacher_model(ctx.teachers, tap)
        for ids, x, y in ctx.batches("test"):
            feature = match_grid(ctx.model.forward_features(x.to(ctx.device), layer)[1], hw)
            target = tokens(teacher.features(x.to(ctx.device), ids, y, ctx.test.fingerprint, tap.layer, tap.timestep,
                                             tap.sigma, tap.pool))
            held.add(tokens(feature), target)
            cosines["linear"] += mean_cosine(tokens(feature).double().cpu() @ w + b, target)
            if ctx.head is not None:
                cosines["dra"] += mean_cosine(tokens(ctx.head(feature)), target)
    return {"feature_set": fs.key, "teacher_layer": tap.layer, "timestep": tap.timestep, "classifier_layer": layer,
            "cka": held.cka(), "linear_cosine": float(cosines["linear"][0] / cosines["linear"][1]),
            "dra_cosine": float(cosines["dra"][0] / cosines["dra"][1]) if ctx.head is not None else None,
            "tokens": held.n}


def cka_identity(ctx: RunContext, fs: FeatureSet) -> dict:
    return {**ctx.base(), "teacher": tap_of(fs, ctx.root).identity(), "feature_set": fs.key,
            "layer": aligned_layer(ctx), "ridge": ctx.s.ridge, "head": ctx.head is not None}


# --- the teacher probe -------------------------------------------------------------------------------------------

def probe_taps(ctx: RunContext, layers: list[str]) -> list[Tap]:
    """The probe's grid: every analyze.timesteps x layer of the base teacher, then the tap of each feature set
    named with --features."""
    from stages.sigma import sigma_from_timestep
    base = ctx.base_tap
    grid = [Tap(base.spec, base.fingerprint, base.noise_seed, base.compute_dtype, layer, t, sigma_from_timestep(t),
                "none") for t in ctx.s.timesteps for layer in layers]
    return grid + [tap_of(fs, ctx.root) for fs in ctx.feature_sets if ctx.named_features]


def probe_identity(ctx: RunContext, tap: Tap) -> dict:
    """A probe point depends on the teacher and the images, not on the run's weights: runs share it."""
    return {"teacher": tap.identity(), "pool": ctx.s.probe_pool, "labels": ctx.s.probe_labels,
            "probe": ctx.probe_settings().__dict__, "eps": ctx.eps, "attack": ctx.attack(),
            "test": [ctx.test.fingerprint, ctx.n_test], "train": [ctx.train.fingerprint, ctx.n_train]}


def probe_point(ctx: RunContext, tap: Tap) -> dict:
    """Linear probe on the teacher's features (noisy input x + sigma eps, the cache's eps per image id): clean test
    accuracy, robust accuracy under the run's PGD attacking the input through the frozen teacher, effective rank."""
    teacher = teacher_model(ctx.teachers, tap)

    def features(ids, x, y, image_set):
        h = teacher.features(x.to(ctx.device), ids, y if ctx.s.probe_labels == "true" else None, image_set,
                             tap.layer, tap.timestep, tap.sigma, tap.pool)
        return h.mean(dim=(2, 3)) if ctx.s.probe_pool == "global" else h.flatten(1)

    with torch.no_grad():
        train, y_train = collect(ctx.scratch, ctx.batches("train"),
                                 lambda ids, x, y: features(ids, x, y, ctx.train.fingerprint), ctx.n_train)
        test, y_test = collect(ctx.scratch, ctx.batches("test"),
                               lambda ids, x, y: features(ids, x, y, ctx.test.fingerprint), ctx.n_test)
    probe = fit_probe(train, y_train, ctx.model.num_classes, ctx.probe_settings()).to(ctx.device)
    clean = probe_correct(probe.cpu(), test, y_test).float().mean()
    robust = attacked(ctx, probe.to(ctx.device),
                      lambda ids, y: (lambda x: features(ids, x, y, ctx.test.fingerprint)))
    return {"timestep": tap.timestep, "sigma": tap.sigma, "layer": tap.layer, "feature_set": tap.feature_key,
            "clean": float(clean), "robust": robust, "erank": moments_of(test).effective_rank(), "dims": test.dims,
            "images": len(test)}


def attacked(ctx: RunContext, head: nn.Module, features_for) -> float:
    """Robust accuracy of head(features(x)) on the test images under the run's PGD (one seeded generator)."""
    a = ctx.attack()
    gen = torch.Generator(ctx.device).manual_seed(int(a["seed"]))
    robust = []
    for ids, x, y in ctx.batches("test"):
        x, y = x.to(ctx.device), y.to(ctx.device)
        robust.append(robust_correct(features_for(ids, y), head, x, y, ctx.eps, a["step_size"], a["steps"],
                                     a["restarts"], gen)[1].cpu())
    return float(torch.cat(robust).float().mean())


def classifier_row(ctx: RunContext, model: Classifier) -> dict:
    """The same three numbers for a classifier: clean and robust accuracy (the run's PGD), effective rank."""
    with inference_only(model):
        robust = attacked(ctx, nn.Identity(), lambda ids, y: model)
        clean, count_ = 0, 0
        moments = Moments(model.fc.in_features)
        with torch.no_grad():
            for _, x, y in ctx.batches("test"):
                x = x.to(ctx.device)
                clean += int((model(x).argmax(1).cpu() == y).sum())
                count_ += len(y)
                moments.add(model.penultimate(x))
    return {"clean": clean / count_, "robust": robust, "erank": moments.effective_rank()}
