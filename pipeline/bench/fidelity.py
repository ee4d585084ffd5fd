"""`dra-pipe bench sampler --fidelity`: how far each sampler's images are from the ODE's solution, next to Heun at
35 NFE (generate's default), and what they cost.

For every registered sampler and every NFE in NFES (steps chosen per sampler so that NFE is exact; an NFE the
sampler cannot hit is skipped and listed), on the same latents and labels as the reference run, it reports on the
uint8 images generate would store. The reference is Heun at 100 steps (199 NFE), converged: Heun-35 itself is not
(measured on the digits model: 1.8 levels from Heun-200, where Heun-100 is 0.15 from it), and a reference that
far off hides what the higher-order samplers gain past 15-20 NFE.
  rms        root mean square deviation from the reference, in grey levels
  off > 2    fraction of pixel values more than 2 levels away from the reference
  agreement  fraction the fit-quality judge (stages.quality) assigns to the conditioning class (digits with a
             real training set only)
  images/s   of the sampler run, timed
Then, per sampler, the fewest NFE from which the RMS stays <= 1 level, the fewest from which it stays within
Heun-35's own RMS, and each multistep sampler's images/s over Heun's at the NFEs both hit (goal >= 0.97: the
solver's own work is small next to the network's). Each sampler runs once untimed before its timed runs.
Models: the digits model (as `bench sampler` picks it) and the CIFAR-shaped conformance network (the official
CIFAR-10 conditional config with DESIGN.md's deterministic sine parameter fill).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from pipeline.bench.sampler import CIFAR10_CONFIG, _device_name, _digits_model, _inputs, _strict_float32, _timed
from stages.edm.networks import EDMPrecond
from stages.quality import to_uint8
from stages.sampler_registry import SAMPLERS
from stages.samplers import NFECounter, sample

NFES = (5, 6, 8, 10, 12, 15, 20, 35)
REFERENCE = ("heun", 100)                # 199 NFE: converged (see above)
DEFAULT = ("heun", 35)                   # generate's default sampler and NFE: the closeness to match
RMS_GOAL = 1.0                           # grey levels
OFF_LEVELS = 2
SPEED_GOAL = 0.97


# --- arithmetic ----------------------------------------------------------------------------------------------

def rms_levels(images: np.ndarray, reference: np.ndarray) -> float:
    """Root mean square difference of two uint8 arrays, in grey levels."""
    diff = images.astype(np.float64) - reference.astype(np.float64)
    return float(math.sqrt(np.mean(diff ** 2)))


def off_fraction(images: np.ndarray, reference: np.ndarray, levels: int = OFF_LEVELS) -> float:
    """Fraction of values more than `levels` grey levels away from the reference."""
    return float(np.mean(np.abs(images.astype(np.int64) - reference.astype(np.int64)) > levels))


def nfe_needed(rms_by_nfe: dict[int, float], goal: float = RMS_GOAL) -> int | None:
    """The fewest measured NFE from which every larger measured NFE also has RMS <= goal; None if none."""
    needed = None
    for nfe in sorted(rms_by_nfe, reverse=True):
        if rms_by_nfe[nfe] > goal:
            break
        needed = nfe
    return needed


def nfe_needed_line(sampler: str, needed: int | None, largest: int = max(NFES)) -> str:
    shown = str(needed) if needed is not None else f"more than {largest}"
    return f"NFE needed for RMS <= {RMS_GOAL:g} level: {shown} ({sampler})"


def as_close_line(sampler: str, needed: int | None, default_rms: float, largest: int = max(NFES)) -> str:
    shown = str(needed) if needed is not None else f"more than {largest}"
    return f"NFE needed to be as close as Heun-35 ({default_rms:.3f} levels): {shown} ({sampler})"


def speed_ratios(rows: list[dict]) -> dict[str, dict[int, float]]:
    """images/s of each non-Heun sampler over Heun's, at every NFE both were measured at."""
    heun = {r["nfe"]: r["images_per_s"] for r in rows if r["sampler"] == "heun"}
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["sampler"] != "heun" and r["nfe"] in heun:
            out.setdefault(r["sampler"], {})[r["nfe"]] = r["images_per_s"] / heun[r["nfe"]]
    return out


# --- models --------------------------------------------------------------------------------------------------

def conformance_network(config: dict | None = None) -> EDMPrecond:
    """EDMPrecond with DESIGN.md's conformance fill: parameters in sorted name order, k = position, j = flat index,
    s = sin(0.37 j + 1.3 k); >= 2-dim tensors get s / sqrt(numel / shape[0]), 1-dim norm weights 1 + 0.1 s,
    other 1-dim tensors 0.1 s."""
    net = EDMPrecond(**(config or CIFAR10_CONFIG))
    params = dict(net.named_parameters())
    with torch.no_grad():
        for k, name in enumerate(sorted(params)):
            p = params[name]
            s = torch.sin(0.37 * torch.arange(p.numel(), dtype=torch.float64) + 1.3 * k).reshape(p.shape)
            if p.dim() >= 2:
                s = s / math.sqrt(p.numel() / p.shape[0])
            elif "norm" in name and name.endswith(".weight"):
                s = 1 + 0.1 * s
            else:
                s = 0.1 * s
            p.copy_(s.to(p.dtype))
    return net


def _digits_judge(cfg):
    """The fit-quality judge trained on the real training set; None when there is none yet."""
    from pathlib import Path

    from pipeline.workflow import real_train_set
    from stages.quality import train_digit_judge
    from stores.errors import UserError
    from stores.images import ImageSet
    try:
        images = ImageSet.open(Path(cfg.root), real_train_set(cfg))
    except UserError:
        return None
    return train_digit_judge(images)[0]


# --- runs ----------------------------------------------------------------------------------------------------

def _run(net, name: str, steps: int, inputs: dict, dev, min_seconds: float):
    """(uint8 images (B, H, W, C), NFE, images/s) of one timed sampler run."""
    counter = NFECounter(net)
    seconds, out = _timed(lambda: sample(name, counter, inputs["latents"], inputs["labels"], num_steps=steps),
                          dev, min_seconds)
    runs = max(1, counter.calls // SAMPLERS[name].nfe(steps))
    return to_uint8(out), counter.calls // runs, inputs["latents"].shape[0] / seconds


def _row(name, steps, images, nfe, speed, reference, judge, labels) -> dict:
    agreement = None
    if judge is not None and labels is not None and tuple(images.shape[1:]) == tuple(judge.shape):
        agreement = float(np.mean(judge.predict(images) == labels.cpu().numpy()))
    return dict(sampler=name, steps=steps, nfe=nfe, rms=rms_levels(images, reference),
                off=off_fraction(images, reference), agreement=agreement, images_per_s=speed)


@torch.no_grad()
def _bench_model(net, b: int, dev, judge, nfes, seed: int, min_seconds: float) -> dict:
    inputs = _inputs(net, b, dev, seed)
    sample(REFERENCE[0], net, inputs["latents"], inputs["labels"], num_steps=2)          # warm-up
    reference, _, ref_speed = _run(net, *REFERENCE, inputs, dev, min_seconds)
    rows, skipped = [], {}
    for name, entry in SAMPLERS.items():
        sample(name, net, inputs["latents"][:1], _first(inputs["labels"]), num_steps=entry.min_steps)   # warm-up
        for nfe in nfes:
            steps = entry.steps_for_nfe(nfe)
            if steps is None:
                skipped.setdefault(name, []).append(nfe)
                continue
            images, calls, speed = _run(net, name, steps, inputs, dev, min_seconds)
            if calls != nfe:
                raise RuntimeError(f"{name} at {steps} steps made {calls} network evaluations; expected {nfe}")
            rows.append(_row(name, steps, images, nfe, speed, reference, judge, inputs["labels"]))
    by_sampler = {name: {r["nfe"]: r["rms"] for r in rows if r["sampler"] == name} for name in SAMPLERS}
    default_rms = by_sampler[DEFAULT[0]].get(DEFAULT[1])
    as_close = None if default_rms is None else \
        {name: nfe_needed(rms, goal=default_rms) for name, rms in by_sampler.items()}
    return dict(batch=b, reference_images_per_s=ref_speed, rows=rows, skipped=skipped,
                nfe_needed={name: nfe_needed(rms) for name, rms in by_sampler.items()}, default_rms=default_rms,
                as_close_as_default=as_close, speed_ratio=speed_ratios(rows))


def _first(labels):
    return None if labels is None else labels[:1]


def bench_fidelity(cfg, console: Console, *, images: int = 64, cifar: bool = True, cifar_images: int = 4,
                   cifar_config: dict | None = None, device: str | None = None, nfes=NFES, seed: int = 0,
                   min_seconds: float = 0.0) -> dict:
    """Run the fidelity benchmark and print its tables; returns the figures."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, source = _digits_model(cfg)
    models = [("digits", net, source, images, _digits_judge(cfg))]
    if cifar:
        models.append(("cifar10", conformance_network(cifar_config), "conformance fill, official config",
                       cifar_images, None))
    results = {"device": _device_name(dev), "models": {}}
    with _strict_float32():
        for name, model, src, b, judge in models:
            model = model.to(dev).eval().requires_grad_(False)
            results["models"][name] = dict(source=src, **_bench_model(model, b, dev, judge, nfes, seed, min_seconds))
            model.to("cpu")
    _report(results, console)
    return results


# --- report --------------------------------------------------------------------------------------------------

def _report(results: dict, console: Console) -> None:
    reference = f"Heun {REFERENCE[1]} steps ({SAMPLERS[REFERENCE[0]].nfe(REFERENCE[1])} NFE, converged)"
    for model, r in results["models"].items():
        table = Table("sampler", "steps", "NFE", "RMS (levels)", f"off > {OFF_LEVELS} levels", "judge agreement",
                      "images/s", title=f"bench sampler --fidelity: {model} ({r['source']}), {r['batch']} images, "
                                        f"against {reference}, {results['device']}")
        for row in r["rows"]:
            agreement = "n/a" if row["agreement"] is None else f"{row['agreement']:.3f}"
            table.add_row(row["sampler"], str(row["steps"]), str(row["nfe"]), f"{row['rms']:.3f}",
                          f"{row['off']:.4f}", agreement, f"{row['images_per_s']:,.2f}")
        console.print(table)
        for name, missed in r["skipped"].items():
            console.print(f"{model}: {name} cannot make exactly NFE {', '.join(map(str, missed))}: skipped",
                          highlight=False)
        console.print(f"{model}:", highlight=False)
        for name, needed in r["nfe_needed"].items():
            console.print(nfe_needed_line(name, needed), highlight=False)
        for name, needed in (r["as_close_as_default"] or {}).items():
            console.print(as_close_line(name, needed, r["default_rms"]), highlight=False)
        for name, ratios in r["speed_ratio"].items():
            cells = ", ".join(f"NFE {n}: {v:.3f}" + ("" if v >= SPEED_GOAL else " (below 0.97)")
                              for n, v in sorted(ratios.items()))
            console.print(f"{model}: {name} images/s over heun's at equal NFE: {cells}", highlight=False)
