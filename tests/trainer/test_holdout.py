"""The held-out evaluation that picks best.pt counts robustness as `eval` does; the TRADES start is a setting."""
from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn
from trainsets import workspace

from pipeline.config import load_config
from pipeline.plans.train import make_job
from trainer.loop import Dist, Trainer, evaluate


class CleanWrongAttackedRight(nn.Module):
    """Predicts class 1 on images exactly on the 1/255 grid (the clean ones) and class 0 anywhere else."""

    def forward(self, x):                                                  # (B, C, H, W) -> (B, 2)
        on_grid = ((x * 255 - (x * 255).round()).abs().flatten(1).amax(1) < 1e-4)
        logits = torch.stack([(~on_grid).float(), on_grid.float()], dim=1)
        return logits + 0 * x.flatten(1).sum(1, keepdim=True)                 # keeps the input in the graph


def test_robust_only_when_also_right_clean():
    images = torch.randint(0, 256, (16, 1, 8, 8)).float() / 255
    labels = torch.zeros(16, dtype=torch.long)                             # every clean prediction is wrong
    r = evaluate(CleanWrongAttackedRight(), images, labels, eps=0.1, steps=2, seed=0, device=torch.device("cpu"))
    assert r["clean_acc"] == 0 and r["pgd_acc"] == 0                     # the attacked images alone are right


@pytest.mark.parametrize("start", ["normal", "uniform"])
def test_trades_attack_start_reaches_the_attack(tmp_path, monkeypatch, one_thread, start):
    workspace(tmp_path / "ws", n_real=64, n_gen=0, features=False)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(tmp_path / "ws"), "train": {
        "epochs": 1, "batch_size": 16, "attack_steps": 1, "holdout": 16, "dra": False, "unsup_fraction": 0.0,
        "attack_start": start}}))
    job = make_job(load_config(tmp_path / "pipeline.yaml"))
    seen = []
    import trainer.loop as loop
    real = loop.trades_adversary
    monkeypatch.setattr(loop, "trades_adversary", lambda *a, **kw: seen.append(kw.get("start")) or real(*a, **kw))
    batch = {"ids": torch.arange(4), "images": torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8),
             "labels": torch.tensor([0, 1, 2, 3])}
    Trainer(job, Dist()).train_step(batch)
    assert seen == [start]


def test_cifar_recipe_starts_uniform_like_dm_at():
    from conftest import REPO
    assert load_config(REPO / "pipeline.cifar10.yaml").train.attack_start == "uniform"
    with pytest.raises(Exception, match="attack_start"):
        load_config(None, {"train.attack_start": "zero"})
