"""`dra-pipe bench targets`: stored views match the true target of the augmented image; the shift does not."""
from __future__ import annotations

import pytest
import yaml

TRAIN = {"epochs": 1, "batch_size": 32, "attack_steps": 1, "dra_hidden": 16, "holdout": 20, "holdout_pgd_steps": 1,
         "loader_workers": 0, "unsup_fraction": 0.0, "crop_pad": 2, "flip": True}


@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_model_dir, ray_local):
    """180 real digits, 6 stored views per image made by extract-features for crop pad 2 with flips."""
    from conftest import run_cli
    tmp = tmp_path_factory.mktemp("targets")
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump({
        "root": str(tmp / "ws"), "data": {"shard_size": 64, "test_fraction": 0.9},
        "model": {"spec": f"dra:{tiny_model_dir}"},
        "features": {"views": 6, "layer": "dec.4x4_in1"}, "train": TRAIN, "ray": {"cpu_actors": 1}}))
    run_cli("import", "digits", "-c", tmp / "pipeline.yaml")
    run_cli("extract-features", "--images", "digits-train", "-c", tmp / "pipeline.yaml")
    import io

    from rich.console import Console

    from pipeline.bench.targets import bench_targets
    from pipeline.config import load_config
    text = io.StringIO()
    result = bench_targets(load_config(tmp / "pipeline.yaml"), Console(file=text, width=200), images=64, steps=2)
    return result, text.getvalue()


def test_stored_views_are_exact_and_the_shift_is_not(measured, one_thread):
    r, _ = measured
    e = r["errors"]
    assert e["stored views"] <= 0.01                          # float16 rounding only
    assert e["online"] < 1e-6                                # the reference against itself
    assert e["whole-cell shift"] > 10 * e["stored views"] and e["unaugmented target"] > 0.05
    assert 0 < e["shift kept cells"] <= 1 and r["views"] == 6 and r["images"] == 64


def test_step_ratios_and_the_last_line(measured):
    r, text = measured
    assert set(r["steps"]) == {"DM-AT", "views", "online", "shifted"} and r["steps"]["DM-AT"]["ratio"] == 1
    assert all(v["seconds"] > 0 for v in r["steps"].values())
    last = text.strip().splitlines()[-1]
    assert last == (f"target error under the training augmentation: stored views {r['errors']['stored views']:.4f}, "
                    f"whole-cell shift {r['errors']['whole-cell shift']:.4f}")
