"""Feature sets in a plan: the stored ones, or, in a dry run before extraction, the ones the config describes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.plans.inputs import PlannedImages, teacher_for_plan
from stages.extract import check_layer, target_shape
from stores.errors import UserError
from trainer.job import shape_text
from trainer.targets import find_feature_sets


@dataclass(frozen=True)
class PlannedFeatures:
    """A feature set the configuration describes: its key names what it will hold, its shape is the teacher's."""

    key: str
    shape: tuple
    flip: bool


def feature_sets_for(cfg: Config, real, gen, key: str | None, planned: list[str] | None) -> dict:
    """The stored feature sets; in a dry run, where they (or their image sets) are not there yet, the planned ones."""
    stored = [x for x in (real, gen) if x is not None and not isinstance(x, PlannedImages)]
    if planned is None or (len(stored) == len([x for x in (real, gen) if x is not None])):
        try:
            return find_feature_sets(Path(cfg.root), real, gen, cfg.features, key)
        except UserError:
            if planned is None:
                raise
    shape, layer, note = planned_target_shape(cfg)
    if note:
        planned.append(note)
    f = cfg.features
    planned.append(f"feature sets are not here yet (`dra-pipe extract-features` writes them): planned as {layer} at "
                   f"timestep {f.timesteps[0]}, pool {f.pool}, {shape_text(shape)} per image"
                   + (" and its flip" if f.flip else ""))
    planned_set = PlannedFeatures(f"(planned: {layer} t={f.timesteps[0]})", shape, bool(f.flip))
    return {"real": planned_set, **({"generated": planned_set} if gen is not None else {})}


def planned_target_shape(cfg: Config) -> tuple[tuple, str, str | None]:
    """(C, h, w) and layer of the targets extract-features would store, from the teacher model and the pooling;
    and a note when a published architecture stands in for a missing checkpoint."""
    model, _, note = teacher_for_plan(cfg)
    layer = check_layer(model, cfg.features.layer)
    return target_shape(model, layer, str(cfg.features.pool)), layer, note
