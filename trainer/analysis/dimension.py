"""Classification dimension: how many top principal components of a representation a linear probe needs to reach
a fraction (95%) of the accuracy of the probe on all of it, and the accuracy as a function of k.

A PCA-based measure of how concentrated the class information is (the paper reportedly uses one; its exact
definition is not public). PCA and probes are fitted on the training rows, accuracies measured on the test rows.
"""
from __future__ import annotations

import torch

from trainer.analysis.probe import ProbeSettings, fit_probe, probe_correct
from trainer.analysis.rows import ProjectedRows, batches
from trainer.analysis.spectrum import Moments


def grid(dims: int) -> list[int]:
    """1, 2, 4, ... below dims, then dims."""
    ks, k = [], 1
    while k < dims:
        ks.append(k)
        k *= 2
    return ks + [dims]


def classification_dimension(train, y_train: torch.Tensor, test, y_test: torch.Tensor, classes: int,
                             s: ProbeSettings, target: float = 0.95) -> dict:
    """{"dimension": smallest k found with accuracy >= target * full accuracy, "full_accuracy", "target",
    "curve": [[k, accuracy], ...] ascending in k}. The curve is measured at 1, 2, 4, ..., D; between the two grid
    points around the threshold the smallest k is found by bisection (accuracy assumed to rise with k there)."""
    moments = Moments(train.dims)
    for _, part in batches(train, 1024):
        moments.add(part)
    _, basis = moments.principal()
    mean = moments.mean.float()

    def accuracy(k: int | None) -> float:
        tr = train if k is None else ProjectedRows(train, mean, basis[:, :k])
        te = test if k is None else ProjectedRows(test, mean, basis[:, :k])
        return float(probe_correct(fit_probe(tr, y_train, classes, s), te, y_test).float().mean())

    full = accuracy(None)
    curve = {k: accuracy(k) for k in grid(train.dims)}
    goal = target * full
    above = [k for k in sorted(curve) if curve[k] >= goal]
    dimension = above[0] if above else train.dims
    below = max([k for k in curve if k < dimension], default=0)
    lo, hi = below, dimension                 # accuracy(lo) < goal <= accuracy(hi)
    while hi - lo > 1 and lo > 0:
        mid = (lo + hi) // 2
        curve[mid] = accuracy(mid)
        lo, hi = (mid, hi) if curve[mid] < goal else (lo, mid)
    return {"dimension": hi if above else train.dims, "full_accuracy": full, "target": target,
            "curve": [[k, curve[k]] for k in sorted(curve)]}
