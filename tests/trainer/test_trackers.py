"""train.loggers: what the trackers write is read back and compared with metrics.jsonl, value and step."""
import json
import os

import pytest
import yaml
from trackerfiles import hparams, scalars, tags, wandb_history
from trainsets import workspace

from pipeline.config import load_config
from pipeline.plans.train import make_job
from trainer import trackers
from trainer.loop import train
from trainer.runs import RunFolder
from trainer.trackers import metric_tag, open_for_training, open_trackers, record_eval

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

TINY = {"epochs": 3, "batch_size": 32, "attack_steps": 1, "dra_hidden": 16, "holdout": 20, "holdout_pgd_steps": 1,
        "loader_workers": 0}


def setup(tmp_path, **train):
    workspace(tmp_path / "ws", n_real=116)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(tmp_path / "ws"),
                                                            "train": {**TINY, **train}}))


def job_of(tmp_path, name, group=None, **train):
    from dataclasses import replace
    cfg = load_config(tmp_path / "pipeline.yaml", {f"train.{k}": v for k, v in train.items()})
    job = replace(make_job(cfg, name), group=group)
    RunFolder(job.run_dir).prepare(job.identity(), job.config)
    return job


def expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers must hold it: {tag: [(step, value)]}."""
    out: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                out.setdefault(metric_tag(key), []).append((row["step"], float(value)))
    return out


def assert_same_curves(held: dict, rows: list[dict], replayed: bool = False) -> None:
    """replayed: the run was resumed and a backend that cannot drop what it holds kept the first writing of a
    replayed epoch; every value is the same but the timing."""
    want = expected([{k: v for k, v in r.items() if not (replayed and k == "images_per_s")} for r in rows])
    assert set(want) <= set(held), sorted(set(want) - set(held))
    for tag, points in want.items():
        assert [s for s, _ in held[tag]] == [s for s, _ in points], tag          # each step once, in order
        assert [v for _, v in held[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_holds_every_row_the_figure_config_and_hparams(tmp_path):
    setup(tmp_path)
    job = job_of(tmp_path, "tb", group={"sweep": "grid", "cell": "train.lr=0.1"})
    train(job)
    run = RunFolder(job.run_dir)
    rows, tb = run.read_metrics(), run.path / "tb"
    assert {"train/loss", "train/kl", "train/dra", "train/lr", "train/images_per_s", "heldout/clean_acc",
            "heldout/pgd_acc"} <= set(expected(rows))
    assert_same_curves(scalars(tb), rows)
    assert {"config/text_summary", "figures/curves"} <= tags(tb)
    assert (run.path / "figures" / "curves.png").exists()
    session = hparams(tb / "hparams")
    assert session["train.lr"] == job.settings.peak_lr == 0.1      # null lr: the optimizer's, as the run used
    assert session["sweep"] == "grid" and session["cell"] == "train.lr=0.1"
    final = scalars(tb / "hparams")
    assert final["hparam/heldout/pgd_acc"] == [(job.total_steps, pytest.approx(rows[-1]["pgd_acc"]))]

    record_eval(run.path, ["tensorboard"], {"clean": 0.75, "pgd_ce": 0.5, "autoattack": None}, job.total_steps)
    held = scalars(tb)
    assert held["eval/clean"] == [(job.total_steps, 0.75)] and "eval/autoattack" not in held
    assert_same_curves(held, rows)                                        # the eval session purged nothing
    assert hparams(tb / "hparams")["cell"] == "train.lr=0.1"              # the cell kept in trackers.json


def test_resumed_run_continues_the_curves_without_duplicate_steps(tmp_path):
    """Killed after epoch 2's row was logged but before its checkpoint: the resumed run writes step 6 again, and
    TensorBoard's purge drops the first one."""
    setup(tmp_path, checkpoint_every=2)
    job = job_of(tmp_path, "killed")

    def kill(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(job, on_epoch=kill)
    run = RunFolder(job.run_dir)
    assert [s for s, _ in scalars(run.path / "tb")["train/loss"]] == [3, 6]
    train(job)
    raw = [s for s, _ in scalars(run.path / "tb", purge=False)["train/loss"]]
    assert raw == [3, 6, 6, 9]                                 # the replayed epoch is really written twice
    assert_same_curves(scalars(run.path / "tb"), run.read_metrics())


def test_only_rank_0_logs(tmp_path):
    setup(tmp_path)
    job = job_of(tmp_path, "ranks")
    with open_for_training(job, 1, 0) as other:
        other.row({"step": 3, "loss": 1.0})
    assert not other.backends and not (RunFolder(job.run_dir).path / "tb").exists()
    with open_for_training(job, 0, 0) as main:
        main.row({"step": 3, "loss": 1.0})
    assert scalars(RunFolder(job.run_dir).path / "tb")["train/loss"] == [(3, 1.0)]


def test_no_loggers_write_nothing(tmp_path):
    setup(tmp_path, epochs=1, loggers=[])
    job = job_of(tmp_path, "quiet")
    train(job)
    run = RunFolder(job.run_dir)
    assert run.final.exists() and not (run.path / "tb").exists() and not (run.path / "trackers.json").exists()


def test_a_logger_not_installed_is_one_line_exit_2(cli, tmp_path, monkeypatch):
    setup(tmp_path, loggers=["tensorboard", "wandb"])
    monkeypatch.setitem(trackers.MODULES, "wandb", "wandb_is_not_installed_here")
    code, out, err = cli("train")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "pip install 'dra-pipe[wandb]'" in err
    assert not (tmp_path / "ws" / "runs").exists()                        # refused before the run folder


def test_eval_adds_its_numbers_to_the_run(cli, tmp_path):
    setup(tmp_path, epochs=1)
    assert cli("train")[0] == 0
    code, out, err = cli("eval", "small-cnn-dra-0", "--n", "8", "--no-autoattack")
    assert code == 0, err
    run = RunFolder(tmp_path / "ws" / "runs" / "small-cnn-dra-0")
    result, step = json.loads((run.path / "eval.json").read_text()), run.read_metrics()[-1]["step"]
    held = scalars(run.path / "tb")
    for key in ("clean", "pgd_ce", "pgd_margin", "worst"):
        assert held[f"eval/{key}"] == [(step, pytest.approx(result[key]))], key
    assert scalars(run.path / "tb" / "hparams")["hparam/eval/pgd_ce"] == [(step, pytest.approx(result["pgd_ce"]))]


def test_wandb_offline_run_holds_every_row(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    setup(tmp_path, loggers=["wandb"], checkpoint_every=2)
    job = job_of(tmp_path, "wb", group={"sweep": "grid", "cell": "c"})

    def kill(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(job, on_epoch=kill)
    train(job)                                                 # a second offline run file, the same W&B run id
    run = RunFolder(job.run_dir)
    assert len(list(run.path.glob("wandb/offline-run-*"))) == 2 and not (run.path / "tb").exists()
    assert_same_curves(wandb_history(run.path), run.read_metrics(), replayed=True)


def test_mlflow_local_run_holds_every_row_under_its_sweep(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)          # set by the trackers: undone after
    setup(tmp_path, loggers=["mlflow"], checkpoint_every=2)
    root = tmp_path / "ws"
    parent = trackers.sweep_parent(root, ["mlflow"], "grid")
    assert trackers.sweep_parent(root, ["mlflow"], "grid") == parent            # found again, not duplicated
    job = job_of(tmp_path, "ml", group={"sweep": "grid", "cell": "c", "mlflow_parent": parent})

    def kill(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(job, on_epoch=kill)
    train(job)
    run = RunFolder(job.run_dir)
    run_id = json.loads((run.path / "trackers.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=(root / "mlruns").resolve().as_uri())
    assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(run_id).data.params["train.lr"] == str(job.settings.peak_lr)
    held = {tag: sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))
            for tag in expected(run.read_metrics())}
    assert_same_curves(held, run.read_metrics(), replayed=True)
    record_eval(run.path, ["mlflow"], {"clean": 0.75, "pgd_ce": 0.5}, job.total_steps)
    history = lambda tag: [(m.step, m.value) for m in client.get_metric_history(run_id, tag)]   # noqa: E731
    assert history("eval/clean") == [(job.total_steps, 0.75)]
    assert history("final/eval/pgd_ce") == [(job.total_steps, 0.5)]
    assert history("final/heldout/pgd_acc") == [(job.total_steps, pytest.approx(run.read_metrics()[-1]["pgd_acc"]))]


def test_wandb_stays_offline_without_a_key_or_network(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert trackers.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x")
    monkeypatch.setattr(trackers.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    assert trackers.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert trackers.wandb_mode() == "online"


def test_open_trackers_with_no_loggers_is_silent(tmp_path):
    with open_trackers(tmp_path, [], {}) as none:
        none.row({"step": 1, "loss": 1.0})
    assert not os.listdir(tmp_path)
