"""Names the stages agree on, derived from the configuration (and, for the trainer's generated set, from the sets
the workspace holds); no stage code here."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from stores.errors import UserError
from stores.images import generated_set_names


def data_prefix(cfg: Config) -> str:
    return cfg.data.name or cfg.data.importer


def real_train_set(cfg: Config) -> str:
    return f"{data_prefix(cfg)}-train"


def real_test_set(cfg: Config) -> str:
    """<prefix>-test, or <prefix>-val for ImageNet (stages.importers.eval_split)."""
    from stages.importers import eval_split
    return f"{data_prefix(cfg)}-{eval_split(cfg.data.importer)}"


DTYPE_SUFFIXES = {"float32": "", "bfloat16": "-bf16", "float16": "-fp16"}


def generated_set(cfg: Config) -> str:
    """The set `generate` writes; one sampled in a reduced model.dtype is a sibling (<data name>-gen-bf16)."""
    return cfg.generate.name or f"{data_prefix(cfg)}-gen{DTYPE_SUFFIXES[cfg.model.dtype]}"


def training_generated_set(cfg: Config) -> str:
    """The generated set the trainer streams (and extract-features prepares): train.generated_set; else the
    workspace's only generated set (e.g. DM-AT's data from `import npz --generated`); else generate's set. Several
    generated sets and none of them generate's: the user must choose."""
    if cfg.train.generated_set:
        return cfg.train.generated_set
    default, found = generated_set(cfg), generated_set_names(Path(cfg.root))
    if len(found) == 1:
        return found[0]
    if found and default not in found:
        raise UserError(f"the workspace holds {len(found)} generated image sets ({', '.join(found)}) and none is "
                        f"generate's set {default}; set train.generated_set to the one to train on")
    return default
