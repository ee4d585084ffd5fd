"""Extract-features: frozen diffusion targets for every image, cached by identity, computed on Ray workers."""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.console import console, human_bytes, shard_list
from pipeline.models import model_provenance, resolve_model_spec
from pipeline.workflow import real_train_set, training_generated_set
from stages.specs import parse_spec
from stores.errors import IntegrityError, UserError
from stores.features import FeatureSetWriter
from stores.images import ImageSet, damaged_shards, image_set_dir
from stores.workspace import check_writable

BIG_PLAN_BYTES = 100e9     # above this the plan points at pooling


@dataclass
class Output:
    """One feature set to fill: an image set at one noise level."""

    images: ImageSet
    level: object            # stages.extract.NoiseLevel
    writer: FeatureSetWriter
    pending: list[int]       # image-shard indices still missing
    views: object            # stores.views.ViewSpec of the set

    @property
    def bytes_per_sample(self) -> int:
        c, h, w = self.writer.layout["sample_shape"]
        return stored_bytes(self.writer.layout["dtype"]) * c * h * w * self.writer.layout["views"]


def stored_bytes(dtype: str) -> int:
    """Bytes per stored target value."""
    import numpy as np
    return np.dtype(dtype).itemsize


def noise_levels(cfg: Config, sigmas: list[float]) -> list:
    from stages.extract import NoiseLevel
    levels = [NoiseLevel.from_sigma(s) for s in sigmas] if sigmas else \
        [NoiseLevel.from_timestep(t) for t in cfg.features.timesteps]
    if not levels:
        raise UserError("no noise level: pass --timestep T or --sigma S (or set features.timesteps)")
    return list(dict.fromkeys(levels))


def default_image_sets(cfg: Config) -> list[str]:
    names = [real_train_set(cfg)]
    if (image_set_dir(Path(cfg.root), training_generated_set(cfg)) / "dataset.json").exists():
        names.append(training_generated_set(cfg))
    return names


def open_image_sets(cfg: Config, names: list[str]) -> list[ImageSet]:
    sets = []
    for name in names:
        if not (image_set_dir(Path(cfg.root), name) / "dataset.json").exists():
            raise UserError(f"image set {name!r} not found under {cfg.root}; `dra-pipe ls` lists the sets")
        s = ImageSet.open(Path(cfg.root), name)
        s.require_complete("finish the stage that writes it first")
        damaged = damaged_shards(s.path, s.records)
        if damaged:
            raise IntegrityError(f"image set {name}: shard(s) {shard_list(damaged)} are damaged; "
                                 f"`dra-pipe repair {name}` redoes them")
        sets.append(s)
    return sets


def plan_outputs(cfg: Config, spec: str, net, sets: list[ImageSet], levels: list) -> tuple[list[Output], str]:
    from pipeline.plans.features import views_for
    from stages.extract import (
        check_compatible,
        check_layer,
        check_stored_dtype,
        feature_identity,
        target_shape,
    )
    from stages.fingerprint import model_fingerprint
    from stages.generate import pick_device
    from stages.precision import check_compute_dtype
    f = cfg.features
    stored, computed = check_stored_dtype(f.dtype), check_compute_dtype(cfg.model.dtype, pick_device())
    layer = check_layer(net, cfg.features.layer)
    shape = target_shape(net, layer, cfg.features.pool)
    fingerprint = model_fingerprint(net)
    outputs = []
    for images in sets:
        check_compatible(net, images)
        views = views_for(cfg, images.identity.get("kind", "real"))
        for level in levels:
            identity = feature_identity(images, fingerprint, layer, level, f.noise_seed, f.pool, views,
                                        bool(net.label_dim), stored, computed)
            provenance = {**model_provenance(spec, Path(cfg.root)), "batch_size": f.batch_size}
            writer = FeatureSetWriter(Path(cfg.root), identity, images.n, images.shard_size, shape, views.count,
                                      f.compression, provenance=provenance, dtype=stored)
            outputs.append(Output(images, level, writer, writer.pending(images.plan_indices()), views))
    return outputs, layer


def probe_rate(net, output: Output, layer: str, cfg: Config) -> float:
    """Images/s (all their views) of the target computation on one batch (for the plan's time estimate)."""
    from stages.extract import compute_targets
    from stores.views import ViewSpec
    images, views = output.images, output.views
    shard = images.read_shard(images.plan_indices()[0])
    n = min(max(1, cfg.features.batch_size // views.count), len(shard.ids))
    one = ViewSpec(1, 0, False)
    dtypes = (cfg.model.dtype, cfg.features.dtype)
    compute_targets(net, shard.ids[:n], shard.images[:n], shard.labels[:n], layer, output.level, 0, cfg.features.pool,
                    one, images.fingerprint, *dtypes)
    started = time.perf_counter()
    compute_targets(net, shard.ids[:n], shard.images[:n], shard.labels[:n], layer, output.level,
                    cfg.features.noise_seed, cfg.features.pool, views, images.fingerprint, *dtypes)
    return n / (time.perf_counter() - started)


def print_plan(outputs: list[Output], layer: str, rate: float, workers: int) -> None:
    from rich.table import Table
    table = Table("image set", "noise level", "feature key", "samples", "views", "bytes/image", "total", "state")
    todo_samples, todo_bytes = 0, 0
    for o in outputs:
        missing = sum(p.count for p in o.images.plan() if p.index in set(o.pending))
        total = o.images.n * o.bytes_per_sample
        state = "cached" if not o.pending else (f"{len(o.pending)} of {len(o.images.plan())} shards to do")
        table.add_row(o.images.name, o.level.label(), o.writer.path.name, f"{o.images.n:,}", str(o.views.count),
                      human_bytes(o.bytes_per_sample),
                      human_bytes(total), state)
        todo_samples += missing
        todo_bytes += missing * o.bytes_per_sample
    shape = "x".join(map(str, outputs[0].writer.layout["sample_shape"]))
    o = outputs[0]
    console.print(f"plan: layer {layer}, targets {shape} {o.writer.layout['dtype']} per view; views made for crop pad "
                  f"{o.views.pad}, flip {'on' if o.views.flip else 'off'}; computed in "
                  f"{o.writer.identity.get('compute_dtype', 'float32')}", highlight=False)
    console.print(table)
    hours = todo_samples / max(rate * workers, 1e-9) / 3600
    console.print(f"to compute: {todo_samples:,} images (all their views), {human_bytes(todo_bytes)} on disk, "
                  f"~{hours * 60:,.1f} min at {rate:,.0f} samples/s per worker x {workers}")
    _pooling_hint(todo_bytes)


def _missing_inputs(cfg: Config, names: list[str]) -> bool:
    """Whether a dry run must plan: an image set or the model is not here yet."""
    root = Path(cfg.root)
    wanted = names or [real_train_set(cfg), training_generated_set(cfg)]
    if any(not (image_set_dir(root, name) / "dataset.json").exists() for name in wanted):
        return True
    try:
        spec = resolve_model_spec(cfg)
    except UserError:
        return cfg.model.spec == "fit"                   # not fitted yet; any other problem is reported later
    return not parse_spec(spec).exists()


def print_planned(cfg: Config, names: list[str], levels: list) -> None:
    """The plan from the configuration: sets that are not here are planned (the real set from the importer, the
    generated one from generate.n), a missing published checkpoint by its architecture; FLOPs of the tap counted."""
    from pipeline.estimates import describe_hours, duration, forward_flops, gpu_hours
    from pipeline.plans.features import views_for
    from pipeline.plans.inputs import planned_generated, planned_real, teacher_for_plan
    from stages.extract import check_layer, target_shape
    from stages.generate import time_forward
    net, _, note = teacher_for_plan(cfg)
    if note:
        console.print(f"planned: {note}", highlight=False, soft_wrap=True)
    layer = check_layer(net, cfg.features.layer)
    c, h, w = target_shape(net, layer, str(cfg.features.pool))
    root, sets = Path(cfg.root), []
    for name in names or [real_train_set(cfg), training_generated_set(cfg)]:
        if (image_set_dir(root, name) / "dataset.json").exists():
            sets.append(ImageSet.open(root, name))
            continue
        if names:
            raise UserError(f"image set {name!r} not found under {cfg.root}; a dry run plans only the configured sets")
        planned = planned_real(cfg) if name == real_train_set(cfg) else planned_generated(cfg, net_shape(net))
        made_by = "dra-pipe import" if name == real_train_set(cfg) else "dra-pipe generate"
        console.print(f"planned: {planned.describe(made_by)}", highlight=False, soft_wrap=True)
        sets.append(planned)
    kinds = {real_train_set(cfg): "real"}
    spec = views_for(cfg, "real")
    nbytes = stored_bytes(cfg.features.dtype)
    console.print(f"plan: layer {layer}, targets {c}x{h}x{w} {cfg.features.dtype} per view at "
                  f"{', '.join(level.label() for level in levels)}; views made for crop pad {spec.pad}, flip "
                  f"{'on' if spec.flip else 'off'}; computed in {cfg.model.dtype}", highlight=False)
    forwards, total = 0, 0
    for s in sets:
        count = views_for(cfg, kinds.get(s.name, "generated")).count
        per_image = nbytes * c * h * w * count * len(levels)
        forwards, total = forwards + s.n * count * len(levels), total + s.n * per_image
        console.print(f"      {s.name}: {s.n:,} images x {count} view(s) x {len(levels)} noise level(s) x "
                      f"{human_bytes(nbytes * c * h * w)} = {human_bytes(per_image)} per image, "
                      f"{human_bytes(s.n * per_image)}",
                      highlight=False)
    tap_flops, full_flops = _tap_flops(net, layer), forward_flops(net)
    console.print(f"compute: one tapped forward per view and noise level ({forwards:,}) x {tap_flops / 1e9:,.3g} GFLOP "
                  f"(the network up to {layer}; a full forward is {full_flops / 1e9:,.3g}); "
                  f"{describe_hours(gpu_hours(forwards * tap_flops))}", highlight=False, soft_wrap=True)
    seconds = time_forward(net, 4, 1, cfg.model.dtype) * tap_flops / full_flops
    console.print(f"here: ~{duration(forwards * seconds / cfg.ray.cpu_actors)} on {cfg.ray.cpu_actors} CPU worker(s) "
                  f"(measured one full forward, scaled to the tap)", highlight=False, soft_wrap=True)
    _pooling_hint(total)
    console.print("dry run: nothing written")


def _pooling_hint(total_bytes: float) -> None:
    if total_bytes > BIG_PLAN_BYTES:
        console.print(f"[yellow]that is {human_bytes(total_bytes)}: --pool 2 stores 4x less, --pool 4 16x less, "
                      f"--pool global keeps one vector per image[/yellow]")


def net_shape(net):
    from types import SimpleNamespace
    return SimpleNamespace(classes=net.label_dim, channels=net.img_channels, resolution=net.img_resolution)


def _tap_flops(net, layer: str) -> float:
    import torch

    from pipeline.estimates import count_flops
    from stages.taps import features
    x = torch.zeros(1, net.img_channels, net.img_resolution, net.img_resolution)
    labels = torch.zeros(1, net.label_dim) if net.label_dim else None
    with torch.no_grad():
        return count_flops(lambda: features(net, x, torch.ones(1), labels, [layer]))


def check_writable_root(cfg: Config) -> None:
    check_writable(Path(cfg.root))


def run_extract(cfg: Config, sigmas: list[float], names: list[str], dry_run: bool, wait: bool = False) -> list[Path]:
    from stages.models import load_model
    levels = noise_levels(cfg, sigmas)
    if dry_run and _missing_inputs(cfg, names):
        print_planned(cfg, names, levels)
        return []
    spec = resolve_model_spec(cfg)
    sets = open_image_sets(cfg, names or default_image_sets(cfg))
    net = load_model(spec)
    outputs, layer = plan_outputs(cfg, spec, net, sets, levels)
    pending = [o for o in outputs if o.pending]
    for o in outputs:
        if o.writer.damaged:
            console.print(f"{o.writer.path.name}: shard(s) {shard_list(o.writer.damaged)} are damaged (deleted, "
                          f"truncated or corrupted); redoing them", highlight=False)
        if not o.pending:
            console.print(f"cached: {o.writer.path.name} ({o.images.name}, {o.level.label()}, {layer})")
    if not pending:
        return [o.writer.path for o in outputs]
    check_writable_root(cfg)
    rate = probe_rate(net, pending[0], layer, cfg)
    print_plan(outputs, layer, rate, cfg.ray.cpu_actors)
    if dry_run:
        return []
    del net
    with ExitStack() as locks:                    # every set to write is locked before Ray starts
        for o in pending:
            locks.enter_context(o.writer.lock(wait))
        execute(cfg, spec, layer, pending)
    return [o.writer.path for o in outputs]


def execute(cfg: Config, spec: str, layer: str, outputs: list[Output]):
    """Create the feature sets, then compute the missing shards on Ray; the driver records each after its data."""
    from functools import partial

    from pipeline.shards.cluster import cluster_nodes, plan_actors, ray_session
    from pipeline.shards.progress import run_with_progress
    from stages.extract import FeaturePayload, FeatureWorker
    from stores.manifest import ShardJob
    check_writable(Path(cfg.root))
    for o in outputs:
        o.writer.begin()
        o.pending = o.writer.pending(o.images.plan_indices())          # read under the lock
    jobs = []
    for images in {id(o.images): o.images for o in outputs}.values():
        mine = [o for o in outputs if o.images is images]
        for plan in images.plan():
            todo = tuple((str(o.writer.path), o.level) for o in mine if plan.index in o.pending)
            if todo:
                payload = FeaturePayload(str(images.path.resolve()), todo, mine[0].views)
                jobs.append(ShardJob(plan.index, plan.first_id, plan.count, payload))
    writers = {str(o.writer.path): o.writer for o in outputs}
    factory = partial(FeatureWorker, spec, layer, cfg.features.pool, cfg.features.noise_seed,
                      cfg.features.batch_size, compute_dtype=cfg.model.dtype, stored_dtype=cfg.features.dtype)

    def record(job: ShardJob, results) -> None:
        for (folder, _), result in zip(job.payload.outputs, results):
            writers[folder].record(result)

    with ray_session(cfg.ray.address, cfg.ray.num_cpus):
        actors = plan_actors(cluster_nodes(), cfg.ray.cpu_actors)
        summary = run_with_progress("extract", "images", jobs, factory, actors, cfg.ray.max_retries, record,
                                    kept=lambda: "completed feature shards are kept; rerun the same command to resume")
    rate = summary.items / max(summary.seconds, 1e-9)
    console.print(f"extracted targets for {summary.items:,} images in {summary.shards} shard jobs in "
                  f"{summary.seconds:.1f} s: "
                  f"{rate:,.1f} images/s on {actors.describe()}, model busy {summary.busy_fraction:.0%}"
                  + (f", {summary.retries} retries" if summary.retries else ""), highlight=False)
    for o in outputs:
        console.print(f"features: {o.writer.path.name} ({o.images.name}, {o.level.label()}, {layer}) complete",
                      highlight=False)
    return summary
