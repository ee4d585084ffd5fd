"""DM-AT's selection of generated images: keep the most confidently recognised fraction of each class.

DM-AT's 1M CIFAR-10 set (after Rebuffi et al. 2021): 5M class-conditional EDM samples, 500k per class, each
scored by a standard (non-robust) WRN-28-10 with the softmax probability of the class it was generated for; the
top 20% of each class are kept. Larger sets are used without selection.

Here the scorer is any dra-pipe classifier (a run's weights or an exported file), the scores are cached next to
the output set so a resumed selection does not score again, and the output is an ordinary generated image set
(new contiguous ids, in source-id order) with `selection.parquet` mapping each id to its source id and score.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stores import remote
from stores.errors import UserError
from stores.images import ImageSet, ImageSetWriter, make_identity

SCORES_FILE = "scores.npz"           # scores and labels (N,) per source id, and what made them
TABLE_FILE = "selection.parquet"     # id, source_id, label, score of every kept sample
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Scorer:
    model: torch.nn.Module           # classifier in eval mode, taking (B, C, H, W) in [0, 1]
    fingerprint: str                 # of its state dict
    source: str                      # the file it came from


def selection_identity(source: ImageSet, scorer: Scorer, fraction: float) -> dict:
    """Identity of the output: which set, which scorer, which fraction (and the rule)."""
    i = source.identity
    origin = {"selected_from": source.fingerprint, "source_name": source.name, "scorer": scorer.fingerprint,
              "fraction": fraction, "rule": "top fraction per class by softmax confidence of the stored label"}
    return make_identity("generated", origin, i["resolution"], i["channels"], i["classes"], i.get("class_names"),
                         "train", i["shard_size"], i["image_format"])


def check_fraction(fraction: float) -> float:
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {fraction:g} (DM-AT kept 0.2 of each class)")
    return fraction


def kept_count(class_sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Images kept per class: floor(size x fraction), as DM-AT (500k x 0.2 = 100k per class)."""
    return np.floor(class_sizes * fraction + 1e-9).astype(np.int64)


@torch.no_grad()
def score_set(scorer: Scorer, images: ImageSet, batch: int, device: torch.device,
              progress: Progress) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels), both (N,) in id order: the scorer's softmax probability of each image's stored label."""
    model = scorer.model.to(device)
    scores, labels = np.empty(images.n, dtype=np.float32), np.empty(images.n, dtype=np.int64)
    for index in images.plan_indices():
        shard = images.read_shard(index)
        labels[shard.ids] = shard.labels
        for lo in range(0, len(shard.ids), batch):
            # x: (B, C, H, W), y: (B,)
            x = torch.from_numpy(shard.images[lo:lo + batch]).to(device).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(shard.labels[lo:lo + batch]).to(device)
            p = torch.softmax(model(x).float(), dim=1).gather(1, y[:, None])[:, 0]
            scores[shard.ids[lo:lo + batch]] = p.cpu().numpy()
            progress(len(y))
    model.to("cpu")
    return scores, labels


def choose(scores: np.ndarray, labels: np.ndarray, classes: int, fraction: float) -> np.ndarray:
    """Source ids kept, ascending: per class the highest scores (ties: the lower id first)."""
    kept = []
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        k = int(kept_count(np.array([len(members)]), fraction)[0])
        order = np.lexsort((members, -scores[members]))            # by score descending, then id ascending
        kept.append(members[order[:k]])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def load_or_score(folder: Path, scorer: Scorer, images: ImageSet, batch: int, device: torch.device,
                  progress: Progress) -> tuple[np.ndarray, np.ndarray, bool]:
    """(scores, labels, cached): those saved by an earlier (interrupted) selection from the same set with the same
    scorer, or new ones, saved atomically before any shard is written."""
    made_by = {"source": images.fingerprint, "scorer": scorer.fingerprint, "n": images.n}
    path = folder / SCORES_FILE
    if path.exists():
        with np.load(path) as saved:
            if json.loads(str(saved["made_by"])) == made_by:
                return saved["scores"], saved["labels"], True
    scores, labels = score_set(scorer, images, batch, device, progress)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".scores.tmp-{os.getpid()}.npz"
    np.savez(tmp, scores=scores, labels=labels, made_by=np.array(json.dumps(made_by)))
    os.replace(tmp, path)
    remote.published(path)
    return scores, labels, False


def write_selected(writer: ImageSetWriter, source: ImageSet, kept: np.ndarray, progress: Progress) -> None:
    """The output's missing shards: output id j holds source sample kept[j]. Source shards are read in order,
    each at most once per output shard that needs it (the last one is kept for the next)."""
    cache: dict[int, object] = {}
    for plan in writer.pending():
        wanted = kept[plan.first_id:plan.first_id + plan.count]                  # ascending source ids
        images, labels = [], []
        for shard_index in np.unique(wanted // source.shard_size):
            if shard_index not in cache:
                cache = {shard_index: source.read_shard(int(shard_index))}
            shard = cache[shard_index]
            rows = wanted[wanted // source.shard_size == shard_index] - shard.ids[0]
            images.append(shard.images[rows])
            labels.append(shard.labels[rows])
        writer.write(plan, np.concatenate(images), np.concatenate(labels))
        progress(plan.count)


def write_table(folder: Path, kept: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> Path:
    table = pa.table({"id": np.arange(len(kept), dtype=np.int64), "source_id": kept.astype(np.int64),
                      "label": labels[kept], "score": scores[kept]})
    tmp = folder / f".{TABLE_FILE}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, folder / TABLE_FILE)
    remote.published(folder / TABLE_FILE)
    return folder / TABLE_FILE
