"""ILSVRC-2012 folders: the layout, the class index, and one file decoded into a square image (`import imagenet`).

Layout of DIR (anything else is refused in one line):
    DIR/train/<synset>/*.JPEG               one folder per synset (n01440764, ...)
    DIR/val/<synset>/*.JPEG                 the validation set in class folders, or
    DIR/val/*.JPEG + DIR/LOC_val_solution.csv   flat, labelled by the Kaggle CSV (ImageId,PredictionString: the
                                            first token of PredictionString is the synset)
    DIR/LOC_synset_mapping.txt              optional: `<synset> <human names>` per line, recorded as names
Class index = position in the sorted synset ids of DIR/train (the standard 0..999 mapping). The devkit's
ILSVRC2012_validation_ground_truth.txt numbers classes by meta.mat's ILSVRC2012_ID order, which cannot be read
without scipy: it is not accepted.

Transform (EDM's dataset_tool `--transform=center-crop`, written anew from its arithmetic): convert to RGB, crop
the central square of side min(h, w) at offsets ((h - side) // 2, (w - side) // 2), resize it to R x R with PIL's
LANCZOS filter (antialiased). Files that cannot be decoded (0 bytes, truncated, corrupt, not an image) are skipped;
CMYK, greyscale, palette and PNG-in-a-.JPEG files are converted. Both are reported, never silent.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stores.errors import UserError

FILTER = "lanczos"
TRANSFORM = "center-crop"
SUFFIXES = {".jpeg", ".jpg", ".png"}
LAYOUT = ("DIR/train/<synset>/*.JPEG, and DIR/val/<synset>/*.JPEG or DIR/val/*.JPEG with DIR/LOC_val_solution.csv")


@dataclass(frozen=True)
class FolderSplit:
    """One split as a sorted file list with labels (class index per file)."""
    split: str
    files: list[Path]
    labels: np.ndarray          # (N,) int64


def synsets(root: Path) -> list[str]:
    """Sorted synset ids of DIR/train: the class index."""
    train = root / "train"
    if not train.is_dir():
        raise UserError(f"{root}: no train folder; import imagenet expects {LAYOUT}")
    found = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise UserError(f"{train}: no synset folders; import imagenet expects {LAYOUT}")
    return found


def human_names(root: Path, ids: list[str]) -> list[str] | None:
    """Names from LOC_synset_mapping.txt when present (one line per synset), else None."""
    path = root / "LOC_synset_mapping.txt"
    if not path.is_file():
        return None
    mapping = dict(line.strip().partition(" ")[::2] for line in path.read_text().splitlines() if line.strip())
    missing = [s for s in ids if s not in mapping]
    if missing:
        raise UserError(f"{path}: synset {missing[0]} has no line; give the mapping of these synsets or remove it")
    return [mapping[s] for s in ids]


def image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)


def train_split(root: Path, ids: list[str]) -> FolderSplit:
    return _class_folders("train", root / "train", ids)


def _class_folders(split: str, folder: Path, ids: list[str]) -> FolderSplit:
    index = {s: k for k, s in enumerate(ids)}
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise UserError(f"{folder}/{unknown[0]}: not a synset of {folder.parent}/train; import imagenet expects "
                        f"{LAYOUT}")
    files = [(f, index[c]) for c in classes for f in image_files(folder / c)]
    if not files:
        raise UserError(f"{folder}: no .JPEG files; import imagenet expects {LAYOUT}")
    return FolderSplit(split, [f for f, _ in files], np.array([k for _, k in files], dtype=np.int64))


def val_split(root: Path, ids: list[str]) -> FolderSplit | None:
    """The validation split (None when DIR has no val folder)."""
    folder = root / "val"
    if not folder.is_dir():
        return None
    if any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
        return _class_folders("val", folder, ids)
    solution = root / "LOC_val_solution.csv"
    if not solution.is_file():
        raise UserError(f"{folder}: flat validation images need {solution.name} next to it; import imagenet expects "
                        f"{LAYOUT}")
    truth = read_solution(solution, ids)
    files = image_files(folder)
    unlabelled = [f.name for f in files if f.stem not in truth]
    if unlabelled:
        raise UserError(f"{solution}: no row for {unlabelled[0]}; give the solution file of these images")
    return FolderSplit("val", files, np.array([truth[f.stem] for f in files], dtype=np.int64))


def read_solution(path: Path, ids: list[str]) -> dict[str, int]:
    """ImageId -> class index from LOC_val_solution.csv (the first token of PredictionString is the synset)."""
    index = {s: k for k, s in enumerate(ids)}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise UserError(f"{path}: expected the header ImageId,PredictionString (Kaggle's LOC_val_solution.csv)")
    truth = {}
    for line, row in enumerate(rows[1:], start=2):
        synset = row[1].split()[0] if len(row) > 1 and row[1].split() else ""
        if synset not in index:
            raise UserError(f"{path}:{line}: synset {synset!r} is not one of DIR/train's folders")
        truth[row[0].strip()] = index[synset]
    return truth


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """RGB image -> (R, R, 3) uint8: the central square of side min(w, h), resized with LANCZOS."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((resolution, resolution), Image.LANCZOS))


def decode(path: Path, resolution: int) -> tuple[np.ndarray | None, str | None]:
    """(image (R, R, 3) uint8, None), (image, 'converted from MODE/FORMAT') or (None, 'skipped: why')."""
    if path.stat().st_size == 0:
        return None, "skipped: 0 bytes"
    try:
        with Image.open(path) as im:
            im.load()                       # a truncated or corrupt stream raises here
            note = _conversion(im)
            rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"skipped: {str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__}"
    return center_crop(rgb, resolution), note


def _conversion(im: Image.Image) -> str | None:
    what = [f"mode {im.mode}"] if im.mode != "RGB" else []
    what += [f"a {im.format} file"] if im.format != "JPEG" else []
    return f"converted ({', '.join(what)})" if what else None
