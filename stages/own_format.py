"""The project's own model format, a folder: `model.safetensors` (weights) + `config.json` (class, constructor
keywords, fingerprint, how it was made). Loading never executes anything from the files; `dra:DIR` specs load here.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stages.edm.networks import EDMPrecond
from stages.fingerprint import model_fingerprint
from stores import remote
from stores.errors import IntegrityError, UserError

FORMAT = "dra-pipe-model"


def _json_safe(config: dict) -> dict:
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in config.items()}


def _from_json(config: dict) -> dict:
    return {k: (float("inf") if v == "inf" else v) for k, v in config.items()}


def save_own(model: EDMPrecond, folder: Path, provenance: dict) -> str:
    """Write the folder atomically (temporary sibling, rename). Returns the model fingerprint."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    fingerprint = model_fingerprint(model)
    meta = {"format": FORMAT, "version": 1, "class": type(model).__name__, "config": _json_safe(model.config),
            "fingerprint": fingerprint, "provenance": provenance}
    (tmp / "config.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    for file in sorted(folder.iterdir()):      # an object-store workspace: workers on other nodes load it from there
        remote.published(file)
    return fingerprint


def load_own(folder: str | Path) -> EDMPrecond:
    """A model in the workspace's store (<root>/models/fit-*) that does not load is damaged data (IntegrityError);
    one given by path is bad input (UserError)."""
    folder = Path(folder)
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    damaged = IntegrityError if folder.parent.name == "models" and folder.name.startswith("fit-") else UserError
    if not config_path.exists() or not weights.exists():
        raise damaged(f"{folder}: not a dra-pipe model (needs config.json and model.safetensors)")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise damaged(f"{config_path}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("class") != "EDMPrecond":
        found = (meta.get("format"), meta.get("class")) if isinstance(meta, dict) else (type(meta).__name__, None)
        raise damaged(f"{config_path}: not a dra-pipe EDMPrecond model (format {found[0]!r}, class {found[1]!r})")
    model = EDMPrecond(**_from_json(meta["config"]))
    try:
        state = load_file(weights)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, SafetensorError) as exc:
        raise damaged(f"{weights}: weights unreadable or not those of the configured network "
                      f"({str(exc).splitlines()[0][:100]}); refit the model") from None
    if model_fingerprint(model) != meta["fingerprint"]:
        raise damaged(f"{folder}: weights do not match the recorded fingerprint (damaged or edited); refit the model")
    return model
