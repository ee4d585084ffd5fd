"""`dra-pipe select`: DM-AT's selection of a generated set, the top fraction of each class by a classifier
(pipeline.select)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import ConfigOpt, RootOpt, WaitOpt, given, resolve
from pipeline.select import run_select


def register(app: typer.Typer) -> None:
    @app.command("select")
    def select_cmd(
        source: Optional[str] = typer.Argument(None, help="image set to select from (default: the generated set, "
                                                          "generate.name)"),
        scorer: str = typer.Option(..., "--scorer", help="the classifier that scores: a run name (its eval.weights) or "
                                                         "a classifier file from `dra-pipe export`; DM-AT used a "
                                                         "standard (non-robust) WRN-28-10"),
        fraction: float = typer.Option(0.2, "--fraction", help="fraction of each class to keep (DM-AT: 0.2, 5M -> 1M)"),
        out: Optional[str] = typer.Option(None, "--out", parser=given, help="name of the selected set "
                                                                            "(default: the source's name + `-top20` "
                                                                            "for --fraction 0.2)"),
        batch_size: int = typer.Option(512, "--batch-size", help="images per scoring batch"),
        wait: bool = WaitOpt,
        config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
    ):
        """Keep the most confidently recognised fraction of each class of a generated set, as a new image set
        (DM-AT's 1M CIFAR-10 set: the top 20% of 5M by a standard classifier's softmax score). Resumable."""
        cfg = resolve(config, root)
        run_select(cfg, source, scorer, fraction, out, batch_size, wait)
