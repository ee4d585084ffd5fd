"""`dra-pipe repair [NAME...]`: rewrite exactly the damaged or missing shards of image and feature sets."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional, TYPE_CHECKING

import typer

from pipeline.cli.common import ConfigOpt, console, interrupted, resolve, RootOpt, shard_list, WaitOpt

if TYPE_CHECKING:
    from pipeline.repair import RepairPlan


def register(app: typer.Typer) -> None:
    app.command("repair")(repair_cmd)


def repair_cmd(
    names: Optional[List[str]] = typer.Argument(None, help="image-set names or feature keys (default: every set)"),
    sources: Optional[List[Path]] = typer.Option(None, "--from", metavar="PATH", help="imported sets: the source file or folder, where the recorded one moved (npz: repeat it for each file, in order)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="generated and feature sets: the model spec, where the recorded one moved"),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPU actors when there is no GPU [config ray.cpu_actors]"),
    wait: bool = WaitOpt,
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Find each set's damaged or missing shards (as `verify` does) and redo exactly those from the recorded source
    or model, with the bytes they had. Every input is checked before anything is written."""
    from pipeline.repair import plan_repair
    from pipeline.shards.cluster import ray_session
    from stores.catalog import resolve_set
    from stores.features import list_feature_sets
    from stores.images import list_image_sets
    cfg = resolve(config, root, {"ray.cpu_actors": workers})
    base = Path(cfg.root)
    targets = [resolve_set(base, name) for name in dict.fromkeys(names)] if names else \
        [("images", p) for p in list_image_sets(base)] + [("features", p) for p in list_feature_sets(base)]
    targets.sort(key=lambda t: t[0] != "images")            # image sets first: feature sets are computed from them
    if not targets:
        console.print(f"nothing under {base} to repair")
        return
    wanted = {path.name for _, path in targets}
    plans = [plan_repair(cfg, kind, path, [str(s) for s in sources or []], model, wait, wanted) for kind, path in targets]
    on_ray = any(p.on_ray for p in plans if p.shards)
    with ray_session(cfg.ray.address, cfg.ray.num_cpus) if on_ray else nullcontext():     # one Ray for every set
        for plan in plans:
            redo(plan)


def redo(plan: RepairPlan) -> None:
    """Redo one set's shards and report them with the throughput."""
    what = "image set" if plan.kind == "images" else "feature set"
    if not plan.shards:
        console.print(f"{what} {plan.name}: nothing damaged", highlight=False)
        return
    started = time.perf_counter()
    try:
        images = plan.redo()
    except KeyboardInterrupt:
        raise interrupted(f"shards of {plan.name} redone so far are kept; rerun `dra-pipe repair` to finish") from None
    seconds = time.perf_counter() - started
    console.print(f"repaired {what} {plan.name}: shard(s) {shard_list(plan.shards)} redone, {images:,} images in "
                  f"{seconds:.1f} s ({images / max(seconds, 1e-9):,.1f} images/s)", highlight=False)
