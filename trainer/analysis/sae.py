"""A TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): z = ReLU(TopK_k(
W_enc (x - b_pre) + b_enc)), x_hat = W_dec z + b_pre, trained on mean squared error with Adam on mini-batches;
decoder directions kept at unit norm, the encoder initialised as the decoder's transpose, b_pre at the data mean.
Reported: the normalised reconstruction error and the fraction of dead latents (never among the top k)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.analysis.probe import standardiser
from trainer.analysis.rows import batches


@dataclass(frozen=True)
class SaeSettings:
    latents: int                  # dictionary size
    k: int                        # active latents per row
    epochs: int = 50              # passes over the training rows
    lr: float = 1e-3              # Adam's learning rate
    batch: int = 256              # rows per step
    seed: int = 0                 # seed of the initial dictionary and of the row order


class TopKSAE(nn.Module):
    def __init__(self, dims: int, s: SaeSettings, mean: torch.Tensor, scale: float, generator: torch.Generator):
        super().__init__()
        if not 1 <= s.k <= s.latents:
            raise ValueError(f"TopK SAE needs 1 <= k <= latents, got k {s.k} and {s.latents} latents")
        self.k, self.scale = s.k, scale
        decoder = torch.randn(s.latents, dims, generator=generator)
        decoder = decoder / decoder.norm(dim=1, keepdim=True)
        self.decoder = nn.Parameter(decoder)                                  # (L, D) unit rows
        self.encoder = nn.Parameter(decoder.T.clone())                        # (D, L)
        self.b_enc = nn.Parameter(torch.zeros(s.latents))
        self.b_pre = nn.Parameter(mean.float() / scale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x / self.scale - self.b_pre) @ self.encoder + self.b_enc      # (B, L)
        top = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction in the input's units, codes)."""
        z = self.encode(x)
        return (z @ self.decoder + self.b_pre) * self.scale, z

    @torch.no_grad()
    def renormalise(self) -> None:
        self.decoder /= self.decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)


def train_sae(rows, s: SaeSettings) -> TopKSAE:
    """Fit on the rows (N, D), inputs divided by their RMS distance from the mean (so one lr fits any scale)."""
    mean, _ = standardiser(rows)
    spread = sum(float(((part - mean) ** 2).sum()) for _, part in batches(rows, 1024))
    scale = max((spread / max(len(rows), 1)) ** 0.5, 1e-12)
    gen = torch.Generator().manual_seed(s.seed)
    sae = TopKSAE(rows.dims, s, mean, scale, gen)
    opt = torch.optim.Adam(sae.parameters(), lr=s.lr)
    with torch.enable_grad():
        for _ in range(s.epochs):
            order = torch.randperm(len(rows), generator=gen)
            for lo in range(0, len(rows), s.batch):
                x = rows[order[lo:lo + s.batch]]
                loss = ((sae(x)[0] - x) / scale).pow(2).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sae.renormalise()
    return sae.eval()


@torch.no_grad()
def sae_scores(sae: TopKSAE, rows, batch: int = 1024) -> dict:
    """{"nmse": sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (1 = no better than the mean), "dead_fraction": latents
    never active on these rows / all latents, "latents", "k"}."""
    mean, _ = standardiser(rows)
    error = spread = 0.0
    fired = torch.zeros(sae.decoder.shape[0], dtype=torch.bool)
    for _, x in batches(rows, batch):
        x_hat, z = sae(x)
        error += float(((x - x_hat) ** 2).sum())
        spread += float(((x - mean) ** 2).sum())
        fired |= (z > 0).any(0)
    return {"nmse": error / spread if spread > 0 else 0.0, "dead_fraction": float((~fired).float().mean()),
            "latents": int(sae.decoder.shape[0]), "k": sae.k}
