
import numpy as np
import pytest
from conftest import make_cifar_tarball
from PIL import Image
from trainsets import npz_halves

from stores.images import ImageSet


def sets_under(root):
    base = root / "images"
    return sorted(p.name for p in base.iterdir()) if base.exists() else []


def test_digits_import_then_noop(cli, tmp_path):
    code, out, _ = cli("import", "digits", "--shard-size", "500")
    assert code == 0 and "imported digits-train: 1438 samples in 3 shards" in out
    train = ImageSet.open(tmp_path / "dra-data", "digits-train")
    test = ImageSet.open(tmp_path / "dra-data", "digits-test")
    assert (train.n, test.n, train.resolution, train.channels, train.classes) == (1438, 359, 8, 1, 10)
    from sklearn.datasets import load_digits
    d = load_digits()
    images = train.read_range(0, train.n).images[..., 0].astype(float) * 16 / 255
    all_images = d.images.reshape(len(d.images), -1)
    # every stored image is one of sklearn's digits (17 grey levels survive the 0..255 mapping exactly)
    rounded = np.rint(images.reshape(len(images), -1))
    assert np.isin(rounded.view([("", rounded.dtype)] * 64), all_images.view([("", all_images.dtype)] * 64)).all()
    code, out, _ = cli("import", "digits", "--shard-size", "500")
    assert code == 0 and "already imported: digits-train" in out and "already imported: digits-test" in out


def test_cifar10_import_both_splits_and_class_names(cli, tmp_path):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    rows, labels = make_cifar_tarball(tarball)
    code, out, err = cli("import", "cifar10", "--from", tarball, "--shard-size", "16")
    assert code == 0, err
    train = ImageSet.open(tmp_path / "dra-data", "cifar10-train")
    assert train.n == 30 and train.identity["class_names"][:2] == ["class0", "class1"]
    got = train.read_range(0, 30)
    assert np.array_equal(got.images, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert np.array_equal(got.labels, labels)
    assert ImageSet.open(tmp_path / "dra-data", "cifar10-test").n == 12


def test_import_takes_data_source_from_the_config(cli, tmp_path):
    """`import cifar10 -c CONFIG` reads data.source (and data.name) when the config's importer is cifar10."""
    tarball = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_tarball(tarball)
    (tmp_path / "c10.yaml").write_text(f"data:\n  importer: cifar10\n  source: {tarball}\n  name: mycifar\n")
    code, out, err = cli("import", "cifar10", "-c", "c10.yaml")
    assert code == 0, err
    assert ImageSet.open(tmp_path / "dra-data", "mycifar-train").n == 30
    code, _, err = cli("import", "cifar100", "-c", "c10.yaml")          # another importer: the source is not its own
    assert code == 2 and "--from" in err and err.count("\n") == 1


def test_cifar100_import(cli, tmp_path):
    tarball = tmp_path / "cifar-100-python.tar.gz"
    make_cifar_tarball(tarball, classes=100)
    code, _, err = cli("import", "cifar100", "--from", tarball)
    assert code == 0, err
    s = ImageSet.open(tmp_path / "dra-data", "cifar100-train")
    assert s.classes == 100 and len(s.identity["class_names"]) == 100


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_import_streams(cli, tmp_path, compressed, monkeypatch):
    rng = np.random.default_rng(0)
    image, label = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 50)
    path = tmp_path / "gen.npz"
    (np.savez_compressed if compressed else np.savez)(path, image=image, label=label)
    # The importer must never load 'image' whole: refuse any read of the full array through np.load.
    import stages.importers as imp
    monkeypatch.setattr(imp.np, "load", lambda *a, **k: pytest.fail("np.load would read the whole array"))
    code, out, err = cli("import", "npz", "--from", path, "--name", "dmat", "--shard-size", "16")
    assert code == 0, err
    s = ImageSet.open(tmp_path / "dra-data", "dmat-train")
    got = s.read_range(0, 50)
    assert np.array_equal(got.images, image) and np.array_equal(got.labels, label)
    assert len(s.records) == 4
    assert s.identity["kind"] == "real" and "hint: this .npz has DM-AT's layout" in out and "--generated" in out


def dmat_halves(tmp_path):
    """DM-AT's 20M set in miniature: two .npz halves (37 stored images, then 25 deflated), random pixels."""
    return npz_halves(tmp_path, (("part1.npz", 37), ("part2.npz", 25)), seed=1)


def sha256_of(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dmat_halves_import_as_one_generated_set(cli, tmp_path, monkeypatch):
    """`import npz --generated` with two files: one generated set, ids 0..36 from the first and 37..61 from the
    second (shard 3 spans both), each file's sha256 in order; a rerun is a no-op, other files are refused; the
    trainer takes the only generated set by default and asks to choose among several."""
    from pipeline.config import load_config
    from pipeline.workflow import training_generated_set
    from stores.errors import UserError
    (a, image_a, label_a), (b, image_b, label_b) = dmat_halves(tmp_path)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load would read a whole array"))
    args = ("import", "npz", "--generated", "--from", a, "--from", b, "--name", "dmat-20m", "--shard-size", "10")
    code, out, err = cli(*args)
    assert code == 0 and "imported generated set dmat-20m: 62 samples in 7 shards" in out and "hint" not in out, err
    s = ImageSet.open(tmp_path / "dra-data", "dmat-20m")
    got = s.read_range(0, s.n)
    assert s.identity["kind"] == "generated" and s.n == 62 and (s.resolution, s.channels) == (32, 3)
    assert np.array_equal(got.ids, np.arange(62))
    assert np.array_equal(got.images, np.concatenate([image_a, image_b]))
    assert np.array_equal(got.labels, np.concatenate([label_a, label_b]))
    assert s.identity["source"] == {"importer": "npz", "format": "DM-AT npz", "checksums": [sha256_of(a), sha256_of(b)],
                                    "counts": [37, 25]}
    code, out, _ = cli(*args)
    assert code == 0 and "already imported: generated set dmat-20m" in out
    code, _, err = cli(*args[:5], "--name", "dmat-20m", "--shard-size", "10")           # the first half alone
    assert code == 2 and "another identity" in err and ImageSet.open(tmp_path / "dra-data", "dmat-20m").n == 62
    cfg = load_config(None, {"root": str(tmp_path / "dra-data")})
    assert training_generated_set(cfg) == "dmat-20m"            # not generate's digits-gen: the only generated set
    code, _, err = cli(*args[:5], "--name", "dmat-half", "--shard-size", "10")
    assert code == 0, err
    with pytest.raises(UserError, match=r"2 generated image sets \(dmat-20m, dmat-half\).*set train.generated_set"):
        training_generated_set(cfg)
    assert training_generated_set(load_config(None, {"root": cfg.root,
                                                     "train.generated_set": "dmat-half"})) == "dmat-half"


def test_killed_generated_import_resumes(cli, tmp_path, monkeypatch):
    """Interrupted after 4 shards (ids 0..39), the same command writes the other 3: the deflated second half is
    streamed from its 4th image on, and the set equals the two halves appended."""
    from stores.images import ImageSetWriter
    (a, image_a, _), (b, image_b, _) = dmat_halves(tmp_path)
    write, calls = ImageSetWriter.write, []

    def write_then_die(self, plan, images, labels):
        calls.append(plan.index)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return write(self, plan, images, labels)
    monkeypatch.setattr(ImageSetWriter, "write", write_then_die)
    args = ("import", "npz", "--generated", "--from", a, "--from", b, "--shard-size", "10")
    code, _, err = cli(*args)
    assert code == 130 and "Traceback" not in err
    assert sorted(ImageSet.open(tmp_path / "dra-data", "digits-gen").records) == [0, 1, 2, 3]
    monkeypatch.setattr(ImageSetWriter, "write", write)
    code, out, err = cli(*args)
    assert code == 0 and "imported generated set digits-gen: 62 samples in 3 shards" in out, err
    s = ImageSet.open(tmp_path / "dra-data", "digits-gen")
    assert s.complete and np.array_equal(s.read_range(0, 62).images, np.concatenate([image_a, image_b]))


def test_folder_import(cli, tmp_path):
    src = tmp_path / "folder"
    rng = np.random.default_rng(0)
    expected = []
    for k, cls in enumerate(["cat", "dog"]):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(img).save(src / cls / f"{i}.png")
            expected.append((img, k))
    code, _, err = cli("import", "folder", "--from", src, "--name", "pets")
    assert code == 0, err
    s = ImageSet.open(tmp_path / "dra-data", "pets-train")
    got = s.read_range(0, 6)
    assert s.identity["class_names"] == ["cat", "dog"]
    assert np.array_equal(got.images, np.stack([e[0] for e in expected])) and got.labels.tolist() == [0, 0, 0, 1, 1, 1]


def bad_npz(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    image = np.zeros((10, 8, 8, 3), np.uint8)
    if kind == "counts":
        np.savez(path, image=image, label=np.zeros(9, int))
    elif kind == "negative":
        np.savez(path, image=image, label=-np.ones(10, int))
    elif kind == "nolabel":
        np.savez(path, image=image)
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file or folder"),
    ("png-as-cifar", "not a tar archive"),
    ("cifar-bad-label", "outside [0, 10)"),
    ("npz-counts", "10 images but 9 labels"),
    ("npz-negative", "negative labels"),
    ("npz-nolabel", "no array 'label'"),
    ("npz-not-zip", "not an .npz file"),
    ("unknown", "unknown importer"),
])
def test_bad_sources_one_line_exit_2_nothing_written(cli, tmp_path, case, needle):
    importer, src = {
        "missing": ("cifar10", tmp_path / "nope.tar.gz"),
        "png-as-cifar": ("cifar10", tmp_path / "x.png"),
        "cifar-bad-label": ("cifar10", tmp_path / "bad.tar.gz"),
        "npz-counts": ("npz", None), "npz-negative": ("npz", None), "npz-nolabel": ("npz", None),
        "npz-not-zip": ("npz", tmp_path / "x.png"),
        "unknown": ("imagenet21k", tmp_path / "x.png"),
    }[case]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
    if case == "cifar-bad-label":
        make_cifar_tarball(src, bad_label=True)
    if src is None:
        src = bad_npz(tmp_path, case.split("-")[1])
    code, out, err = cli("import", importer, "--from", src)
    assert code == 2
    assert needle in err and err.count("\n") == 1 and err.startswith("error: ")
    assert sets_under(tmp_path / "dra-data") == []


def test_unwritable_root(cli, tmp_path):
    import os
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        root = blocker / "root"           # a path under a regular file cannot be created, even by root
    else:
        root = tmp_path / "ro" / "root"
        (tmp_path / "ro").mkdir(mode=0o500)
    code, _, err = cli("import", "digits", "--root", root)
    assert code == 2 and "not writable" in err and err.count("\n") == 1
    assert not root.exists()
