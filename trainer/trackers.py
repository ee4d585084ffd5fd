"""Live tracking (`train.loggers`): a run's curves, figures, config and final numbers in TensorBoard, W&B or MLflow.

Each backend is one small class with the same five calls (scalars, image, text, summary, close); `Trackers` fans
out to the chosen ones. The loop opens them on rank 0 only (`open_for_training`), logs each metrics.jsonl row at
the row's global step, and at the end the curves figure and the hparams summary; `dra-pipe eval` adds its
numbers at the run's last step (`record_eval`). Ids that let a later process continue the same W&B and MLflow
runs, and the sweep cell the run was trained for, live in `runs/<name>/trackers.json`.

A resumed run continues the same curves: TensorBoard gets `purge_step` = the checkpoint's step + 1 (it drops
what an earlier process wrote past the checkpoint); W&B and MLflow skip steps they already hold.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path

import yaml

from stores.errors import UserError
from stores.identity import write_json_atomic
from trainer.architectures import architecture
from trainer.settings import OPTIMIZER_DEFAULTS

LOGGERS = ("tensorboard", "wandb", "mlflow")
MODULES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}
STATE_FILE = "trackers.json"
TB_FOLDER = "tb"
HPARAMS_FOLDER = "hparams"                   # tb/hparams: the HParams tab's session, rewritten with each summary
PROJECT = "dra-pipe"                         # the W&B project and the MLflow experiment
HELD_OUT = ("clean_acc", "pgd_acc")
EVAL_KEYS = ("clean", "pgd_ce", "pgd_margin", "autoattack", "worst")


def check_loggers(loggers) -> None:
    """Refuse, before training starts, a logger whose package is not installed (naming the extra to install)."""
    for name in loggers:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise UserError(f"train.loggers: {name} needs the {MODULES[name]} package: "
                            f"pip install 'dra-pipe[{name}]' (or drop {name} from train.loggers)")


def metric_tag(key: str) -> str:
    """A metrics.jsonl key's tag: held-out accuracy under heldout/, every other number under train/."""
    return f"heldout/{key}" if key in HELD_OUT else f"train/{key}"


def row_scalars(row: Mapping) -> dict[str, float]:
    """The numbers of one metrics.jsonl row, by tag (its step is the step they are logged at)."""
    return {metric_tag(k): float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat(config: Mapping, prefix: str = "") -> dict:
    """{'train.lr': 0.1, ...}: nested sections flattened; lists and null as text (what hparams accept)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


# --- backends ----------------------------------------------------------------------------------------------------

class TensorBoard:
    """Event files in runs/<name>/tb/ through tensorboardX (no TensorFlow, no tensorboard package needed)."""

    def __init__(self, run_dir: Path, purge_step: int | None):
        from tensorboardX import SummaryWriter
        self.folder = run_dir / TB_FOLDER
        # a writer names its file by the second it starts: a suffix keeps two in one second from sharing it
        self.writer = SummaryWriter(str(self.folder), purge_step=purge_step, flush_secs=30,
                                    filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        pixels = np.asarray(Image.open(png).convert("RGB"))                                # (H, W, 3) uint8
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)              # a code block

    def summary(self, hparams: dict, metrics: dict, step: int) -> None:
        shutil.rmtree(self.folder / HPARAMS_FOLDER, ignore_errors=True)                   # one session per run
        self.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in metrics.items()}, name=HPARAMS_FOLDER,
                                global_step=step)

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """WANDB_MODE when the user set it; online only with an API key and a reachable server, else offline (never
    waits on a network that is not there)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not os.environ.get("WANDB_API_KEY"):
        return "offline"
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=2).close()
        return "online"
    except OSError:
        return "offline"


class WandB:
    """A W&B run (offline files under runs/<name>/wandb/ unless online); a sweep's runs share its group."""

    def __init__(self, run_dir: Path, name: str, config: dict, group: dict, state: dict):
        import wandb
        state.setdefault("wandb_id", uuid.uuid4().hex[:12])
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=name, id=state["wandb_id"],
                              resume="allow", dir=str(run_dir), mode=wandb_mode(), config=config,
                              group=group.get("sweep"), tags=[group["cell"]] if group.get("cell") else None,
                              settings=wandb.Settings(silent=True, console="off"))
        self.state = state                                  # wandb_step: the last step it holds (offline runs
        self.last = max(state.get("wandb_step", -1), self.run.step - 1)   # know no history of their own)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if step <= self.last and "train/epoch" in values:
            return                                          # a replayed epoch of a resumed run
        self.run.log(dict(values), step=max(step, self.last))
        self.last = self.state["wandb_step"] = max(step, self.last)

    def image(self, tag: str, png: Path, step: int) -> None:
        import wandb
        self.run.log({tag: wandb.Image(str(png))}, step=max(step, self.last))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass                                                # the config is the run's config already

    def summary(self, hparams: dict, metrics: dict, step: int) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in metrics.items()})

    def close(self) -> None:
        self.run.finish()


def mlflow_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a local mlruns/ at the workspace root (MLflow's file store: it needs no
    database package, and MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE to use it)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (root / "mlruns").resolve().as_uri()


class MLflow:
    """An MLflow run in experiment dra-pipe; a sweep's runs are children of the sweep's parent run."""

    def __init__(self, root: Path, name: str, config: dict, group: dict, state: dict):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=mlflow_uri(root))
        if "mlflow_run_id" not in state:
            tags = {"mlflow.runName": name}
            if group.get("mlflow_parent"):
                tags.update({"mlflow.parentRunId": group["mlflow_parent"], "sweep.cell": group.get("cell", "")})
            run = self.client.create_run(mlflow_experiment(self.client), run_name=name, tags=tags)
            state["mlflow_run_id"] = run.info.run_id
            params = _params(flat(config))
            for lo in range(0, len(params), 100):                       # MLflow takes 100 params per batch
                self.client.log_batch(run.info.run_id, params=params[lo:lo + 100])
        self.run_id = state["mlflow_run_id"]
        self.last = max((m.step for m in self.client.get_metric_history(self.run_id, "train/epoch")), default=-1)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if step <= self.last and "train/epoch" in values:
            return                                          # a replayed epoch of a resumed run
        self.client.log_batch(self.run_id, metrics=_metrics(values, step))
        self.last = max(self.last, step)

    def image(self, tag: str, png: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(png), "figures")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.client.log_text(self.run_id, text, f"{tag}.yaml")

    def summary(self, hparams: dict, metrics: dict, step: int) -> None:
        held = self.client.get_run(self.run_id).data.metrics                   # each final number once
        new = {f"final/{k}": v for k, v in metrics.items() if held.get(f"final/{k}") != v}
        if new:
            self.client.log_batch(self.run_id, metrics=_metrics(new, step))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_experiment(client) -> str:
    found = client.get_experiment_by_name(PROJECT)
    return found.experiment_id if found else client.create_experiment(PROJECT)


def _metrics(values: Mapping[str, float], step: int) -> list:
    import time

    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def _params(values: dict) -> list:
    from mlflow.entities import Param
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def sweep_parent(root: Path, loggers, sweep: str) -> str | None:
    """The MLflow parent run of sweep `sweep` (found by name, else created), when mlflow is among the loggers."""
    if "mlflow" not in loggers:
        return None
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_uri(root))
    experiment = mlflow_experiment(client)
    found = client.search_runs([experiment], f"tags.`dra-pipe.sweep` = '{sweep}'", max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(experiment, run_name=sweep, tags={"dra-pipe.sweep": sweep}).info.run_id


# --- the fan-out -------------------------------------------------------------------------------------------------

class Trackers:
    """The chosen backends of one run (none: every call does nothing). Use as a context manager."""

    def __init__(self, run_dir: Path | None = None, backends: list | None = None, config: dict | None = None,
                 group: dict | None = None, state: dict | None = None):
        self.run_dir, self.backends, self.config, self.group = run_dir, backends or [], config or {}, group or {}
        self.state = state if state is not None else {}

    def save_state(self) -> None:
        """trackers.json: the backends' run ids and last steps, and the sweep cell (for the next process)."""
        if self.backends:
            write_json_atomic(self.run_dir / STATE_FILE, {**self.state, "group": self.group})

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.save_state()
        for backend in self.backends:
            backend.close()

    def _each(self, call: str, *args) -> None:
        for backend in self.backends:
            getattr(backend, call)(*args)

    def row(self, row: Mapping) -> None:
        """One metrics.jsonl row, at its global step."""
        self._each("scalars", row_scalars(row), int(row["step"]))
        self.save_state()

    def config_text(self) -> None:
        self._each("text", "config", yaml.safe_dump(self.config, sort_keys=False))

    def finish(self, step: int) -> None:
        """At the end of training: the loss-terms and accuracy figure (figures/curves.png) and the hparams summary."""
        if not self.backends:
            return
        from types import SimpleNamespace

        from trainer.report import plot_curves
        from trainer.runs import RunFolder
        rows = RunFolder(self.run_dir).read_metrics()
        if rows:
            (self.run_dir / "figures").mkdir(exist_ok=True)
            png = plot_curves(SimpleNamespace(name=self.run_dir.name, metrics=rows), self.run_dir / "figures" /
                              "curves.png")
            self._each("image", "figures/curves", png, step)
        self.summary(step)

    def eval(self, result: Mapping, step: int) -> None:
        """`dra-pipe eval`'s numbers (eval.json) at the run's last step, then the hparams summary again."""
        numbers = {f"eval/{k}": float(result[k]) for k in EVAL_KEYS if result.get(k) is not None}
        self._each("scalars", numbers, step)
        self.summary(step, numbers)

    def summary(self, step: int, numbers: Mapping[str, float] | None = None) -> None:
        """The run's train settings (and sweep cell) with its final numbers (those of its files, then `numbers`),
        for TensorBoard's HParams tab."""
        hparams = flat({"train": self.config.get("train") or {}})
        hparams.update({k: self.group[k] for k in ("sweep", "cell") if self.group.get(k)})
        self._each("summary", hparams, {**final_metrics(self.run_dir), **(numbers or {})}, step)


def resolved_train(train: Mapping) -> dict:
    """The train section with a null lr / weight_decay replaced by the optimizer's value the run used."""
    if not {"arch", "optimizer"} <= set(train):
        return dict(train)
    optimizer = architecture(train["arch"]).optimizer if train["optimizer"] == "auto" else train["optimizer"]
    return {**train, **{k: OPTIMIZER_DEFAULTS[optimizer][k] for k in ("lr", "weight_decay") if train.get(k) is None}}


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last epoch's held-out accuracy and eval.json's accuracies (where written)."""
    from trainer.runs import RunFolder
    rows = RunFolder(run_dir).read_metrics()
    out = {f"heldout/{k}": float(rows[-1][k]) for k in HELD_OUT if rows and k in rows[-1]}
    eval_json = run_dir / "eval.json"
    if eval_json.exists():
        result = json.loads(eval_json.read_text())
        out.update({f"eval/{k}": float(result[k]) for k in EVAL_KEYS if result.get(k) is not None})
    return out


def open_trackers(run_dir: Path, loggers, config: dict, group: dict | None = None,
                  purge_step: int | None = None) -> Trackers:
    """The run's trackers; their ids (and the sweep cell) are kept in trackers.json for the next process. They
    record the config with a null train.lr / weight_decay resolved to the value the run used."""
    run_dir = Path(run_dir)
    config = {**config, "train": resolved_train(config.get("train") or {})}
    state_path = run_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    group = group if group is not None else state.get("group") or {}
    check_loggers(loggers)
    backends = []
    for name in loggers:
        if name == "tensorboard":
            backends.append(TensorBoard(run_dir, purge_step))
        elif name == "wandb":
            backends.append(WandB(run_dir, run_dir.name, config, group, state))
        else:
            backends.append(MLflow(Path(config.get("root", run_dir.parent.parent)), run_dir.name, config, group,
                                   state))
    trackers = Trackers(run_dir, backends, config, group, state)
    trackers.save_state()
    return trackers


def open_for_training(job, rank: int, start_step: int) -> Trackers:
    """Rank 0's trackers of the Job (other ranks: none). A resumed run (start_step > 0) purges TensorBoard's
    events past its checkpoint; a new one starts with the resolved config as text."""
    if rank != 0:
        return Trackers()
    trackers = open_trackers(Path(job.run_dir), job.settings.loggers, job.config, job.group,
                             purge_step=start_step + 1 if start_step else None)
    if not start_step:
        trackers.config_text()
    return trackers


def record_eval(run_dir: Path, loggers, result: Mapping, step: int) -> None:
    """Add eval.json's numbers to a trained run's trackers (the config and sweep cell it was trained with)."""
    run_dir = Path(run_dir)
    if not loggers:
        return
    config_path = run_dir / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
    with open_trackers(run_dir, loggers, config) as trackers:
        trackers.eval(result, step)
