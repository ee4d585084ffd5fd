"""Linear CKA (Kornblith et al. 2019) and the held-out cosine of a ridge map between two representations, both
from second moments accumulated batch by batch (rows are samples: images, or tokens of a feature grid)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of x (N, D1) and y (N, D2), rows paired:
    ||X_c^T Y_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) with column-centred X_c, Y_c. 1 for identical features,
    and invariant to rotations and isotropic scaling of either; near 0 for independent ones."""
    moments = CrossMoments(x.shape[1], y.shape[1])
    moments.add(x, y)
    return moments.cka()


class CrossMoments:
    """Sums, X^T X, Y^T Y and X^T Y (float64) of paired rows added in batches: linear CKA of arbitrarily many rows
    in (D1 + D2)^2 memory."""

    def __init__(self, dx: int, dy: int):
        self.n = 0
        self.sx, self.sy = torch.zeros(dx, dtype=torch.float64), torch.zeros(dy, dtype=torch.float64)
        self.xx = torch.zeros(dx, dx, dtype=torch.float64)
        self.yy = torch.zeros(dy, dy, dtype=torch.float64)
        self.xy = torch.zeros(dx, dy, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} rows of x, {len(y)} of y: rows must be paired")
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.xy += x.T @ y

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X_c^T X_c, Y_c^T Y_c, X_c^T Y_c)."""
        mx, my = self.sx / max(self.n, 1), self.sy / max(self.n, 1)
        return (self.xx - self.n * torch.outer(mx, mx), self.yy - self.n * torch.outer(my, my),
                self.xy - self.n * torch.outer(mx, my))

    def cka(self) -> float:
        xx, yy, xy = self.centred()
        denominator = torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy)
        return float((xy ** 2).sum() / denominator) if denominator > 0 else 0.0

    def ridge(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (D1, D2), b (D2,)) minimising ||Y - X W - b||^2 + alpha * trace(X_c^T X_c) / D1 * ||W||^2: a linear
        map from x to y fitted on the rows added so far (the penalty scales with the mean variance of x)."""
        xx, _, xy = self.centred()
        dims = xx.shape[0]
        penalty = alpha * torch.trace(xx) / dims + 1e-12
        w = torch.linalg.solve(xx + penalty * torch.eye(dims, dtype=xx.dtype), xy)
        b = self.sy / max(self.n, 1) - (self.sx / max(self.n, 1)) @ w
        return w, b


def mean_cosine(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(sum of row-wise cosines, rows) of predicted and target (N, D): accumulate, then divide."""
    cos = F.cosine_similarity(predicted.detach().double().cpu(), target.detach().double().cpu(), dim=1, eps=1e-8)
    return torch.stack([cos.sum(), torch.tensor(float(len(cos)), dtype=torch.float64)])


def tokens(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B h w, C): every spatial position as one row."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])
