"""`dra-pipe model info` and `fit-diffusion`: inspect a diffusion model, train one on an image set."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import ConfigOpt, RootOpt, console, human_bytes, interrupted, resolve, WaitOpt
from pipeline.config import Config
from pipeline.models import fit_settings, fitted_model_dir, resolve_model_spec
from pipeline.progress import RateBar
from pipeline.workflow import real_train_set
from stores.errors import UserError
from stores.workspace import check_writable

model_app = typer.Typer(help="Inspect diffusion models.", no_args_is_help=True)
ModelOpt = typer.Option(None, "--model", "-m", help="edm:PATH.pkl | diffusers:DIR | dra:DIR | fit (the model fit-diffusion made) [config model.spec]")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
    model_app.command("info")(model_info_cmd)
    app.command("fit-diffusion")(fit_diffusion_cmd)


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


def fit_diffusion_cmd(
    images: Optional[str] = typer.Option(None, "--images", help="image set to train on (default: the real training set)"),
    duration_kimg: Optional[float] = typer.Option(None, "--duration-kimg", help="training length in thousands of images [config fit_diffusion.duration_kimg]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per step [config fit_diffusion.batch_size]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed [config fit_diffusion.seed]"),
    wait: bool = WaitOpt,
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Train a class-conditional EDM on an image set (resumable), saved as safetensors + JSON."""
    cfg = resolve(config, root, {"fit_diffusion.duration_kimg": duration_kimg, "fit_diffusion.batch_size": batch_size,
                                 "fit_diffusion.seed": seed})
    run_fit_diffusion(cfg, images, wait)


def run_fit_diffusion(cfg: Config, images_name: str | None, wait: bool = False) -> Path:
    """Fit (or resume) the model, holding its lock (in its training folder) while it trains: one fit at a time."""
    from stages.fit_diffusion import network_config, training_dir
    from stores.images import ImageSet
    from stores.locks import writer_lock
    images = ImageSet.open(Path(cfg.root), images_name or real_train_set(cfg))
    if not images.complete:
        raise UserError(f"image set {images.name} is incomplete ({len(images.missing_shards())} shards missing); rerun the stage that writes it")
    out = fitted_model_dir(cfg, images.name)
    if (out / "config.json").exists():
        console.print(f"cached: model {out.name} (fit on {images.name} with these settings) - nothing to do")
        return out
    check_writable(Path(cfg.root))
    settings = fit_settings(cfg)
    network_config(images, settings)                 # bad levels or batch refused before anything is written
    if settings.batch_size > images.n:
        raise UserError(f"fit_diffusion.batch_size {settings.batch_size} exceeds the {images.n} images of {images.name}")
    with writer_lock(training_dir(out), f"model {out.name}", wait):
        return _fit(cfg, images, out)


def _fit(cfg: Config, images, out: Path) -> Path:
    from stages.fit_diffusion import Trainer
    if (out / "config.json").exists():
        console.print(f"cached: model {out.name} (another fit finished it while this one waited) - nothing to do")
        return out
    settings = fit_settings(cfg)
    trainer = Trainer(images, settings, out)
    start = trainer.step
    console.print(f"fit-diffusion on {images.name}: {settings.total_steps} steps of {settings.batch_size} "
                  f"({settings.duration_kimg:g} kimg)" + (f", resuming at step {start}" if trainer.resumed else ""))
    with RateBar("fit-diffusion", "images", total=(settings.total_steps - start) * settings.batch_size) as bar:
        try:
            fingerprint = trainer.run(lambda n, loss: bar.advance(n, f"loss {loss:.4f}"))
        except KeyboardInterrupt:
            bar.close()
            raise interrupted(f"at step {trainer.step}; checkpoint saved - rerun the same command to resume")
    console.print(f"saved model {out} (fingerprint {fingerprint[:16]}); throughput: {bar.rate:,.0f} images/s")
    return out
