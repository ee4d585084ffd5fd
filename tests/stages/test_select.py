"""`dra-pipe select`: DM-AT's top fraction per class by a classifier's confidence, on a tiny generated set."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from evalruns import fit_small_cnn, save_run
from trainsets import image_set

from stages.select import choose, kept_count
from stores.images import ImageSet
from stores.manifest import write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

N, SHARD = 150, 32


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    train = image_set(root, "digits-train", "real", 256, 64, seed=1)
    gen = image_set(root, "digits-gen", "generated", N, SHARD, seed=3)
    model = fit_small_cnn(train, steps=20)
    save_run(root, "scorer", model, 0.05, dra=False, unsup_fraction=0.0)
    (tmp_path / "pipeline.yaml").write_text(f"root: {root}\n")
    return {"root": root, "gen": gen, "model": model}


def own_class_confidence(model, images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    data = images.read_range(0, images.n)
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    return p[torch.arange(len(x)), torch.from_numpy(data.labels)].numpy(), data.labels


def test_keeps_the_most_confident_fraction_of_each_class_with_their_bytes(cli, ws):
    code, out, err = cli("select", "--scorer", "scorer", "--fraction", "0.5")
    assert code == 0, err
    scores, labels = own_class_confidence(ws["model"], ws["gen"])
    sizes = np.bincount(labels, minlength=10)
    picked = ImageSet.open(ws["root"], "digits-gen-top50")
    assert picked.complete and picked.n == kept_count(sizes, 0.5).sum() and picked.identity["kind"] == "generated"
    table = pq.read_table(picked.path / "selection.parquet").to_pydict()
    source_ids = np.array(table["source_id"])
    assert table["id"] == list(range(picked.n)) and np.all(np.diff(source_ids) > 0)
    for c in range(10):                                   # every kept score beats every dropped one of its class
        members = labels == c
        kept = np.zeros(N, bool)
        kept[source_ids] = True
        if kept[members].any() and (~kept[members]).any():
            assert scores[members & kept].min() >= scores[members & ~kept].max() - 1e-6
    assert np.allclose(table["score"], scores[source_ids], atol=1e-6)
    source, got = ws["gen"].read_range(0, N), picked.read_range(0, picked.n)
    assert (np.array_equal(got.images, source.images[source_ids])
            and np.array_equal(got.labels, source.labels[source_ids]))
    assert "selected" in out and "images/s" in out
    code, out, _ = cli("select", "--scorer", "scorer", "--fraction", "0.5")
    assert code == 0 and "nothing to do" in out


def test_resume_reuses_scores_and_redoes_only_missing_shards(cli, ws, monkeypatch):
    assert cli("select", "--scorer", "scorer", "--fraction", "0.6", "--out", "top")[0] == 0
    picked = ImageSet.open(ws["root"], "top")
    before = {i: (picked.path / f"shard-{i:06d}.tar").read_bytes() for i in picked.records}
    write_manifest(picked.path, {i: r for i, r in picked.records.items() if i != 1})     # as if killed mid-way
    (picked.path / "shard-000001.tar").unlink()

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")
    monkeypatch.setattr("stages.select.score_set", no_scoring)
    code, out, err = cli("select", "--scorer", "scorer", "--fraction", "0.6", "--out", "top")
    assert code == 0, err
    assert "cached from an earlier run" in out
    again = ImageSet.open(ws["root"], "top")
    assert again.complete and {i: (again.path / f"shard-{i:06d}.tar").read_bytes() for i in again.records} == before


def test_choose_breaks_ties_by_id_and_keeps_floor_of_each_class():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1, 0.7], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1])
    assert choose(scores, labels, 2, 0.5).tolist() == [0, 1, 5]         # class 0 keeps 2 of 4 (0.9, the first 0.5)
    assert kept_count(np.array([500_000]), 0.2).tolist() == [100_000]


@pytest.mark.parametrize("args, needle", [
    (["--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["--scorer", "nope"], "no run nope"),
    (["--scorer", "scorer", "missing-set"], "no image set missing-set"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, ws, args, needle):
    base = ["select"] + ([] if "--scorer" in args else ["--scorer", "scorer"])
    code, _, err = cli(*base, *args)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (ws["root"] / "images").iterdir()) == ["digits-gen", "digits-train"]


def test_scorer_of_other_classes_and_clashing_output_are_refused(cli, ws):
    four = image_set(ws["root"], "four-train", "real", 64, 64, classes=4, seed=4)
    save_run(ws["root"], "four", fit_small_cnn(four, steps=5), 0.05, dra=False, unsup_fraction=0.0)
    code, _, err = cli("select", "--scorer", "four")
    assert code == 2 and "classifier predicts 4 classes" in err
    assert cli("select", "--scorer", "scorer", "--fraction", "0.5", "--out", "picked")[0] == 0
    code, _, err = cli("select", "--scorer", "scorer", "--fraction", "0.4", "--out", "picked")
    assert code == 2 and "already exists with another identity" in err


def test_the_trainer_streams_the_selected_set_when_told(cli, ws, tmp_path):
    from pipeline.config import load_config
    from pipeline.plans.train import make_job
    assert cli("select", "--scorer", "scorer", "--fraction", "0.5", "--out", "picked")[0] == 0
    cfg = load_config(tmp_path / "pipeline.yaml", {"train.dra": False, "train.holdout": 32,
                                                          "train.generated_set": "picked"})
    job = make_job(cfg)
    assert job.generated.images.endswith("/picked") and job.generated.n == ImageSet.open(ws["root"], "picked").n
    assert make_job(load_config(tmp_path / "pipeline.yaml", {"train.dra": False, "train.holdout": 32})).generated.n == N
