"""The online teacher (`train.dra_targets: online`): the frozen diffusion model, truncated at the tapped layer,
computing the target of the exact augmented image inside the training step.

Built by the pipeline and handed to the trainer as a callable, so trainer/ never imports stages/. It is
picklable (Ray Train ships it to every rank) and loads its model lazily, once per process, on the device of the
images it is given. Its settings come from the run's feature set: model spec (provenance), layer, noise level,
noise seed, pooling and compute dtype (model.dtype when the set was made), so it computes what extract-features
stores, with the same eps per image id.
"""
from __future__ import annotations

from pathlib import Path

import torch

from stores.errors import UserError
from stores.features import FeatureSet


class OnlineTeacher:
    """teacher(views_uint8 (B, H, W, C), ids (B,), labels (B,), generated (B,) bool) -> targets (B, Ct, h, w)
    float32, no gradients. image_sets: the (real, generated) image-set fingerprints that key each row's noise."""

    def __init__(self, spec: str, layer: str, sigma: float, timestep: int | None, noise_seed: int, pool: str,
                 image_sets: tuple[str, str | None], fingerprint: str | None = None, compute_dtype: str = "float32"):
        self.spec, self.layer, self.sigma, self.timestep = spec, layer, sigma, timestep
        self.noise_seed, self.pool, self.fingerprint = noise_seed, pool, fingerprint
        self.image_sets, self.compute_dtype = image_sets, compute_dtype
        self._model = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}             # each process loads its own copy

    def _load(self, device: torch.device):
        self._model = load_frozen(self.spec, self.fingerprint, self.compute_dtype, device)
        return self._model

    @torch.no_grad()
    def __call__(self, views_uint8: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                 generated: torch.Tensor) -> torch.Tensor:
        from stages.extract import NoiseLevel, view_targets
        model = self._model or self._load(views_uint8.device)
        level = NoiseLevel(self.sigma, self.timestep)
        real, gen = self.image_sets
        if gen is None and bool(generated.any()):
            raise ValueError("generated rows in the batch, but the teacher knows no generated image set")
        keys = [gen if g else real for g in generated.cpu().tolist()]
        return view_targets(model, ids, views_uint8, labels, self.layer, level, self.noise_seed, self.pool, keys,
                            self.compute_dtype)


def load_frozen(spec: str, fingerprint: str | None, compute_dtype: str, device: torch.device):
    """The model of `spec` in eval mode on `device`, parameters frozen; checked against `fingerprint` when given."""
    from stages.fingerprint import model_fingerprint
    from stages.models import load_model
    from stages.precision import check_compute_dtype
    check_compute_dtype(compute_dtype, device)
    model = load_model(spec)
    if fingerprint is not None and model_fingerprint(model) != fingerprint:
        raise UserError(f"model {spec} is not the teacher the feature set was made with (fingerprint "
                        f"{fingerprint[:12]}); point model.spec at that model")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval().to(device)


class FrozenTeacher:
    """The frozen diffusion model as a differentiable feature callable (`dra-pipe analyze`): the tapped, pooled
    activation of images in [0, 1] at any layer and noise level, with the cache's eps per (image set, id)."""

    def __init__(self, spec: str, noise_seed: int, compute_dtype: str = "float32", fingerprint: str | None = None):
        self.spec, self.noise_seed, self.compute_dtype, self.fingerprint = spec, noise_seed, compute_dtype, fingerprint
        self._model = None

    def model(self, device: torch.device):
        if self._model is None:
            self._model = load_frozen(self.spec, self.fingerprint, self.compute_dtype, device)
        return self._model

    def layers(self) -> list[str]:
        return self.model(torch.device("cpu")).layer_names()

    def default_layer(self) -> str:
        from stages.extract import default_layer
        return default_layer(self.model(torch.device("cpu")))

    def takes_no_label(self) -> bool:
        """Whether the model runs without a class label (unconditional, or EDM's all-zero label vector)."""
        model = self.model(torch.device("cpu"))
        if not model.label_dim:
            return True
        x = torch.zeros(1, model.img_channels, model.img_resolution, model.img_resolution)
        try:
            with torch.no_grad():
                model(x, torch.ones(1), None)
        except ValueError:                         # a conditional diffusers model insists on a label
            return False
        return True

    def features(self, x01: torch.Tensor, ids, labels, image_set: str, layer: str, timestep: int | None,
                 sigma: float, pool: str) -> torch.Tensor:
        """(B, Ct, h, w) float32 targets of x01 (B, C, H, W); labels None gives the model no class label."""
        from stages.extract import NoiseLevel, input_targets
        return input_targets(self.model(x01.device), x01, ids, labels, layer, NoiseLevel(sigma, timestep),
                             self.noise_seed, pool, image_set, self.compute_dtype)


def teacher_for(job, root: Path) -> OnlineTeacher | None:
    """The online teacher of an online-mode job, from its real feature set's identity and recorded model spec."""
    if job.dra_targets != "online":
        return None
    fs = FeatureSet(Path(root) / "features" / job.feature_keys["real"])
    ident, spec = fs.identity, fs.meta.get("provenance", {}).get("model_spec")
    if not spec:
        raise UserError(f"feature set {fs.key} records no model spec; extract it again with dra-pipe extract-features")
    gen_key = job.feature_keys.get("generated")
    gen = FeatureSet(Path(root) / "features" / gen_key).identity["image_set"] if gen_key else None
    return OnlineTeacher(spec, ident["layer"], ident["sigma"], ident["timestep"], ident["noise_seed"],
                         str(ident["pool"]),
                         (ident["image_set"], gen), ident.get("model"), ident.get("compute_dtype", "float32"))
