"""Run folders: `runs/<name>/` = config.yaml (resolved), run.json (identity), metrics.jsonl, checkpoint.pt, final.pt.

checkpoint.pt holds everything the next step depends on (live and EMA weights, head, optimizer, loader
position, every rank's RNG states, the epoch's running sums and the length of metrics.jsonl at that moment),
written atomically, so a killed run resumes exactly: metrics.jsonl is cut back to what the checkpoint saw.
final.pt holds what evaluation needs: EMA weights, architecture, normalisation and threat model. best.pt has
the same form, for the epoch whose EMA weights did best under PGD on the held-out images (DM-AT's selection).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from stores import remote
from stores.atomic import torch_save_atomically
from stores.errors import IntegrityError, UserError
from stores.identity import read_json_record, write_json_atomic
from stores.locks import LOCK_NAME, WriterLock, writer_lock

FINAL_FORMAT = "dra-pipe-classifier"


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.run_json = self.path / "run.json"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.final = self.path / "final.pt"
        self.best = self.path / "best.pt"

    @property
    def finished(self) -> bool:
        return self.final.exists()

    def lock(self, wait: bool = False) -> WriterLock:
        """The run's writer lock, for the process that prepares and drives it (`with run.lock(wait):`)."""
        return writer_lock(self.path, f"run '{self.path.name}'", wait)

    def prepare(self, identity: dict, config: dict) -> str:
        """Create the folder, or check that it holds this very run. Returns 'new', 'resume' or 'finished'."""
        if self.run_json.exists():
            old = read_json_record(self.run_json, {"identity": dict}, f"run {self.path.name}'s record")["identity"]
            if old != _jsonable(identity):
                raise UserError(f"run {self.path.name} exists with other settings ({_diff(old, _jsonable(identity))}); "
                                f"pass --name to start another run")
            return "finished" if self.finished else "resume" if self.checkpoint.exists() else "new"
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        write_json_atomic(self.run_json, {"identity": _jsonable(identity)})
        return "new"

    def discard(self) -> None:
        """Remove what `prepare` wrote for a new run that never reached its first checkpoint (the writer lock, held
        by the caller, goes with its release)."""
        for path in self.path.iterdir():
            if path.name != LOCK_NAME:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    # --- metrics ------------------------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics_bytes(self) -> int:
        return self.metrics.stat().st_size if self.metrics.exists() else 0

    def truncate_metrics(self, size: int) -> None:
        """Drop lines written after the checkpoint: the resumed run writes them again."""
        if self.metrics.exists() and self.metrics.stat().st_size > size:
            with open(self.metrics, "r+b") as f:
                f.truncate(size)

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        rows = []
        for number, line in enumerate(self.metrics.read_bytes().splitlines(), 1):
            try:
                row = json.loads(line)
            except ValueError:                       # JSONDecodeError and UnicodeDecodeError
                row = None
            if not isinstance(row, dict):
                raise IntegrityError(f"{self.metrics}: line {number} is not a JSON object (damaged); "
                                     f"delete the run folder and train again")
            rows.append(row)
        return rows

    # --- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        if self.metrics.exists():        # an object-store root: the rows the checkpoint counts, uploaded before it
            remote.published(self.metrics)
        _save_atomic(state, self.checkpoint)

    def load_checkpoint(self) -> dict | None:
        if not self.checkpoint.exists():
            return None
        try:
            return torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:                 # a pickle error, a truncated zip, ...
            raise IntegrityError(f"{self.checkpoint}: unreadable ({type(exc).__name__}); the checkpoint is damaged: "
                                 f"delete it to train run {self.path.name} from the start") from None

    def save_final(self, payload: dict) -> None:
        _save_atomic({"format": FINAL_FORMAT, **payload}, self.final)

    def save_best(self, payload: dict) -> None:
        _save_atomic({"format": FINAL_FORMAT, **payload}, self.best)

    def weights(self, choice: str, explicit: bool = False) -> Path:
        """best.pt for `best` when the run has one (it needs held-out images), else final.pt: see weights_note.
        An explicit `best` (a --weights flag) for a run without best.pt is refused."""
        if choice == "best" and not self.best.exists() and explicit:
            raise UserError(f"run {self.path.name} has no best.pt (trained without held-out images, train.holdout 0); "
                            f"pass --weights final")
        return self.best if choice == "best" and self.best.exists() else self.final

    def weights_note(self, choice: str) -> str | None:
        """Why final.pt stands in for `best`, if it does: one line for the user."""
        if choice == "best" and not self.best.exists():
            return (f"run {self.path.name} has no best.pt (no held-out images to select by, train.holdout 0): "
                    f"using final.pt, the last epoch's weights")
        return None


def _save_atomic(obj: dict, path: Path) -> None:
    torch_save_atomically(obj, path)


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{k}.")
            if inner:
                out.append(inner)
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return "; ".join(out)[:300]
