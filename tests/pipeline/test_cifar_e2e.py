"""The real recipe's shape end to end at 32x32x3 through the CLI: a CIFAR-10 python tarball and DM-AT's generated
data as two .npz halves (both made here, random pixels) -> import both -> fit a tiny EDM -> extract-features with
2 views -> train with DRA on stored views -> eval with AutoAttack. pipeline.cifar10.yaml, shrunk, is the config."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import yaml
from conftest import REPO, make_cifar_tarball
from trainsets import npz_halves

from stores.features import FeatureSet, list_feature_sets
from stores.images import ImageSet

GENERATED = "cifar10-dmat"         # the config's generated-set name, written by import npz --generated


def shrunk_recipe(tmp_path, tarball) -> dict:
    """pipeline.cifar10.yaml with its sizes cut to seconds on a CPU; every other key as the recipe has it."""
    cfg = yaml.safe_load((REPO / "pipeline.cifar10.yaml").read_text())
    cfg["root"] = str(tmp_path / "ws")
    cfg["data"].update(source=str(tarball), shard_size=16)
    cfg["model"]["spec"] = "fit"                             # no official checkpoint here: fit a tiny EDM
    cfg["fit_diffusion"] = {"model_channels": 8, "channel_mult": [1, 2, 2], "num_blocks": 1, "batch_size": 16,
                            "duration_kimg": 0.032, "dropout": 0.0}
    cfg["generate"]["name"] = GENERATED
    cfg["features"].update(views=2, views_generated=2, batch_size=32)
    cfg["train"].update(arch="small-cnn", epochs=1, batch_size=8, unsup_fraction=0.5, attack_steps=2, holdout=8,
                        holdout_pgd_steps=2, dra_hidden=16, dra_depth=2, workers=1, loader_workers=0)
    cfg["eval"].update(n=4, pgd_steps=2, batch_size=4, device="cpu", rank_n=4)
    cfg["ray"] = {"num_cpus": 2, "cpu_actors": 1}
    return cfg


def dmat_halves(tmp_path) -> list[tuple]:
    """DM-AT's layout: `image` uint8 (N, 32, 32, 3) and `label` int; the second half deflated."""
    return npz_halves(tmp_path, (("20m_part1.npz", 40), ("20m_part2.npz", 24)), seed=7)


def test_cifar_recipe_end_to_end(cli, tmp_path, ray_local, one_thread):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_tarball(tarball, n_train=50, n_test=10)                  # 10 images per batch file
    halves = dmat_halves(tmp_path)
    (tmp_path / "c10.yaml").write_text(yaml.safe_dump(shrunk_recipe(tmp_path, tarball)))
    ws = tmp_path / "ws"

    def ok(*args):
        code, out, err = cli(*args, "-c", "c10.yaml")
        assert code == 0 and "Traceback" not in err, f"{args}: {err}"
        return out

    ok("import", "cifar10")                                               # data.source from the config
    real = ImageSet.open(ws, "cifar10-train")
    assert real.identity["kind"] == "real" and (real.n, real.resolution, real.channels, real.classes) == (50, 32, 3, 10)
    assert ImageSet.open(ws, "cifar10-test").n == 10

    args = [a for path, _, _ in halves for a in ("--from", path)]
    out = ok("import", "npz", "--generated", *args)
    assert f"imported generated set {GENERATED}: 64 samples" in out
    gen = ImageSet.open(ws, GENERATED)
    got = gen.read_range(0, gen.n)
    assert gen.identity["kind"] == "generated" and gen.n == 64 and np.array_equal(got.ids, np.arange(64))
    assert np.array_equal(got.images, np.concatenate([h[1] for h in halves]))
    assert gen.identity["source"]["format"] == "DM-AT npz"
    assert gen.identity["source"]["checksums"] == [hashlib.sha256(p.read_bytes()).hexdigest() for p, _, _ in halves]

    ok("fit-diffusion")
    assert len(list((ws / "models").glob("fit-*/model.safetensors"))) == 1

    ok("extract-features")
    feats = {FeatureSet(p).identity["image_set_name"]: FeatureSet(p) for p in list_feature_sets(ws)}
    assert sorted(feats) == sorted(["cifar10-train", GENERATED])        # the generated set found without naming it
    for name, n in (("cifar10-train", 50), (GENERATED, 64)):
        fs = feats[name]
        c, h, w = fs.shape
        assert fs.views == 2 and fs.identity["views"]["flip"] and fs.identity["views"]["pad"] == 4
        slab = fs.read_shard(0)
        assert slab["targets"].shape == slab["targets_v1"].shape == (16, c, h, w) and (h, w) == (8, 8)  # dec.8x8_in1
        assert sum(r.count for r in fs.records.values()) == n
        assert np.abs(slab["targets_v1"].astype(np.float32) - slab["targets"]).max() > 1e-3   # the mirror's own

    out = ok("train", "--name", "e2e")
    assert f"generated {GENERATED} 64 images" in out and "2 stored views per real image, 2 per generated" in out
    rows = [json.loads(line) for line in (ws / "runs" / "e2e" / "metrics.jsonl").read_text().splitlines()]
    epoch = rows[-1]
    assert epoch["epoch"] == 1 and math.isfinite(epoch["dra"]) and epoch["dra"] > 0 and math.isfinite(epoch["loss"])
    assert "pgd_acc" in epoch and "views_seen_real" in epoch
    run_config = yaml.safe_load((ws / "runs" / "e2e" / "config.yaml").read_text())
    assert run_config["train"]["dra"] and run_config["train"]["dra_targets"] == "views"

    ok("eval", "e2e")
    result = json.loads((ws / "runs" / "e2e" / "eval.json").read_text())
    assert result["n"] == 4 and result["autoattack_version"] == "standard" and "apgd-ce" in result["autoattack_log"][0]
    assert result["autoattack"] == result["counts"]["autoattack"] / 4
    assert 0 <= result["counts"]["autoattack"] <= result["counts"]["clean"]
