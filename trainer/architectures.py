"""The classifier architectures training can build: name, builder, its keywords, one help phrase, its optimizer.

Torch-free, so the configuration schema can offer the names without loading torch; the builder is a class of
`trainer.classifiers` (or of another module, e.g. `trainer.vit`), named here and imported when a classifier is
built. Adding an architecture is one `Architecture` entry (tests/trainer/test_classifier_contract.py then runs
its contract). `optimizer` is what `train.optimizer: auto` picks for it: SGD for the CNNs (DM-AT), AdamW for the
ViTs (trainer/vit.py says why).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from stores.errors import UserError


@dataclass(frozen=True)
class Architecture:
    name: str
    class_name: str                                   # a Classifier subclass in `module`
    help: str                                         # one short phrase
    options: dict = field(default_factory=dict)       # constructor keywords besides the common ones
    module: str = "trainer.classifiers"               # where the class lives
    optimizer: str = "sgd"                            # train.optimizer: auto picks this one (sgd | adamw)

    def builder(self):
        """The Classifier subclass (imports its module, hence torch)."""
        return getattr(importlib.import_module(self.module), self.class_name)

    def help_line(self) -> str:
        return f"{self.name} ({self.help})"


VIT_S = {"dim": 384, "depth": 12, "heads": 6}                  # MLP ratio 4 (trainer/vit.py)
VIT_B = {"dim": 768, "depth": 12, "heads": 12}
VIT = {"module": "trainer.vit", "optimizer": "adamw"}

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("small-cnn", "SmallCNN", "3 conv layers, 56k parameters, for 8x8 digits"),
    Architecture("preact-resnet18", "ResNet18", "PreAct ResNet-18, 11.2M", {"preact": True}),
    Architecture("resnet18", "ResNet18", "ResNet-18, 11.2M", {"preact": False}),
    Architecture("wrn-28-10", "WideResNet", "DM-AT's SiLU WideResNet, 36.5M", {"depth": 28, "width": 10}),
    Architecture("wrn-34-10", "WideResNet", "the same, deeper, 46.2M", {"depth": 34, "width": 10}),
    Architecture("wrn-70-16", "WideResNet", "the same, deeper and wider, 266.8M", {"depth": 70, "width": 16}),
    Architecture("vit-s/2", "ViT", "ViT-S, 2x2 patches, 21.4M at 32x32", VIT_S | {"patch": 2}, **VIT),
    Architecture("vit-s/4", "ViT", "ViT-S, 4x4 patches, 21.3M at 32x32", VIT_S | {"patch": 4}, **VIT),
    Architecture("vit-b/2", "ViT", "ViT-B, 2x2 patches, 85.3M at 32x32", VIT_B | {"patch": 2}, **VIT),
    Architecture("vit-b/4", "ViT", "ViT-B, 4x4 patches, 85.2M at 32x32", VIT_B | {"patch": 4}, **VIT),
)}


def architecture_help() -> str:
    return " | ".join(a.help_line() for a in ARCHITECTURES.values())


def architecture(name: str) -> Architecture:
    """The registered architecture `name`; UserError naming the valid ones otherwise."""
    if name not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}: valid ones are {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
