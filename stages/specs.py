"""Model specs: `KIND:PATH` names a diffusion model file or folder; the registry maps each kind to its loader.

Torch-free, so the configuration schema and the CLI's help can be built without loading torch: a loader is
named by its dotted path and imported only when a model loads. Adding a model family is one `ModelFamily`
entry here (and one fixture in tests/stages/test_model_families.py, which refuses a family without one).

`fit` is not a family: it names the model fit-diffusion trains, which only the pipeline can find (it reads the
workspace); `pipeline.models.resolve_model_spec` turns it into `dra:<folder>`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from stores.errors import UserError

FIT = "fit"
FIT_HELP = "fit (the model fit-diffusion trains on the real set)"


@dataclass(frozen=True)
class ModelFamily:
    """One kind of model file: how a spec of it is written, what it is, and where its loader lives."""

    kind: str          # the spec's prefix, e.g. "edm"
    syntax: str        # how a spec of this kind is written, e.g. "edm:PATH.pkl"
    help: str          # what the file is, one short phrase
    loader: str        # "module:function"; function(path: str) -> Denoiser, imported when a model loads

    def load(self, path: str):
        """The model at `path` (imports the loader's module: torch, and for diffusers: diffusers)."""
        module, _, name = self.loader.partition(":")
        return getattr(importlib.import_module(module), name)(path)

    def help_line(self) -> str:
        return f"{self.syntax} ({self.help})"


FAMILIES: dict[str, ModelFamily] = {f.kind: f for f in (
    ModelFamily("edm", "edm:PATH.pkl", "official EDM pickle", "stages.edm_pickle:load_edm_pickle"),
    ModelFamily("diffusers", "diffusers:DIR", "UNet2DModel, DDPM", "stages.diffusers_model:load_diffusers_denoiser"),
    ModelFamily("dra", "dra:DIR", "saved by fit-diffusion", "stages.own_format:load_own"),
)}


def spec_help(fit: bool = False) -> str:
    """The one help text for a model spec, built from the registry; `fit` adds the pipeline's `fit`."""
    lines = [FIT_HELP] if fit else []
    return " | ".join(lines + [family.help_line() for family in FAMILIES.values()])


@dataclass(frozen=True)
class ModelSpec:
    """A parsed `KIND:PATH` spec (PATH may itself contain colons)."""

    kind: str
    path: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"

    @property
    def family(self) -> ModelFamily:
        return FAMILIES[self.kind]

    def exists(self) -> bool:
        return Path(self.path).exists()

    def with_path(self, path: str | Path) -> ModelSpec:
        return ModelSpec(self.kind, str(path))

    def absolute(self) -> ModelSpec:
        """PATH made absolute: Ray workers need not share the driver's working directory."""
        return self.with_path(Path(self.path).resolve())


def localize_spec(text: str) -> str:
    """The spec as a Ray worker on another node sees it: a model inside an object-store workspace is brought into
    this node's cache (stores.remote.localize)."""
    from stores.remote import localize
    spec = parse_spec(text)
    return str(spec.with_path(localize(spec.path, need=True)))


def parse_spec(text: str) -> ModelSpec:
    """`KIND:PATH` -> ModelSpec; UserError naming the known kinds for anything else (`fit` included: resolve it
    first with pipeline.models.resolve_model_spec)."""
    kind, _, path = str(text).partition(":")
    if not path or kind not in FAMILIES:
        raise UserError(f"model spec {text!r} not understood; use {spec_help()}")
    return ModelSpec(kind, path)
