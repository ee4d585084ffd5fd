"""`dra-pipe bench targets`: stored views and the online teacher inside the training step match the true target of
the augmented image; the shift does not; the printed step ratios and times are paired by round."""
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
        "model": {"spec": f"dra:{tiny_model_dir}"}, "features": {"views": 6, "layer": "dec.4x4_in1"}, "train": TRAIN,
        "ray": {"cpu_actors": 1}}))
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
    assert e["whole-cell shift"] > 10 * e["stored views"] and e["unaugmented target"] > 0.05
    assert 0 < e["shift kept cells"] <= 1 and r["views"] == 6 and r["images"] == 64


def test_the_online_teacher_inside_the_step_gives_the_true_target(measured):
    """The targets the online teacher handed the real training step equal their recomputation from the frozen model
    (the image read by id, the crop/flip the step's generator drew, the cache's noise); the classifier saw that very
    augmented image. A step whose teacher saw the un-augmented image, or keyed its noise otherwise, fails here."""
    r, _ = measured
    check = r["online check"]
    assert r["errors"]["online"] < 1e-5 and check["image max diff"] == 0.0
    assert check["rows"] >= r["images"] and check["steps"] == -(-check["rows"] // TRAIN["batch_size"])


def test_step_ratios_and_their_times_are_paired(measured):
    """Every printed ratio is one round's: that round's two times, printed next to it, divide to it, and it is the
    (lower) median of the per-round ratios."""
    import re
    import statistics
    r, text = measured
    steps = r["steps"]
    assert set(steps) == {"DM-AT", "views", "online", "shifted"} and steps["DM-AT"]["ratio"] == 1
    base = steps["DM-AT"]["times"]
    assert len(base) == 2
    for name, v in steps.items():
        ratios = [a / b for a, b in zip(v["times"], base)]
        assert v["ratio"] == statistics.median_low(ratios) == ratios[v["round"]] == v["seconds"] / v["dmat_seconds"]
        assert (v["seconds"], v["dmat_seconds"]) == (v["times"][v["round"]], base[v["round"]]) and v["seconds"] > 0
        if name == "DM-AT":
            continue
        row = re.search(rf"step {name} / DM-AT[\s│]+([\d.]+) = ([\d,.]+) ms / ([\d,.]+) ms \(round (\d+)\)", text)
        assert row, text
        ratio, ms, dmat_ms = (float(g.replace(",", "")) for g in row.groups()[:3])
        assert ratio == round(v["ratio"], 3) and int(row.group(4)) == v["round"] + 1
        assert abs(ms / dmat_ms - ratio) <= 5e-4 + ratio * (0.05 / ms + 0.05 / dmat_ms)   # printed rounding only
    assert "ms" not in text.split("step DM-AT")[1].splitlines()[0]          # no unpaired DM-AT time to compare with
    assert "step ratios paired by round: in each of 2 rounds" in " ".join(text.split())


def test_the_last_line(measured):
    r, text = measured
    last = text.strip().splitlines()[-1]
    assert last == (f"target error under the training augmentation: stored views {r['errors']['stored views']:.4f}, "
                    f"whole-cell shift {r['errors']['whole-cell shift']:.4f}")
