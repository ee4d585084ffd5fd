"""Evaluation as the pipeline runs it (`dra-pipe eval`, `report`, `export` and the eval and report stages of `run`
and `sweep`): robust accuracy written to eval.json, comparisons and figures, a run's weights in one file."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from rich.table import Table

from pipeline.config import Config
from pipeline.console import console
from pipeline.outputs import check_output_file
from pipeline.workflow import real_test_set
from stores.errors import UserError
from stores.workspace import check_writable


def run_eval(cfg: Config, run: str | None, model_file: Path | None, images_name: str | None = None,
             out: Path | None = None, wait: bool = False, explicit_weights: bool = False, force: bool = False) -> dict:
    """Evaluate, write eval.json, print the table; returns the eval.json body. Writing into a run's folder, it
    holds the run's lock (refused while another process trains or evaluates the run, or waits with `wait`)."""
    from trainer.classifier_files import find_run, load_classifier
    from trainer.evaluate import EvalSettings, autoattack_available, evaluate_file, open_test_set, write_eval_json
    if (run is None) == (model_file is None):
        raise UserError("give a run name or --model FILE (one of them)")
    if run is not None:
        from trainer.trackers import check_loggers
        check_loggers(cfg.train.loggers)             # eval's numbers go to the run's trackers too
    s = EvalSettings.from_config(cfg.eval)
    s.apply_threads()
    if s.autoattack and not autoattack_available():
        raise UserError("eval.autoattack is on but pyautoattack is not installed: `pip install pyautoattack`, "
                        "or pass --no-autoattack (eval.autoattack: false)")
    root = Path(cfg.root)
    folder = find_run(root, run) if run is not None else None
    path = folder.weights(s.weights, explicit_weights) if folder is not None else model_file
    net, record = load_classifier(path, stored=folder is not None)
    test = open_test_set(root, images_name or real_test_set(cfg))
    default = path.with_name("eval.json") if run is not None else path.with_name(path.name + ".eval.json")
    target = check_output_file(out or default, root, force=force, default=default)
    if folder and folder.weights_note(s.weights):
        console.print(f"note: {folder.weights_note(s.weights)}", highlight=False, soft_wrap=True)
    into_run = folder is not None and Path(target).resolve().parent == folder.path.resolve()
    _header(record, path, test, s)
    with folder.lock(wait) if into_run else nullcontext():
        result = evaluate_file(path, record, net, test, s,
                               log=lambda line: console.print(f"  {line}", highlight=False, soft_wrap=True))
        result["weights"] = path.stem if folder else str(path)        # best or final: which file was evaluated
        write_eval_json(result, target)
        if into_run and Path(target).name == "eval.json":
            from trainer.trackers import record_eval
            record_eval(folder.path, cfg.train.loggers, result, record.get("steps", 0))
    show_eval(result)
    console.print(f"wrote {target}", highlight=False, soft_wrap=True)
    return result


def _header(record: dict, path: Path, test, s) -> None:
    n = test.n if s.n <= 0 else min(s.n, test.n)
    eps = record["threat_model"]["epsilon"]
    chosen = record.get("selected")
    if chosen:
        console.print(f"weights: epoch {chosen['epoch']}, the best by {chosen['by']} ({chosen['pgd_acc']:.2%}; clean "
                      f"{chosen['clean_acc']:.2%}); eval.weights: final takes the last epoch's",
                      highlight=False, soft_wrap=True)
    chosen_by = ", n / classes per class" if s.subset == "per-class" and n < test.n else ""
    console.print(f"eval {record['arch']} from {path} on {test.name}: {n} of {test.n} images{chosen_by}, L-inf eps "
                  f"{eps:g}, PGD {s.pgd_steps} steps x {s.pgd_restarts} restart(s)"
                  + (f", AutoAttack {s.autoattack_version}" if s.autoattack
                     else ", AutoAttack skipped (eval.autoattack: false)"),
                  highlight=False, soft_wrap=True)


ROWS = (("clean", "clean"), ("pgd_ce", "PGD-{k} cross-entropy"), ("pgd_margin", "PGD-{k} margin"),
        ("autoattack", "AutoAttack {v}"), ("worst", "worst case over the above"))


def show_eval(result: dict) -> None:
    table = Table("attack", "accuracy", "correct", "seconds", title=f"n = {result['n']}, L-inf eps {result['eps']:g}")
    for key, label in ROWS:
        if result.get(key) is None:
            continue
        name = label.format(k=result["steps"], v=result.get("autoattack_version"))
        table.add_row(name, f"{result[key]:.2%}", f"{result['counts'][key]}/{result['n']}",
                      f"{result['seconds'][key]:.1f}" if key in result["seconds"] else "")
        if key == "autoattack":
            after = result.get("autoattack_per_attack", {})          # non-increasing: run order
            for attack, acc in sorted(after.items(), key=lambda item: -item[1]):
                table.add_row(f"  after {attack}", f"{acc:.2%}", "", "")
    console.print(table)
    if result.get("autoattack") is None:
        console.print("AutoAttack: not run", highlight=False, soft_wrap=True)
    for line in result["warnings"]:
        console.print(f"warning: {line}", highlight=False, soft_wrap=True)


EXPORT_FORMATS = ("dra-pipe", "robustbench")


def export_run(cfg: Config, run: str, out: Path | None = None, explicit_weights: bool = False,
               force: bool = False, export_format: str = "dra-pipe") -> Path:
    """Write run `run`'s classifier (eval.weights: best or final) to `out` (default ./<run>.pt, or
    ./<run>.robustbench.pt and its model_info <run>.robustbench.json); returns the file."""
    from trainer.classifier_files import export_classifier, find_run
    if export_format not in EXPORT_FORMATS:
        raise UserError(f"--format {export_format!r}: use one of {', '.join(EXPORT_FORMATS)}")
    folder = find_run(Path(cfg.root), run)
    source = folder.weights(cfg.eval.weights, explicit=explicit_weights)
    suffix = ".robustbench.pt" if export_format == "robustbench" else ".pt"
    target = check_output_file(out or Path(f"{folder.path.name}{suffix}"), Path(cfg.root), force=force)
    if folder.weights_note(cfg.eval.weights):
        console.print(f"note: {folder.weights_note(cfg.eval.weights)}", highlight=False, soft_wrap=True)
    if export_format == "robustbench":
        return export_robustbench(cfg, folder, source, target, force)
    written = export_classifier(source, target, folder.path.name, stored=True)
    params = sum(t.numel() for t in written["state_dict"].values())
    console.print(f"exported {written['arch']} of run {folder.path.name} ({params:,} values, L-inf eps "
                  f"{written['threat_model']['epsilon']:g}, fingerprint {written['fingerprint'][:16]}) to {target}; "
                  f"evaluate it with `dra-pipe eval --model {target}`", highlight=False, soft_wrap=True)
    return target


def export_robustbench(cfg: Config, folder, source: Path, target: Path, force: bool) -> Path:
    """The classifier as a state dict in RobustBench's layout (trainer.robustbench; dra-pipe's own names where
    RobustBench has no definition) and, beside it, RobustBench's model_info with the run's eval.json figures."""
    import json

    from pipeline.workflow import data_prefix
    from stores.atomic import torch_save_atomically
    from stores.identity import write_json_atomic
    from trainer.classifier_files import load_classifier
    from trainer.robustbench import TO_FILL, definition, family, model_info, normalises, to_robustbench
    info_path = check_output_file(target.with_suffix(".json"), Path(cfg.root), force=force)
    model, record = load_classifier(source, stored=True)
    known = family(model.arch) is not None
    torch_save_atomically(to_robustbench(model) if known else model.state_dict(), target)
    evaluated = json.loads(folder.path.joinpath("eval.json").read_text()) if (folder.path / "eval.json").exists() \
        else None
    evaluated = evaluated if evaluated and evaluated.get("weights") == source.stem else None
    info = model_info(record, evaluated, data_prefix(cfg))
    write_json_atomic(info_path, info)
    say = lambda line: console.print(line, highlight=False, soft_wrap=True)      # noqa: E731
    say(f"exported {model.arch} of run {folder.path.name} as a RobustBench state dict to {target}")
    say(f"  loads into {definition(model)}" if known else
        f"  RobustBench has no definition of {model.arch}: the state dict keeps dra-pipe's names "
        "(trainer.classifiers builds it)")
    if known and family(model.arch) != "wrn" and normalises(model):
        say(f"  note: RobustBench's {model.arch} does not normalise inside; normalise inputs with mean "
            f"{record['mean']} and std {record['std']} before it")
    say(f"wrote {info_path} (RobustBench model_info; fill the fields marked {TO_FILL}: "
        f"{', '.join(k for k, v in info.items() if str(v).startswith(TO_FILL))})")
    return target


def run_report(cfg: Config, runs: list[str], out: Path | None = None):
    """Compare finished runs (trainer.report): print the table, the mean over seeds and the figures' paths."""
    from trainer.evaluate import EvalSettings
    from trainer.report import SUMMARY_COLUMNS, make_report
    s = EvalSettings.from_config(cfg.eval)
    s.apply_threads()
    check_writable(Path(out) if out else Path(cfg.root) / "reports", "report folder", "--out")
    report = make_report(Path(cfg.root), runs, s, out,
                         log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    table = Table(*report.columns, title="runs")
    for row in report.rows:
        table.add_row(*row)
    console.print(table)
    if report.summary:
        summary = Table(*SUMMARY_COLUMNS, title="mean +- sample std over seeds")
        for row in report.summary:
            summary.add_row(*row)
        console.print(summary)
    if report.analysis:
        from trainer.analysis_results import ANALYSIS_COLUMNS
        console.print(_table(ANALYSIS_COLUMNS, report.analysis, "representation measures (dra-pipe analyze)"))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    for path in report.figures:
        console.print(f"figure: {path}", highlight=False, soft_wrap=True)
    console.print(f"wrote {report.folder / 'table.md'} and {report.folder / 'report.json'}", highlight=False,
                  soft_wrap=True)
    return report


def _table(columns, rows, title: str) -> Table:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    return table
