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


# --- diffusion models ----------------------------------------------------------------------------------------

model_app = typer.Typer(help="Inspect diffusion models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
ModelOpt = typer.Option(None, "--model", "-m", help="edm:PATH.pkl | diffusers:DIR | dra:DIR | fit (the model fit-diffusion made) [config model.spec]")


def fit_settings(cfg: Config):
    from stages.fit_diffusion import FitSettings
    f = cfg.fit_diffusion
    return FitSettings(model_channels=f.model_channels, channel_mult=tuple(f.channel_mult), num_blocks=f.num_blocks,
                       batch_size=f.batch_size, lr=f.lr, ema_halflife_kimg=f.ema_halflife_kimg,
                       duration_kimg=f.duration_kimg, seed=f.seed)


def fitted_model_dir(cfg: Config, images_name: str | None = None) -> Path:
    from pipeline.stores.images import ImageSet
    from pipeline.workflow import real_train_set
    from stages.fit_diffusion import model_key
    images = ImageSet.open(Path(cfg.root), images_name or real_train_set(cfg))
    return Path(cfg.root) / "models" / model_key(images, fit_settings(cfg))


def resolve_model_spec(cfg: Config) -> str:
    """`fit` means the model fit-diffusion trains with the configured settings on the real training set."""
    if cfg.model.spec != "fit":
        return cfg.model.spec
    folder = fitted_model_dir(cfg)
    if not (folder / "config.json").exists():
        raise UserError(f"model spec 'fit': no fitted model at {folder} yet; run `dra-pipe fit-diffusion` (or `dra-pipe run`)")
    return f"dra:{folder}"


@model_app.command("info")
def model_info_cmd(model: Optional[str] = ModelOpt, config: Path = ConfigOpt, root: Optional[Path] = RootOpt):
    """List a model's feature layers with their output shapes, its parameter count and fingerprint."""
    cfg = resolve(config, root, {"model.spec": model})
    from stages.fingerprint import model_fingerprint
    from stages.models import load_model
    from stages.taps import describe_layers, parameter_count
    spec = resolve_model_spec(cfg)
    net = load_model(spec)
    console.print(f"model {spec}: {type(net).__name__}, {parameter_count(net):,} parameters, "
                  f"{net.img_channels}x{net.img_resolution}x{net.img_resolution} images, "
                  f"{net.label_dim or 'no'} classes, fingerprint {model_fingerprint(net)[:16]}", highlight=False)
    table = Table("layer", "output (C, h, w)", "float16 bytes/sample")
    for name, shape in describe_layers(net):
        n = 1
        for d in shape:
            n *= d
        table.add_row(name, "x".join(map(str, shape)), human_bytes(2 * n))
    console.print(table)


@app.command("fit-diffusion")
def fit_diffusion_cmd(
    images: Optional[str] = typer.Option(None, "--images", help="image set to train on (default: the real training set)"),
    duration_kimg: Optional[float] = typer.Option(None, "--duration-kimg", help="training length in thousands of images [config fit_diffusion.duration_kimg]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per step [config fit_diffusion.batch_size]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed [config fit_diffusion.seed]"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Train a class-conditional EDM on an image set (resumable), saved as safetensors + JSON."""
    cfg = resolve(config, root, {"fit_diffusion.duration_kimg": duration_kimg, "fit_diffusion.batch_size": batch_size,
                                 "fit_diffusion.seed": seed})
    run_fit_diffusion(cfg, images)


def run_fit_diffusion(cfg: Config, images_name: str | None) -> Path:
    from pipeline.progress import RateBar
    from pipeline.stores.images import ImageSet
    from pipeline.workflow import real_train_set
    from pipeline.workspace import check_writable
    from stages.fit_diffusion import Trainer
    images = ImageSet.open(Path(cfg.root), images_name or real_train_set(cfg))
    if not images.complete:
        raise UserError(f"image set {images.name} is incomplete ({len(images.missing_shards())} shards missing); rerun the stage that writes it")
    out = fitted_model_dir(cfg, images.name)
    if (out / "config.json").exists():
        console.print(f"cached: model {out.name} (fit on {images.name} with these settings) - nothing to do")
        return out
    check_writable(Path(cfg.root))
    settings = fit_settings(cfg)
    trainer = Trainer(images, settings, out)
    if settings.batch_size > images.n:
        raise UserError(f"fit_diffusion.batch_size {settings.batch_size} exceeds the {images.n} images of {images.name}")
    start = trainer.step
    console.print(f"fit-diffusion on {images.name}: {settings.total_steps} steps of {settings.batch_size} "
                  f"({settings.duration_kimg:g} kimg)" + (f", resuming at step {start}" if trainer.resumed else ""))
    with RateBar("fit-diffusion", "images", total=(settings.total_steps - start) * settings.batch_size) as bar:
        try:
            fingerprint = trainer.run(lambda n, loss: bar.advance(n, f"loss {loss:.4f}"))
        except KeyboardInterrupt:
            bar.close()
            console.print(f"interrupted at step {trainer.step}; checkpoint saved - rerun the same command to resume")
            raise typer.Exit(130)
    console.print(f"saved model {out} (fingerprint {fingerprint[:16]}); throughput: {bar.rate:,.0f} images/s")
    return out


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
