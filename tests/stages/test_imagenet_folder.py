"""stages.imagenet: the ILSVRC-2012 layout, the sorted-synset class index, the centre crop, bad files."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import imagenet
from stores.errors import UserError

SYNSETS = ["n01440764", "n01443537", "n02102040"]


def add_odd_files(folder, rng, whole_jpeg: str) -> None:
    """Converted on import: a greyscale, a CMYK and a PNG named .JPEG; skipped: an empty file and `whole_jpeg` cut
    in half."""
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8), "L").save(folder / "grey.JPEG")
    Image.fromarray(rng.integers(0, 256, (30, 20, 4), dtype=np.uint8), "CMYK").save(folder / "cmyk.JPEG")
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(folder / "png.JPEG", format="PNG")
    (folder / "empty.JPEG").write_bytes(b"")
    whole = (folder / whole_jpeg).read_bytes()
    (folder / "truncated.JPEG").write_bytes(whole[:len(whole) // 2])


def make_imagenet(root, flat_val=True):
    """train: 3 synsets (created out of order) with JPEGs of varied sizes and modes and bad files; val: flat + CSV."""
    rng = np.random.default_rng(0)
    for synset in reversed(SYNSETS):
        folder = root / "train" / synset
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate([(40, 30), (25, 50), (33, 33)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{synset}_{i}.JPEG")
    add_odd_files(root / "train" / SYNSETS[1], rng, f"{SYNSETS[1]}_0.JPEG")
    val = root / "val"
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for i, synset in enumerate([SYNSETS[2], SYNSETS[0]]):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{i:08d},{synset} 1 2 3 4 {SYNSETS[1]} 5 6 7 8")   # the first box names the class
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def test_labels_are_sorted_synset_indices(tmp_path, monkeypatch):
    root = make_imagenet(tmp_path / "in")
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(listing(self), reverse=True)))   # any order
    ids = imagenet.synsets(root)
    assert ids == SYNSETS
    train = imagenet.train_split(root, ids)
    assert all(train.labels[i] == SYNSETS.index(f.parent.name) for i, f in enumerate(train.files))
    assert train.files == sorted(train.files)
    val = imagenet.val_split(root, ids)
    assert list(val.labels) == [2, 0]


def test_center_crop_matches_a_hand_computation(tmp_path):
    image = Image.fromarray(np.arange(7 * 10 * 3, dtype=np.uint8).reshape(7, 10, 3))     # w 10, h 7
    got = imagenet.center_crop(image, 4)
    by_hand = np.asarray(image)[0:7, 1:8]                           # side 7, left (10 - 7) // 2 = 1, top 0
    assert np.array_equal(got, np.asarray(Image.fromarray(by_hand).resize((4, 4), Image.LANCZOS)))
    tall = Image.fromarray(np.arange(9 * 4 * 3, dtype=np.uint8).reshape(9, 4, 3))
    assert np.array_equal(imagenet.center_crop(tall, 4), np.asarray(tall)[2:6])      # top (9 - 4) // 2 = 2, no scale


def test_bad_files_are_converted_or_skipped(tmp_path):
    root = make_imagenet(tmp_path / "in")
    folder = root / "train" / SYNSETS[1]
    notes = {name: imagenet.decode(folder / name, 8) for name in
             ("grey.JPEG", "cmyk.JPEG", "png.JPEG", "empty.JPEG", "truncated.JPEG", f"{SYNSETS[1]}_0.JPEG")}
    assert notes[f"{SYNSETS[1]}_0.JPEG"][1] is None
    assert "mode L" in notes["grey.JPEG"][1] and "mode CMYK" in notes["cmyk.JPEG"][1]
    assert "PNG" in notes["png.JPEG"][1]
    for name in ("grey.JPEG", "cmyk.JPEG", "png.JPEG"):
        assert notes[name][0].shape == (8, 8, 3) and notes[name][0].dtype == np.uint8
    assert notes["empty.JPEG"] == (None, "skipped: 0 bytes")
    assert notes["truncated.JPEG"][0] is None and notes["truncated.JPEG"][1].startswith("skipped")


def test_layouts_other_than_the_documented_ones_are_refused(tmp_path):
    root = make_imagenet(tmp_path / "in")
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(UserError, match="LOC_val_solution.csv"):
        imagenet.val_split(root, SYNSETS)
    with pytest.raises(UserError, match="no train folder"):
        imagenet.synsets(root / "val")
    (root / "LOC_synset_mapping.txt").write_text(f"{SYNSETS[0]} tench, Tinca tinca\n")
    with pytest.raises(UserError, match=SYNSETS[1]):
        imagenet.human_names(root, SYNSETS)
