"""`dra-pipe analyze` (and the analyze stage of `run` and `sweep`): representation measures of finished runs.

For each run: load it (eval.weights), its test and training sets, its teacher (the feature set it aligned with, or
that its configuration names) and eval.json; check everything; train the clean-objective reference the teacher
probe compares with (a run of its own, through the train runner, cached like any run); then compute each entry of
analysis.json whose identity is new (trainer.analysis does the measuring, pipeline.analyze_measures the streaming),
write it and the figures, and print the headline numbers.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.analyze_data import (
    AnalyzeSettings,
    default_tap,
    named_feature_set,
    open_images,
    run_config,
    run_feature_set,
    teacher_model,
)
from pipeline.analyze_measures import (
    RunContext,
    align_uniform,
    cka,
    cka_identity,
    classifier_row,
    dimension,
    probe_identity,
    probe_point,
    probe_taps,
    rank,
    sae,
    saliency,
)
from pipeline.config import Config
from pipeline.console import console
from stores.errors import UserError
from stores.identity import short_key
from trainer.analysis_results import SUMMARY, cell, read_analysis, summary, write_analysis

PER_RUN = {"rank": rank, "dimension": dimension, "sae": sae, "align-uniform": align_uniform, "saliency": saliency}
SETTINGS_OF = {"rank": (), "dimension": ("probe_epochs", "probe_lr", "batch_size", "seed", "dimension_target"),
               "sae": ("sae_expansion", "sae_k", "sae_epochs", "batch_size", "seed"),
               "align-uniform": ("pair_crop_pad", "seed"), "saliency": ()}


@dataclass
class Entry:
    name: str
    identity: dict
    compute: object                        # () -> result dict

    @property
    def key(self) -> str:
        return short_key({"entry": self.name, **self.identity})


def run_analyze(cfg: Config, runs: list[str], features: list[str] | None = None, wait: bool = False,
                strict: bool = True) -> list[Path]:
    """Analyze each run (default: the runs `dra-pipe run` trains); returns their analysis.json files. Each run's
    folder is locked while its analysis is written (another writer: refused, or waited for with `wait`); strict:
    see prepare."""
    from pipeline.variants import default_run_names
    from trainer.evaluate import EvalSettings
    s = AnalyzeSettings.from_config(cfg.analyze)
    EvalSettings.from_config(cfg.eval).apply_threads()
    names = list(runs) or default_run_names(cfg)
    contexts = [prepare(cfg, name, s, features or [], strict) for name in names]   # every check before any write
    plans = [(ctx, entries(ctx)) for ctx in contexts]
    train_clean_references([ctx for ctx in contexts if ctx.clean_ref], wait)
    written, shared = [], {}
    try:
        for ctx, todo in plans:
            written.append(analyze_run(ctx, todo, shared, wait))
    finally:
        for ctx in contexts:
            ctx.scratch.close()
    show_summary(contexts)
    return written


def prepare(cfg: Config, name: str, s: AnalyzeSettings, feature_keys: list[str], strict: bool = True) -> RunContext:
    """The run's context, every input checked: a problem is one UserError before anything is written. Not strict
    (the analyze stage of `run` and `sweep`): a measure whose input the workspace lacks is left out, with a note."""
    from trainer.classifier_files import load_classifier, state_fingerprint, threat_model
    from trainer.evaluate import EvalSettings, check_fits
    from trainer.report import load_run
    root = Path(cfg.root)
    info = load_run(root, name)
    run_cfg = run_config(info, root)
    ev = EvalSettings.from_config(cfg.eval)
    path = info.folder.weights(ev.weights)
    model, record = load_classifier(path, stored=True)
    train, test = (open_images(root, f"{info.prefix}-{split}", info.name) for split in ("train", "test"))
    check_fits(record, test)
    if info.eval is None:
        s = _without(s, "teacher-probe", strict, f"run {info.name} has no eval.json: the teacher probe attacks with "
                     f"the run's evaluation PGD; run `dra-pipe eval {info.name}` first, or leave teacher-probe out "
                     f"of --measures")
    identity = _run_identity(info)
    named = [named_feature_set(root, key, train) for key in feature_keys]
    teachers = named or [f for f in [run_feature_set(root, run_cfg, identity, train)] if f is not None]
    if not teachers:
        s = _without(s, "cka", strict, f"run {info.name}: no teacher feature set of {train.name} to measure CKA "
                     f"against; run `dra-pipe extract-features`, pass --features KEY, or leave cka out of --measures")
    read_analysis(info.folder.path)                                   # a damaged one is refused before any work
    ctx = RunContext(info.name, root, info.config, s, model.to(ev.torch_device()),
                     state_fingerprint(record["state_dict"]), path.stem, identity, threat_model(record, path)[1],
                     ev.torch_device(), train, test, None, teachers, info.eval, _head(info, record, model))
    ctx.named_features = bool(named)
    if "teacher-probe" in s.measures:
        ctx.base_tap = default_tap(root, run_cfg, (teachers or [None])[0])
        _check_teacher(ctx)
        ctx.clean_ref = clean_reference(run_cfg, info.name)[0]
    return ctx


def _without(s: AnalyzeSettings, measure: str, strict: bool, why: str) -> AnalyzeSettings:
    if measure not in s.measures:
        return s
    if strict:
        raise UserError(why)
    console.print(f"note: {measure} skipped: {why.split(';')[0]}", highlight=False, soft_wrap=True)
    return replace(s, measures=tuple(m for m in s.measures if m != measure))


def _run_identity(info) -> dict:
    import json
    try:
        return json.loads(info.folder.run_json.read_bytes())["identity"]
    except (ValueError, KeyError, TypeError):
        from stores.errors import IntegrityError
        raise IntegrityError(f"{info.folder.run_json}: unreadable (damaged); train the run again") from None


def _head(info, record: dict, model) -> torch.nn.Module | None:
    """The DRA run's trained projection head (the last step's, from checkpoint.pt), or None."""
    from trainer.dra import ProjectionHead
    if not record.get("dra") or not info.folder.checkpoint.exists():
        return None
    state = info.folder.load_checkpoint().get("head")
    if not state:
        return None
    weights = [v for k, v in state.items() if k.endswith("weight")]
    head = ProjectionHead(weights[0].shape[1], weights[-1].shape[0], weights[0].shape[0], len(weights))
    head.load_state_dict(state)
    return head.eval().to(next(model.parameters()).device)


def _check_teacher(ctx: RunContext) -> None:
    """The probe's layers exist in the teacher, and a teacher without a label input takes none."""
    if "teacher-probe" not in ctx.s.measures:
        return
    teacher = teacher_model(ctx.teachers, ctx.base_tap)
    valid = teacher.layers()
    unknown = [layer for layer in ctx.s.layers if layer not in ("auto", "all") and layer not in valid]
    if unknown:
        raise UserError(f"unknown teacher layer(s) {', '.join(unknown)} (--layer, analyze.layers); the teacher's "
                        f"layers: {', '.join(valid)}")
    if ctx.s.probe_labels == "none" and not teacher.takes_no_label():
        raise UserError(f"the teacher {ctx.base_tap.spec} needs a class label; set analyze.probe_labels: true "
                        f"(the features then hold the label)")


def probe_layers(ctx: RunContext) -> list[str]:
    teacher = teacher_model(ctx.teachers, ctx.base_tap)
    if "all" in ctx.s.layers:
        return teacher.layers()
    return list(dict.fromkeys(teacher.default_layer() if layer == "auto" else layer for layer in ctx.s.layers))


def entries(ctx: RunContext) -> list[Entry]:
    """Every entry the configured measures make for this run, in the order they are computed."""
    out = []
    for measure in ctx.s.measures:
        if measure in PER_RUN:
            chosen = {k: getattr(ctx.s, k) for k in SETTINGS_OF[measure]}
            out.append(Entry(measure, {**ctx.base(), **chosen}, lambda m=measure: PER_RUN[m](ctx)))
        elif measure == "cka":
            out += [Entry(f"cka/{fs.key}", cka_identity(ctx, fs), lambda fs=fs: cka(ctx, fs))
                    for fs in ctx.feature_sets]
        else:
            out += _probe_entries(ctx)
    return out


def _probe_entries(ctx: RunContext) -> list[Entry]:
    out = []
    for tap in probe_taps(ctx, probe_layers(ctx)):
        name = f"teacher-probe/t{tap.timestep}/{tap.layer}" + (f"/{tap.feature_key}" if tap.feature_key else "")
        out.append(Entry(name, probe_identity(ctx, tap), lambda tap=tap: probe_point(ctx, tap)))
    refs = {**ctx.base(), "clean_ref": ctx.clean_ref, "attack": ctx.attack(), "eps": ctx.eps}
    return out + [Entry("teacher-probe/references", refs, lambda: references(ctx))]


def references(ctx: RunContext) -> dict:
    """The run itself and its clean-trained reference, measured as the probe is."""
    from trainer.classifier_files import find_run, load_classifier
    folder = find_run(ctx.root, ctx.clean_ref)
    clean_model, _ = load_classifier(folder.final, stored=True)          # a clean run's best is PGD-selected
    return {"run": {"name": ctx.name, **classifier_row(ctx, ctx.model)},
            "clean": {"name": ctx.clean_ref, **classifier_row(ctx, clean_model.to(ctx.device))}}


def clean_reference(run_cfg: Config, run: str) -> tuple[str, Config]:
    """The run's non-robust reference: the same data, epochs and seed, objective clean, DRA off; named by its
    training identity, so runs that share data and schedule share it."""
    from pipeline.plans.train import make_job
    from trainer.settings import TrainSettings, run_name
    cfg = copy.deepcopy(run_cfg)
    cfg.train["objective"], cfg.train["dra"] = "clean", False
    try:
        job = make_job(cfg)
    except UserError as exc:
        raise UserError(f"run {run}: its clean-trained reference cannot be planned ({exc})") from None
    return run_name(TrainSettings.from_section(cfg.train), "clean", short_key(job.identity(), 8)), cfg


def train_clean_references(contexts: list[RunContext], wait: bool = False) -> None:
    """Train each distinct clean reference (a finished one is found and kept), one after the other."""
    from pipeline.train import run_train
    from trainer.report import load_run
    done = set()
    for ctx in contexts:
        name, ref_cfg = clean_reference(run_config(load_run(ctx.root, ctx.name), ctx.root), ctx.name)
        if name not in done:
            console.print(f"clean-trained reference {name} (objective clean, DRA off)", highlight=False)
            run_train(ref_cfg, name, wait=wait)
            done.add(name)


def analyze_run(ctx: RunContext, todo: list[Entry], shared: dict, wait: bool = False) -> Path:
    """Compute the entries whose key is new (probe points shared between runs are computed once per process)."""
    from trainer.runs import RunFolder
    with RunFolder(ctx.root / "runs" / ctx.name).lock(wait):
        return _analyze_locked(ctx, todo, shared)


def _analyze_locked(ctx: RunContext, todo: list[Entry], shared: dict) -> Path:
    folder = ctx.root / "runs" / ctx.name
    body = read_analysis(folder)
    body.update({"run": ctx.name, "weights": ctx.weights, "fingerprint": ctx.fingerprint})
    computed = 0
    for entry in todo:
        old = body["entries"].get(entry.name)
        if old and old.get("key") == entry.key:
            console.print(f"{ctx.name}: {entry.name} cached", highlight=False)
            continue
        started, reused = time.perf_counter(), shared.get(entry.key)
        result = reused[1] if reused else entry.compute()
        shared.setdefault(entry.key, (ctx.name, result))
        body["entries"][entry.name] = {"key": entry.key, "result": result}
        computed += 1
        done = f"the same as for {reused[0]}" if reused else f"{time.perf_counter() - started:.1f} s"
        console.print(f"{ctx.name}: {entry.name} ({done})", highlight=False)
    path = folder / "analysis.json"
    if computed or not path.exists():                  # a rerun that computes nothing writes nothing
        path = write_analysis(folder, body)
        from trainer.analysis_figures import analysis_figures
        for figure in analysis_figures(body, folder / "figures"):
            console.print(f"figure: {figure}", highlight=False, soft_wrap=True)
    return path


def show_summary(contexts: list[RunContext]) -> None:
    from rich.table import Table
    table = Table("run", *(header for header, _ in SUMMARY.values()), title="analysis")
    for ctx in contexts:
        numbers = summary(read_analysis(ctx.root / "runs" / ctx.name))
        table.add_row(ctx.name, *(cell(numbers[k], pct) for k, (_, pct) in SUMMARY.items()))
    console.print(table)
