"""Names the stages agree on, derived from the configuration (no stage code here)."""
from __future__ import annotations

from pipeline.config import Config


def data_prefix(cfg: Config) -> str:
    return cfg.data.name or cfg.data.importer


def real_train_set(cfg: Config) -> str:
    return f"{data_prefix(cfg)}-train"


def real_test_set(cfg: Config) -> str:
    return f"{data_prefix(cfg)}-test"


DTYPE_SUFFIXES = {"float32": "", "bfloat16": "-bf16", "float16": "-fp16"}


def generated_set(cfg: Config) -> str:
    """The set `generate` writes; one sampled in a reduced model.dtype is a sibling (<data name>-gen-bf16)."""
    return cfg.generate.name or f"{data_prefix(cfg)}-gen{DTYPE_SUFFIXES[cfg.model.dtype]}"


def training_generated_set(cfg: Config) -> str:
    """The generated set the trainer streams (and extract-features prepares): train.generated_set, else generate's."""
    return cfg.train.generated_set or generated_set(cfg)
