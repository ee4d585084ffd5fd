"""ImageNet at 64x64 end to end through `dra-pipe run` (issue 25 item 4), on a fixture made here.

A folder of 10 synsets holds JPEGs of varied sizes and modes (and two files that cannot be read), its val split in
class folders. The teacher is an EDM pickle of a tiny ADM (`DhariwalUNet`, 10 classes, random weights) in the
official format. The run imports at 64x64, generates, extracts views at the ADM's 8x8 bottleneck, trains
`vit-b/4` with DRA for one epoch, evaluates it with AutoAttack on one validation image per class and reports (the
effective rank on the val split). A ViT-B is too
slow for 2 cores, so `vit-b/4` is built with the same class and patch at width 32, depth 2 (the registered entry is
put back after the test), as in test_vit_train.py.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from model_files import write_edm_pickle
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
from test_imagenet_folder import add_odd_files  # noqa: E402

from stages.edm.networks import EDMPrecond  # noqa: E402
from stores.features import FeatureSet, list_feature_sets
from stores.images import ImageSet
from trainer import architectures
from trainer.classifier_files import find_run, load_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

SYNSETS = [f"n0{1440764 + 97 * i}" for i in range(10)]
SIZES = [(80, 60), (50, 90), (64, 64), (120, 100)]
TINY_ADM = dict(img_resolution=64, img_channels=3, label_dim=10, model_type="DhariwalUNet", model_channels=16,
                channel_mult=[1, 2, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)


def make_folder(root):
    """train: 4 JPEGs per synset (sizes above), one greyscale, one CMYK, one PNG named .JPEG, one empty, one cut
    in half; val: 2 JPEGs per synset in class folders."""
    rng = np.random.default_rng(0)
    for k, synset in enumerate(SYNSETS):
        for split, sizes in (("train", SIZES), ("val", SIZES[:2])):
            folder = root / split / synset
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                tone = rng.integers(0, 256, (h, w, 3)) // 2 + 12 * k             # classes differ in brightness
                Image.fromarray(tone.astype(np.uint8)).save(folder / f"{synset}_{i}.JPEG")
    add_odd_files(root / "train" / SYNSETS[3], rng, f"{SYNSETS[3]}_0.JPEG")
    return root


def write_config(tmp_path, teacher):
    config = {
        "root": str(tmp_path / "ws"),
        "data": {"importer": "imagenet", "source": str(tmp_path / "ILSVRC2012"), "resolution": 64, "shard_size": 16},
        "model": {"spec": f"edm:{teacher}"},
        "generate": {"n": 10, "steps": 2, "batch_size": 10},
        "features": {"layer": "dec.8x8_in1", "views": 2, "views_generated": 1, "batch_size": 11},
        "train": {"arch": "vit-b/4", "epochs": 1, "batch_size": 16, "unsup_fraction": 0.25, "attack_steps": 1,
                  "epsilon": 4 / 255, "attack_step_size": 1 / 255, "crop_pad": 0, "flip": True, "dra_hidden": 16,
                  "holdout": 8, "holdout_pgd_steps": 1, "loader_workers": 0},
        "eval": {"n": 10, "subset": "per-class", "pgd_steps": 2, "batch_size": 10},
        "run": {"stages": ["import", "generate", "extract-features", "train", "eval", "report"], "compare_dra": False},
    }
    path = tmp_path / "imagenet64.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_vit_b4(monkeypatch):
    entry = architectures.ARCHITECTURES["vit-b/4"]
    monkeypatch.setitem(architectures.ARCHITECTURES, "vit-b/4",
                        dataclasses.replace(entry, options={"dim": 32, "depth": 2, "heads": 2, "patch": 4}))


def test_imagenet_64_from_jpeg_folder_to_autoattack(cli, tmp_path, ray_local, tiny_vit_b4):
    make_folder(tmp_path / "ILSVRC2012")
    torch.manual_seed(0)
    teacher = write_edm_pickle(tmp_path / "edm-tiny-adm.pkl", EDMPrecond(**TINY_ADM).eval())
    code, out, err = cli("run", "-c", write_config(tmp_path, teacher))
    assert code == 0, err[-2000:]
    ws = tmp_path / "ws"

    train, val = ImageSet.open(ws, "imagenet-train"), ImageSet.open(ws, "imagenet-val")
    assert (train.n, train.resolution, train.channels, train.classes) == (40 + 3, 64, 3, 10)   # + grey, cmyk, png
    assert len(train.identity["source"]["skipped"]) == 2 and train.identity["source"]["filter"] == "lanczos"
    assert (val.n, val.resolution) == (20, 64) and list(val.read_range(0, 20).labels) == sorted(list(range(10)) * 2)
    assert ImageSet.open(ws, "imagenet-gen").resolution == 64

    features = {FeatureSet(p).identity["image_set_name"]: FeatureSet(p) for p in list_feature_sets(ws)}
    assert set(features) == {"imagenet-train", "imagenet-gen"}
    assert features["imagenet-train"].shape == (32, 8, 8)             # the tiny ADM's 8x8 bottleneck
    assert (features["imagenet-train"].views, features["imagenet-gen"].views) == (2, 1)

    run = find_run(ws, "vit-b-4-dra-0")
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["dra"] > 0 and np.isfinite(rows[-1]["loss"])          # the DRA term was trained
    _, record = load_classifier(run.final)
    assert record["arch"] == "vit-b/4" and record["resolution"] == 64 and record["num_classes"] == 10
    assert record["threat_model"]["epsilon"] == pytest.approx(4 / 255)

    result = json.loads((run.path / "eval.json").read_text())
    assert result["test_set"]["name"] == "imagenet-val" and result["n"] == 10
    assert result["settings"]["subset"] == "per-class" and result["autoattack"] is not None
    assert result["autoattack"] <= result["clean"]

    report = json.loads((ws / "reports" / "vit-b-4-dra-0" / "report.json").read_text())
    assert "imagenet-val" in json.dumps(report)                # the effective rank on ImageNet's val split


def test_data_resolution_sets_the_import_size(cli, tmp_path, ray_local):
    make_folder(tmp_path / "ILSVRC2012")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"root": str(tmp_path / "ws"), "data": {
        "importer": "imagenet", "source": str(tmp_path / "ILSVRC2012"), "resolution": 24}}))
    code, _, err = cli("import", "imagenet", "-c", config)
    assert code == 0, err
    assert ImageSet.open(tmp_path / "ws", "imagenet-train").resolution == 24
    code, _, err = cli("import", "imagenet", "-c", config, "--resolution", "12", "--name", "small")
    assert code == 0, err
    assert ImageSet.open(tmp_path / "ws", "small-val").resolution == 12
