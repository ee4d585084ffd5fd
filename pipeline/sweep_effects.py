"""Paired effects of a sweep: what changing one setting did, seed by seed, so a claim can be tested, not eyeballed.

Every cell of a sweep trains the same seeds, so seed s of two cells shares its data order, initialisation and
attack noise: the per-seed difference between the cells removes that shared variation. For each axis, each of its
values is compared with its first value, once per setting of the other axes; for two axes of two values each, the
interaction (how much the first axis's effect changes with the second) is the difference of those differences.
Reported: mean difference, its sample std, the paired t statistic, the two-sided p value (Student t, n - 1
degrees of freedom) and how many seeds moved the way the mean did.
"""
from __future__ import annotations

import json
import math

import numpy as np


def paired(differences: list[float]) -> dict:
    """Mean, sample std, t, two-sided p and sign count of per-seed differences (t and p None for one seed or a
    constant difference, where neither is defined)."""
    d = np.asarray(differences, dtype=float)
    mean = float(d.mean())
    std = float(d.std(ddof=1)) if d.size > 1 else 0.0
    t = p = None
    if d.size > 1 and std > 0:
        from scipy.stats import t as student_t
        t = mean / (std / math.sqrt(d.size))
        p = float(2 * student_t.sf(abs(t), d.size - 1))
    agreeing = int(np.sum(np.sign(d) == np.sign(mean))) if mean != 0 else int(np.sum(d == 0))
    return {"differences": [float(x) for x in d], "mean": mean, "std": std, "t": t, "p": p,
            "agreeing": agreeing, "n": int(d.size)}


def _values(row: dict, metric: str) -> list[float] | None:
    stat = row["stats"].get(metric)
    return stat["values"] if stat else None


def _find(rows: list[dict], cell: dict) -> dict:
    key = json.dumps(cell, sort_keys=True)
    return next(r for r in rows if json.dumps(r["cell"], sort_keys=True) == key)


def _difference(rows: list[dict], cell_a: dict, cell_b: dict, metric: str) -> list[float] | None:
    a, b = _values(_find(rows, cell_a), metric), _values(_find(rows, cell_b), metric)
    return None if a is None or b is None else [vb - va for va, vb in zip(a, b)]


def main_effects(axes: list, rows: list[dict], metrics: list[str]) -> list[dict]:
    """One entry per (axis, value other than its first, setting of the other varied axes, metric)."""
    found, constant = [], {a.key for a in axes if len(a.values) == 1}
    for row in rows:
        for axis in axes:
            baseline = axis.values[0]
            if row["cell"][axis.key] == baseline:
                continue
            base_cell = {**row["cell"], axis.key: baseline}
            context = {k: v for k, v in row["cell"].items() if k != axis.key and k not in constant}
            for metric in metrics:
                diffs = _difference(rows, base_cell, row["cell"], metric)
                if diffs is not None:
                    found.append({"axis": axis.key, "from": baseline, "to": row["cell"][axis.key],
                                  "context": context, "metric": metric, **paired(diffs)})
    return found


def interactions(axes: list, rows: list[dict], metrics: list[str]) -> list[dict]:
    """For exactly two axes of two values each: per seed, (effect of axis 1 at axis 2's second value) minus
    (its effect at axis 2's first value). Positive: the two changes together do more than the sum of each alone."""
    varied = [a for a in axes if len(a.values) > 1]
    if len(varied) != 2 or any(len(a.values) != 2 for a in varied):
        return []
    (first, second), fixed = varied, {a.key: a.values[0] for a in axes if len(a.values) == 1}
    found = []
    for metric in metrics:
        effects = [_difference(rows, {**fixed, first.key: first.values[0], second.key: level},
                               {**fixed, first.key: first.values[1], second.key: level}, metric)
                   for level in second.values]
        if None not in effects:
            found.append({"axes": [first.key, second.key], "metric": metric,
                          **paired([high - low for low, high in zip(*effects)])})
    return found


def _number(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.2f} pt" if percent else f"{value:+.3f}"


def _row(label: str, metric: str, entry: dict, percent: bool) -> str:
    t = "-" if entry["t"] is None else f"{entry['t']:.2f}"
    p = "-" if entry["p"] is None else f"{entry['p']:.3f}"
    return (f"| {label} | {metric} | {_number(entry['mean'], percent)} | {_number(entry['std'], percent)[1:]} | "
            f"{t} | {p} | {entry['agreeing']}/{entry['n']} |")


def effects_markdown(effects: list[dict], crossed: list[dict], percent_metrics: set[str], names: dict) -> str:
    """effects.md: the paired main effects, then the interaction rows (if any)."""
    header = ["| change | measure | mean diff | std | t | p | seeds agreeing |", "|---|---|---|---|---|---|---|"]
    lines = ["Paired per-seed differences (second minus first); p: two-sided paired t test.", "", *header]
    for e in effects:
        where = ", ".join(f"{k}={v}" for k, v in e["context"].items())
        label = f"{e['axis']}: {e['from']} -> {e['to']}" + (f" (at {where})" if where else "")
        lines.append(_row(label, names.get(e["metric"], e["metric"]), e, e["metric"] in percent_metrics))
    if crossed:
        lines += ["", "Interaction: effect of the first axis with the second at its second value, minus at its "
                      "first value.", "", *header]
        for e in crossed:
            lines.append(_row(" x ".join(e["axes"]), names.get(e["metric"], e["metric"]), e,
                              e["metric"] in percent_metrics))
    return "\n".join(lines) + "\n"
