"""Which cached targets a run aligns with: the feature sets of its image sets, from one teacher.

Found by the identity in their meta.json (image-set fingerprint, timestep, layer, pooling) or named by key. Both
feature sets must come from the same teacher (identical identity apart from the image set), so real and
generated images are aligned with the same representation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stores.errors import IntegrityError, UserError
from stores.features import FeatureSet, list_feature_sets
from stores.images import ImageSet
from stores.views import ViewSpec


@dataclass(frozen=True)
class FeatureQuery:
    """Which cached targets a run aligns with (the pipeline resolves it from features.* and model.dtype)."""

    timestep: int                       # DDPM timestep of the targets
    layer: str                          # diffusion layer; auto = whichever the set holds
    pool: str                           # spatial pooling of the targets
    dtype: str                          # stored dtype of the targets
    compute_dtype: str = "float32"      # the teacher's compute dtype when the set was made

    def describe(self) -> str:
        return (f"at timestep {self.timestep}, layer {self.layer}, pool {self.pool}, stored {self.dtype}, computed in "
                f"{self.compute_dtype}")


def _teacher(fs: FeatureSet) -> dict:
    """The identity apart from the image set and the view count: model, layer, noise level, pooling, the views'
    crop pad, flips and seed (real and generated sets may store different numbers of views)."""
    views = {k: v for k, v in views_of(fs).identity().items() if k != "count"}
    return {**{k: v for k, v in fs.identity.items() if k not in ("image_set", "image_set_name", "views")},
            "views": views}


def views_of(fs) -> ViewSpec:
    """The views a feature set stores (a planned one carries its ViewSpec)."""
    return (fs.views if isinstance(getattr(fs, "views", None), ViewSpec)
            else ViewSpec.from_identity(fs.identity.get("views")))


def check_views_match(feats: dict, pad: int, flip: bool) -> None:
    """Views mode: every feature set's views must have been made for the run's crop pad and flips."""
    for fs in feats.values():
        v = views_of(fs)
        if (v.pad, v.flip) != (pad, flip):
            raise UserError(f"feature set {fs.key} holds views made for crop pad {v.pad}, "
                            f"flip {'on' if v.flip else 'off'}; this run augments with crop pad {pad}, "
                            f"flip {'on' if flip else 'off'} (train.crop_pad, train.flip): "
                            f"extract-features with the run's settings, or change them to the set's")


def _prefer(sets: list[FeatureSet], views: ViewSpec | None) -> list[FeatureSet]:
    """Among matching sets, those whose views are exactly the configured ones, if any."""
    if views is None:
        return sets
    exact = [f for f in sets if views_of(f) == views]
    return exact or sets


def _matches(fs: FeatureSet, query: FeatureQuery) -> bool:
    """Timestep, layer, pooling, stored dtype (features.dtype) and the teacher's compute dtype (model.dtype)."""
    i = fs.identity
    layer_ok = query.layer == "auto" or i.get("layer") == query.layer
    dtypes_ok = (i.get("dtype", "float16"), i.get("compute_dtype", "float32")) == (query.dtype, query.compute_dtype)
    pool_ok = str(i.get("pool")) == str(query.pool)
    return i.get("timestep") == query.timestep and layer_ok and pool_ok and dtypes_ok


def _readable(root: Path) -> list[FeatureSet]:
    sets = []
    for path in list_feature_sets(root):
        try:
            sets.append(FeatureSet(path))
        except (UserError, IntegrityError):
            continue                              # damaged sets are `dra-pipe verify`'s business
    return sets


def find_feature_sets(root: Path, real: ImageSet, gen: ImageSet | None, query: FeatureQuery,
                      key: str | None = None, views: dict | None = None) -> dict[str, FeatureSet]:
    """{"real": set[, "generated": set]}: by `key` (either one; the other must share its teacher) or by `query`.

    views: {"real": ViewSpec, "generated": ViewSpec} configured; among several matching sets these win."""
    views = views or {}
    sets = _readable(root)
    if key is not None:
        chosen = next((f for f in sets if f.key == key), None)
        if chosen is None:
            raise UserError(f"no feature set {key} under {root}/features; `dra-pipe ls` lists them")
        own = {real.fingerprint: "real", **({gen.fingerprint: "generated"} if gen else {})}
        made_from = chosen.identity.get("image_set")
        if made_from not in own:
            names = " or ".join(f"{s.name} ({s.fingerprint[:12]})" for s in (real, gen) if s is not None)
            raise UserError(f"feature set {key} was computed from image set {str(made_from)[:12]}, not from {names}; "
                            f"pick a feature set of these images")
        candidates = {own[made_from]: [chosen]}
    else:
        candidates = {"real": _prefer([f for f in sets if f.identity.get("image_set") == real.fingerprint
                                       and _matches(f, query)], views.get("real"))}
        if not candidates["real"]:
            raise UserError(f"no feature set for {real.name} {query.describe()}; run `dra-pipe extract-features` first")
    pairs = _pairs(sets, real, gen, candidates, views)
    if len(pairs) > 1:
        keys = ", ".join(p["real"].key for p in pairs)
        raise UserError(f"several feature sets of {real.name} match ({keys}); pass --features KEY")
    return pairs[0]


def _pairs(sets: list[FeatureSet], real: ImageSet, gen: ImageSet | None, candidates: dict, views: dict) -> list[dict]:
    """Complete the candidates with the other set's feature set of the same teacher."""
    if gen is None:
        return [{"real": f} for f in candidates["real"]]
    have, need, need_set = ("real", "generated", gen) if "real" in candidates else ("generated", "real", real)
    pairs = []
    for f in candidates[have]:
        others = _prefer([o for o in sets if o.identity.get("image_set") == need_set.fingerprint
                          and _teacher(o) == _teacher(f)], views.get(need))
        pairs += [{have: f, need: o} for o in others]
    if not pairs:
        _missing(need_set, candidates[have][0])
    return pairs


def _missing(images: ImageSet, like: FeatureSet):
    raise UserError(f"no feature set for {images.name} from the same teacher as {like.key} (layer "
                    f"{like.identity.get('layer')}, timestep {like.identity.get('timestep')}); run "
                    f"`dra-pipe extract-features` for {images.name}")
