"""`import imagenet64`: Downsampled-ImageNet 64x64 pickles into image sets (labels 1-based -> 0-based, channel-planar
rows -> HWC), damaged files exit 1, wrong input exits 2."""
import pickle

import numpy as np

from stores.images import ImageSet

TRAIN = [f"train_data_batch_{i}" for i in range(1, 11)]


def make_batches(folder, per_batch=3, val=4, seed=0):
    """Tiny batches in the published layout; returns {file: (rows, 1-based labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, n in [(f, per_batch) for f in TRAIN] + [("val_data", val)]:
        rows = rng.integers(0, 256, (n, 12288), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(1, 1001, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": labels, "mean": rows.mean(0)}, f)
        made[name] = (rows, labels)
    return made


def test_imagenet64_batches_import_pixel_by_pixel(cli, tmp_path):
    made = make_batches(tmp_path / "in64")
    code, out, err = cli("import", "imagenet64", "--from", tmp_path / "in64", "--shard-size", "7")
    assert code == 0, err
    train = ImageSet.open(tmp_path / "dra-data", "imagenet64-train")
    val = ImageSet.open(tmp_path / "dra-data", "imagenet64-val")
    assert (train.n, val.n, train.resolution, train.channels, train.classes) == (30, 4, 64, 3, 1000)
    got = train.read_range(0, 30)
    rows = np.concatenate([made[f][0] for f in TRAIN])
    labels = sum((made[f][1] for f in TRAIN), [])
    for i in (0, 4, 29):                                          # sample i, pixel (y, x), channel c
        for y, x, c in ((0, 0, 0), (5, 63, 2), (63, 17, 1)):
            assert got.images[i, y, x, c] == rows[i, c * 4096 + y * 64 + x]
    assert np.array_equal(got.labels, np.array(labels) - 1)
    assert np.array_equal(val.read_range(0, 4).labels, np.array(made["val_data"][1]) - 1)
    code, out, _ = cli("import", "imagenet64", "--from", tmp_path / "in64", "--shard-size", "7")
    assert code == 0 and "already imported: imagenet64-train" in out


def one_line(err):
    return len(err.strip().splitlines()) == 1


def test_imagenet64_wrong_input_exits_2(cli, tmp_path):
    make_batches(tmp_path / "in64")
    (tmp_path / "in64" / "train_data_batch_7").unlink()
    code, _, err = cli("import", "imagenet64", "--from", tmp_path / "in64")
    assert code == 2 and one_line(err) and "train_data_batch_7" in err
    code, _, err = cli("import", "imagenet64", "--from", tmp_path / "in64" / "val_data")
    assert code == 2 and one_line(err) and "folder" in err


def test_imagenet64_damaged_or_hostile_batch_exits_1(cli, tmp_path):
    folder = tmp_path / "in64"
    make_batches(folder)
    (folder / "val_data").write_bytes((folder / "val_data").read_bytes()[:100])          # truncated
    code, _, err = cli("import", "imagenet64", "--from", folder)
    assert code == 1 and one_line(err) and "val_data" in err
    make_batches(folder)

    class Hostile:
        def __reduce__(self):
            return (print, ("executed",))
    with open(folder / "train_data_batch_2", "wb") as f:
        pickle.dump({"data": Hostile(), "labels": [1]}, f)
    code, out, err = cli("import", "imagenet64", "--from", folder)
    assert code == 1 and one_line(err) and "refusing global" in err and "executed" not in out
    make_batches(folder)
    with open(folder / "train_data_batch_3", "wb") as f:                                # 32x32 rows, float labels
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}, f)
    code, _, err = cli("import", "imagenet64", "--from", folder)
    assert code == 1 and one_line(err) and "12288" in err
    make_batches(folder)
    with open(folder / "train_data_batch_4", "wb") as f:                                # label 0: not 1-based
        pickle.dump({"data": np.zeros((2, 12288), np.uint8), "labels": [0, 2]}, f)
    code, _, err = cli("import", "imagenet64", "--from", folder)
    assert code == 1 and one_line(err) and "outside 1..1000" in err
    assert not (tmp_path / "dra-data" / "images").exists() or not list((tmp_path / "dra-data" / "images").iterdir())
