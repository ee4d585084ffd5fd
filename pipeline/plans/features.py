"""Feature sets in a plan: the stored ones, or, in a dry run before extraction, the ones the config describes."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.plans.inputs import PlannedImages, teacher_for_plan
from stages.extract import check_layer, target_shape
from stores.errors import UserError
from stores.views import ViewSpec, check_views
from trainer.job import shape_text
from trainer.targets import FeatureQuery, find_feature_sets


@dataclass(frozen=True)
class PlannedFeatures:
    """A feature set the configuration describes: its key names what it will hold, its shape is the teacher's."""

    key: str
    shape: tuple
    views: ViewSpec


def feature_query(cfg: Config) -> FeatureQuery:
    """The targets a run of this configuration aligns with: features.timesteps[0], layer, pool and dtype, and the
    teacher's compute dtype (model.dtype)."""
    f = cfg.features
    return FeatureQuery(f.timesteps[0], f.layer, str(f.pool), f.dtype, cfg.model.dtype)


def feature_sets_for(root: Path, query: FeatureQuery, real, gen, key: str | None, planned: list[str] | None,
                     views: dict | None, plan: Callable[[], dict]) -> dict:
    """The stored feature sets; in a dry run, where they (or their image sets) are not there yet, plan() (one
    planned set per image set, see planned_feature_sets)."""
    stored = [x for x in (real, gen) if x is not None and not isinstance(x, PlannedImages)]
    if planned is None or (len(stored) == len([x for x in (real, gen) if x is not None])):
        try:
            return find_feature_sets(root, real, gen, query, key, views)
        except UserError:
            if planned is None:
                raise
    return plan()


def planned_feature_sets(cfg: Config, planned: list[str], generated: bool) -> dict:
    """The feature sets extract-features would write with this configuration (a note for each in `planned`)."""
    shape, layer, note = planned_target_shape(cfg)
    if note:
        planned.append(note)
    f = cfg.features
    planned.append(f"feature sets are not here yet (`dra-pipe extract-features` writes them): planned as {layer} at "
                   f"timestep {f.timesteps[0]}, pool {f.pool}, {shape_text(shape)} per image"
                   + f", {views_for(cfg, 'real').label()}")
    real_set = PlannedFeatures(f"(planned: {layer} t={f.timesteps[0]})", shape, views_for(cfg, "real"))
    gen_set = PlannedFeatures(real_set.key, shape, views_for(cfg, "generated"))
    return {"real": real_set, **({"generated": gen_set} if generated else {})}


def views_for(cfg: Config, kind: str) -> ViewSpec:
    """The views extract-features stores for a real or generated set: made for the run's crop pad and flips."""
    f, t = cfg.features, cfg.train
    count, what = f.views, "features.views (--views)"
    if kind == "generated" and f.views_generated is not None:
        count, what = f.views_generated, "features.views_generated"
    spec = check_views(count, t.crop_pad, t.flip, what)
    return ViewSpec(spec.count, spec.pad, spec.flip, f.view_seed)


def planned_target_shape(cfg: Config) -> tuple[tuple, str, str | None]:
    """(C, h, w) and layer of the targets extract-features would store, from the teacher model and the pooling;
    and a note when a published architecture stands in for a missing checkpoint."""
    model, _, note = teacher_for_plan(cfg)
    layer = check_layer(model, cfg.features.layer)
    return target_shape(model, layer, str(cfg.features.pool)), layer, note
