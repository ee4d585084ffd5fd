"""Classifier files: a run's final.pt or best.pt, an exported file or a RobustBench-format state dict (loaded through
trainer.robustbench), and finding a finished run.

A classifier file is a dict with format "dra-pipe-classifier" and the keys in RECORD_KEYS; `export_classifier`
writes one with a fingerprint (sha256 of the state dict) for others.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.metadata
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from stores import remote
from stores.atomic import torch_save_atomically
from stores.errors import IntegrityError, UserError
from trainer.classifiers import Classifier, build_classifier
from trainer.robustbench import robustbench_record
from trainer.runs import FINAL_FORMAT, RunFolder

RECORD_KEYS = ("arch", "num_classes", "in_channels", "resolution", "mean", "std", "state_dict", "threat_model")


def load_classifier(path: str | Path, stored: bool = False) -> tuple[Classifier, dict]:
    """(classifier in eval mode, record) from a final.pt or an exported file; every problem is one UserError,
    or, for `stored` (a run's own final.pt / best.pt, written by training), one IntegrityError: damaged data."""
    try:
        return _load_classifier(Path(path))
    except UserError as exc:
        if stored and Path(path).is_file():
            raise IntegrityError(f"{exc} - the run's own file is damaged; delete it and train the run again") from None
        raise


def _load_classifier(path: Path) -> tuple[Classifier, dict]:
    if not path.is_file():
        raise UserError(f"no classifier file {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:                                   # a pickle error, a truncated zip, ...
        raise UserError(f"{path}: not a readable classifier file ({type(exc).__name__}: {str(exc)[:80]})") from None
    if isinstance(record, dict) and "format" not in record:       # a bare state dict: RobustBench's layout?
        record = robustbench_record(record, str(path))
    if not isinstance(record, dict) or record.get("format") != FINAL_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path}: not a dra-pipe classifier (format {found!r}); export one with `dra-pipe export`")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise UserError(f"{path}: the classifier record lacks {', '.join(missing)}")
    model = build_classifier(record["arch"], record["num_classes"], record["in_channels"], record["resolution"],
                             record["mean"], record["std"])
    problem = state_dict_mismatch(model, record["state_dict"])
    if problem:
        raise UserError(f"{path}: its weights are not those of a {record['arch']} classifier ({problem})")
    model.load_state_dict(record["state_dict"])
    threat_model(record, path)
    return model.eval(), record


def state_dict_mismatch(model: nn.Module, state: dict) -> str:
    """'' if `state` fits `model` exactly, else a short description of the first differences."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(missing)} missing, e.g. {missing[0]}" if missing else "",
             f"{len(extra)} unexpected, e.g. {extra[0]}" if extra else "",
             f"{len(shapes)} of another shape, e.g. {shapes[0]}" if shapes else ""]
    return "; ".join(p for p in parts if p)


def threat_model(record: dict, where: str | Path = "classifier") -> tuple[str, float]:
    """(norm, eps) recorded with the weights; only L-inf is evaluated."""
    tm = record["threat_model"]
    norm, eps = tm.get("norm"), tm.get("epsilon")
    if norm != "Linf" or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
        raise UserError(f"{where}: threat model {tm!r} is not an L-inf radius in [0, 1]; only L-inf is evaluated")
    return norm, float(eps)


def state_fingerprint(state: dict) -> str:
    """sha256 over the state dict: every tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def export_classifier(source: str | Path, out: str | Path, run_name: str | None = None, stored: bool = False) -> dict:
    """Write the classifier of `source` (final.pt or an export) to `out` for others; returns what was written.

    The file holds the EMA state dict, architecture, shape, normalisation, threat model, fingerprint and the
    dra-pipe version, and loads with `load_classifier` (or torch.load(weights_only=True) + build_classifier).
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    _, record = load_classifier(source, stored)
    export = {"format": FINAL_FORMAT, **{k: record[k] for k in RECORD_KEYS},
              "fingerprint": state_fingerprint(record["state_dict"]), "dra_pipe_version": package_version("dra-pipe"),
              "run": run_name or record.get("run"), "dra": record.get("dra"), "objective": record.get("objective"),
              "selected": record.get("selected"), "exported_from": str(Path(source).resolve()), "exported": now_text()}
    _save_atomic(export, out)
    return export


def _save_atomic(obj: dict, path: Path) -> None:
    try:
        torch_save_atomically(obj, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise                               # the CLI says what is full and how to go on
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


def now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def find_run(root: Path, run: str) -> RunFolder:
    """The finished run `run`: a name under <root>/runs or a run folder's path."""
    folder = RunFolder(Path(run) if Path(run).is_dir() and (Path(run) / "run.json").exists() else root / "runs" / run)
    if not folder.run_json.exists():
        known = sorted(p.name for p in (root / "runs").glob("*") if (p / "run.json").exists()) \
            if (root / "runs").is_dir() else []
        listing = f"runs there: {', '.join(known)}" if known else "there are no runs yet; `dra-pipe train` makes one"
        raise UserError(f"no run {run} under {root}/runs ({listing})")
    remote.bring(folder.path)                   # an object store's root: this run's weights, not pulled at the start
    if not folder.finished:
        state = "training stopped at a checkpoint" if folder.checkpoint.exists() else "training never started"
        raise UserError(f"run {folder.path.name} has no final.pt ({state}); finish it with "
                        f"`dra-pipe train --name {folder.path.name}`")
    return folder
