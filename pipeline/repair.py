"""Repair: redo exactly the damaged or missing shards of a set from what it records, with the bytes it had.

Imported sets are read again from their source (the path dataset.json records, or `--from`), generated sets are
sampled again from their model with the recorded seed, sampler and batch size, feature sets are computed again
from their image set and model. Every check (the source or model is there and is the recorded one) runs for every
set before any set is written: a missing input changes nothing.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.console import console, interrupt_reported, report_interrupt, shard_list
from pipeline.data import local_sources
from pipeline.models import model_provenance, recorded_model
from stages.specs import parse_spec
from stores.catalog import verify_feature_set, verify_image_set
from stores.errors import IntegrityError, UserError
from stores.features import FeatureSet
from stores.images import ImageSet, image_set_dir


@dataclass
class RepairPlan:
    """One set to repair: what is damaged, and how to redo it (after every set's inputs were checked)."""

    kind: str                                # images | features
    name: str
    shards: list[int]                        # damaged or never completed shard indices
    redo: Callable[[], int] | None = None    # redoes them under the set's lock; returns images processed
    on_ray: bool = False                     # redone on Ray actors (generated and feature sets)


def repair_sets(cfg: Config, names: list[str], sources: list[str], model: str | None, wait: bool = False) -> None:
    """`dra-pipe repair`: plan every named set (default: all; image sets first, as feature sets are computed from
    them), checking all their inputs, then redo each one's shards (on one Ray for every set that needs it)."""
    from pipeline.shards.cluster import ray_session
    from stores.catalog import resolve_set
    from stores.features import list_feature_sets
    from stores.images import list_image_sets
    base = Path(cfg.root)
    targets = [resolve_set(base, name) for name in dict.fromkeys(names)] if names else \
        [("images", p) for p in list_image_sets(base)] + [("features", p) for p in list_feature_sets(base)]
    targets.sort(key=lambda t: t[0] != "images")
    if not targets:
        console.print(f"nothing under {base} to repair")
        return
    if sources and not any(_reads_source_files(kind, path) for kind, path in targets):
        named = ", ".join(path.name for _, path in targets[:3]) + (", ..." if len(targets) > 3 else "")
        raise UserError(f"--from names source files, but none of the sets to repair ({named}) was imported from a "
                        f"file (digits is embedded, generated and feature sets are computed again); leave --from out")
    wanted = {path.name for _, path in targets}
    plans = [plan_repair(cfg, kind, path, sources, model, wait, wanted) for kind, path in targets]
    on_ray = any(p.on_ray for p in plans if p.shards)
    with ray_session(cfg.ray.address, cfg.ray.num_cpus) if on_ray else nullcontext():
        for plan in plans:
            redo(plan)


def _reads_source_files(kind: str, path: Path) -> bool:
    """Whether repairing this set reads files named by --from: an image set imported from files."""
    if kind != "images":
        return False
    importer = ImageSet(path).identity.get("source", {}).get("importer")
    return importer is not None and importer != "digits"


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
        if not interrupt_reported():               # a Ray redo has said what it keeps already
            report_interrupt(f"shards of {plan.name} redone so far are kept; rerun `dra-pipe repair` to finish")
        raise
    seconds = time.perf_counter() - started
    console.print(f"repaired {what} {plan.name}: shard(s) {shard_list(plan.shards)} redone, {images:,} images in "
                  f"{seconds:.1f} s ({images / max(seconds, 1e-9):,.1f} images/s)", highlight=False)


def damaged_indices(kind: str, path: Path) -> list[int]:
    problems = verify_image_set(path) if kind == "images" else verify_feature_set(path)
    return sorted({p.shard for p in problems})


def plan_repair(cfg: Config, kind: str, path: Path, sources: list[str], model: str | None, wait: bool,
                targets: set[str]) -> RepairPlan:
    """Check the set's inputs (UserError / IntegrityError in one line); nothing is written."""
    shards = damaged_indices(kind, path)
    plan = RepairPlan(kind, path.name, shards)
    if not shards:
        return plan
    if kind == "features":
        plan.redo, plan.on_ray = _feature_redo(cfg, FeatureSet(path), model, wait, targets), True
        return plan
    images = ImageSet(path)
    src = images.identity["source"]
    if src.get("importer") == "imagenet":
        plan.redo, plan.on_ray = _imagenet_redo(cfg, images, shards, sources, wait), True
    elif "importer" in src:
        plan.redo = _import_redo(cfg, images, sources, wait)
    elif "model" in src:
        plan.redo, plan.on_ray = _generate_redo(cfg, images, model, wait), True
    else:
        raise UserError(f"image set {images.name} was made by `dra-pipe select`, which repair does not redo: delete "
                        f"{images.path} and rerun that select command")
    return plan


def _provenance(record: dict) -> dict:
    """Where a set's data came from (dataset.json / meta.json); {} for sets written before it was recorded."""
    found = record.get("provenance")
    return found if isinstance(found, dict) else {}


# --- imported sets ------------------------------------------------------------------------------------------

def _import_redo(cfg: Config, images: ImageSet, sources: list[str], wait: bool) -> Callable[[], int]:
    """Imported sets (real ones, and generated sets from DM-AT's .npz files): their recorded sources, or --from."""
    from stages.importers import recorded_checksums, repair_imported, source_matches
    importer = images.identity["source"]["importer"]
    paths: list[str] = []
    recorded = None
    if importer != "digits":
        paths = list(sources) or [str(p) for p in _provenance(images.meta).get("sources", [])]
        wanted = len(recorded_checksums(images.identity))
        files = f" (all {wanted} files, in order)" if wanted > 1 else ""
        if not paths:
            raise UserError(f"image set {images.name} does not record its source file(s); pass --from PATH, the "
                            f"{importer} source it was imported from{files}")
        paths, recorded = local_sources(cfg, paths)          # a bucket's source: this node's copy of it
        for path in paths:
            if not Path(path).exists():
                hint = "pass --from PATH where it is now" if not sources else "check --from"
                raise UserError(f"{path}: the {importer} source image set {images.name} was imported from is not "
                                f"there any more; {hint}{files}")
        if len(paths) != wanted:
            raise UserError(f"image set {images.name} was imported from {wanted} {importer} file(s), --from gives "
                            f"{len(paths)}; pass each of them, in order")
    if not source_matches(images.identity, paths):
        what = ", ".join(paths) or "the digits embedded in this scikit-learn"
        raise UserError(f"{what}: not the {importer} source image set {images.name} was imported from (its checksum "
                        f"differs); pass --from the original source")

    def redo() -> int:
        result = repair_imported(Path(cfg.root), images.name, images.identity, images.n, paths, wait=wait,
                                 recorded=recorded)
        return sum(p.count for p in images.plan() if p.index in set(result.redone))
    return redo


def _imagenet_redo(cfg: Config, images: ImageSet, shards: list[int], sources: list[str],
                   wait: bool) -> Callable[[], int]:
    """An imported ImageNet split: its recorded folder (or --from DIR), checked by its file listing."""
    from pipeline.imagenet_repair import imagenet_split_of, repair_imagenet_split
    if len(sources) > 1:
        raise UserError(f"image set {images.name} was imported from one ImageNet folder, --from gives "
                        f"{len(sources)}; pass that folder once")
    recorded = _provenance(images.meta).get("sources", [])
    if not sources and not recorded:
        raise UserError(f"image set {images.name} does not record its folder; pass --from DIR, the ImageNet folder "
                        f"it was imported from")
    source = Path(sources[0] if sources else recorded[0])
    split = imagenet_split_of(images, source)
    return lambda: repair_imagenet_split(cfg, images, source, split, shards, wait)


# --- generated sets -----------------------------------------------------------------------------------------

def _load_recorded_model(what: str, provenance: dict, root: Path, override: str | None, fingerprint: str):
    """The model a set records (or `--model`), refused unless it is there and has the recorded fingerprint.

    The workspace's own model (a fitted one) missing or changed is damaged stored data (exit 1); a user's
    model file that moved is input (exit 2, naming what to pass)."""
    from stages.fingerprint import model_fingerprint
    from stages.generate import absolute_spec
    from stages.models import load_model
    spec, inside = (override, False) if override else recorded_model(provenance, root)
    if not spec:
        raise UserError(f"{what} does not record its model; pass --model SPEC (the model with fingerprint "
                        f"{fingerprint[:12]})")
    spec = absolute_spec(spec)
    path = parse_spec(spec).path
    if not Path(path).exists():
        if inside:
            raise IntegrityError(f"{path}: the workspace's model {what} was made with is missing; refit it "
                                 f"(`dra-pipe fit-diffusion`) before repairing")
        raise UserError(f"{path}: the model {what} was made with is not there any more; pass --model SPEC where "
                        f"it is now" if not override else f"{path}: no such model; check --model")
    net = load_model(spec)
    if model_fingerprint(net) != fingerprint:
        message = f"{spec}: not the model {what} was made with (its fingerprint differs from {fingerprint[:12]})"
        if inside:
            raise IntegrityError(f"{message}; the workspace's model changed")
        raise UserError(f"{message}; pass --model SPEC of the original")
    return spec, net


def _generate_redo(cfg: Config, images: ImageSet, override: str | None, wait: bool) -> Callable[[], int]:
    from pipeline.generate import GenerateJob, execute
    from stages.generate import (
        GenerateSettings,
        generated_identity,
        require_conditional,
    )
    from stores.images import ImageSetWriter
    root = Path(cfg.root)
    provenance = _provenance(images.meta)
    src = images.identity["source"]
    spec, net = _load_recorded_model(f"image set {images.name}", provenance, root, override, src["model"])
    require_conditional(net, spec)
    batch = int(provenance.get("batch_size") or cfg.generate.batch_size)
    settings = GenerateSettings(src["sampler"], src["steps"], src["churn"], src["seed"], batch,
                                images.identity["image_format"], src.get("dtype", "float32")).check()
    if generated_identity(net, settings, images.shard_size, images.identity.get("class_names")) != images.identity:
        raise IntegrityError(f"{images.path}: its identity is not one generate writes; the set's record is damaged")
    if override:
        provenance = {**model_provenance(spec, root), "batch_size": batch}

    def redo() -> int:
        from pipeline.shards.cluster import cluster_nodes, plan_actors, ray_session
        writer = ImageSetWriter(root, images.name, images.identity, images.n, provenance)
        with writer.lock(wait), ray_session(cfg.ray.address, cfg.ray.num_cpus):      # reuses the command's Ray
            job = GenerateJob(images.n, images.name, images.shard_size, spec, settings, net, writer, writer.pending())
            actors = plan_actors(cluster_nodes(), cfg.ray.cpu_actors)
            return execute(job, actors, cfg.ray.max_retries, None, 0.5).items
    return redo


# --- feature sets -------------------------------------------------------------------------------------------

def _feature_redo(cfg: Config, fs: FeatureSet, override: str | None, wait: bool,
                  targets: set[str]) -> Callable[[], int]:
    from pipeline.extract import Output, execute
    from stages.extract import NoiseLevel
    from stores.features import FeatureSetWriter
    from stores.views import ViewSpec
    root, ident, layout = Path(cfg.root), fs.identity, fs.layout
    name = ident.get("image_set_name", "?")
    if not (image_set_dir(root, name) / "dataset.json").exists():
        raise IntegrityError(f"{image_set_dir(root, name)}: the image set feature set {fs.key} was computed from is "
                             f"missing")
    images = ImageSet.open(root, name)
    if images.fingerprint != ident["image_set"]:
        raise IntegrityError(f"image set {name} changed since feature set {fs.key} was computed (fingerprint differs); "
                             f"delete {fs.path} and rerun extract-features")
    if damaged_indices("images", images.path) and name not in targets:
        raise UserError(f"image set {name}, which feature set {fs.key} is computed from, is damaged too; "
                        f"`dra-pipe repair {name} {fs.key}` repairs both")
    provenance = _provenance(fs.meta)
    spec, _ = _load_recorded_model(f"feature set {fs.key}", provenance, root, override, ident["model"])
    batch = int(provenance.get("batch_size") or cfg.features.batch_size)
    if override:
        provenance = {**model_provenance(spec, root), "batch_size": batch}
    run_cfg = copy.deepcopy(cfg)
    run_cfg.features.update({"pool": ident["pool"], "noise_seed": ident["noise_seed"], "batch_size": batch,
                             "dtype": layout.get("dtype", "float16")})
    run_cfg.model["dtype"] = ident.get("compute_dtype", "float32")
    level = NoiseLevel(ident["sigma"], ident["timestep"])
    views = ViewSpec.from_identity(ident.get("views"))

    def redo() -> int:
        fresh = ImageSet(images.path)                 # as repaired, if it was among the targets
        writer = FeatureSetWriter(root, ident, layout["n"], layout["shard_size"], tuple(layout["sample_shape"]),
                                  int(layout.get("views", 1)), layout["compression"], provenance,
                                  layout.get("dtype", "float16"))
        with writer.lock(wait):
            output = Output(fresh, level, writer, writer.pending(fresh.plan_indices()), views)
            return execute(run_cfg, spec, ident["layer"], [output]).items
    return redo
