"""`dra-pipe analyze [RUN ...]`: representation measures of finished runs into runs/<name>/analysis.json."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.analyze import run_analyze
from pipeline.cli.common import ConfigOpt, RootOpt, exit_once_reported, resolve


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_cmd)


def _measures(text: Optional[str]) -> Optional[list[str]]:
    """'rank,cka' -> ['rank', 'cka'] (the config check names an unknown one)."""
    return None if text is None else [part.strip() for part in text.split(",")]


def analyze_cmd(
    runs: Optional[list[str]] = typer.Argument(None, help="run names under <root>/runs (default: the runs `dra-pipe "
                                               "run` trains with this config)"),
    features: Optional[list[str]] = typer.Option(None, "--features", help="a teacher feature set of the run's "
                                                 "training images (repeatable): CKA is measured against it and the "
                                                 "teacher probe adds its layer and timestep (default: the set the "
                                                 "run aligned with, or that its config names)"),
    timestep: Optional[list[int]] = typer.Option(None, "--timestep", help="teacher probe timestep in [0, 999] "
                                                 "(repeatable) [config analyze.timesteps]"),
    layer: Optional[list[str]] = typer.Option(None, "--layer", help="teacher probe tap layer, auto or all "
                                              "(repeatable) [config analyze.layers]"),
    measures: Optional[str] = typer.Option(None, "--measures", help="comma-separated measures (defined above) "
                                           "[config analyze.measures]"),
    n_test: Optional[int] = typer.Option(None, "--n-test", help="first n test images, 0 = all [config analyze.n_test]"),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="first n training images, 0 = all "
                                          "[config analyze.n_train]"),
    config: Path = ConfigOpt, root: Optional[Path] = RootOpt,
):
    """Measure what the paper claims about representations; each measure is cached in runs/<name>/analysis.json by
    the run's and the settings' identity (a rerun is a no-op), with figures in runs/<name>/figures/.

    - **teacher-probe**: a linear probe (multinomial logistic regression) on the frozen teacher's features at each
      timestep and tap layer, fitted on the training split: clean test accuracy, robust accuracy under the run's
      evaluation PGD (eval.json) at the run's eps attacking the input through the teacher (noise eps fixed per image
      as in the cache), and the features' effective rank; with the same numbers for the run and for a classifier
      trained without attack (objective clean, same data and epochs: trained here as a run of its own). Diffusion
      features are "partially robust" when the probe's robust accuracy lies between the two.
    - **cka**: linear CKA (Kornblith et al. 2019) between the classifier's aligned layer (train.dra_layer, pooled onto
      the target grid) and the teacher's targets, token by token, on the test images; the held-out cosine of a ridge
      map from those tokens to the targets (fitted on the training images' cached targets: the baseline any run
      gets); and for a DRA run the held-out cosine of its own projection head (DRA's objective).
    - **rank**: effective rank exp(H(p)) of the centred penultimate features of the test images, p the normalised
      singular values (Roy & Vetterli 2007), and the spectrum p itself.
    - **dimension**: classification dimension, the fewest top principal components of the penultimate features a
      linear probe needs for analyze.dimension_target (95%) of the full-feature probe's test accuracy, and accuracy
      against k (PCA-based; the paper's definition is not public).
    - **sae**: a TopK sparse autoencoder (Gao et al. 2024) with analyze.sae_expansion latents per dimension and k =
      analyze.sae_k on the penultimate features: normalised reconstruction error on the test images
      (sum |x - x_hat|^2 / sum |x - mean|^2) and the fraction of dead latents (never active on them).
    - **align-uniform**: alignment E|f(x) - f(x')|^2 over two random views of each test image and uniformity
      log E exp(-2 |f(x) - f(y)|^2) over pairs of test images, of L2-normalised penultimate features (Wang & Isola
      2020).
    - **saliency**: frequency saliency, the radially averaged power spectrum of the input gradients of the
      cross-entropy on the test images, and the fraction of its energy at or below half the Nyquist frequency.
    """
    cfg = resolve(config, root, {"analyze.timesteps": timestep or None, "analyze.layers": layer or None,
                                 "analyze.measures": _measures(measures), "analyze.n_test": n_test,
                                 "analyze.n_train": n_train})
    with exit_once_reported():
        run_analyze(cfg, runs or [], features or [])
