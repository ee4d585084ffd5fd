"""train.precision and train.attack_precision act on the CPU too: bf16 autocast changes the step a little."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from trainsets import workspace

from pipeline.config import load_config
from pipeline.plans.train import make_job
from trainer.loader import make_loader
from trainer.loop import Dist, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

TINY = {"epochs": 1, "batch_size": 32, "attack_steps": 3, "dra_hidden": 16, "holdout": 0, "loader_workers": 0}


@pytest.fixture
def make(tmp_path):
    workspace(tmp_path / "ws", n_real=64, n_gen=64)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(tmp_path / "ws"), "train": TINY}))

    def trainer(**train) -> tuple[Trainer, dict]:
        job = make_job(load_config(tmp_path / "pipeline.yaml", {f"train.{k}": v for k, v in train.items()}), "p")
        t = Trainer(job, Dist())
        return t, next(iter(make_loader(t.mix_plan())))
    return trainer


def first_step(make, **train) -> tuple[dict, Trainer]:
    trainer, batch = make(**train)
    return trainer.train_step(copy.deepcopy(batch)), trainer


def test_bf16_step_changes_the_loss_a_little(make):
    f32, _ = first_step(make)
    bf16, _ = first_step(make, precision="bf16")
    again, _ = first_step(make)
    assert torch.equal(f32["loss"], again["loss"])                       # float32 is deterministic here
    gap = abs(float(bf16["loss"] - f32["loss"]))
    assert 0 < gap < 0.05 * float(f32["loss"]), (float(f32["loss"]), float(bf16["loss"]))


def test_bf16_attack_changes_the_adversarial_examples(make):
    f32, _ = make()
    bf16, batch = make(attack_precision="bf16")
    x = batch["images"].permute(0, 3, 1, 2).float() / 255
    y = batch["labels"]
    advs = []
    for t in (f32, f32, bf16):
        t.attack_gen.manual_seed(0)
        with t.autocast("attack_precision"):
            advs.append(t.attack(x, y))
    assert torch.equal(advs[0], advs[1]) and not torch.equal(advs[0], advs[2])   # only the precision differs
    assert (advs[2] - x).abs().max() <= f32.s.epsilon + 1e-6          # still inside the eps-ball


@pytest.mark.parametrize("step_precision, attack_precision", [("bf16", "float32"), ("float32", "bf16")])
def test_each_precision_acts_on_its_part_of_the_step(make, monkeypatch, step_precision, attack_precision):
    """The classifier's logits in train_step: bf16 where its setting says so, float32 elsewhere."""
    trainer, batch = make(precision=step_precision, attack_precision=attack_precision)
    phase, seen = ["step"], {"attack": set(), "step": set()}
    forward, attack = trainer.model.forward, trainer.attack

    def spy_forward(x, *args, **kwargs):
        out = forward(x, *args, **kwargs)
        seen[phase[0]].add(out.dtype)
        return out

    def spy_attack(*args):
        phase[0] = "attack"
        try:
            return attack(*args)
        finally:
            phase[0] = "step"
    monkeypatch.setattr(trainer.model, "forward", spy_forward)
    monkeypatch.setattr(trainer, "attack", spy_attack)
    trainer.train_step(batch)
    dtype = {"float32": torch.float32, "bf16": torch.bfloat16}
    assert seen == {"attack": {dtype[attack_precision]}, "step": {dtype[step_precision]}}


def test_precisions_are_part_of_the_run_identity(make):
    a, _ = make()
    b, _ = make(precision="bf16")
    c, _ = make(attack_precision="bf16")
    ids = [t.job.identity()["train"] for t in (a, b, c)]
    assert ids[0]["precision"] == ids[0]["attack_precision"] == "float32"
    assert ids[1]["precision"] == "bf16" and ids[2]["attack_precision"] == "bf16"
    assert len({yaml.safe_dump(i) for i in ids}) == 3
