"""Representation measures: pure functions over tensors, row stores and callables (no stores, no files).

- `spectrum`: effective rank and the normalised singular-value spectrum (Roy & Vetterli 2007), from a matrix or
  from streamed second moments.
- `cka`: linear CKA (Kornblith et al. 2019) and a ridge map's held-out cosine, from streamed moments.
- `geometry`: alignment and uniformity of normalised features (Wang & Isola 2020).
- `probe`: a seeded multinomial logistic-regression probe trained on mini-batches, and its robust accuracy under
  PGD through a feature callable (a frozen teacher).
- `dimension`: the classification dimension (PCA components a probe needs for 95% of the full probe's accuracy).
- `sae`: a TopK sparse autoencoder (Gao et al. 2024) trained on mini-batches.
- `saliency`: the radially averaged power spectrum of input gradients and its low-frequency fraction.
- `rows`: the row stores the probes and autoencoders read mini-batches from.

`pipeline.analyze` streams images from the stores, computes features in batches and calls these.
"""
