"""Sample quality of a class-conditional diffusion model, measured by a small classifier (the judge).

The judge is a scikit-learn SVC (RBF kernel) on raw pixel values scaled to [0, 1], trained on a real image
set (e.g. `digits-train`). `class_agreement` draws n images per class with the EDM Heun sampler, quantises
them to uint8 exactly as stored images are (so the judge sees what `generate` would write), and returns the
fraction the judge assigns to the class they were conditioned on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.noise import latents_for
from stages.samplers import sample
from stores.images import ImageSet, eval_set_name


@dataclass
class Judge:
    """A fitted classifier over flattened uint8 images, with its accuracy on held-out real images."""

    model: object            # fitted sklearn estimator: predict(features [N, H*W*C]) -> labels [N]
    test_accuracy: float     # accuracy on the real test images (or cross-validated, see train_digit_judge)
    test_source: str         # what test_accuracy was measured on
    shape: tuple             # (H, W, C) of the images it was trained on

    def predict(self, images_uint8: np.ndarray) -> np.ndarray:
        """images (N, H, W, C) uint8 -> predicted labels (N,) int64."""
        if tuple(images_uint8.shape[1:]) != tuple(self.shape):
            raise ValueError(f"judge was trained on {self.shape} images, got {tuple(images_uint8.shape[1:])}")
        return np.asarray(self.model.predict(_features(images_uint8)), dtype=np.int64)


def _features(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.reshape(len(images_uint8), -1).astype(np.float64) / 255.0


def _all(images: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    data = images.read_range(0, images.n)
    return data.images, data.labels


def _sibling_test_set(train: ImageSet) -> ImageSet | None:
    """`<prefix>-test` (or ImageNet's `<prefix>-val`) next to `<prefix>-train`, if it exists."""
    if not train.name.endswith("-train"):
        return None
    path = train.path.with_name(eval_set_name(train.path.parent.parent, train.name[: -len("-train")]))
    return ImageSet(path) if (path / "dataset.json").exists() else None


def train_digit_judge(train: ImageSet, test: ImageSet | None = None, seed: int = 0) -> tuple[Judge, float]:
    """Fit the judge on every image of `train`; returns (judge, its accuracy on real test images).

    The test images are `test`, else the sibling `<prefix>-test` set, else 5-fold cross-validation on `train`.
    """
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import SVC

    x, y = _all(train)
    model = SVC(kernel="rbf", C=10.0, gamma="scale", random_state=seed).fit(_features(x), y)
    test = test if test is not None else _sibling_test_set(train)
    if test is not None:
        tx, ty = _all(test)
        accuracy, source = float((model.predict(_features(tx)) == ty).mean()), f"{test.name} ({test.n} images)"
    else:
        accuracy = float(cross_val_score(SVC(kernel="rbf", C=10.0, gamma="scale"), _features(x), y, cv=5).mean())
        source = f"5-fold cross-validation on {train.name}"
    judge = Judge(model, accuracy, source, tuple(x.shape[1:]))
    return judge, accuracy


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """Sampler output (B, C, H, W) in about [-1, 1] -> (B, H, W, C) uint8, as images are stored."""
    x = ((samples.to(torch.float64) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def conditional_samples(model, n_per_class: int, steps: int, seed: int, batch_size: int = 250,
                        sampler: str = "heun") -> tuple[np.ndarray, np.ndarray]:
    """n_per_class images of every class: (images (N, H, W, C) uint8, labels (N,)); sample i's noise is
    latents_for(i)."""
    classes = int(model.label_dim)
    if classes < 1:
        raise ValueError("class agreement needs a class-conditional model (label_dim > 0)")
    n = n_per_class * classes
    labels = torch.arange(n, dtype=torch.int64) % classes
    shape = (model.img_channels, model.img_resolution, model.img_resolution)
    out = []
    for start in range(0, n, batch_size):
        ids = range(start, min(start + batch_size, n))
        latents = latents_for(ids, shape, seed)
        out.append(to_uint8(sample(sampler, model, latents, labels[start:start + len(ids)], num_steps=steps)))
    return np.concatenate(out), labels.numpy()


def class_agreement(model, n_per_class: int, steps: int, seed: int, judge: Judge, batch_size: int = 250) -> float:
    """Fraction of Heun samples (n_per_class per class, `steps` steps) that the judge assigns to their class."""
    images, labels = conditional_samples(model, n_per_class, steps, seed, batch_size)
    return float((judge.predict(images) == labels).mean())
