import json

import numpy as np
import pytest
import torch
from evalruns import make_workspace
from trainsets import image_set

from pipeline.config import defaults
from stores.images import ImageSet
from trainer.analysis.spectrum import effective_rank
from trainer.classifier_files import load_classifier
from trainer.evaluate import EvalSettings, penultimate_features, read_images
from trainer.report import mosaic, samples_per_class

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    torch.set_num_threads(1)
    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    evaluated = {"clean": 0.75, "pgd_ce": 0.5, "pgd_margin": 0.4375, "autoattack": 0.375, "n": 16}
    (ws["dra"].path / "eval.json").write_text(json.dumps(evaluated))
    return ws


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def test_report_writes_table_and_figures(cli, ws):
    code, out, err = cli("report", "tiny-dra", "tiny-big-eps", "--root", ws["root"])
    assert code == 0, err
    folder = ws["root"] / "reports" / "tiny-dra+tiny-big-eps"
    for path in (ws["dra"].path / "figures" / "curves.png", ws["dra"].path / "figures" / "samples.png",
                 ws["big"].path / "figures" / "curves.png", folder / "accuracy.png", folder / "effective_rank.png"):
        assert is_png(path), path
        assert str(path) in out
    assert not (ws["big"].path / "figures" / "samples.png").exists()     # trained on real data only
    assert "tiny-big-eps: trained without generated data" in out
    assert "tiny-big-eps: not evaluated yet" in out

    table = (folder / "table.md").read_text().splitlines()
    assert table[0].startswith("| run | arch | objective | DRA | lambda | timestep | data |")
    dra_row = next(line for line in table if line.startswith("| tiny-dra |"))
    lam = defaults()["train"]["dra_lambda"]                              # the tiny runs train at the default lambda
    assert f"| on | {lam:g} | 100 |" in dra_row and "digits-train + digits-gen (50% of each batch)" in dra_row
    assert "| 75.00% | 50.00% | 43.75% | 37.50% | 16 |" in dra_row
    big_row = next(line for line in table if line.startswith("| tiny-big-eps |"))
    assert "| off | - | - | digits-train | 3 | - | - | - | - | - |" in big_row

    report = json.loads((folder / "report.json").read_text())
    model, _ = load_classifier(ws["dra"].final)
    x, _ = read_images(ImageSet.open(ws["root"], "digits-test"), 0)
    expected = effective_rank(penultimate_features(model, x, 64, torch.device("cpu")))
    rep = report["runs"][0]["representation"]
    assert rep["erank"] == pytest.approx(expected) and rep["images"] == 48 and rep["dims"] == 64 and rep["dra"]
    assert 1 < expected < 64 and f"{expected:.2f}" in dra_row


def test_report_rank_n_and_missing_generated_set(cli, ws):
    gen_dir = ws["root"] / "images" / "digits-gen"
    gen_dir.rename(gen_dir.with_name("moved"))
    try:
        code, out, err = cli("report", "tiny-dra", "--root", ws["root"], "--rank-n", "20", "--out", ws["root"] / "r2")
    finally:
        gen_dir.with_name("moved").rename(gen_dir)
    assert code == 0, err
    assert "generated set digits-gen is not under" in out
    report = json.loads((ws["root"] / "r2" / "report.json").read_text())
    assert report["runs"][0]["representation"]["images"] == 20


def test_report_of_a_missing_run_is_one_line_exit_2(cli, ws):
    code, _, err = cli("report", "tiny-dra", "nope", "--root", ws["root"])
    assert code == 2 and err.startswith("error: no run nope under") and len(err.strip().splitlines()) == 1


def test_samples_per_class_takes_the_first_of_each_class_in_id_order(tmp_path):
    images = image_set(tmp_path, "g", "generated", 70, 16, classes=3, seed=5)
    found = samples_per_class(images, per_class=4)
    data = images.read_range(0, 70)
    for c in range(3):
        first = np.flatnonzero(data.labels == c)[:4]
        assert len(found[c]) == 4 and all(np.array_equal(a, data.images[i]) for a, i in zip(found[c], first))
    grid = mosaic(found, 4)
    assert grid.shape == (3 * 9, 4 * 9, 1) and np.array_equal(grid[9:17, 9:17], found[1][1])


def test_penultimate_features_leave_the_model_as_it_was(ws):
    model = ws["model"].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = penultimate_features(model, torch.rand(10, 1, 8, 8), 4, torch.device("cpu"))
    assert features.shape == (10, 64) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # no BN statistics moved
    model.eval()


def test_eval_settings_come_from_the_config():
    from pipeline.config import load_config
    s = EvalSettings.from_config(load_config(None, {"eval.rank_n": 7, "eval.pgd_steps": 4}).eval)
    assert s.rank_n == 7 and s.pgd_steps == 4 and s.step_size(0.2) == pytest.approx(0.125)


def test_eval_settings_cover_exactly_the_eval_section():
    """eval.json's `settings` equal the config's eval section (what `dra-pipe run` compares to reuse a result)."""
    from dataclasses import asdict

    from pipeline.config import load_config
    section = load_config(None).eval
    assert asdict(EvalSettings.from_config(section)) == dict(section)


def _info(name, seed, dra=True, lr=0.1, clean=0.9, aa=0.3):
    from trainer.report import RunInfo
    config = {"root": f"/ws{seed}", "run": {"seeds": [0, 1, 2]}, "eval": {"n": 0},
              "train": {"seed": seed, "dra": dra, "dra_lambda": 0.5, "lr": lr, "checkpoint_every": seed}}
    evaluated = {"clean": clean, "pgd_ce": 0.5, "pgd_margin": 0.4, "autoattack": aa, "n": 100}
    return RunInfo(name, None, config, [], {"arch": "small-cnn", "objective": "trades", "dra": dra}, evaluated)


def test_seed_summary_groups_runs_that_differ_only_in_seed():
    from trainer.report import seed_summary
    on = [_info(f"on-{s}", s, clean=c, aa=a) for s, c, a in ((0, 0.90, 0.30), (1, 0.92, 0.26), (2, 0.94, 0.31))]
    off = [_info(f"off-{s}", s, dra=False, clean=0.8 + s / 100) for s in (0, 1)]
    other_lr = _info("lr", 0, lr=0.2)                    # another setting: alone, so no summary row
    ranks = {i.name: {"erank": 10.0 + k} for k, i in enumerate(on)}
    rows = seed_summary([*on, *off, other_lr], ranks)
    assert [r[:2] for r in rows] == [("small-cnn trades, DRA on (lambda 0.5)", "0, 1, 2"),
                                     ("small-cnn trades, DRA off", "0, 1")]
    clean = np.array([0.90, 0.92, 0.94])
    assert rows[0][2] == f"{clean.mean():.2%} +- {clean.std(ddof=1):.2%}"
    assert rows[0][5] == f"{np.mean([0.30, 0.26, 0.31]):.2%} +- {np.std([0.30, 0.26, 0.31], ddof=1):.2%}"
    assert rows[0][6] == "11.00 +- 1.00"
    assert rows[1][6] == "-"                              # no effective rank for the DRA-off runs


def test_curves_put_the_counters_on_a_panel_of_their_own():
    """visits_real climbs past 16 over a run: on the loss axis it would flatten every loss curve."""
    from trainer.report import curve_panels
    rows = [{"epoch": e, "step": 4 * e, "lr": 0.1, "images_per_s": 500.0, "loss": 2.0 / e, "ce": 1.9 / e,
             "kl": 0.01, "dra": 0.5, "clean_acc": 0.5, "pgd_acc": 0.3, "visits_real": 0.6 * e,
             "visits_generated": 0.8 * e, "views_seen_real": 1.0} for e in range(1, 30)]
    panels = curve_panels(rows)
    assert panels["losses"] == ["ce", "dra", "kl", "loss"]
    assert panels["accuracy"] == ["clean_acc", "pgd_acc"]
    assert panels["counters"] == ["views_seen_real", "visits_generated", "visits_real"]
    assert curve_panels([{"epoch": 1, "loss": 1.0}])["counters"] == []
