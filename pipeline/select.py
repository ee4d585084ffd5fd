"""Select: DM-AT's selection of a generated set, the top fraction of each class by a classifier's score."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipeline.config import Config
from pipeline.console import console
from pipeline.progress import RateBar
from pipeline.workflow import generated_set
from stores.errors import UserError
from stores.images import DATASET_JSON, ImageSet, ImageSetWriter, image_set_dir, validate_set_name
from stores.locks import writer_lock
from stores.workspace import check_writable


def run_select(cfg: Config, source_name: str | None, scorer_arg: str, fraction: float, out: str | None,
               batch_size: int, wait: bool = False) -> ImageSet:
    """Validate everything, score (or reuse saved scores), choose, write the missing shards, write the table.

    The output set is locked from before its saved scores are read or written until the table is written."""
    from stages.select import check_fraction, selection_identity
    root = Path(cfg.root)
    fraction = check_fraction(fraction)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    source = _open_source(root, source_name or generated_set(cfg))
    scorer = load_scorer(root, scorer_arg, cfg.eval.weights, source)
    identity = selection_identity(source, scorer, fraction)
    name = validate_set_name(out or f"{source.name}-top{round(fraction * 100)}")
    folder = image_set_dir(root, name)
    with writer_lock(folder, f"image set '{name}'", wait):
        return _select_into(root, folder, name, identity, source, scorer, fraction, batch_size)


def _select_into(root: Path, folder: Path, name: str, identity: dict, source: ImageSet, scorer, fraction: float,
                 batch_size: int) -> ImageSet:
    from stages.generate import pick_device
    from stages.select import choose, load_or_score, write_selected, write_table
    if _existing_identity(folder) not in (None, identity):
        raise UserError(f"image set {name} already exists with another identity (other source, scorer or fraction); "
                        f"pass another --out or delete {folder}")
    if (folder / DATASET_JSON).exists() and ImageSet(folder).complete:
        console.print(f"{name} is complete: {ImageSet(folder).n:,} images selected from {source.name} - nothing to do",
                      highlight=False)
        return ImageSet(folder)
    check_writable(root)
    device = pick_device()
    started = time.perf_counter()
    with RateBar(f"score {source.name}", "images", total=source.n) as bar:
        scores, labels, cached = load_or_score(folder, scorer, source, batch_size, device, bar.advance)
    scored_s = time.perf_counter() - started
    rate = f"{source.n:,} images in {scored_s:.1f} s ({source.n / max(scored_s, 1e-9):,.0f} images/s on {device.type})"
    console.print(f"scores: {'cached from an earlier run' if cached else rate}", highlight=False)
    kept = choose(scores, labels, source.classes, fraction)
    if len(kept) == 0:
        if not (folder / DATASET_JSON).exists():
            shutil.rmtree(folder, ignore_errors=True)                # only the scores were there: leave nothing
        raise UserError(f"--fraction {fraction:g} keeps no image of any class of {source.name}; raise it")
    with ImageSetWriter(root, name, identity, len(kept)) as writer:     # its lock nests in this command's
        writer.begin()
        started = time.perf_counter()
        todo = sum(p.count for p in writer.pending())
        with RateBar(f"write {name}", "images", total=todo) as bar:
            write_selected(writer, source, kept, bar.advance)
    written_s = time.perf_counter() - started
    write_table(folder, kept, labels, scores)
    _summary(name, source, kept, labels, scores, todo, written_s)
    return ImageSet(folder)


def _open_source(root: Path, name: str) -> ImageSet:
    return ImageSet.open_complete(root, name, "`dra-pipe generate` writes it (`dra-pipe ls` lists sets)",
                                  "finish it first")


def load_scorer(root: Path, arg: str, weights: str, images: ImageSet):
    """A classifier file, or a run's weights; it must fit the images (shape and classes)."""
    from stages.select import Scorer
    from trainer.classifier_files import find_run, load_classifier, state_fingerprint
    from trainer.evaluate import check_fits
    folder = None if Path(arg).is_file() else find_run(root, arg)
    path = folder.weights(weights) if folder else Path(arg)
    if folder and folder.weights_note(weights):
        console.print(f"note: {folder.weights_note(weights)}", highlight=False, soft_wrap=True)
    model, record = load_classifier(path, stored=folder is not None)
    check_fits(record, images)
    return Scorer(model, state_fingerprint(record["state_dict"]), str(path))


def _existing_identity(folder: Path) -> dict | None:
    meta = folder / DATASET_JSON
    return json.loads(meta.read_text())["identity"] if meta.exists() else None


def _summary(name: str, source: ImageSet, kept, labels, scores, written: int, seconds: float) -> None:
    import numpy as np
    per_class = np.bincount(labels[kept], minlength=source.classes)
    floors = [float(scores[kept][labels[kept] == c].min()) if per_class[c] else float("nan")
              for c in range(source.classes)]
    console.print(f"selected {len(kept):,} of {source.n:,} images ({per_class.min():,}-{per_class.max():,} per class; "
                  f"lowest kept score per class {min(floors):.3f}-{max(floors):.3f}) -> {name}", highlight=False)
    if written:
        console.print(f"wrote {written:,} images in {seconds:.1f} s ({written / max(seconds, 1e-9):,.0f} images/s); "
                      f"ids map to source ids in {name}/selection.parquet; train on it with train.generated_set: "
                      f"{name}",
                      highlight=False, soft_wrap=True)
