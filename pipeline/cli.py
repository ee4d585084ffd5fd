"""The `dra-pipe` command line. Every command reads pipeline.yaml; its flags override the file's keys."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import Config, explain, load_config, to_yaml
from pipeline.errors import IntegrityError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="dra-pipe: diffusion models as data source and as frozen teacher for adversarial training.\n\n"
                       "Stage 1 writes images and diffusion features once into sharded stores; stage 2 streams them.")
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

ConfigOpt = typer.Option(Path("pipeline.yaml"), "--config", "-c", help="pipeline.yaml to read (defaults apply if ./pipeline.yaml is absent)")
RootOpt = typer.Option(None, "--root", help="workspace root; overrides `root:` of the config")


def resolve(config: Path, root: Optional[Path], overrides: dict[str, Any] | None = None) -> Config:
    over = dict(overrides or {})
    if root is not None:
        over["root"] = str(root)
    return load_config(config, over)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --- config --------------------------------------------------------------------------------------------------

@app.command("config")
def config_cmd(config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
               explain_keys: bool = typer.Option(False, "--explain", help="list every key with its default and meaning")):
    """Print the resolved configuration (defaults <- pipeline.yaml <- flags)."""
    if explain_keys:
        table = Table("key", "default", "meaning")
        for key, default, help_text in explain():
            table.add_row(key, default, help_text)
        console.print(table)
        return
    cfg = resolve(config, root)
    console.print(f"# resolved from {cfg._origin}", highlight=False)
    console.print(to_yaml(cfg), highlight=False, markup=False)


# --- import --------------------------------------------------------------------------------------------------

@app.command("import")
def import_cmd(
    importer: str = typer.Argument(..., help="digits | cifar10 | cifar100 | npz | folder"),
    source: Optional[Path] = typer.Option(None, "--from", help="file or folder to import (CIFAR tarball, .npz, image folder)"),
    name: Optional[str] = typer.Option(None, "--name", help="set name prefix; sets are <name>-<split> (default: the importer)"),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="samples per shard [config data.shard_size]"),
    image_format: Optional[str] = typer.Option(None, "--format", help="png (lossless, default) or npy (raw) [config data.image_format]"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Import a real data set into image stores (one per split)."""
    cfg = resolve(config, root, {"data.shard_size": shard_size, "data.image_format": image_format})
    run_import(cfg, importer, str(source) if source else None, name)


def run_import(cfg: Config, importer: str, source: str | None, name: str | None) -> None:
    from pipeline.importers import import_source
    from pipeline.progress import RateBar
    with RateBar("import", "images") as bar:
        results = import_source(Path(cfg.root), importer, source, name, cfg.data.shard_size, cfg.data.image_format,
                                cfg.data.test_fraction, cfg.data.split_seed, bar.advance)
    for r in results:
        if r.skipped:
            console.print(f"already imported: {r.name} ({r.n} samples, fingerprint {r.fingerprint[:12]}) - nothing to do")
        else:
            console.print(f"imported {r.name}: {r.n} samples in {r.shards_written} shards, fingerprint {r.fingerprint[:12]}")
    if bar.done:
        console.print(f"throughput: {bar.rate:,.0f} images/s ({bar.done} images in {bar.seconds:.2f} s)")


# --- ls / verify ---------------------------------------------------------------------------------------------

@app.command("ls")
def ls_cmd(config: Path = ConfigOpt, root: Optional[Path] = RootOpt):
    """List every image and feature set under the root, with size, identity and completeness."""
    cfg = resolve(config, root)
    show_catalog(Path(cfg.root))


def show_catalog(root: Path) -> None:
    from pipeline.catalog import catalog
    entries = catalog(root)
    if not entries:
        console.print(f"nothing under {root} yet: `dra-pipe import digits` creates the first sets")
        return
    table = Table("store", "name", "kind", "samples", "shards", "bytes", "identity", "state", title=f"{root}")
    for e in entries:
        state = "complete" if e.complete else (f"error: {e.error}" if e.error else f"partial {e.shards_done}/{e.shards_total}")
        table.add_row(e.kind, e.name, e.what, f"{e.samples:,}/{e.total:,}", f"{e.shards_done}/{e.shards_total}",
                      human_bytes(e.bytes), e.summary, state)
    console.print(table)


@app.command("verify")
def verify_cmd(name: Optional[str] = typer.Argument(None, help="image-set name or feature key (default: every set)"),
               config: Path = ConfigOpt, root: Optional[Path] = RootOpt):
    """Recompute every shard's checksum; name each missing, truncated or corrupted shard (exit 1 if any)."""
    from pipeline.catalog import resolve_set, verify_feature_set, verify_image_set
    from pipeline.stores.features import list_feature_sets
    from pipeline.stores.images import list_image_sets
    cfg = resolve(config, root)
    base = Path(cfg.root)
    targets = [resolve_set(base, name)] if name else \
        [("images", p) for p in list_image_sets(base)] + [("features", p) for p in list_feature_sets(base)]
    problems, checked = [], 0
    for kind, path in targets:
        try:
            found = verify_image_set(path) if kind == "images" else verify_feature_set(path)
        except IntegrityError as exc:
            console.print(f"[red]{path.name}: {exc}[/red]")
            problems.append(exc)
            continue
        checked += 1
        for p in found:
            console.print(f"[red]{p}[/red]", highlight=False)
        problems += found
        if not found:
            console.print(f"ok: {kind[:-1] if kind == 'images' else 'feature'} set {path.name}", highlight=False)
    if problems:
        console.print(f"{len(problems)} problem(s) found; rerun the stage that wrote the set to redo those shards")
        raise typer.Exit(1)
    console.print(f"all {checked} set(s) intact")


# --- run -----------------------------------------------------------------------------------------------------

@app.command("run")
def run_cmd(config: Path = ConfigOpt, root: Optional[Path] = RootOpt):
    """Run every stage pipeline.yaml names, end to end, reusing what is cached (now: import, then ls)."""
    cfg = resolve(config, root)
    console.rule("import")
    run_import(cfg, cfg.data.importer, cfg.data.source, cfg.data.name)
    console.rule("stores")
    show_catalog(Path(cfg.root))


# --- bench ---------------------------------------------------------------------------------------------------

@app.command("bench")
def bench_cmd(
    what: str = typer.Argument("stores", help="stores: streaming read of image shards + feature slabs vs bare baselines"),
    samples: int = typer.Option(100_000, "--samples", help="samples in the synthetic benchmark set"),
    batch: int = typer.Option(512, "--batch", help="batch size of the streaming reader"),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes"),
    cold: bool = typer.Option(True, "--cold/--warm-only", help="also time cold passes (drops the page cache; needs root)"),
    work_dir: Optional[Path] = typer.Option(None, "--dir", help="where to build the benchmark data (default: <root>/bench)"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Measure a stage against its bare baseline in the same run (ratios, not absolute times)."""
    cfg = resolve(config, root)
    if what != "stores":
        raise UserError(f"unknown benchmark {what!r}; available: stores")
    from pipeline.bench import bench_stores
    bench_stores(work_dir or Path(cfg.root) / "bench", samples, batch, workers, cold, console)


def main() -> None:
    """Entry point: bad input -> one line and exit 2; damaged data -> one line and exit 1."""
    try:
        app()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except IntegrityError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
