"""RobustBench's state-dict layouts for our classifiers, both ways, and its `model_info` fields.

RobustBench's own definitions (robustbench.model_zoo.architectures) that compute what ours compute:
- `wrn-D-W`: `dm_wide_resnet.DMWideResNet(num_classes, depth=D, width=W, activation_fn=Swish)`, the model of
  Wang2023Better_WRN-28-10 and Gowal2020Uncovering: the same pre-activation blocks, SAME padding, width-changing
  shortcut on the activated input, `mean`/`std` buffers inside. Exact.
- `resnet18`: `resnet.ResNet18()` (BasicBlock). `preact-resnet18`: `resnet.PreActResNet(PreActBlockV2, [2, 2, 2, 2],
  bn_before_fc=True)` (its shortcut takes the activated input, as ours). Neither normalises inside: the logits
  match ours only for a run trained with mean 0 and std 1; otherwise normalise the input before the model.
- `small-cnn`: RobustBench has no such model; an export keeps dra-pipe's own names.
"""
from __future__ import annotations

import re
from fractions import Fraction

import torch

from stores.errors import UserError
from trainer.architectures import ARCHITECTURES
from trainer.classifiers import Classifier, build_classifier

DEFINITIONS = {
    "wrn": "robustbench.model_zoo.architectures.dm_wide_resnet.DMWideResNet(num_classes={classes}, depth={depth}, "
           "width={width}, activation_fn=Swish)",
    "resnet18": "robustbench.model_zoo.architectures.resnet.ResNet18()",
    "preact-resnet18": "robustbench.model_zoo.architectures.resnet.PreActResNet(PreActBlockV2, [2, 2, 2, 2], "
                       "bn_before_fc=True)",
}
ASSUMED_EPS = 8 / 255          # RobustBench's CIFAR L-inf radius: what a bare state dict is evaluated at

_WRN_RULES = [
    (r"stages\.stem\.(.+)", lambda m: f"init_conv.{m[1]}"),
    (r"stages\.block(\d+)\.(\d+)\.(bn0|conv0|bn1|conv1|shortcut)\.(.+)",
     lambda m: f"layer.{int(m[1]) - 1}.block.{m[2]}."
               f"{dict(bn0='batchnorm_0', conv0='conv_0', bn1='batchnorm_1', conv1='conv_1').get(m[3], m[3])}.{m[4]}"),
    (r"stages\.final\.bn\.(.+)", lambda m: f"batchnorm.{m[1]}"),
    (r"fc\.(.+)", lambda m: f"logits.{m[1]}"),
    (r"(mean|std)", lambda m: m[1]),
]
_RESNET_RULES = [
    (r"stages\.stem\.0\.(.+)", lambda m: f"conv1.{m[1]}"),
    (r"stages\.stem\.1\.(.+)", lambda m: f"bn1.{m[1]}"),
    (r"stages\.stem\.weight", lambda m: "conv1.weight"),
    (r"stages\.layer(\d)\.(\d)\.shortcut\.weight", lambda m: f"layer{m[1]}.{m[2]}.shortcut.0.weight"),
    (r"stages\.layer(\d)\.(\d)\.(.+)", lambda m: f"layer{m[1]}.{m[2]}.{m[3]}"),
    (r"stages\.final\.bn\.(.+)", lambda m: f"bn.{m[1]}"),
    (r"fc\.(.+)", lambda m: f"linear.{m[1]}"),
    (r"(mean|std)", lambda m: None),                 # no normalisation inside RobustBench's ResNets
]


def family(arch: str) -> str | None:
    """Which RobustBench definition computes `arch` (a key of DEFINITIONS), None when there is none."""
    return "wrn" if arch.startswith("wrn-") else arch if arch in DEFINITIONS else None


def definition(model: Classifier) -> str:
    """The RobustBench constructor call whose model loads the exported state dict."""
    depth, width = _wrn_shape(model.arch) if model.arch.startswith("wrn-") else (0, 0)
    return DEFINITIONS[family(model.arch)].format(classes=model.num_classes, depth=depth, width=width)


def _wrn_shape(arch: str) -> tuple[int, int]:
    options = ARCHITECTURES[arch].options
    return options["depth"], options["width"]


def robustbench_names(model: Classifier) -> dict[str, str | None]:
    """Our state-dict name -> RobustBench's (None: a tensor RobustBench's model does not hold)."""
    rules = _WRN_RULES if family(model.arch) == "wrn" else _RESNET_RULES
    names = {}
    for ours in model.state_dict():
        for pattern, rename in rules:
            match = re.fullmatch(pattern, ours)
            if match:
                names[ours] = rename(match)
                break
        else:
            raise AssertionError(f"no RobustBench name for {ours}")       # a new layer without a rule
    return names


def to_robustbench(model: Classifier) -> dict[str, torch.Tensor]:
    """The model's state dict under RobustBench's names and shapes (mean/std as (C, 1, 1))."""
    state = model.state_dict()
    return {rb: (state[ours].reshape(-1, 1, 1) if rb in ("mean", "std") else state[ours]).clone()
            for ours, rb in robustbench_names(model).items() if rb is not None}


def normalises(model: Classifier) -> bool:
    """Whether the model's inputs are normalised by anything but mean 0 and std 1."""
    return bool((model.mean != 0).any() or (model.std != 1).any())


# --- loading a RobustBench-format state dict ---------------------------------------------------------------------

def robustbench_record(obj, where: str) -> dict:
    """A classifier record (trainer.classifier_files' keys) for a RobustBench-format WRN or ResNet-18 state dict:
    bare, or under 'state_dict' / 'model_state_dict', names with or without DataParallel's 'module.'. CIFAR-sized
    (32x32), evaluated at RobustBench's L-inf 8/255 (a bare state dict records no threat model)."""
    from trainer.runs import FINAL_FORMAT
    state = _unwrap(obj, where)
    arch = _detect(state, where)
    first = state["init_conv.weight" if arch.startswith("wrn-") else "conv1.weight"]
    head = state["logits.weight" if arch.startswith("wrn-") else "linear.weight"]
    channels = first.shape[1]
    mean, std = ((state["mean"].flatten().tolist(), state["std"].flatten().tolist()) if arch.startswith("wrn-")
                 else ([0.0] * channels, [1.0] * channels))
    model = build_classifier(arch, head.shape[0], channels, 32, mean, std)
    return {"format": FINAL_FORMAT, "arch": arch, "num_classes": head.shape[0], "in_channels": channels,
            "resolution": 32, "mean": mean, "std": std, "state_dict": _ours(model, state, where),
            "threat_model": {"norm": "Linf", "epsilon": ASSUMED_EPS}, "run": None,
            "source": f"RobustBench-format state dict ({definition(model)})"}


def _unwrap(obj, where: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{where}: not a dra-pipe classifier, nor a state dict; export one with `dra-pipe export`")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _detect(state: dict, where: str) -> str:
    """Our architecture whose RobustBench layout the state dict has; UserError naming what it is not."""
    if {"init_conv.weight", "layer.0.block.0.conv_0.weight", "logits.weight", "mean", "std"} <= set(state):
        width = state["layer.0.block.0.conv_0.weight"].shape[0] // 16
        blocks = sum(1 for k in state if re.fullmatch(r"layer\.0\.block\.\d+\.conv_0\.weight", k))
        arch = f"wrn-{6 * blocks + 4}-{width}"
        if arch not in ARCHITECTURES:
            raise UserError(f"{where}: a DMWideResNet of depth {6 * blocks + 4}, width {width}; dra-pipe builds "
                            f"{', '.join(a for a in ARCHITECTURES if a.startswith('wrn-'))}")
        return arch
    if "conv1.weight" in state and "linear.weight" in state:
        if "layer4.1.conv1.weight" not in state or "layer4.2.conv1.weight" in state:
            raise UserError(f"{where}: a RobustBench ResNet, but not a ResNet-18 (dra-pipe builds ResNet-18 only)")
        if "bn1.weight" in state:
            return "resnet18"
        if "bn.weight" in state:
            return "preact-resnet18"
        raise UserError(f"{where}: a PreActResNet-18 without its closing BN (RobustBench's PreActBlock, shortcut "
                        f"on the raw input): not an architecture dra-pipe builds")
    raise UserError(f"{where}: not a dra-pipe classifier, nor a RobustBench-format WideResNet (DMWideResNet) or "
                    f"ResNet-18 state dict")


def _ours(model: Classifier, state: dict, where: str) -> dict[str, torch.Tensor]:
    """The state dict under our names; what RobustBench's model lacks (normalisation, an old checkpoint's
    num_batches_tracked) is the fresh model's."""
    own = model.state_dict()
    names = robustbench_names(model)
    wanted = {rb for rb in names.values() if rb}
    extra = sorted(set(state) - wanted)
    missing = sorted(rb for rb in wanted - set(state) if not rb.endswith("num_batches_tracked"))
    if extra or missing:
        name = (extra or missing)[0]
        raise UserError(f"{where}: not the layout of {model.arch} ({len(missing)} missing, {len(extra)} unexpected "
                        f"tensors, e.g. {name})")
    out = {}
    for ours, rb in names.items():
        if rb is None or rb not in state:
            out[ours] = own[ours]
        elif state[rb].numel() != own[ours].numel():
            raise UserError(f"{where}: {rb} has shape {tuple(state[rb].shape)}, {model.arch} needs "
                            f"{tuple(own[ours].shape)}")
        else:
            out[ours] = state[rb].reshape(own[ours].shape)
    return out


# --- model_info ---------------------------------------------------------------------------------------------------

TO_FILL = "TO FILL"
ARCH_NAMES = {"resnet18": "ResNet-18", "preact-resnet18": "PreActResNet-18"}


def model_info(record: dict, evaluated: dict | None, dataset: str) -> dict:
    """RobustBench's model_info fields for an exported classifier; what a person must fill says TO FILL."""
    arch = record["arch"]
    name = f"WideResNet-{arch.removeprefix('wrn-')}" if arch.startswith("wrn-") else \
        ARCH_NAMES.get(arch, f"{arch} (dra-pipe's own)")
    eps = Fraction(record["threat_model"]["epsilon"]).limit_denominator(255)
    info = {"link": f"{TO_FILL}: paper or code URL", "name": f"{TO_FILL}: paper title",
            "authors": f"{TO_FILL}: authors", "additional_data": False, "number_forward_passes": 1,
            "dataset": dataset, "venue": f"{TO_FILL}: venue and year", "architecture": name,
            "eps": f"{eps.numerator}/{eps.denominator}" if eps.denominator == 255 else f"{float(eps):g}",
            "clean_acc": _percent(evaluated, "clean"), "reported": f"{TO_FILL}: the AutoAttack accuracy your paper "
                                                                     "reports",
            "autoattack_acc": _percent(evaluated, "autoattack"), "unreliable": False}
    if evaluated:
        info["footnote"] = (f"dra-pipe eval on {evaluated.get('n')} test images, eps {evaluated.get('eps')}, "
                            f"AutoAttack {evaluated.get('autoattack_version') or 'not run'}")
    return info


def _percent(evaluated: dict | None, key: str) -> str:
    value = (evaluated or {}).get(key)
    if isinstance(value, (int, float)):
        return f"{100 * value:.2f}"
    return f"{TO_FILL}: run `dra-pipe eval` with AutoAttack"
