"""Every key of `train` and `eval` that changes the result is proven to change it (issue 22; generate and
features: test_settings_act_stages.py).

The tables below hold every key of the two sections, each in exactly one: NON_DEFAULT (a value that must change
the result of the smallest real run), NEUTRAL (a value that must leave it exactly as it is) or NOT_COMPARED (why
no small run can compare). A key added to the schema without a row fails test_tables_cover_the_schema.

train: `dra-pipe train`'s own path (pipeline.train.run_train: make_job, the online teacher, the loop) for one
epoch of 2 steps of 16 images (8 real, 8 generated) on real extract-features targets of a tiny EDM. The result:
the live weights and head (checkpoint.pt), the EMA (final.pt), the epoch's loss terms, and the held-out
evaluation: its accuracies and the adversarial images its attack made (after 2 steps the EMA is near chance,
so PGD accuracy is 0 whatever the attack; the images show the attack itself).
eval: `dra-pipe eval`'s path (pipeline.evaluate.run_eval) and the report's effective rank on 16 test images of
a small trained CNN. The result: the figures, the adversarial images of the PGD attacks, AutoAttack's per-attack
accuracies and log (times left out), the effective rank.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from evalruns import fit_small_cnn, save_run
from settingsact import Change, assert_acts, check_tables, differing, recording, rows, shards_in_process
from trainsets import image_set

import trainer.evaluate
import trainer.loop
from pipeline.config import load_config
from pipeline.evaluate import run_eval
from pipeline.extract import run_extract
from pipeline.plans.train import make_job
from pipeline.train import run_train
from trainer.evaluate import EvalSettings
from trainer.loader import make_loader
from trainer.loop import Dist, Trainer
from trainer.report import load_run, representation
from trainer.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

TIME = re.compile(r" \(total time [0-9.]+ s\)")
EVAL = {"eval.autoattack": False, "eval.n": 16, "eval.pgd_steps": 3}
TRAIN = {"train.epochs": 1, "train.batch_size": 16, "train.attack_steps": 1, "train.holdout": 8,
         "train.holdout_pgd_steps": 2, "train.dra_hidden": 16, "train.loader_workers": 0}
PAD = {"train.crop_pad": 1, "features.views": 4}      # views made for 1-pixel crops (9 augmentations, 4 stored)
FLIP = {"train.flip": True, "features.views": 2}      # the image and its mirror

NON_DEFAULT = {
    "train.arch": "resnet18",
    "train.objective": ["pgd-at", "clean"],
    "train.epochs": 2,                                # twice the steps, and another learning-rate schedule
    "train.batch_size": 8,
    "train.generated_set": "other-gen",
    "train.unsup_fraction": 0.25,
    # auto: SGD for the small CNN; with lr and decay fixed only the update rule differs, else AdamW's defaults too
    "train.optimizer": [Change("adamw", context={"train.lr": 0.1, "train.weight_decay": 5e-4}), "adamw"],
    "train.lr": [0.05, Change(0.01, context={"train.optimizer": "adamw"})],
    "train.weight_decay": [0.01, Change(0.5, context={"train.optimizer": "adamw"})],
    "train.adam_beta1": Change(0.5, context={"train.optimizer": "adamw"}),
    "train.adam_beta2": Change(0.9, context={"train.optimizer": "adamw"}),
    "train.label_smoothing": 0.0,
    "train.trades_beta": 2.0,
    "train.epsilon": 0.03,                            # below the step 0.05: the training attack's step is cut
    "train.attack_steps": 2,
    "train.attack_step_size": 0.02,
    "train.precision": "bf16",
    "train.attack_precision": "bf16",
    "train.attack_start": "uniform",
    # views mode augments with the stored views only: a crop pad or flips need feature sets made for them
    "train.crop_pad": Change(1, also={"features.views": 4}),
    "train.flip": Change(True, also={"features.views": 2}),
    # without augmentation every mode aligns with view 0's target; with it they align with different ones
    "train.dra_targets": [Change("online", context=PAD), Change("shifted", context=PAD)],
    # below 2/11, so it caps the EMA's ramp (1 + n) / (10 + n) from the first update; the live weights stay
    "train.ema_decay": Change(0.1, moves=("ema",), same=("live", "loss")),
    "train.dra": False,
    "train.dra_lambda": 0.5,
    "train.dra_layer": "conv2",                       # 64x8x8, pooled onto the 2x2 targets (auto: conv3)
    "train.dra_view": "clean",
    "train.dra_hidden": 8,
    "train.dra_depth": 2,
    "train.holdout": 4,                               # another training split and another held-out set
    "train.holdout_pgd_steps": Change(3, moves=("held_out",), same=("live", "ema", "loss")),
    "train.seed": 1,
    # reader slots = ranks x loader workers: two workers split each source in two shares, so batches differ
    "train.loader_workers": 2,
    "eval.n": 8,
    "eval.subset": Change("per-class", context={"eval.n": 10}),      # one image of each digit, not the first 10
    "eval.pgd_steps": 5,
    "eval.pgd_step_size": 0.01,
    "eval.pgd_restarts": 2,
    # AutoAttack on the eps-0.3 run, where APGD-CE breaks every image (seconds, not minutes); standard runs
    # APGD-T next, plus APGD-DLR (the log says which ran)
    "eval.autoattack": Change(True, moves=("autoattack", "figures"), run="big"),
    "eval.autoattack_version": Change("plus", context={"eval.autoattack": True}, moves=("autoattack",), run="big"),
    # AutoAttack seeds every batch (its random starts depend on the batch layout); PGD's sign steps turn the
    # batched kernels' last-bit differences into other adversarial images (its random starts are the same)
    "eval.batch_size": 5,
    "eval.seed": Change(1, same=("rank",)),
    "eval.weights": Change("final", moves=("attacks", "rank")),     # best.pt and final.pt: other weights
    "eval.rank_n": Change(10, moves=("rank",), same=("figures", "attacks")),
}
NEUTRAL = {
    "train.checkpoint_every": (1, "a checkpoint after every step saves state, and a resumed run replays exactly"),
    "train.loggers": ([], "the trackers only read what the run writes (tests/trainer/test_trackers.py reads them "
                          "back): the same weights, losses and held-out accuracy without them"),
    "eval.cpu_threads": (2, "the CPU kernels give the same numbers with 1 or 2 threads (torch's threads are set "
                            "back to 1 by the one_thread fixture)"),
}
NOT_COMPARED = {
    "train.workers": "data-parallel ranks run on Ray Train (about 22 s to start here) and split each batch and "
                     "each source's reader slots over the ranks: tests/trainer/test_train.py::"
                     "test_ray_train_two_cpu_workers_on_digits (slow) trains with 2",
    "eval.device": "auto is the CPU on a machine without a GPU and cuda is refused there; on a GPU the kernels "
                   "may differ in the last bits from the CPU's",
}
ALSO_NEUTRAL = [("train.loader_workers", 1, "one worker process reads the one slot the main process reads")]


def test_tables_cover_the_schema():
    check_tables(("train", "eval"), {**TRAIN, **EVAL}, NON_DEFAULT=NON_DEFAULT, NEUTRAL=NEUTRAL,
                 NOT_COMPARED=NOT_COMPARED)


def section(table: dict, name: str) -> dict:
    return {k: v for k, v in table.items() if k.startswith(f"{name}.")}


def neutral(name: str) -> list:
    return [pytest.param(k, v, why, id=f"{k}={v}") for k, (v, why) in section(NEUTRAL, name).items()] + \
        [pytest.param(k, v, why, id=f"{k}={v}") for k, v, why in ALSO_NEUTRAL if k.startswith(f"{name}.")]


# --- train ----------------------------------------------------------------------------------------------------

class TrainRuns:
    """The module's workspace; each result of a configuration is trained once (`train` trains afresh)."""

    def __init__(self, root: Path, spec: str):
        self.root, self.cache, self.names = root, {}, itertools.count()
        self.base = {"root": str(root), "model.spec": spec, "data.shard_size": 16, "features.pool": "2", **TRAIN}

    def config(self, settings: dict):
        return load_config(None, {**self.base, **settings})

    def result(self, settings: dict) -> dict:
        key = repr(sorted(settings.items()))
        if key not in self.cache:
            self.cache[key] = self.train(settings)
        return self.cache[key]

    def train(self, settings: dict) -> dict:
        name, attacks = f"run{next(self.names)}", []
        with recording(trainer.loop, "pgd_attack", attacks):
            run_train(self.config(settings), name)
        run = RunFolder(self.root / "runs" / name)
        live, metrics = torch.load(run.checkpoint, weights_only=True), run.read_metrics()
        return {"live": {"model": live["model"], "head": live["head"]},
                "ema": torch.load(run.final, weights_only=True)["state_dict"],
                "loss": [{k: r[k] for k in ("loss", "ce", "kl", "dra") if k in r} for r in metrics],
                "held_out": {"accuracy": [(r.get("clean_acc"), r.get("pgd_acc")) for r in metrics],
                             "attacks": attacks}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, one_thread_for_module) -> TrainRuns:
    root = tmp_path_factory.mktemp("train-settings")
    image_set(root, "digits-train", "real", 40, 16, seed=1)
    image_set(root, "digits-gen", "generated", 32, 16, seed=3)
    image_set(root, "other-gen", "generated", 32, 16, seed=4)
    runs = TrainRuns(root, f"dra:{tiny_model_dir}")
    with shards_in_process():                        # extract-features' own targets (the teacher reads its spec)
        run_extract(runs.config({}), [], ["digits-train", "digits-gen", "other-gen"], False)
        for views in (PAD, FLIP):
            run_extract(runs.config(views), [], ["digits-train", "digits-gen"], False)
    return runs


def test_the_base_run_repeats_exactly(runs):
    """Otherwise a difference below could be noise."""
    assert differing(runs.result({}), runs.train({})) == set()


@pytest.mark.parametrize("key,change", rows(section(NON_DEFAULT, "train")))
def test_a_train_setting_changes_what_is_trained(runs, key, change):
    changed = runs.train({**change.context, **change.also, key: change.value})
    assert_acts(key, change, runs.result(change.context), changed, moves=("live",))


@pytest.mark.parametrize("key,value,why", neutral("train"))
def test_a_neutral_train_setting_trains_the_same(runs, key, value, why):
    assert differing(runs.result({}), runs.train({key: value})) == set(), why


def test_the_ema_copies_the_weights_through_its_warm_up(runs):
    """DM-AT's EMA copies the live weights for the first 2.5% of the steps, whatever train.ema_decay says: in a run
    of 200 steps the first 2 updates are copies. Broken by: no warm-up (the first update averages)."""
    for decay in (0.995, 0.1):
        trainer = Trainer(make_job(runs.config({"train.epochs": 100, "train.ema_decay": decay}), "warm-up"), Dist())
        batches = iter(make_loader(trainer.mix_plan()))
        trainer.model.train()
        for _ in range(2):
            trainer.train_step(next(batches))
            ema, live = trainer.ema.module.state_dict(), trainer.model.state_dict()
            assert all(torch.equal(ema[k], live[k]) for k in live), f"ema_decay {decay}: not a copy"


# --- eval -----------------------------------------------------------------------------------------------------

class EvalRuns:
    """Two finished runs: `tiny` (eps 0.05; best.pt and final.pt hold other weights) and `big` (eps 0.3)."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def result(self, settings: dict, run: str = "tiny") -> dict:
        key = (run, repr(sorted(settings.items())))
        if key not in self.cache:
            self.cache[key] = self.evaluate(settings, run)
        return self.cache[key]

    def evaluate(self, settings: dict, run: str = "tiny") -> dict:
        cfg, attacks = load_config(None, {"root": str(self.root), **EVAL, **settings}), []
        with recording(trainer.evaluate, "pgd_attack", attacks):
            r = run_eval(cfg, run, None)
        rank = representation(self.root, load_run(self.root, run), EvalSettings.from_config(cfg.eval))
        return {"figures": {k: r[k] for k in ("clean", "pgd_ce", "pgd_margin", "autoattack", "worst", "counts", "n")},
                "attacks": attacks,
                "autoattack": {"after": r.get("autoattack_per_attack"),
                               "log": [TIME.sub("", line) for line in r.get("autoattack_log", [])]},
                "rank": {k: rank[k] for k in ("erank", "spectrum", "images")}}


@pytest.fixture(scope="module")
def evals(tmp_path_factory, one_thread_for_module) -> EvalRuns:
    root = tmp_path_factory.mktemp("eval-settings")
    train = image_set(root, "digits-train", "real", 256, 64, seed=1)
    image_set(root, "digits-test", "real", 24, 64, seed=2)
    tiny, other = fit_small_cnn(train), fit_small_cnn(train, steps=15, seed=1)
    folder = save_run(root, "tiny", tiny, 0.05, dra=True, unsup_fraction=0.5)
    final = torch.load(folder.final, weights_only=True)
    folder.save_best({**final, "state_dict": other.state_dict(),
                      "selected": {"epoch": 2, "by": "held-out PGD-20", "pgd_acc": 0.5, "clean_acc": 0.9}})
    save_run(root, "big", other, 0.3, dra=False, unsup_fraction=0.0)
    return EvalRuns(root)


def test_the_base_evaluation_repeats_exactly_and_attacks_both_losses(evals):
    """PGD on cross-entropy and PGD on the margin start from the same random points (one seed) and must still
    find other images. Broken by: the margin attack running cross-entropy."""
    base = evals.result({})
    assert differing(base, evals.evaluate({})) == set()
    ce, margin = base["attacks"]                      # one batch each
    assert not torch.equal(ce, margin)


@pytest.mark.parametrize("key,change", rows(section(NON_DEFAULT, "eval")))
def test_an_eval_setting_changes_the_evaluation(evals, key, change):
    changed = evals.evaluate({**change.context, **change.also, key: change.value}, change.run or "tiny")
    assert_acts(key, change, evals.result(change.context, change.run or "tiny"), changed, moves=("attacks",))


@pytest.mark.parametrize("key,value,why", neutral("eval"))
def test_a_neutral_eval_setting_evaluates_the_same(evals, key, value, why):
    assert differing(evals.result({}), evals.evaluate({key: value})) == set(), why
