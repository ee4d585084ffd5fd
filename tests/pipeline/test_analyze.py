"""`dra-pipe analyze` end to end on a small real workspace (digits, a tiny EDM teacher, a DRA run and its DRA-off
twin, evaluated): every measure lands in analysis.json with its figures, `report` shows them, a rerun is a no-op,
a changed setting recomputes only what it changes, the same inputs give the same bytes, and every analyze key acts."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

RUNS = ("small-cnn-nodra-0", "small-cnn-dra-0")
ANALYZE = {"n_train": 192, "n_test": 48, "timesteps": [25, 100], "probe_epochs": 4, "sae_epochs": 3,
           "batch_size": 64}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir, ray_local, one_thread_for_module):
    """import digits -> extract-features -> train (DRA off and on, 1 epoch) -> eval -> analyze -> report."""
    from conftest import run_cli
    tmp = tmp_path_factory.mktemp("analyze")
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump({
        "root": str(tmp / "ws"), "data": {"shard_size": 512}, "model": {"spec": f"dra:{tiny_model_dir}"},
        "features": {"batch_size": 256},
        "train": {"epochs": 1, "batch_size": 128, "unsup_fraction": 0.0, "attack_steps": 2, "holdout": 32,
                  "holdout_pgd_steps": 2, "dra_hidden": 16},
        "eval": {"n": 48, "pgd_steps": 3, "autoattack": False, "rank_n": 48},
        "analyze": ANALYZE, "ray": {"cpu_actors": 1, "num_cpus": 2},
        "run": {"stages": ["import", "extract-features", "train", "eval", "analyze", "report"], "parallel": False}}))
    run_cli("run", "-c", tmp / "pipeline.yaml")
    return tmp


def _analysis(ws, run: str) -> dict:
    return json.loads((ws / "ws" / "runs" / run / "analysis.json").read_bytes())


def _stamps(ws) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for run in RUNS
            for p in (ws / "ws" / "runs" / run).rglob("*") if p.is_file() and p.name != ".lock"}


def test_every_measure_with_its_figures_and_the_report(workspace):
    for run in RUNS:
        entries = _analysis(workspace, run)["entries"]
        assert sorted(entries) == sorted(["rank", "dimension", "sae", "align-uniform", "saliency",
                                          "teacher-probe/references", "teacher-probe/t25/dec.4x4_in1",
                                          "teacher-probe/t100/dec.4x4_in1", *(k for k in entries if k[:4] == "cka/")])
        cka = next(v["result"] for k, v in entries.items() if k.startswith("cka/"))
        assert 0 <= cka["cka"] <= 1 and (cka["dra_cosine"] is None) == (run == RUNS[0])
        refs = entries["teacher-probe/references"]["result"]
        assert refs["clean"]["name"].startswith("clean-small-cnn-nodra-s0-") and 0 <= refs["run"]["robust"] <= 1
        probe = entries["teacher-probe/t25/dec.4x4_in1"]["result"]
        assert probe["images"] == 48 and 0 <= probe["robust"] <= probe["clean"] <= 1
        figures = workspace / "ws" / "runs" / run / "figures"
        for name in ("spectrum.png", "dimension.png", "saliency.png", "teacher_probe.png"):
            assert (figures / name).read_bytes()[:4] == b"\x89PNG"
    report = json.loads(next((workspace / "ws" / "reports").glob("*/report.json")).read_bytes())
    assert [row["run"] for row in report["analysis"]] == list(RUNS) and "CKA" in report["analysis"][0]
    assert all(r["representation"]["source"] == "analysis.json" for r in report["runs"])


def test_probe_points_are_shared_and_the_clean_reference_is_one_run(workspace):
    a, b = (_analysis(workspace, run)["entries"] for run in RUNS)
    assert a["teacher-probe/t100/dec.4x4_in1"] == b["teacher-probe/t100/dec.4x4_in1"]    # the teacher's, not the run's
    clean = {p.name for p in (workspace / "ws" / "runs").iterdir() if p.name.startswith("clean-")}
    assert len(clean) == 1 and (workspace / "ws" / "runs" / clean.pop() / "final.pt").exists()


def test_rerun_is_a_noop_and_a_new_timestep_computes_only_its_point(cli, workspace):
    before = _stamps(workspace)
    code, out, err = cli("analyze", "-c", workspace / "pipeline.yaml")
    assert code == 0, err
    assert _stamps(workspace) == before and "cached" in out
    code, out, err = cli("analyze", *RUNS, "--timestep", "25", "--timestep", "100", "--timestep", "200",
                         "-c", workspace / "pipeline.yaml")
    assert code == 0, err
    computed = [line.split(": ", 1)[1].split(" (")[0] for line in out.splitlines() if line.endswith(" s)")]
    assert computed == ["teacher-probe/t200/dec.4x4_in1"]              # once: the second run reuses the point
    assert out.count("teacher-probe/t200/dec.4x4_in1 (the same as for") == 1
    assert "teacher-probe/t200/dec.4x4_in1" in _analysis(workspace, RUNS[1])["entries"]


def test_same_inputs_give_the_same_analysis(cli, workspace):
    path = workspace / "ws" / "runs" / RUNS[1] / "analysis.json"
    args = ("analyze", RUNS[1], "--timestep", "25", "--timestep", "100", "--timestep", "200",
            "-c", workspace / "pipeline.yaml")
    assert cli(*args)[0] == 0
    first = path.read_bytes()
    path.unlink()
    code, _, err = cli(*args)
    assert code == 0, err
    assert path.read_bytes() == first


def test_an_unknown_teacher_layer_is_one_line_and_changes_nothing(cli, workspace):
    before = _stamps(workspace)
    code, _, err = cli("analyze", RUNS[0], "--layer", "dec.9x9_nope", "-c", workspace / "pipeline.yaml")
    assert code == 2 and err.count("\n") == 1 and "unknown teacher layer(s) dec.9x9_nope" in err, err
    assert _stamps(workspace) == before


# which entries each analyze key moves (the others must keep their cache key)
PER_RUN = {"rank", "dimension", "sae", "align-uniform", "saliency", "cka", "references"}
PROBES = {"t25", "t100"}
ACTS = [("probe_pool", "global", PROBES), ("probe_labels", "true", PROBES), ("probe_epochs", 2, PROBES | {"dimension"}),
        ("probe_lr", 0.1, PROBES | {"dimension"}), ("n_train", 128, PER_RUN | PROBES),
        ("n_test", 32, PER_RUN | PROBES), ("batch_size", 32, PROBES | {"dimension", "sae"}),
        ("seed", 1, PROBES | {"dimension", "sae", "align-uniform"}), ("sae_expansion", 2, {"sae"}),
        ("sae_k", 4, {"sae"}), ("sae_epochs", 5, {"sae"}), ("dimension_target", 0.9, {"dimension"}),
        ("pair_crop_pad", 0, {"align-uniform"}), ("ridge", 0.5, {"cka"}),
        ("timesteps", (25, 400), {"t100", "t400"}), ("layers", ("enc.8x8_block0",), PROBES | {"t25e", "t100e"}),
        ("measures", ("rank",), (PER_RUN | PROBES) - {"rank"})]


def _keys(cfg, s) -> dict:
    from pipeline.analyze import entries, prepare
    ctx = prepare(cfg, RUNS[1], s, [])
    return {_short(e.name): e.key for e in entries(ctx)}


def _short(name: str) -> str:
    """rank, cka, references, t25, t25e (a probe point at an enc.* layer)."""
    parts = name.split("/")
    if parts[0] == "teacher-probe":
        return parts[1] + ("e" if "enc." in name else "")
    return parts[0]


@pytest.mark.parametrize("key, value, moved", ACTS, ids=[a[0] for a in ACTS])
def test_every_analyze_key_acts_on_what_it_should_only(workspace, key, value, moved):
    from pipeline.analyze_data import AnalyzeSettings
    from pipeline.config import load_config
    cfg = load_config(workspace / "pipeline.yaml")
    base = AnalyzeSettings.from_config(cfg.analyze)
    before, after = _keys(cfg, base), _keys(cfg, replace(base, **{key: value}))
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == moved


def test_the_teacher_reproduces_the_cached_targets(workspace):
    """The differentiable teacher the probe and CKA attack and read computes what extract-features stored: the
    same eps per (image set, id), to float16 rounding."""
    import numpy as np
    import torch

    from pipeline.analyze_data import cached_target_batches, tap_of, teacher_model
    from stores.features import FeatureSet, list_feature_sets
    from stores.images import ImageSet
    fs = FeatureSet(list_feature_sets(workspace / "ws")[0])
    train = ImageSet.open(workspace / "ws", "digits-train")
    tap = tap_of(fs, workspace / "ws")
    ids, x, y, cached = next(cached_target_batches(train, fs, 16, 16))
    x.requires_grad_(True)
    fresh = teacher_model({}, tap).features(x, ids, y, train.fingerprint, tap.layer, tap.timestep, tap.sigma, tap.pool)
    assert np.allclose(fresh.detach().numpy(), cached.numpy(), rtol=2e-3, atol=2e-3)
    grad, = torch.autograd.grad(fresh.sum(), [x])
    assert grad.abs().sum() > 0                                       # differentiable in the image
