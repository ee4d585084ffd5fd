"""`dra-pipe eval`, `dra-pipe report`, `dra-pipe export`: robust accuracy, comparisons and figures, sharing weights."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, WaitOpt, resolve
from pipeline.evaluate import export_run, run_eval, run_report

ForceOpt = typer.Option(False, "--force", help="replace the --out file if it exists (default: refuse)")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("report")(report_cmd)
    app.command("export")(export_cmd)


# --- eval --------------------------------------------------------------------------------------------------------

def eval_cmd(
    run: Optional[str] = typer.Argument(None, help="run name under <root>/runs (or a run folder)"),
    model: Optional[Path] = typer.Option(None, "--model", help="evaluate an exported classifier "
                                                         "file, or a RobustBench-format WRN / ResNet-18 state dict "
                                                         "(at L-inf 8/255), instead of a run"),
    images: Optional[str] = typer.Option(None, "--images", help="image set to evaluate on (default: <data name>-test)"),
    n: Optional[int] = typer.Option(None, "--n", help="test images, 0 = all [config eval.n]"),
    subset: Optional[str] = typer.Option(None, "--subset", help="first (the first n) or per-class (n / classes of "
                                                                "each class) [config eval.subset]"),
    pgd_steps: Optional[int] = typer.Option(None, "--pgd-steps", help="PGD steps [config eval.pgd_steps]"),
    restarts: Optional[int] = typer.Option(None, "--restarts", help="PGD restarts [config eval.pgd_restarts]"),
    autoattack: Optional[bool] = typer.Option(None, "--autoattack/--no-autoattack", help="run AutoAttack "
                                                                                         "[config eval.autoattack]"),
    weights: Optional[str] = typer.Option(None, "--weights", help="a run's best (held-out PGD selection) or final "
                                                                  "weights [config eval.weights]"),
    out: Optional[Path] = typer.Option(None, "--out", help="eval.json path (default: the run's eval.json, or "
                                                           "FILE.eval.json); never inside the workspace's images, "
                                                           "features, models or runs"),
    force: bool = ForceOpt,
    wait: bool = WaitOpt,
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Clean, PGD (cross-entropy and margin) and AutoAttack accuracy of a run's EMA weights or an exported file."""
    cfg = resolve(config, root, {"eval.n": n, "eval.subset": subset, "eval.pgd_steps": pgd_steps,
                                 "eval.pgd_restarts": restarts, "eval.autoattack": autoattack,
                                 "eval.weights": weights})
    run_eval(cfg, run, model, images, out, wait, explicit_weights=weights is not None, force=force)


# --- export ------------------------------------------------------------------------------------------------------

def export_cmd(
    run: str = typer.Argument(..., help="run name under <root>/runs (or a run folder)"),
    out: Optional[Path] = typer.Option(None, "--out", help="file to write (default: ./<run>.pt); never inside the "
                                                           "workspace's images, features, models or runs"),
    force: bool = ForceOpt,
    weights: Optional[str] = typer.Option(None, "--weights", help="best (held-out PGD selection) or final weights "
                                                                  "[config eval.weights]"),
    export_format: str = typer.Option("dra-pipe", "--format", help="dra-pipe (one file with architecture, "
                                      "normalisation and threat model) or robustbench (a state dict RobustBench's "
                                      "model definition loads, plus its model_info JSON)"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Write a run's classifier (EMA weights, architecture, normalisation, threat model) to one file for others."""
    cfg = resolve(config, root, {"eval.weights": weights})
    export_run(cfg, run, out, explicit_weights=weights is not None, force=force, export_format=export_format)


# --- report ------------------------------------------------------------------------------------------------------

def report_cmd(
    runs: list[str] = typer.Argument(..., help="run names under <root>/runs (or run folders)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder of the comparison "
                                                           "(default: <root>/reports/<names>)"),
    rank_n: Optional[int] = typer.Option(None, "--rank-n", help="test images for the effective rank, 0 = all "
                                                                "[config eval.rank_n]"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Side-by-side table and figures: training curves, generated samples per class, effective rank of features."""
    cfg = resolve(config, root, {"eval.rank_n": rank_n})
    run_report(cfg, runs, out)
