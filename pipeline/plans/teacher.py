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
        from stages.fingerprint import model_fingerprint
        from stages.models import load_model
        from stages.precision import check_compute_dtype
        check_compute_dtype(self.compute_dtype, device)
        model = load_model(self.spec)
        if self.fingerprint is not None and model_fingerprint(model) != self.fingerprint:
            raise UserError(f"model {self.spec} is not the teacher the feature set was made with (fingerprint "
                            f"{self.fingerprint[:12]}); point model.spec at that model")
        for p in model.parameters():
            p.requires_grad_(False)
        self._model = model.eval().to(device)
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
                         str(ident["pool"]), (ident["image_set"], gen), ident.get("model"),
                         ident.get("compute_dtype", "float32"))
