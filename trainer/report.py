"""Comparison of finished runs: a side-by-side table and PNG figures (matplotlib, no display needed).

Per run, in runs/<name>/figures/: `curves.png` (every loss term and the held-out clean and PGD accuracy per epoch)
and `samples.png` (the generated images the run trained on, one row per class).
Per comparison, in <root>/reports/<names>/: `table.md`, `report.json`, `accuracy.png` (held-out accuracy of every
run per epoch) and `effective_rank.png`: the paper's representation analysis, the effective rank of the
classifier's penultimate features on clean test images (see `analysis.spectrum.effective_rank`, centred), runs with and
without DRA side by side, with their normalised singular values.

Accuracies in the table come from each run's eval.json (`dra-pipe eval RUN`); a run without one shows '-'. Runs
`dra-pipe analyze` measured get a second table of its headline numbers (analysis.json), and their effective rank is
read from there when it is of the same weights on the same test images.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import yaml

from stores.errors import IntegrityError, UserError
from stores.identity import write_json_atomic
from stores.images import DATASET_JSON, ImageSet, eval_set_name, image_set_dir
from trainer.analysis.spectrum import effective_rank, singular_distribution
from trainer.analysis_figures import plot_effective_rank
from trainer.analysis_results import ANALYSIS_COLUMNS, analysis_rows, rank_entry
from trainer.classifier_files import find_run, load_classifier, state_fingerprint
from trainer.evaluate import EvalSettings, Log, check_fits, penultimate_features, read_images
from trainer.runs import RunFolder
from trainer.settings import dra_on

COLUMNS = ("run", "arch", "objective", "DRA", "lambda", "timestep", "data", "epochs", "clean", "PGD-CE",
           "PGD-margin", "AutoAttack", "n", "eff. rank")
NOT_LOSSES = {"epoch", "step", "lr", "images_per_s", "clean_acc", "pgd_acc"}
SAMPLES_PER_CLASS = 8
SAMPLE_SHARDS = 4                        # read at most this many shards of a generated set for the grid


def _quiet(_: str) -> None:
    pass


@dataclass
class RunInfo:
    """What a finished run folder says about itself."""

    name: str
    folder: RunFolder
    config: dict                         # the resolved configuration it was trained with
    metrics: list[dict]
    record: dict                         # final.pt without the weights
    eval: dict | None                    # eval.json, if `dra-pipe eval` ran

    def setting(self, section: str, key: str, default=None):
        return (self.config.get(section) or {}).get(key, default)

    @property
    def dra(self) -> bool:
        asked = dra_on(self.setting("train", "dra"), self.setting("train", "dra_lambda", 0))
        return bool(self.record.get("dra", asked))

    @property
    def prefix(self) -> str:
        return self.setting("data", "name") or self.setting("data", "importer") or "digits"

    @property
    def generated_name(self) -> str | None:
        """The generated set the run streamed, or None when it trained on real data only."""
        if not self.setting("train", "unsup_fraction", 0):
            return None
        return self.setting("train", "generated_set") or self.setting("generate", "name") or f"{self.prefix}-gen"


def _read_stored(path: Path, read) -> dict:
    """A run's file, written by the pipeline: one that does not read as a mapping is damaged data."""
    try:
        value = read(path)
    except Exception as exc:              # torch, YAML and JSON each raise their own kinds
        value = exc
    if not isinstance(value, dict):
        raise IntegrityError(f"{path}: unreadable ({type(value).__name__}); the run's file is damaged: delete it and "
                             f"train or evaluate the run again")
    return value


def load_run(root: Path, run: str) -> RunInfo:
    import torch
    folder = find_run(root, run)
    record = _read_stored(folder.final, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    record = {k: v for k, v in record.items() if k != "state_dict"}
    config = (_read_stored(folder.config, lambda p: yaml.safe_load(p.read_text()) or {})
              if folder.config.exists() else {})
    eval_path = folder.path / "eval.json"
    evaluated = _read_stored(eval_path, lambda p: json.loads(p.read_bytes())) if eval_path.exists() else None
    return RunInfo(folder.path.name, folder, config or {}, folder.read_metrics(), record, evaluated)


# --- the table ---------------------------------------------------------------------------------------------------

def data_label(info: RunInfo) -> str:
    real = f"{info.prefix}-train"
    gen = info.generated_name
    if gen is None:
        return real
    return f"{real} + {gen} ({info.setting('train', 'unsup_fraction'):.0%} of each batch)"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def table_row(info: RunInfo, erank: float | None) -> tuple[str, ...]:
    e = info.eval or {}
    timesteps = info.setting("features", "timesteps") or []
    return (info.name, str(info.record.get("arch", "?")), str(info.record.get("objective", "?")),
            "on" if info.dra else "off", f"{info.setting('train', 'dra_lambda'):g}" if info.dra else "-",
            str(timesteps[0]) if info.dra and timesteps else "-", data_label(info), epochs_cell(info),
            _pct(e.get("clean")), _pct(e.get("pgd_ce")), _pct(e.get("pgd_margin")), _pct(e.get("autoattack")),
            str(e.get("n", "-")), "-" if erank is None else f"{erank:.2f}")


SUMMARY_COLUMNS = ("setting", "seeds", "clean", "PGD-CE", "PGD-margin", "AutoAttack", "eff. rank")
SEED_FREE = {"root": None, "run": None, "ray": None, "eval": None, "train": ("seed", "checkpoint_every")}


def setting_key(info: RunInfo) -> str:
    """The run's configuration without what differs between seeds of one setting (or cannot change the result)."""
    kept = {}
    for section, values in sorted(info.config.items()):
        if section in SEED_FREE and SEED_FREE[section] is None:
            continue
        drop = SEED_FREE.get(section) or ()
        kept[section] = {k: v for k, v in values.items() if k not in drop} if isinstance(values, dict) else values
    return json.dumps(kept, sort_keys=True, default=str)


def _mean_std(values: list) -> str:
    present = [v for v in values if v is not None]
    if len(present) < len(values) or not present:
        return "-"
    return f"{np.mean(present):.2%} +- {np.std(present, ddof=1) if len(present) > 1 else 0:.2%}"


def seed_summary(infos: list[RunInfo], ranks: dict[str, dict]) -> list[tuple[str, ...]]:
    """One row per setting trained with two or more seeds: mean +- sample std of each column."""
    groups: dict[str, list[RunInfo]] = {}
    for info in infos:
        groups.setdefault(setting_key(info), []).append(info)
    rows = []
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        label = (f"{first.record.get('arch', '?')} {first.record.get('objective', '?')}, DRA "
                 + (f"on (lambda {first.setting('train', 'dra_lambda'):g})" if first.dra else "off"))
        seeds = ", ".join(str(m.setting("train", "seed")) for m in members)
        columns = [_mean_std([(m.eval or {}).get(k) for m in members])
                   for k in ("clean", "pgd_ce", "pgd_margin", "autoattack")]
        erank = [ranks.get(m.name, {}).get("erank") for m in members]
        erank_cell = "-" if None in erank else f"{np.mean(erank):.2f} +- {np.std(erank, ddof=1):.2f}"
        rows.append((label, seeds, *columns, erank_cell))
    return rows


def epochs_cell(info: RunInfo) -> str:
    """'30', or '27/30' when the evaluated weights are the best epoch's (eval.weights: best)."""
    selected = ((info.eval or {}).get("model") or {}).get("selected")
    return f"{selected['epoch']}/{len(info.metrics)}" if selected else str(len(info.metrics))


def markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- figures -----------------------------------------------------------------------------------------------------

def _figure(width: float, height: float, panels: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, panels)
    return fig, (list(axes) if panels > 1 else [axes])


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


COUNTER_PREFIXES = ("visits_", "views_seen_")    # per-image counts, not losses: they get a panel of their own


def curve_panels(rows: list[dict]) -> dict[str, list[str]]:
    """The metrics keys each panel of curves.png draws: loss terms, held-out accuracy, and the counters
    (times each image was visited, distinct stored views seen), which would flatten every loss on a shared axis."""
    numeric = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    counters = [k for k in numeric if k.startswith(COUNTER_PREFIXES)]
    losses = [k for k in numeric if k not in NOT_LOSSES and k not in counters]
    accuracy = [k for k in ("clean_acc", "pgd_acc") if k in numeric]
    return {"losses": losses, "accuracy": accuracy, "counters": counters}


def plot_curves(info: RunInfo, path: Path) -> Path:
    """Loss terms, held-out clean / PGD accuracy and (when recorded) the visit and view counters, per epoch."""
    rows = info.metrics
    epochs = [r["epoch"] for r in rows]
    panels = curve_panels(rows)
    fig, axes = _figure(15 if panels["counters"] else 10, 3.8, 3 if panels["counters"] else 2)
    labels = {"clean_acc": "clean", "pgd_acc": "PGD"}
    settings = {"losses": dict(ylabel="mean over the epoch's steps", title=f"{info.name}: loss terms"),
                "accuracy": dict(ylabel="held-out accuracy (EMA weights)", ylim=(0, 1), title="accuracy"),
                "counters": dict(ylabel="per image, so far", title="visits and distinct views seen")}
    for ax, (panel, keys) in zip(axes, panels.items()):
        for key in keys:
            ax.plot(epochs, [r.get(key, math.nan) for r in rows], marker=".", label=labels.get(key, key))
        ax.set(xlabel="epoch", **settings[panel])
        _integer_epochs(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.savefig(path, dpi=110)
    return path


def samples_per_class(images: ImageSet, per_class: int = SAMPLES_PER_CLASS,
                      max_shards: int = SAMPLE_SHARDS) -> dict[int, list[np.ndarray]]:
    """{class: up to per_class images (H, W, C) uint8}, in id order, from the set's first shards."""
    found: dict[int, list[np.ndarray]] = {c: [] for c in range(images.classes)}
    for index in images.plan_indices()[:max_shards]:
        if index not in images.records:
            continue
        shard = images.read_shard(index)
        for image, label in zip(shard.images, shard.labels):
            if len(found[int(label)]) < per_class:
                found[int(label)].append(image)
        if all(len(v) == per_class for v in found.values()):
            break
    return found


def mosaic(found: dict[int, list[np.ndarray]], per_class: int, gap: int = 1) -> np.ndarray:
    """One (rows*(H+gap), cols*(W+gap), C) uint8 image: a row per class, empty cells white."""
    h, w, c = next(img.shape for imgs in found.values() for img in imgs)
    out = np.full((len(found) * (h + gap), per_class * (w + gap), c), 255, dtype=np.uint8)
    for row, cls in enumerate(sorted(found)):
        for col, img in enumerate(found[cls]):
            out[row * (h + gap):row * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = img
    return out


def plot_samples(images: ImageSet, path: Path, per_class: int = SAMPLES_PER_CLASS) -> Path:
    """A grid of generated images, one row per class (labelled with the class names when the set has them)."""
    found = samples_per_class(images, per_class)
    if not any(found.values()):
        raise UserError(f"image set {images.name} has no complete shard to draw samples from")
    grid = mosaic(found, per_class)
    names = images.identity.get("class_names") or [str(c) for c in sorted(found)]
    fig, (ax,) = _figure(max(3.0, 0.45 * per_class + 1), max(3.0, 0.4 * len(found) + 0.6))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None,
              vmin=0, vmax=255, interpolation="nearest")
    step = grid.shape[0] / len(found)
    ax.set_yticks([step * (i + 0.5) for i in range(len(found))], [names[c] for c in sorted(found)])
    ax.set_xticks([])
    ax.set_title(f"{images.name}: first {per_class} per class")
    fig.savefig(path, dpi=110)
    return path


def plot_accuracy(infos: list[RunInfo], path: Path) -> Path:
    fig, (ax,) = _figure(6.5, 4)
    for info in infos:
        epochs = [r["epoch"] for r in info.metrics]
        for key, style in (("clean_acc", "-"), ("pgd_acc", "--")):
            if any(key in r for r in info.metrics):
                ax.plot(epochs, [r.get(key, math.nan) for r in info.metrics], style, marker=".",
                        label=f"{info.name} {'clean' if key == 'clean_acc' else 'PGD'}")
    ax.set(xlabel="epoch", ylabel="held-out accuracy (EMA weights)", ylim=(0, 1), title="training curves")
    _integer_epochs(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


# --- the report --------------------------------------------------------------------------------------------------

@dataclass
class Report:
    folder: Path
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: list[tuple[str, ...]] = field(default_factory=list)     # mean +- std over seeds (SUMMARY_COLUMNS)
    analysis: list[tuple[str, ...]] = field(default_factory=list)    # analysis.json's numbers (ANALYSIS_COLUMNS)


def report_folder(root: Path, names: list[str]) -> Path:
    joined = "+".join(names)
    return root / "reports" / (joined if len(joined) <= 80 else datetime.now().strftime("report-%Y%m%d-%H%M%S"))


def representation(root: Path, info: RunInfo, s: EvalSettings) -> dict:
    """Effective rank and normalised singular values of the run's penultimate features on its clean test split."""
    name = eval_set_name(root, info.prefix)
    if not (image_set_dir(root, name) / DATASET_JSON).exists():
        raise UserError(f"no test set {name} under {root}/images for run {info.name}")
    model, record = load_classifier(info.folder.weights(s.weights), stored=True)
    images = ImageSet.open(root, name)
    check_fits(record, images)
    n = images.n if s.rank_n <= 0 else min(s.rank_n, images.n)
    stored = rank_entry(info.folder.path, state_fingerprint(record["state_dict"]), name, n)   # `dra-pipe analyze`
    if stored:
        return {**{k: stored[k] for k in ("erank", "spectrum", "images", "dims", "test_set")}, "dra": info.dra,
                "centred": True, "source": "analysis.json"}
    x, _ = read_images(images, s.rank_n)
    features = penultimate_features(model, x, s.batch_size, s.torch_device())
    return {"erank": effective_rank(features), "spectrum": singular_distribution(features).tolist(),
            "images": len(x), "dims": features.shape[1], "test_set": name, "dra": info.dra, "centred": True}


def run_figures(root: Path, info: RunInfo, report: Report) -> None:
    """curves.png and samples.png in the run's figures/ folder (skipped with a note when impossible)."""
    figures = info.folder.path / "figures"
    figures.mkdir(exist_ok=True)
    if info.metrics:
        report.figures.append(plot_curves(info, figures / "curves.png"))
    else:
        report.notes.append(f"{info.name}: metrics.jsonl is empty; no training curves")
    gen = info.generated_name
    if gen is None:
        report.notes.append(f"{info.name}: trained without generated data; no sample grid")
    elif not (image_set_dir(root, gen) / DATASET_JSON).exists():
        report.notes.append(f"{info.name}: generated set {gen} is not under {root}/images; no sample grid")
    else:
        report.figures.append(plot_samples(ImageSet.open(root, gen), figures / "samples.png"))


def make_report(root: Path, runs: list[str], s: EvalSettings, out: Path | None = None, log: Log = _quiet) -> Report:
    """Table, per-run figures, comparison figures; report.json and table.md in the comparison folder."""
    if not runs:
        raise UserError("name at least one run")
    infos = [load_run(root, run) for run in runs]
    report = Report(out or report_folder(root, [i.name for i in infos]), COLUMNS)
    ranks: dict[str, dict] = {}
    for info in infos:                    # every run's weights are read before anything is written
        log(f"{info.name}: effective rank")
        try:
            ranks[info.name] = representation(root, info, s)
        except UserError as exc:
            report.notes.append(f"{info.name}: no effective rank ({exc})")
        if info.folder.weights_note(s.weights):
            report.notes.append(info.folder.weights_note(s.weights))
    report.folder.mkdir(parents=True, exist_ok=True)
    for info in infos:
        log(f"{info.name}: figures")
        run_figures(root, info, report)
        if info.eval is None:
            report.notes.append(f"{info.name}: not evaluated yet; `dra-pipe eval {info.name}` fills "
                                f"clean/PGD/AutoAttack")
        report.rows.append(table_row(info, ranks.get(info.name, {}).get("erank")))
    report.summary = seed_summary(infos, ranks)
    report.analysis = analysis_rows([(i.name, i.folder.path) for i in infos])
    if any(i.metrics for i in infos):
        report.figures.append(plot_accuracy(infos, report.folder / "accuracy.png"))
    if ranks:
        report.figures.append(plot_effective_rank(ranks, report.folder / "effective_rank.png"))
    _write(report, infos, ranks)
    return report


def _write(report: Report, infos: list[RunInfo], ranks: dict[str, dict]) -> None:
    table = markdown_table(report.columns, report.rows)
    if report.summary:
        table += "\nMean +- sample std over seeds:\n\n" + markdown_table(SUMMARY_COLUMNS, report.summary)
    if report.analysis:
        table += "\nRepresentation measures (`dra-pipe analyze`):\n\n" + markdown_table(ANALYSIS_COLUMNS,
                                                                                         report.analysis)
    (report.folder / "table.md").write_text(table)
    body = {"created": datetime.now().isoformat(timespec="seconds"), "columns": list(report.columns),
            "runs": [{"name": i.name, "row": dict(zip(report.columns, row)), "eval": i.eval,
                      "representation": {k: v for k, v in ranks.get(i.name, {}).items() if k != "spectrum"} or None}
                     for i, row in zip(infos, report.rows)],
            "seed_summary": [dict(zip(SUMMARY_COLUMNS, row)) for row in report.summary],
            "analysis": [dict(zip(ANALYSIS_COLUMNS, row)) for row in report.analysis],
            "figures": [str(p) for p in report.figures], "notes": report.notes}
    write_json_atomic(report.folder / "report.json", json.loads(json.dumps(body)))
