import json

import pytest
import torch
import yaml
from trainsets import feature_set, image_set, workspace

from pipeline.config import defaults, load_config
from pipeline.plans.train import make_job
from stores.images import ImageSet
from trainer.classifier_files import load_classifier
from trainer.loop import train
from trainer.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

TINY = {"epochs": 2, "batch_size": 32, "attack_steps": 2, "dra_hidden": 32, "holdout": 20, "holdout_pgd_steps": 2,
        "loader_workers": 0}


def setup(tmp_path, train=None, **ws):
    sets = workspace(tmp_path / "ws", n_real=ws.pop("n_real", 116), **ws)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(tmp_path / "ws"),
                                                            "train": {**TINY, **(train or {})}}))
    return sets


def config(tmp_path, **train):
    return load_config(tmp_path / "pipeline.yaml", {f"train.{k}": v for k, v in train.items()})


def test_train_writes_run_folder_and_rerun_is_a_noop(cli, tmp_path):
    setup(tmp_path)
    code, out, err = cli("train")
    assert code == 0, err
    run = RunFolder(tmp_path / "ws" / "runs" / "small-cnn-dra-0")
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("loss", "ce", "kl", "dra", "clean_acc", "pgd_acc", "images_per_s", "lr"):
        assert all(key in r for r in rows), key
    assert yaml.safe_load(run.config.read_text())["train"]["epochs"] == 2
    model, record = load_classifier(run.final, stored=True)
    assert record["threat_model"] == {"norm": "Linf", "epsilon": 0.2} and record["dra"]
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    code, out, _ = cli("train")
    assert code == 0 and "nothing to do" in out


def test_dry_run_prints_plan_and_trains_nothing(cli, tmp_path):
    sets = setup(tmp_path)
    code, out, err = cli("train", "--dry-run", "--epochs", "3")
    assert code == 0, err
    assert "3 steps per epoch (ceil(96 / 32)) x 3 epochs = 9 steps" in out
    assert "16 real + 16 generated" in out and sets["real_features"].name in out and "s per step" in out
    assert "classifier small-cnn: " in out and "GFLOP per image per TRADES step (2 attack steps" in out
    assert "optimizer auto: sgd (Nesterov, momentum 0.9), peak lr 0.1" in out
    assert not (tmp_path / "ws" / "runs").exists()


@pytest.mark.parametrize("views", [1, 4])
def test_killed_run_resumes_exactly(tmp_path, views):
    """With 4 stored views per image, the view each sample is drawn under must replay exactly too."""
    setup(tmp_path, {"checkpoint_every": 2, "crop_pad": 1}, views=views, pad=1)
    straight = make_job(config(tmp_path), "straight")
    RunFolder(straight.run_dir).prepare(straight.identity(), straight.config)
    train(straight)

    killed = make_job(config(tmp_path), "killed")
    RunFolder(killed.run_dir).prepare(killed.identity(), killed.config)

    def kill(step, images, terms):
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(killed, on_step=kill)
    # mid-epoch (3 steps per epoch)
    assert torch.load(RunFolder(killed.run_dir).checkpoint, weights_only=True)["step"] == 4
    train(killed)
    a, b = (torch.load(RunFolder(j.run_dir).final, weights_only=True)["state_dict"] for j in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(RunFolder(j.run_dir).best, weights_only=True) for j in (straight, killed))
    assert a["selected"] == b["selected"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k])
                                                  for k in a["state_dict"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]   # noqa: E731
    assert strip(RunFolder(straight.run_dir).read_metrics()) == strip(RunFolder(killed.run_dir).read_metrics())


def test_best_weights_are_those_of_the_best_held_out_epoch(tmp_path):
    """DM-AT's selection: the EMA weights of the epoch with the highest held-out PGD accuracy (later epoch on ties)."""
    setup(tmp_path, {"epochs": 4})
    job = make_job(config(tmp_path), "best")
    run = RunFolder(job.run_dir)
    run.prepare(job.identity(), job.config)
    train(job)
    pgd = [r["pgd_acc"] for r in run.read_metrics()]
    epoch = max(i for i, acc in enumerate(pgd, 1) if acc == max(pgd))
    best = torch.load(run.best, weights_only=True)
    assert best["selected"]["epoch"] == epoch and best["selected"]["pgd_acc"] == max(pgd)
    assert best["steps"] == epoch * job.steps_per_epoch                        # saved at the end of that epoch
    assert run.weights("best") == run.best and run.weights("final") == run.final
    model, record = load_classifier(run.best, stored=True)
    assert record["arch"] == "small-cnn" and model(torch.rand(2, 1, 8, 8)).shape == (2, 10)

    no_holdout = make_job(config(tmp_path, holdout=0, epochs=1), "no-holdout")
    folder = RunFolder(no_holdout.run_dir)
    folder.prepare(no_holdout.identity(), no_holdout.config)
    train(no_holdout)
    assert not folder.best.exists() and folder.weights("best") == folder.final


def test_best_weights_go_to_the_later_epoch_on_a_tie(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from trainer import loop
    monkeypatch.setattr(loop, "_final_record", lambda job, trainer: {"saved_at": trainer.step})
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    job = SimpleNamespace(settings=SimpleNamespace(holdout_pgd_steps=20))
    for epoch, pgd in enumerate((0.3, 0.5, 0.5, 0.4), 1):
        row = {"epoch": epoch, "pgd_acc": pgd, "clean_acc": 0.9}
        loop._keep_if_best(run, job, SimpleNamespace(step=epoch), row)
        run.append_metrics(row)
    best = torch.load(run.best, weights_only=True)
    assert best["saved_at"] == 3 and best["selected"]["epoch"] == 3 and best["selected"]["by"] == "held-out PGD-20"


def test_dra_off_and_lambda_zero_are_the_same_baseline(tmp_path):
    setup(tmp_path, {"epochs": 1})
    finals = []
    for name, over in (("off", {"dra": False}), ("zero", {"dra_lambda": 0.0})):
        job = make_job(config(tmp_path, **over), name)
        assert not job.dra and job.feature_keys == {}
        RunFolder(job.run_dir).prepare(job.identity(), job.config)
        train(job)
        finals.append(torch.load(RunFolder(job.run_dir).final, weights_only=True)["state_dict"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_same_name_other_settings_refused(cli, tmp_path):
    setup(tmp_path, {"epochs": 1})
    assert cli("train")[0] == 0
    code, _, err = cli("train", "--lambda", "0.25")
    default = defaults()["train"]["dra_lambda"]
    assert code == 2 and f"dra_lambda: {default:g} there, 0.25 now" in err and "--name" in err and err.count("\n") == 1
    code, out, _ = cli("train", "--lambda", "0.25", "--name", "other")
    assert code == 0


def one_line_error(cli, *args):
    code, _, err = cli("train", *args)
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_bad_input_one_line_exit_2(cli, tmp_path):
    sets = setup(tmp_path)
    err = one_line_error(cli, "--features", "nosuchkey")
    assert "no feature set nosuchkey" in err
    other = image_set(tmp_path / "ws", "elsewhere-train", "real", 40, 32, seed=9)
    key = feature_set(tmp_path / "ws", other).name
    err = one_line_error(cli, "--features", key)
    assert (other.fingerprint[:12] in err and sets["real"].fingerprint[:12] in err
            and sets["gen"].fingerprint[:12] in err)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(tmp_path / "ws"),
                                                            "train": {**TINY, "dra_layer": "conv9"}}))
    assert "has no layer 'conv9'" in one_line_error(cli)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(tmp_path / "ws"),
                                                            "train": {**TINY, "unsup_fraction": 1.0}}))
    assert "unsup_fraction" in one_line_error(cli)


def test_grid_mismatch_refused(cli, tmp_path):
    setup(tmp_path, shape=(8, 3, 3))
    assert "cannot be matched" in one_line_error(cli)


def test_missing_features_and_sets(cli, tmp_path):
    setup(tmp_path, features=False)
    assert "run `dra-pipe extract-features`" in one_line_error(cli)
    code, _, err = cli("train", "--no-dra", "--epochs", "1")
    assert code == 0, err
    setup(tmp_path / "nogen", n_gen=0)
    code, _, err = cli("train", "--config", tmp_path / "nogen" / "pipeline.yaml")
    assert code == 2 and "dra-pipe generate" in err


@pytest.mark.slow
def test_ray_train_two_cpu_workers_on_digits(cli, tmp_path):
    """Data-parallel through Ray Train (gloo): the real digits set, a generated set, DRA on (about 1-4 min here)."""
    ws = tmp_path / "ws"
    assert cli("import", "digits", "--root", ws)[0] == 0
    real = ImageSet.open(ws, "digits-train")
    gen = image_set(ws, "digits-gen", "generated", 300, 128, seed=3)
    feature_set(ws, real, (8, 4, 4))
    feature_set(ws, gen, (8, 4, 4))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(
        {"root": str(ws), "train": {**TINY, "epochs": 1, "batch_size": 256, "holdout": 144}}))
    code, out, err = cli("train", "--workers", "2", "--name", "ray")
    assert code == 0, err
    run = RunFolder(ws / "runs" / "ray")
    rows = run.read_metrics()
    assert len(rows) == 1 and rows[0]["step"] == 6 and run.finished        # ceil(1294 / 256) steps
    assert json.loads(run.run_json.read_text())["identity"]["train"]["workers"] == 2


def test_bench_train_times_each_variant_around_its_own_work(tmp_path, monkeypatch):
    """A clock that moves only inside the timed work: 1 ms per augmented loader batch, 10 ms per step without a
    head, 11 ms with one, 5 ms per diffusion forward of the naive step. The figures must be exactly those: a
    variant timed around the wrong work, a trainer with the wrong head, a misplaced rate or ratio shows."""
    from types import SimpleNamespace

    from rich.console import Console

    from pipeline.bench import train as bench
    from trainer.loop import Trainer
    clock = SimpleNamespace(now=50.0)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def ticking(fn, seconds):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            clock.now += seconds(*args) if callable(seconds) else seconds
            return out
        return run
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step",
                        ticking(step, lambda trainer, batch: 0.010 if trainer.head is None else 0.011))
    compute_targets, targets_computed = bench.compute_targets, []

    def counted_targets(*args):
        targets_computed.append(len(args[1]))                   # args[1]: the batch's ids
        return compute_targets(*args)
    monkeypatch.setattr(bench, "compute_targets", ticking(counted_targets, 0.005))
    monkeypatch.setattr(bench, "align", ticking(bench.align, 0.001))
    cfg = load_config(None, {"root": str(tmp_path), "train.batch_size": 32, "train.attack_steps": 1,
                             "train.loader_workers": 0, "data.shard_size": 128, "fit_diffusion.model_channels": 8})
    console = Console(record=True, width=160)
    figures = bench.bench_train(cfg, console, steps=2, samples=256)
    assert figures["loader_samples_per_s"] == pytest.approx(32 / 0.001)
    assert (figures["step_s/DM-AT"] == pytest.approx(0.010)
            and figures["step_s/DM-AT+DRA cached"] == pytest.approx(0.011))
    assert figures["step_s/DRA naive"] == pytest.approx(0.016)
    assert (figures["ratio_cached_over_dmat"] == pytest.approx(1.1)
            and figures["ratio_naive_over_cached"] == pytest.approx(16 / 11))
    assert figures["consume_images_per_s"] == pytest.approx(32 / 0.011)
    assert targets_computed == [32, 32, 32]                  # the naive step computes its batch's targets every round
    text = console.export_text()
    assert "DM-AT+DRA cached / DM-AT: 1.100" in text and "DRA naive / DM-AT+DRA cached: 1.45x" in text
