"""The `dra-pipe` command line. Every command reads pipeline.yaml; its flags override the file's keys."""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import Config, explain, load_config, to_yaml
from pipeline.errors import IntegrityError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
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
    cfg = load_config(config, over)
    cfg["root"] = str(Path(cfg.root).expanduser().resolve())   # Ray workers run elsewhere: absolute paths only
    return cfg


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
               recompute: int = typer.Option(0, "--recompute", help="feature sets: also recompute K random samples with the model and report the largest deviation"),
               config: Path = ConfigOpt, root: Optional[Path] = RootOpt):
    """Recompute every shard's checksum; name each missing, truncated or corrupted shard (exit 1 if any)."""
    if recompute < 0:
        raise UserError(f"--recompute {recompute}: give a number of samples >= 0")
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
        if not found and kind == "features" and recompute:
            report_recompute(base, path, recompute)
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
                       duration_kimg=f.duration_kimg, dropout=f.dropout, seed=f.seed)


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


def report_recompute(root: Path, path: Path, k: int) -> None:
    """Recompute k cached samples of a feature set with the model recorded in its provenance."""
    from pipeline.stores.features import FeatureSet
    from pipeline.stores.images import ImageSet
    from stages.extract import recompute_deviation
    from stages.fingerprint import model_fingerprint
    from stages.models import load_model
    fs = FeatureSet(path)
    spec = fs.meta.get("provenance", {}).get("model_spec")
    if not spec:
        raise UserError(f"feature set {fs.key} does not record its model spec; cannot recompute")
    net = load_model(spec)
    if model_fingerprint(net) != fs.identity["model"]:
        raise UserError(f"model {spec} is not the one feature set {fs.key} was computed with (fingerprint differs)")
    images = ImageSet.open(root, fs.identity["image_set_name"])
    if images.fingerprint != fs.identity["image_set"]:
        raise UserError(f"image set {images.name} changed since feature set {fs.key} was computed (fingerprint differs)")
    result = recompute_deviation(net, images, fs, k)
    console.print(f"recomputed {result['samples']} samples of {fs.key}: max abs deviation {result['max_abs']:.3g}, "
                  f"max relative {result['max_rel']:.3g} (float16 storage rounds at ~1e-3 relative)", highlight=False)


# --- run -----------------------------------------------------------------------------------------------------

@app.command("run")
def run_cmd(
    seeds: Optional[str] = typer.Option(None, "--seeds", help="training seeds, comma-separated (0,1,2): each setting is "
                                        "trained once per seed and the report adds mean +- std [config run.seeds]"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Run every stage pipeline.yaml names (run.stages), end to end, reusing what is cached."""
    cfg = resolve(config, root, {"run.seeds": parse_seeds(seeds) if seeds is not None else None})
    run_seeds(cfg)                                 # a bad seed list fails before any stage runs
    _check_autoattack(cfg)
    started = time.perf_counter()
    runs = []
    for stage in cfg.run.stages:
        console.rule(stage)
        runs = STAGE_RUNNERS[stage](cfg, runs) or runs
    console.rule("done")
    console.print(f"pipeline finished in {time.perf_counter() - started:,.0f} s", highlight=False)


def _stage_import(cfg: Config, runs: list[str]) -> None:
    run_import(cfg, cfg.data.importer, cfg.data.source, cfg.data.name)
    show_catalog(Path(cfg.root))


def _stage_fit(cfg: Config, runs: list[str]) -> None:
    if cfg.model.spec != "fit":
        console.print(f"model.spec is {cfg.model.spec}: no model to fit", highlight=False)
        return
    run_fit_diffusion(cfg, None)


def _stage_generate(cfg: Config, runs: list[str]) -> None:
    from pipeline.cli_generate import run_generate
    run_generate(cfg)


def _stage_extract(cfg: Config, runs: list[str]) -> None:
    from pipeline.cli_extract import run_extract
    if not cfg.train.dra and not cfg.run.compare_dra:
        console.print("DRA is off: no diffusion targets needed", highlight=False)
        return
    run_extract(cfg, [], [], False)


def _train_variants(cfg: Config) -> list[Config]:
    """DRA off and on when comparing (else the configured setting), once per seed of run.seeds."""
    settings = (False, True) if cfg.run.compare_dra else (cfg.train.dra,)
    variants = []
    for dra in settings:
        for seed in run_seeds(cfg):
            variant = copy.deepcopy(cfg)
            variant.train["dra"], variant.train["seed"] = dra, seed
            variants.append(variant)
    return variants


def _check_autoattack(cfg: Config) -> None:
    """The eval stage needs pyautoattack when eval.autoattack is on: say so before the first stage, not after them."""
    from trainer.evaluate import autoattack_available
    if "eval" in cfg.run.stages and cfg.eval.autoattack and not autoattack_available():
        raise UserError("eval.autoattack is on but pyautoattack is not installed: `pip install pyautoattack` (or "
                        "`pip install -e '.[eval]'`), or set eval.autoattack: false")


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None


def run_seeds(cfg: Config) -> list[int]:
    seeds = cfg.run.seeds
    if seeds is None:
        return [cfg.train.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"run.seeds must list distinct seeds, got {seeds!r}; or set it to null for train.seed alone")
    return list(seeds)


def _stage_train(cfg: Config, runs: list[str]) -> list[str]:
    from pipeline.cli_train import run_train
    from trainer.plan import make_job
    names = []
    for variant in _train_variants(cfg):
        name = make_job(variant).name
        console.print(f"[bold]train {name}[/bold]")
        run_train(variant, name)
        names.append(name)
    return names


def _stage_eval(cfg: Config, runs: list[str]) -> None:
    from pipeline.cli_eval import run_eval
    from trainer.evaluate import find_run
    for name in runs or [v.name for v in map(_job_for, _train_variants(cfg))]:
        folder = find_run(Path(cfg.root), name)
        result = folder.final.with_name("eval.json")
        weights = folder.weights(cfg.eval.weights)
        if result.exists() and result.stat().st_mtime >= weights.stat().st_mtime and _same_eval(result, cfg):
            console.print(f"cached: {result} (newer than the run's weights, same settings)", highlight=False)
            continue
        run_eval(cfg, name, None)


def _job_for(cfg: Config):
    from trainer.plan import make_job
    return make_job(cfg)


def _same_eval(path: Path, cfg: Config) -> bool:
    import json
    return json.loads(path.read_text()).get("settings") == dict(cfg.eval)


def _stage_report(cfg: Config, runs: list[str]) -> None:
    from pipeline.cli_eval import run_report
    run_report(cfg, runs or [v.name for v in map(_job_for, _train_variants(cfg))])


STAGE_RUNNERS = {"import": _stage_import, "fit-diffusion": _stage_fit, "generate": _stage_generate,
                 "extract-features": _stage_extract, "train": _stage_train, "eval": _stage_eval,
                 "report": _stage_report}


# --- bench ---------------------------------------------------------------------------------------------------

BENCHES = ("stores", "generate", "extract", "sampler", "train")


@app.command("bench")
def bench_cmd(
    what: str = typer.Argument("stores", help="stores | generate | extract | sampler | train"),
    samples: int = typer.Option(100_000, "--samples", help="stores: samples in the synthetic benchmark set"),
    batch: int = typer.Option(512, "--batch", help="stores: batch size of the streaming reader"),
    workers: int = typer.Option(2, "--workers", help="stores: DataLoader worker processes"),
    cold: bool = typer.Option(True, "--cold/--warm-only", help="stores: also time cold passes (drops the page cache; needs root)"),
    n: Optional[int] = typer.Option(None, "--n", help="generate: images to generate per pass"),
    work_dir: Optional[Path] = typer.Option(None, "--dir", help="where to build benchmark data (default: <root>/bench)"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Measure a stage against its bare baseline in the same run (ratios, not absolute times)."""
    cfg = resolve(config, root)
    work = work_dir or Path(cfg.root) / "bench"
    if what == "stores":
        from pipeline.bench import bench_stores
        bench_stores(work, samples, batch, workers, cold, console)
    elif what == "generate":
        from pipeline.bench_generate import bench_generate
        bench_generate(cfg, work / "generate", n, console)
    elif what == "extract":
        from pipeline.bench_extract import bench_extract
        bench_extract(cfg, console)
    elif what == "sampler":
        from pipeline.bench_sampler import bench_sampler
        bench_sampler(cfg, console)
    elif what == "train":
        from pipeline.bench_train import bench_train
        bench_train(cfg, console, work_dir=work / "train")
    else:
        raise UserError(f"unknown benchmark {what!r}; available: {', '.join(BENCHES)}")


# --- registered command modules (each defines register(app); one line per module) --------------------------
__import__("pipeline.cli_train", fromlist=["register"]).register(app)
__import__("pipeline.cli_generate", fromlist=["register"]).register(app)
__import__("pipeline.cli_extract", fromlist=["register"]).register(app)
__import__("pipeline.cli_eval", fromlist=["register"]).register(app)
__import__("pipeline.cli_select", fromlist=["register"]).register(app)


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
    except KeyboardInterrupt:
        print("interrupted: finished shards and checkpoints are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        from pipeline.shard_runner import ShardFailed, WorkerStartError
        if isinstance(exc, (ShardFailed, WorkerStartError)):
            print(f"error: {exc}; finished shards are kept, rerun the same command to resume", file=sys.stderr)
            sys.exit(1)
        raise

if __name__ == "__main__":
    main()
