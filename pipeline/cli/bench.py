"""`dra-pipe bench`: each stage against its bare baseline in the same run (ratios, not absolute times)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, console, resolve
from stores import remote
from stores.errors import UserError

BENCHES = ("stores", "generate", "extract", "sampler", "train", "targets", "gpu", "import")
CifarOpt = typer.Option(False, "--cifar/--no-cifar", help="targets: also time the online teacher on the CIFAR-size "
                        "pair (WRN-28-10 + EDM CIFAR-10; minutes here)")

FidelityOpt = typer.Option(False, "--fidelity", help="sampler: every sampler at NFE 5-35 against Heun at 35 NFE "
                                                     "(RMS in grey levels, judge agreement, images/s)")
ImagesOpt = typer.Option(64, "--images", help="sampler --fidelity: digits images per run (the CIFAR-shaped network: "
                                              "a sixteenth, at least 1)")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)


def bench_cmd(
    what: str = typer.Argument("stores", help="stores | generate | extract | sampler | train | targets | gpu | import "
                               "(stores with --root s3://...: the bucket's readers against a bare GET)"),
    samples: int = typer.Option(100_000, "--samples", help="stores: samples in the synthetic benchmark set; targets: "
                                                           "real images measured (at most one shard)"),
    batch: int = typer.Option(512, "--batch", help="stores: batch size of the streaming reader"),
    workers: int = typer.Option(2, "--workers", help="stores: DataLoader worker processes"),
    cold: bool = typer.Option(True, "--cold/--warm-only", help="stores: also time cold passes (drops the page cache; "
                                                               "needs root)"),
    n: Optional[int] = typer.Option(None, "--n", help="generate: images per pass; import: JPEGs made (2000)"),
    work_dir: Optional[Path] = typer.Option(None, "--dir", help="where to build benchmark data (default: ROOT/bench)"),
    cifar: bool = CifarOpt,
    smoke: bool = typer.Option(False, "--smoke", help="gpu: the same code paths on the CPU with tiny sizes (about a "
                                                      "minute)"),
    out: Optional[Path] = typer.Option(None, "--out", help="gpu: write the table as JSON here (default: "
                                                           "ROOT/bench/gpu/gpu.json)"),
    fidelity: bool = FidelityOpt, images: int = ImagesOpt,
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Measure a stage against its bare baseline in the same run (ratios, not absolute times)."""
    _check_sizes((("--samples", samples, 1), ("--batch", batch, 1), ("--workers", workers, 0), ("--n", n, 1),
                  ("--images", images, 1)))
    cfg = resolve(config, root)
    work = work_dir or Path(cfg.root) / "bench"
    if what == "stores" and remote.mirror_of(work) is not None:        # --root s3://...: the bucket's reader
        _bench_stores_remote(work, samples, batch, workers)
    elif what == "stores":
        from pipeline.bench.stores import bench_stores
        bench_stores(work, samples, batch, workers, cold, console)
    elif what == "generate":
        from pipeline.bench.generate import bench_generate
        bench_generate(cfg, work / "generate", n, console)
    elif what == "extract":
        from pipeline.bench.extract import bench_extract
        bench_extract(cfg, console)
    elif what == "sampler":
        _bench_sampler(cfg, fidelity, images)
    elif what == "train":
        from pipeline.bench.train import bench_train
        bench_train(cfg, console, work_dir=work / "train")
    elif what == "targets":
        from pipeline.bench.targets import bench_targets
        bench_targets(cfg, console, images=min(samples, 4096), cifar=cifar)
    elif what == "import":
        from pipeline.bench.imports import bench_import
        bench_import(cfg, n or 2000, 64, console)
    elif what == "gpu":
        _bench_gpu(cfg, work, smoke, out)
    else:
        raise UserError(f"unknown benchmark {what!r}; available: {', '.join(BENCHES)}")


def _bench_stores_remote(work: Path, samples: int, batch: int, workers: int) -> None:
    from pipeline.bench.stores_remote import bench_stores_remote
    bench_stores_remote(work / "stores-remote", samples, batch, workers, console)


def _check_sizes(sizes) -> None:
    """UserError for the first (flag, value, least) whose value is below least."""
    for flag, value, least in sizes:
        if value is not None and value < least:
            raise UserError(f"bench {flag} {value}: give a number >= {least}")


def _bench_gpu(cfg, work: Path, smoke: bool, out: Path | None) -> None:
    from pipeline.bench.gpu import bench_gpu
    from pipeline.outputs import check_output_file
    if out is not None:                       # a table written again replaces the last one: no --force needed
        check_output_file(out, Path(cfg.root), force=True)
    bench_gpu(work / ("gpu-smoke" if smoke else "gpu"), console, smoke=smoke, out=out)


def _bench_sampler(cfg, fidelity: bool, images: int) -> None:
    if fidelity:
        from pipeline.bench.fidelity import bench_fidelity
        bench_fidelity(cfg, console, images=images, cifar_images=max(1, images // 16), min_seconds=1.0)
    else:
        from pipeline.bench.sampler import bench_sampler
        bench_sampler(cfg, console)
