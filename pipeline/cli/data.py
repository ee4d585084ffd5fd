"""`dra-pipe config`, `import`, `ls` and `verify`: the configuration, real data into image sets, the catalog
(pipeline.data)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import ConfigOpt, RootOpt, WaitOpt, console, given, given_root, resolve
from pipeline.config import explain, to_yaml
from pipeline.data import import_data, list_sets, verify
from stores.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("config")(config_cmd)
    app.command("import")(import_cmd)
    app.command("ls")(ls_cmd)
    app.command("verify")(verify_cmd)


def config_cmd(config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
               explain_keys: bool = typer.Option(False, "--explain",
                                                 help="list every key with its default and meaning")):
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


def import_cmd(
    importer: str = typer.Argument(..., help="digits | cifar10 | cifar100 | npz | folder | imagenet | imagenet64"),
    sources: Optional[list[Path]] = typer.Option(None, "--from", metavar="PATH", parser=given_root,
                                                 help="file or folder to import, on this disk or a bucket's "
                                                      "s3://BUCKET/KEY (gs:// too: brought into the node's cache "
                                                      "first) (CIFAR tarball, .npz, image folder; "
                                                      "imagenet: DIR/train/<synset>/*.JPEG and DIR/val (class "
                                                      "folders, or flat with DIR/LOC_val_solution.csv); "
                                                      "imagenet64: the folder holding train_data_batch_1..10 and "
                                                      "val_data); "
                                                      "npz: repeat it to append several files into one set, in order "
                                                      "[config data.source, when IMPORTER is data.importer]"),
    generated: bool = typer.Option(False, "--generated", help="npz only: the files hold generated images "
                                                              "(DM-AT's published data): write one generated set, the "
                                                              "trainer's generated data"),
    name: Optional[str] = typer.Option(None, "--name", parser=given,
                                       help="set name prefix; sets are <name>-<split> (default: the importer). "
                                            "With --generated: the generated set's name [default: train.generated_set, "
                                            "else generate.name, else <data name>-gen]"),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="samples per shard [config data.shard_size]"),
    image_format: Optional[str] = typer.Option(None, "--format", help="png (lossless, default) or npy (raw) "
                                                                      "[config data.image_format]"),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="imagenet only (the other importers keep "
                                                                       "their sources' size): side of the square "
                                                                       "images, centre crop then LANCZOS resize "
                                                                       "[config data.resolution]"),
    workers: Optional[int] = typer.Option(None, "--workers", help="imagenet only: CPU workers decoding in "
                                                                  "parallel [config ray.cpu_actors]"),
    wait: bool = WaitOpt,
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Import a real data set into image stores (one per split), or DM-AT's generated .npz files (--generated)."""
    cfg = resolve(config, root, {"data.shard_size": shard_size, "data.image_format": image_format,
                                 "ray.cpu_actors": workers, "data.resolution": resolution})
    import_data(cfg, importer, [str(s) for s in sources or []], name, generated, wait)


def ls_cmd(config: Path = ConfigOpt, root: Optional[Path] = RootOpt):
    """List every image and feature set under the root, with size, identity and completeness."""
    cfg = resolve(config, root)
    list_sets(Path(cfg.root))


def verify_cmd(name: Optional[str] = typer.Argument(None, help="image-set name or feature key (default: every set)"),
               recompute: int = typer.Option(0, "--recompute", help="feature sets: also recompute K random samples "
                                                                    "with the model and report the largest deviation"),
               config: Path = ConfigOpt, root: Optional[Path] = RootOpt):
    """Recompute every shard's checksum; name each missing, truncated or corrupted shard (exit 1 if any)."""
    if recompute < 0:
        raise UserError(f"--recompute {recompute}: give a number of samples >= 0")
    cfg = resolve(config, root)
    checked = verify(Path(cfg.root), name, recompute)
    console.print(f"all {checked} set(s) intact")
