"""`dra-pipe bench extract`: extract-features on Ray against a bare loop of the same forward passes, in one run.

Data: the generated set when it is complete and larger, else the real training set (imported if missing).
Model: the configured one if it resolves, else a freshly initialised network of the fit-diffusion size (the cost
of a forward does not depend on the weights).
bare      decode each shard and compute its targets in this process (same batch, threads, layer, pooling, views),
          nothing written
bare xN   the same loop in N plain processes at once, each on every N-th shard (N = the pipeline's CPU workers):
          what the cores give without Ray, zarr or checksums. The goal is judged against it, since two processes on
          two cores share caches and memory bandwidth whatever the pipeline does. It runs before and after the
          pipeline and the two rates are averaged (with one worker: the bare loop, before and after), since this
          machine is shared and a single pass of seconds swings by 10-20%
pipeline  `extract-features` on a fresh feature root: Ray actors, zarr writes, checksums, meta.json
The ratio uses the runner's own timing (first dispatch to last record); Ray start-up is shown apart.
"""
from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from pipeline.config import Config
from pipeline.data import import_configured
from pipeline.extract import execute, noise_levels, open_image_sets, plan_outputs
from pipeline.models import fit_settings, resolve_model_spec
from pipeline.shards.cluster import cluster_nodes, plan_actors, ray_session
from pipeline.workflow import real_train_set, training_generated_set
from stages.edm.networks import EDMPrecond
from stages.extract import check_layer, compute_targets
from stages.fit_diffusion import network_config
from stages.models import load_model, save_own
from stores.errors import UserError
from stores.images import ImageSet


def bench_extract(cfg: Config, console: Console) -> dict:
    work = Path(cfg.root) / "bench" / "extract"
    if not (Path(cfg.root) / "images" / real_train_set(cfg) / "dataset.json").exists():
        import_configured(cfg)
    spec, label = _model_spec(cfg, work, resolve_model_spec)
    images = _largest_set(cfg, open_image_sets)
    level = noise_levels(cfg, [])[0]
    net = load_model(spec)
    layer = check_layer(net, cfg.features.layer)
    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        actors = plan_actors(cluster_nodes(), cfg.ray.cpu_actors)
        parallel = actors.actors > 1 and not actors.num_gpus
        bare = _bare(net, images, layer, level, cfg, actors.threads)
        reference = (lambda: _bare_parallel(spec, images, layer, level, cfg, actors)) if parallel else \
            (lambda: _bare(net, images, layer, level, cfg, actors.threads))
        before = reference() if parallel else bare
        pipe = _pipeline(cfg, spec, images.name, work)
        after = reference()
    name = f"bare x{actors.actors}" if parallel else "bare loop"
    table = Table("path", "images", "seconds", "images/s",
                  title=f"bench extract on {images.name} ({len(images.plan())} "
                  f"shards): {label}, {layer}, {level.label()}, "
                  f"pool {cfg.features.pool}, {_views(cfg, images).label()}, {actors.describe()}")
    rows = {"bare loop": bare, f"{name} before": before, "pipeline": pipe, f"{name} after": after}
    for row, r in rows.items():
        if row != "bare loop" or parallel:
            table.add_row(row, f"{r['images']:,}", f"{r['seconds']:.2f}", f"{r['rate']:,.1f}")
    console.print(table)
    reference_rate = (before["rate"] + after["rate"]) / 2
    per_worker = pipe["rate"] / bare["rate"] / actors.actors
    ratio = pipe["rate"] / reference_rate / (1 if parallel else actors.actors)
    against = name if parallel else "bare" + (" per worker" if actors.actors > 1 else "")
    console.print(f"pipeline / {against} (mean of before and after): {ratio:.3f} (goal >= 0.9 on the CPU, >= 0.95 on "
                  f"a GPU); pipeline / one bare process per worker: {per_worker:.3f}; Ray start-up and actor set-up "
                  f"{pipe['startup']:.1f} s not counted", highlight=False)
    return {"bare": bare, "reference_before": before, "reference_after": after, "pipeline": pipe, "ratio": ratio,
            "ratio_per_worker": per_worker}


def _largest_set(cfg: Config, open_image_sets):
    """The generated set when it is complete (more shards keep every worker busy to the end), else the real one."""
    real = open_image_sets(cfg, [real_train_set(cfg)])[0]
    try:
        generated = ImageSet.open(Path(cfg.root), training_generated_set(cfg))
    except UserError:
        return real
    return generated if generated.complete and generated.n > real.n else real


def _model_spec(cfg: Config, work: Path, resolve_model_spec) -> tuple[str, str]:
    try:
        return resolve_model_spec(cfg), f"model {cfg.model.spec}"
    except UserError:
        images = ImageSet.open(Path(cfg.root), real_train_set(cfg))
        folder = work / "untrained-model"
        torch.manual_seed(0)
        save_own(EDMPrecond(**network_config(images, fit_settings(cfg))).eval(), folder, {"bench": True})
        return f"dra:{folder.resolve()}", "untrained network of the fit-diffusion size"


def _views(cfg: Config, images: ImageSet):
    from pipeline.plans.features import views_for
    return views_for(cfg, images.identity.get("kind", "real"))


def _bare(net, images, layer: str, level, cfg: Config, threads: int, shards: list[int] | None = None,
          ready=None) -> dict:
    """The same views per image in a plain loop (batch_size // V images per forward, as the workers do).

    shards: the shards to run (default all); ready: a barrier passed once warmed up, so parallel copies
    start together."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    f, views = cfg.features, _views(cfg, images)
    b = max(1, f.batch_size // views.count)
    try:
        first = images.read_shard(images.plan_indices()[0])
        compute_targets(net, first.ids[:b], first.images[:b], first.labels[:b], layer, level, f.noise_seed, f.pool,
                        views, images.fingerprint)
        if ready is not None:
            ready.wait()
        started, count = time.perf_counter(), 0
        for index in images.plan_indices() if shards is None else shards:
            shard = images.read_shard(index)
            for lo in range(0, len(shard.ids), b):
                sl = slice(lo, lo + b)
                compute_targets(net, shard.ids[sl], shard.images[sl], shard.labels[sl], layer, level, f.noise_seed,
                                f.pool, views, images.fingerprint)
            count += len(shard.ids)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return {"images": count, "seconds": seconds, "rate": count / seconds}


def _bare_parallel(spec: str, images: ImageSet, layer: str, level, cfg: Config, actors) -> dict:
    """`_bare` in actors.actors plain processes at once, shard i in process i mod N; rate = images / slowest."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    indices = images.plan_indices()
    with context.Manager() as manager:
        ready = manager.Barrier(actors.actors)
        with context.Pool(actors.actors) as pool:
            parts = pool.starmap(_bare_process, [(spec, str(images.path), layer, level, cfg, actors.threads,
                                                  indices[i::actors.actors], ready) for i in range(actors.actors)])
    count, seconds = sum(p["images"] for p in parts), max(p["seconds"] for p in parts)
    return {"images": count, "seconds": seconds, "rate": count / seconds}


def _bare_process(spec: str, image_path: str, layer: str, level, cfg: Config, threads: int, shards: list[int],
                  ready) -> dict:
    return _bare(load_model(spec), ImageSet(Path(image_path)), layer, level, cfg, threads, shards, ready)


def _pipeline(cfg: Config, spec: str, image_set: str, work: Path) -> dict:
    """extract-features into a throw-away copy of the workspace's feature area."""
    features_root = work / "root"
    shutil.rmtree(features_root, ignore_errors=True)
    (features_root / "images").mkdir(parents=True)
    (features_root / "images" / image_set).symlink_to((Path(cfg.root) / "images" / image_set).resolve())
    bench_cfg = copy.deepcopy(cfg)
    bench_cfg["root"] = str(features_root.resolve())
    sets = open_image_sets(bench_cfg, [image_set])
    outputs, layer = plan_outputs(bench_cfg, spec, load_model(spec), sets, noise_levels(bench_cfg, [])[:1])
    summary = execute(bench_cfg, spec, layer, outputs)
    return {"images": summary.items, "seconds": summary.seconds, "rate": summary.items / summary.seconds,
            "startup": summary.startup_seconds}
