"""Fit-diffusion (train a class-conditional EDM on an image set) and `model info` (a model's layers and size)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from pipeline.config import Config
from pipeline.console import console, human_bytes, report_interrupt
from pipeline.models import fit_settings, fitted_model_dir, resolve_model_spec
from pipeline.progress import RateBar
from pipeline.workflow import real_train_set
from stores.errors import UserError
from stores.workspace import check_writable


def show_model(cfg: Config) -> None:
    """The configured model's feature layers with their output shapes, its parameter count and fingerprint."""
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


def run_fit_diffusion(cfg: Config, images_name: str | None, wait: bool = False) -> Path:
    """Fit (or resume) the model, holding its lock (in its training folder) while it trains: one fit at a time."""
    from stages.fit_diffusion import network_config, training_dir
    from stores.images import ImageSet
    from stores.locks import writer_lock
    images = ImageSet.open(Path(cfg.root), images_name or real_train_set(cfg))
    images.require_complete("rerun the stage that writes it")
    out = fitted_model_dir(cfg, images.name)
    if (out / "config.json").exists():
        console.print(f"cached: model {out.name} (fit on {images.name} with these settings) - nothing to do")
        return out
    check_writable(Path(cfg.root))
    settings = fit_settings(cfg)
    network_config(images, settings)                 # bad levels or batch refused before anything is written
    if settings.batch_size > images.n:
        raise UserError(f"fit_diffusion.batch_size {settings.batch_size} exceeds the {images.n} images of "
                        f"{images.name}")
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
            report_interrupt(f"at step {trainer.step}; checkpoint saved - rerun the same command to resume")
            raise
    console.print(f"saved model {out} (fingerprint {fingerprint[:16]}); throughput: {bar.rate:,.0f} images/s")
    return out
