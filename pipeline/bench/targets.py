"""`dra-pipe bench targets`: how far what the trainer aligns with is from the true target of the image it sees.

On real training images of the workspace, under the run's augmentation (train.crop_pad, train.flip), the true
target of an augmented image is the frozen teacher's tapped activation of that very image (the same noise per
image id as the cache). The relative error ||aligned - true|| / ||true|| is measured for
  stored views  the target the loader hands over for the view it drew (train.dra_targets: views)
  online        the targets the online teacher hands the real training step (train.dra_targets: online, captured
                inside Trainer.train_step), against an independent recomputation: the image read by its id from
                the image set, the crop/flip the step's generator drew, the cache's noise for that id, in float32
  shift         the un-augmented target moved by whole cells, on the cells it keeps (dra_targets: shifted)
and each mode's training step is timed against plain DM-AT on the workspace's own batches: in every round each
mode takes one step on the same batch, back to back; a mode's ratio is the median over rounds of its step time over
DM-AT's in the same round, printed with the two times of the round it came from. With --cifar it also
times the online teacher on the CIFAR-size pair (WRN-28-10, EDM CIFAR-10 at dec.8x8_in1, a small batch here)
next to its FLOP-count ratio. The last line reads
  target error under the training augmentation: stored views X, whole-cell shift Y
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pipeline.config import Config
from pipeline.estimates import count_flops
from pipeline.plans.teacher import teacher_for
from pipeline.plans.train import make_job
from stages.extract import NoiseLevel, view_targets
from stages.models import load_model
from stores.errors import UserError
from stores.features import FeatureSet
from stores.images import ImageSet
from stores.views import apply_views, view_augmentations
from trainer.augment import apply_augment, draw_params
from trainer.loader import make_loader
from trainer.loop import Dist, Trainer, mix_plan
from trainer.views import to_unit, view_choices

GOAL_ERROR, GOAL_STEP = 0.01, 1.05


def bench_targets(cfg: Config, console: Console, images: int = 256, steps: int = 24, cifar: bool = False) -> dict:
    """Measure the errors and step ratios; print a table and the last line; return the figures."""
    if images < 1 or steps < 1:
        raise UserError(f"bench targets needs at least one image and one step (got {images} and {steps})")
    job = make_job(cfg)
    if not job.dra:
        raise UserError("bench targets needs DRA on (train.dra true, train.dra_lambda > 0) and its feature sets")
    root = Path(cfg.root)
    features = FeatureSet(root / "features" / job.feature_keys["real"])
    teacher, level = _teacher(features)
    sample = _real_sample(ImageSet(Path(job.real.images)), features, images)
    errors = _errors(job, teacher, level, features, sample, cfg.train.seed)
    online = _online_in_step(cfg, root, teacher, level, features, images)
    result = {"images": len(sample["ids"]), "layer": features.identity["layer"], "views": features.views,
              "errors": {"stored views": errors.pop("stored views"), "online": online.pop("error"), **errors},
              "online check": online, "steps": _paired(_step_times(cfg, root, steps))}
    if cifar:
        result["cifar"] = _cifar_online()
    _report(result, console)
    return result


def _teacher(features: FeatureSet):
    spec = features.meta.get("provenance", {}).get("model_spec")
    if not spec:
        raise UserError(f"feature set {features.key} records no model spec; extract it again")
    ident = features.identity
    return load_model(spec).eval().requires_grad_(False), NoiseLevel(ident["sigma"], ident["timestep"])


def _real_sample(images: ImageSet, features: FeatureSet, n: int) -> dict:
    """The first n real training images with every stored view's target (float32, (N, V, C, h, w))."""
    plan = images.plan()[0]
    n = min(n, plan.count)
    data = images.read_range(plan.first_id, plan.first_id + n)
    stored = features.read_shard(0)
    views = np.stack([stored[name][:n] for name in features.target_names()], axis=1).astype(np.float32)
    return {"ids": torch.arange(plan.first_id, plan.first_id + n), "images": torch.from_numpy(data.images),
            "labels": torch.from_numpy(data.labels), "stored": torch.from_numpy(views)}


def _relative(aligned: torch.Tensor, true: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """||aligned - true|| / ||true|| over the whole batch (over the kept cells when a mask is given)."""
    diff, ref = aligned - true, true
    if keep is not None:
        diff, ref = diff * keep[:, None], ref * keep[:, None]
    return float(diff.norm() / ref.norm().clamp_min(1e-12))


def _errors(job, teacher, level, features: FeatureSet, s: dict, seed: int) -> dict:
    ident, pad, flip = features.identity, job.settings.crop_pad, job.settings.flip
    truth = lambda flips, shifts: view_targets(teacher, s["ids"], apply_views(s["images"], flips, shifts),  # noqa: E731
                                               s["labels"], ident["layer"], level, ident["noise_seed"],
                                               str(ident["pool"]), ident["image_set"])
    # stored views: the view the loader would draw for each row, its stored target, against the truth of that view
    counts = np.full(len(s["ids"]), features.views)
    chosen = torch.from_numpy(view_choices(seed, 0, 0, counts))
    flips, shifts = view_augmentations(job.view_seed, s["ids"], chosen, pad, flip)
    stored = s["stored"][torch.arange(len(chosen)), chosen]
    views_error = _relative(stored, truth(flips, shifts))
    # shift: the random crop/flip of the run's augmentation
    flips, shifts = draw_params(len(s["ids"]), torch.Generator().manual_seed(seed), pad, flip)
    true = truth(flips, shifts)
    mirror = s["stored"][:, 1] if flip and features.views > 1 and job.mirror_view else None
    _, shifted, keep = apply_augment(s["images"], s["stored"][:, 0], mirror, flips, shifts)
    shift_error = _relative(shifted, true, keep.float())
    return {"stored views": views_error, "whole-cell shift": shift_error,
            "shift kept cells": float(keep.float().mean()),
            "unaugmented target": _relative(s["stored"][:, 0], true)}


class _Recorder:
    """The online teacher a Trainer holds, wrapped: keeps a copy of every target it hands the training step."""

    def __init__(self, teacher):
        self.teacher, self.targets = teacher, []

    def __call__(self, views_uint8, ids, labels, generated):
        out = self.teacher(views_uint8, ids, labels, generated)
        self.targets.append(out.detach().cpu().clone())
        return out


def _online_in_step(cfg: Config, root: Path, model, level: NoiseLevel, features: FeatureSet, images: int) -> dict:
    """The targets the online teacher gives the real training step (train.dra_targets: online; steps on the
    workspace's batches until `images` rows) against their independent recomputation: each row's image read by its
    id from its image set, the crop/flip the step's generator draws first, the cache's noise for that id (keyed by the
    set's fingerprint), the frozen model in float32. Also the largest pixel difference between the image the
    classifier saw in the step and that recomputed augmented image (None when the step passes no clean image)."""
    job, trainer, batches = _trainer(cfg, root, "online-check", "online")
    trainer.teacher = recorder = _Recorder(trainer.teacher)
    seen = []
    hook = trainer.net.register_forward_pre_hook(lambda _, args: seen.append(None if args[0] is None else
                                                                             args[0].detach().cpu().clone()))
    sets, ident, s = _image_sets(job), features.identity, job.settings
    want, pixels, rows = [], 0.0, 0
    while rows < images:
        batch = next(batches)
        drawn = torch.Generator()
        drawn.set_state(trainer.aug_gen.get_state())
        trainer.train_step(batch)
        if len(recorder.targets) != len(seen) or len(seen) != len(want) + 1:
            raise RuntimeError("the online training step did not call its teacher and its network once each")
        flips, shifts = draw_params(len(batch["ids"]), drawn, s.crop_pad, s.flip)
        raw, labels, keys = _by_id(sets, batch["ids"].numpy(), batch["generated"].numpy())
        viewed = apply_views(raw, flips, shifts)
        want.append(view_targets(model, batch["ids"], viewed, labels, ident["layer"], level, ident["noise_seed"],
                                 str(ident["pool"]), keys))
        if seen[-1] is None or pixels is None:
            pixels = None
        else:
            pixels = max(pixels, float((seen[-1] - to_unit(viewed)).abs().max()))
        rows += len(batch["ids"])
    hook.remove()
    return {"error": _relative(torch.cat(recorder.targets), torch.cat(want)), "steps": len(want), "rows": rows,
            "image max diff": pixels}


def _image_sets(job) -> dict[bool, ImageSet]:
    """The run's image sets by the loader's `generated` flag."""
    sets = {False: ImageSet(Path(job.real.images))}
    if job.generated is not None:
        sets[True] = ImageSet(Path(job.generated.images))
    return sets


def _by_id(sets: dict[bool, ImageSet], ids: np.ndarray, generated: np.ndarray):
    """Images (N, H, W, C) uint8 and labels (N,) of the given rows, read shard by shard from their image sets,
    and each row's noise key (its set's fingerprint)."""
    first = sets[False]
    images = torch.empty((len(ids), first.resolution, first.resolution, first.channels), dtype=torch.uint8)
    labels = torch.empty(len(ids), dtype=torch.int64)
    for gen, store in sets.items():
        shard_of = np.where(generated == gen, ids // store.shard_size, -1)
        for index in np.unique(shard_of[shard_of >= 0]):
            data, rows = store.read_shard(int(index)), shard_of == index
            images[rows] = torch.from_numpy(data.images[ids[rows] - data.ids[0]])
            labels[rows] = torch.from_numpy(data.labels[ids[rows] - data.ids[0]])
    return images, labels, [sets[bool(g)].fingerprint for g in generated]


MODES = {"DM-AT": None, "views": "views", "online": "online", "shifted": "shifted"}


def _trainer(cfg: Config, root: Path, name: str, mode: str | None):
    """(job, Trainer, endless batch iterator) of the workspace's run with DRA in `mode` (None: DM-AT, no DRA)."""
    over = {"train.dra": mode is not None, **({"train.dra_targets": mode} if mode else {})}
    job = dataclasses.replace(make_job(_with(cfg, over), f"bench-{name}"), run_dir=str(root / "bench" / "targets"))
    trainer = Trainer(job, Dist(), teacher_for(job, root))
    return job, trainer, iter(make_loader(dataclasses.replace(mix_plan(job, Dist()), loader_workers=0)))


def _step_times(cfg: Config, root: Path, steps: int) -> dict[str, list[float]]:
    """Seconds of each mode's step in each of `steps` rounds (after one warm-up round). In a round every mode takes
    one step, back to back (the order reversed every other round), each on its own loader's next batch: the same
    ids for every mode, checked."""
    runs = {name: _trainer(cfg, root, name, mode)[1:] for name, mode in MODES.items()}
    times = {name: [] for name in MODES}
    for i in range(steps + 1):
        batches = {name: next(batches) for name, (_, batches) in runs.items()}
        if not all(torch.equal(b["ids"], batches["DM-AT"]["ids"]) for b in batches.values()):
            raise RuntimeError("the modes' loaders gave different batches: their step times would not be paired")
        for name in list(runs) if i % 2 else list(runs)[::-1]:
            started = time.perf_counter()
            runs[name][0].train_step(batches[name])
            if i:
                times[name].append(time.perf_counter() - started)
    return times


def _paired(times: dict[str, list[float]]) -> dict:
    """Per mode, from the rounds' times: ratio, the median over rounds of its step time over DM-AT's in the same
    round (the lower median for an even count, so it is one round's ratio); round, that round (0-based); seconds
    and dmat_seconds, its two times (seconds / dmat_seconds == ratio); times, all rounds."""
    base, out = times["DM-AT"], {}
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, base)]
        r = ratios.index(statistics.median_low(ratios))
        out[name] = {"ratio": ratios[r], "round": r, "seconds": t[r], "dmat_seconds": base[r], "times": list(t)}
    return out


def _with(cfg: Config, overrides: dict) -> Config:
    from pipeline.config import load_config
    origin = None if cfg._origin == "<defaults>" else cfg._origin
    return load_config(origin, {"root": cfg.root, **overrides})


def _cifar_online(batch: int = 2) -> dict:
    """The online teacher's cost on the CIFAR-size pair: WRN-28-10 TRADES step vs the same step plus the EDM CIFAR-10
    forward truncated at dec.8x8_in1, timed here and counted in FLOPs."""
    import tempfile

    from pipeline.bench.gpu import FULL, _job
    from pipeline.bench.gpu_parts import bench_steps, step_batches, teacher_targets
    from stages.edm.networks import EDMPrecond
    from stages.extract import check_layer
    sizes = dataclasses.replace(FULL, train_batch=batch, loader_samples=64, loader_workers=0)
    torch.manual_seed(0)
    net = EDMPrecond(**sizes.net).eval().requires_grad_(False)
    layer = check_layer(net, "dec.8x8_in1")
    with tempfile.TemporaryDirectory() as work:
        job = _job(Path(work), sizes, net, layer, Console(quiet=True))
        batches = step_batches(job, 3)
        sigma = NoiseLevel.from_timestep(100).sigma
        timed = bench_steps(job, net, layer, sigma, batches, torch.device("cpu"), ("float32",))
        trainer = Trainer(job.without_dra(), Dist())
        step_flops = count_flops(lambda: trainer.train_step(batches[0]))
        first = batches[0]
        teacher_flops = count_flops(lambda: teacher_targets(net, first["images"], first["labels"], sigma, layer))
    base = timed["float32/DM-AT"]["seconds"]
    return {"batch": batch, "step_seconds": base, "online_ratio": timed["float32/DRA online"]["seconds"] / base,
            "stored_ratio": timed["float32/DRA stored"]["seconds"] / base,
            "flop_ratio": (step_flops + teacher_flops) / step_flops,
            "gflop_step_per_image": step_flops / batch / 1e9, "gflop_teacher_per_image": teacher_flops / batch / 1e9}


def _report(r: dict, console: Console) -> None:
    table = Table("measure", "value", title=f"bench targets: {r['images']} real images, {r['views']} stored views, "
                                            f"layer {r['layer']}")
    for name, value in r["errors"].items():
        label = {"shift kept cells": "whole-cell shift keeps", "online": "relative error: online (in the training "
                 "step, vs recomputed)"}.get(name, f"relative error: {name}")
        table.add_row(label, f"{value:.2%}" if name == "shift kept cells" else f"{value:.4f}")
    steps = r["steps"]
    rounds = len(steps["DM-AT"]["times"])
    table.add_row("step DM-AT", "1.000, the reference: each ratio below is against its step in the same round")
    for name, v in steps.items():
        if name != "DM-AT":
            table.add_row(f"step {name} / DM-AT", f"{v['ratio']:.3f} = {v['seconds'] * 1000:,.1f} ms / "
                          f"{v['dmat_seconds'] * 1000:,.1f} ms (round {v['round'] + 1})")
    if "cifar" in r:
        c = r["cifar"]
        table.add_row(f"CIFAR pair, batch {c['batch']}: online / DM-AT", f"{c['online_ratio']:.3f} measured, "
                      f"{c['flop_ratio']:.3f} by FLOPs ({c['gflop_teacher_per_image']:.1f} + "
                      f"{c['gflop_step_per_image']:.1f} GFLOP)")
    console.print(table)
    console.print(f"step ratios paired by round: in each of {rounds} rounds every mode took one step on the same "
                  f"batch, back to back; a mode's ratio is the median over rounds of its step time / DM-AT's in the "
                  f"same round (the lower median), shown with the two times of the round it came from", highlight=False)
    views_step, views_error = r["steps"]["views"]["ratio"], r["errors"]["stored views"]
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    console.print(f"goals: stored-views error <= {GOAL_ERROR} ({met(views_error <= GOAL_ERROR)}), "
                  f"cached-views step <= {GOAL_STEP} x DM-AT ({views_step:.3f}: {met(views_step <= GOAL_STEP)})",
                  highlight=False)
    console.print(f"target error under the training augmentation: stored views {r['errors']['stored views']:.4f}, "
                  f"whole-cell shift {r['errors']['whole-cell shift']:.4f}", highlight=False)
