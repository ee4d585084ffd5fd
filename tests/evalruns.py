"""Finished run folders for the evaluation and report tests, made in seconds instead of by `dra-pipe train`.

A small-cnn is fitted for a few SGD steps on label-dependent brightness images (trainsets.image_set), then saved
the way the training loop saves a run: config.yaml, run.json, metrics.jsonl and final.pt.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from trainsets import image_set

from pipeline.config import defaults
from trainer.classifiers import build_classifier
from trainer.evaluate import read_images
from trainer.runs import RunFolder

EPS = 0.05          # the tiny model keeps about half its clean accuracy under PGD at this radius
MEAN, STD = 0.5, 0.3


def fit_small_cnn(images, steps: int = 40, seed: int = 0) -> torch.nn.Module:
    """A few SGD steps of plain cross-entropy: enough to be well above chance on these images."""
    torch.manual_seed(seed)
    model = build_classifier("small-cnn", images.classes, images.channels, images.resolution, MEAN, STD)
    x, y = read_images(images, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        i = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_run(root: Path, name: str, model: torch.nn.Module, eps: float, dra: bool, unsup_fraction: float,
             epochs: int = 3) -> RunFolder:
    config = defaults()
    config["root"] = str(root)
    config["train"].update(dra=dra, unsup_fraction=unsup_fraction, epsilon=eps, epochs=epochs)
    run = RunFolder(root / "runs" / name)
    run.prepare({"test": name}, config)
    for epoch in range(1, epochs + 1):
        terms = {"loss": 2.0 / epoch, "ce": 1.5 / epoch, "kl": 0.1 * epoch, "clean_acc": 0.3 * epoch / epochs,
                 "pgd_acc": 0.1 * epoch / epochs, "images_per_s": 100.0, "lr": 0.1, "step": 10 * epoch}
        run.append_metrics({"epoch": epoch, **terms, **({"dra": 0.5 / epoch} if dra else {})})
    run.save_final({"arch": "small-cnn", "num_classes": model.num_classes, "in_channels": model.in_channels,
                    "resolution": model.resolution, "mean": [MEAN], "std": [STD], "state_dict": model.state_dict(),
                    "threat_model": {"norm": "Linf", "epsilon": eps}, "run": name, "dra": dra, "objective": "trades",
                    "steps": 10 * epochs, "image_set": "test"})
    return run


def make_workspace(root: Path) -> dict:
    """digits-train/-test/-gen and two finished runs: `tiny-dra` (eps 0.05, generated data) and `tiny-big-eps`
    (eps 0.3, no DRA, real data only: every test image falls to the first attack)."""
    train = image_set(root, "digits-train", "real", 256, 64, seed=1)
    image_set(root, "digits-test", "real", 48, 64, seed=2)
    image_set(root, "digits-gen", "generated", 96, 32, seed=3)
    image_set(root, "four-test", "real", 20, 64, classes=4, seed=4)
    model = fit_small_cnn(train)
    return {"root": root, "model": model,
            "dra": save_run(root, "tiny-dra", model, EPS, dra=True, unsup_fraction=0.5),
            "big": save_run(root, "tiny-big-eps", fit_small_cnn(train, steps=15, seed=1), 0.3, dra=False,
                            unsup_fraction=0.0)}
