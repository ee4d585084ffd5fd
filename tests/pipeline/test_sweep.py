"""dra-pipe sweep: the grid's cells x seeds, one extraction per teacher, one training per identity, a no-op rerun."""
from __future__ import annotations

import json

import pytest
import yaml

from stores.features import list_feature_sets


def _config(tmp_path, model_dir) -> None:
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "root": str(tmp_path / "ws"),
        "data": {"shard_size": 512},
        "model": {"spec": f"dra:{model_dir}"},
        "generate": {"n": 256, "steps": 4, "batch_size": 128},
        "features": {"batch_size": 256},
        "train": {"epochs": 1, "batch_size": 128, "attack_steps": 2, "holdout": 32, "holdout_pgd_steps": 2,
                  "dra_hidden": 16},
        "eval": {"n": 40, "pgd_steps": 2, "autoattack": False},
        "ray": {"cpu_actors": 1, "num_cpus": 2},
        "run": {"stages": ["import", "generate", "extract-features", "train", "eval", "report"]}}))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model_dir, ray_local):
    """One real sweep, lambda {0, 0.5} x timestep {25, 100} x seeds {0, 1}, run twice."""
    from conftest import run_cli
    tmp = tmp_path_factory.mktemp("sweep")
    _config(tmp, tiny_model_dir)
    snapshots = []
    for _ in range(2):
        run_cli("sweep", "train.dra_lambda=0,0.5", "features.timesteps=25,100", "--seeds", "0,1", "--name", "grid",
                "-c", tmp / "pipeline.yaml")
        snapshots.append({p.name: (p / "final.pt").stat().st_mtime_ns for p in (tmp / "ws" / "runs").iterdir()})
    return tmp, snapshots


def test_each_cell_once_per_seed_and_each_training_once(swept):
    tmp, (runs, _) = swept
    results = json.loads((tmp / "ws" / "sweeps" / "grid" / "results.json").read_text())
    cells = results["cells"]
    assert [(c["cell"]["train.dra_lambda"], c["cell"]["features.timesteps"]) for c in cells] == \
        [(0.0, [25]), (0.0, [100]), (0.5, [25]), (0.5, [100])]
    assert all(len(c["runs"]) == 2 for c in cells)
    assert cells[0]["runs"] == cells[1]["runs"]                  # lambda 0 is one training, whatever the timestep
    assert len(set(cells[2]["runs"]) | set(cells[3]["runs"])) == 4
    assert len(runs) == 6 and set(runs) == {r for c in cells for r in c["runs"]}
    assert all("-nodra-" in r for r in cells[0]["runs"]) and all("-dra-" in r for r in cells[2]["runs"])
    stats = cells[2]["stats"]
    assert len(stats["clean"]["values"]) == 2 and stats["autoattack"] is None and stats["erank"]["mean"] > 1


def test_extraction_once_per_teacher(swept):
    tmp, _ = swept
    sets = list_feature_sets(tmp / "ws")
    timesteps = sorted(json.loads((p / "meta.json").read_text())["identity"]["timestep"] for p in sets)
    assert timesteps == [25, 25, 100, 100]                        # real + generated set, per timestep, once


def test_outputs_and_rerun_is_a_noop(swept):
    tmp, (first, second) = swept
    out = tmp / "ws" / "sweeps" / "grid"
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 5 and "train.dra_lambda" in table and "+-" in table   # header + 4 cells
    assert (out / "robust_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    lam = [e for e in results["effects"] if e["axis"] == "train.dra_lambda" and e["metric"] == "clean"]
    assert len(lam) == 2 and {e["context"]["features.timesteps"][0] for e in lam} == {25, 100}
    assert len(results["interactions"]) >= 1 and "paired" in (out / "effects.md").read_text().lower()
    assert second == first                                         # the second sweep trained nothing


def test_trackers_group_the_runs_by_sweep_and_cell(swept):
    """TensorBoard's HParams tab filters by sweep and cell; every run also holds its evaluation's numbers."""
    from trackerfiles import hparams, scalars

    from pipeline.sweep import label
    tmp, _ = swept
    cells = json.loads((tmp / "ws" / "sweeps" / "grid" / "results.json").read_text())["cells"]
    for cell in cells[2:]:                                         # runs of their own (lambda 0 is shared)
        for run in cell["runs"]:
            tb = tmp / "ws" / "runs" / run / "tb"
            session = hparams(tb / "hparams")
            parts = set(label(cell["cell"]).split(", "))                  # results.json sorts the cell's keys
            assert session["sweep"] == "grid" and set(session["cell"].split(", ")) == parts, run
            assert "eval/pgd_ce" in scalars(tb) and "hparam/eval/pgd_ce" in scalars(tb / "hparams")


def test_a_generate_axis_gives_each_cell_its_own_generated_set(tmp_path, tiny_model_dir, ray_local):
    """generate.steps=3,4 (the base has 4): the 4-step cell keeps the base's set, the 3-step one gets digits-gen-3,
    and each trains on its own images (issue 27's sampler sweep)."""
    from conftest import run_cli

    from stores.images import ImageSet
    _config(tmp_path, tiny_model_dir)
    run_cli("sweep", "generate.steps=3,4", "train.dra=false", "--seeds", "0", "--name", "nfe",
            "-c", tmp_path / "pipeline.yaml")
    ws = tmp_path / "ws"
    four, three = ImageSet.open(ws, "digits-gen"), ImageSet.open(ws, "digits-gen-3")
    assert (four.identity["source"]["steps"], three.identity["source"]["steps"]) == (4, 3)
    cells = json.loads((ws / "sweeps" / "nfe" / "results.json").read_text())["cells"]
    trained_on = [json.loads((ws / "runs" / c["runs"][0] / "run.json").read_text())["identity"]["generated"]
                  for c in cells]
    assert trained_on == [three.fingerprint, four.fingerprint]


@pytest.mark.parametrize("axis, needle", [("train.nokey=1", "unknown configuration key 'train.nokey'"),
                                          ("train.dra_lambda", "write KEY=V1,V2"),
                                          ("train.epochs=2,x", "key 'train.epochs'"),
                                          ("train.dra_lambda=0,0", "listed twice"),
                                          ("train.seed=1,2", "--seeds")])
def test_bad_axes_one_line_nothing_written(cli, tmp_path, axis, needle):
    code, _, err = cli("sweep", axis)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "dra-data").exists()


def test_table_carries_the_analysis_measures_as_mean_and_std():
    """Cells analysed (`analyze` in run.stages) add a column per headline measure; measures nobody took add none."""
    from pipeline.sweep import Axis, markdown, summarise
    stats = {"clean": summarise([0.9, 0.8]), "pgd_ce": None, "pgd_margin": None, "autoattack": None,
             "erank": summarise([30.0, 32.0]), "cka": summarise([0.2, 0.4]), "probe_robust": summarise([0.05, 0.07]),
             "sae_nmse": None}
    table = markdown([Axis("train.dra_lambda", (0.0, 0.1))], [{"cell": {"train.dra_lambda": 0.1}, "seeds": [0, 1],
                                                                "stats": stats}], "dra-pipe sweep")
    header, _, row = table.splitlines()[2:5]
    assert header.endswith("| eff. rank | CKA | probe robust |") and "SAE nmse" not in header
    assert row.endswith("| 31.00 +- 1.41 | 0.300 +- 0.141 | 6.00% +- 1.41% |")


def _row(cell: dict, clean: list[float], rank: list[float]) -> dict:
    from pipeline.sweep import summarise
    return {"cell": cell, "seeds": [0, 1, 2], "stats": {"clean": summarise(clean), "erank": summarise(rank)}}


def test_paired_effects_are_per_seed_differences_with_a_paired_t():
    """A 2x2 grid with hand-made numbers: the effect of lambda is per seed (second minus first), at each setting
    of the other axis, and its t and p are the paired t test's; the interaction is the difference of effects."""
    from scipy.stats import ttest_rel

    from pipeline.sweep import Axis
    from pipeline.sweep_effects import effects_markdown, interactions, main_effects
    axes = [Axis("train.dra_lambda", (0.0, 0.1)), Axis("train.unsup_fraction", (0.0, 0.5))]
    rows = [_row({"train.dra_lambda": 0.0, "train.unsup_fraction": 0.0}, [0.50, 0.60, 0.70], [30, 31, 32]),
            _row({"train.dra_lambda": 0.1, "train.unsup_fraction": 0.0}, [0.52, 0.61, 0.74], [33, 33, 35]),
            _row({"train.dra_lambda": 0.0, "train.unsup_fraction": 0.5}, [0.55, 0.65, 0.70], [20, 22, 21]),
            _row({"train.dra_lambda": 0.1, "train.unsup_fraction": 0.5}, [0.55, 0.70, 0.71], [24, 25, 23])]
    effects = main_effects(axes, rows, ["clean", "erank"])
    lam = next(e for e in effects if e["axis"] == "train.dra_lambda" and e["metric"] == "clean"
               and e["context"] == {"train.unsup_fraction": 0.0})
    assert lam["differences"] == pytest.approx([0.02, 0.01, 0.04]) and lam["agreeing"] == 3
    reference = ttest_rel([0.52, 0.61, 0.74], [0.50, 0.60, 0.70])
    assert lam["t"] == pytest.approx(reference.statistic) and lam["p"] == pytest.approx(reference.pvalue)
    synthetic_rank = next(e for e in effects if e["axis"] == "train.unsup_fraction" and e["metric"] == "erank"
                          and e["context"] == {"train.dra_lambda": 0.0})
    assert synthetic_rank["differences"] == pytest.approx([-10, -9, -11]) and synthetic_rank["t"] < 0
    assert len(effects) == 8                                       # 2 axes x 2 contexts x 2 measures
    crossed = {e["metric"]: e for e in interactions(axes, rows, ["clean", "erank"])}
    assert crossed["clean"]["differences"] == pytest.approx([0.0 - 0.02, 0.05 - 0.01, 0.01 - 0.04])
    text = effects_markdown(effects, list(crossed.values()), {"clean"}, {"erank": "eff. rank"})
    assert "| train.dra_lambda: 0.0 -> 0.1 (at train.unsup_fraction=0.0) | clean | +2.33 pt |" in text
    assert "eff. rank" in text and "Interaction" in text
