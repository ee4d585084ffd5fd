"""Every key of `generate` and `features` that changes the result is proven to change it (issue 22; train and
eval: test_settings_act.py, which explains the tables).

Both stages run the pipeline's own way (pipeline.generate.run_generate, pipeline.extract.run_extract: the
configuration, the plan, the stage's worker, the stores), each in a fresh workspace, with the shard jobs run in
this process instead of on Ray actors (settingsact.shards_in_process), on a tiny EDM.
generate: 6 images in batches of 4, Heun 3 steps. The result: the stored pixels and labels, read back under the
set's name.
features: the targets of 12 real and 8 generated 8x8 images, in batches of 4. The result: every stored array of
both feature sets (targets of each view, ids) read back, and the bytes of their data files on disk.
"""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
from settingsact import Change, assert_acts, check_tables, differing, rows, shards_in_process
from trainsets import image_set

from pipeline.config import load_config
from pipeline.extract import run_extract
from pipeline.generate import run_generate
from stores.features import FeatureSet
from stores.images import ImageSet

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

GENERATE = {"data.shard_size": 8, "generate.n": 6, "generate.steps": 3, "generate.batch_size": 4}
FEATURES = {"data.shard_size": 8, "features.batch_size": 4}
PAD = {"train.crop_pad": 1}                           # 9 augmentations to store views of

NON_DEFAULT = {
    "generate.n": 7,
    "generate.seed": 1,
    "generate.sampler": "euler",
    "generate.steps": 4,
    "generate.churn": 1.0,
    "features.timesteps": Change([200]),              # a list value: wrapped (a bare list holds alternatives)
    "features.layer": "enc.4x4_block0",               # the same 16x4x4 shape as auto (dec.4x4_in1)
    "features.pool": "2",
    # views are made for train.crop_pad and train.flip: at pad 0 without flips there is only view 0
    "features.views": Change(4, context=PAD),
    "features.views_generated": Change(4, context=PAD, moves=("generated",), same=("real",)),
    "features.view_seed": Change(1, context={**PAD, "features.views": 4}),   # views 1..3 are drawn per image
    "features.noise_seed": 1,
    "features.dtype": "float32",
    "features.compression": Change("zstd", moves=("bytes",), same=("real", "generated")),   # bytes, not values
}
NEUTRAL = {
    "generate.name": ("other", "it names the set (the result is read back under that name), not its images"),
    "generate.batch_size": (3, "sample i depends only on (seed, i); the network's float32 output can differ in the "
                               "last bits with the batch (measured: 2e-11 between batches of 1 and 4), which the "
                               "8-bit pixels hide unless a value sits on a rounding boundary"),
    "features.batch_size": (3, "target i depends only on image i and its eps; float32 targets differ in the last "
                               "bits with the batch (measured: 4e-9 between batches of 1 and 12), which float16 "
                               "storage (features.dtype) hides unless a value sits on a rounding boundary"),
}
NOT_COMPARED: dict = {}


def test_tables_cover_the_schema():
    check_tables(("generate", "features"), {**GENERATE, **FEATURES}, NON_DEFAULT=NON_DEFAULT, NEUTRAL=NEUTRAL,
                 NOT_COMPARED=NOT_COMPARED)


def section(table: dict, name: str) -> dict:
    return {k: v for k, v in table.items() if k.startswith(f"{name}.")}


def neutral(name: str) -> list:
    return [pytest.param(k, v, why, id=f"{k}={v}") for k, (v, why) in section(NEUTRAL, name).items()]


class Stage1:
    """Fresh workspaces for each run of either stage; the base's results per context computed once."""

    def __init__(self, top: Path, spec: str):
        self.top, self.spec, self.cache, self.count = top, spec, {}, itertools.count()

    def config(self, base: dict, settings: dict):
        root = self.top / f"ws{next(self.count)}"
        return load_config(None, {"root": str(root), "model.spec": self.spec, **base, **settings})

    def result(self, stage: str, settings: dict) -> dict:
        key = (stage, repr(sorted(settings.items())))
        if key not in self.cache:
            self.cache[key] = getattr(self, stage)(settings)
        return self.cache[key]

    def generate(self, settings: dict) -> dict:
        cfg = self.config(GENERATE, settings)
        with shards_in_process():
            run_generate(cfg)
        stored = ImageSet.open(Path(cfg.root), cfg.generate.name or "digits-gen")
        data = stored.read_range(0, stored.n)
        return {"images": data.images, "labels": data.labels}

    def features(self, settings: dict) -> dict:
        cfg = self.config(FEATURES, settings)
        root = Path(cfg.root)
        image_set(root, "digits-train", "real", 12, 8, seed=1)
        image_set(root, "digits-gen", "generated", 8, 8, seed=3)
        with shards_in_process():
            paths = run_extract(cfg, [], [], False)
        out: dict = {"bytes": {}}
        for path in paths:
            fs = FeatureSet(path)
            kind = {"digits-train": "real", "digits-gen": "generated"}[fs.identity["image_set_name"]]
            out[kind] = [fs.read_shard(i) for i in sorted(fs.records)]
            out["bytes"][kind] = {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
                                  for f in sorted((path / "features.zarr").rglob("*"))
                                  if f.is_file() and f.name != "zarr.json"}
        return out


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_model_dir, one_thread_for_module) -> Stage1:
    return Stage1(tmp_path_factory.mktemp("stage1-settings"), f"dra:{tiny_model_dir}")


@pytest.mark.parametrize("stage", ["generate", "features"])
def test_the_base_run_repeats_exactly(stage1, stage):
    """Otherwise a difference below could be noise."""
    assert differing(stage1.result(stage, {}), getattr(stage1, stage)({})) == set()


@pytest.mark.parametrize("key,change", rows(section(NON_DEFAULT, "generate")))
def test_a_generate_setting_changes_the_images(stage1, key, change):
    changed = stage1.generate({**change.context, **change.also, key: change.value})
    assert_acts(key, change, stage1.result("generate", change.context), changed, moves=("images",))


@pytest.mark.parametrize("key,change", rows(section(NON_DEFAULT, "features")))
def test_a_features_setting_changes_the_targets(stage1, key, change):
    changed = stage1.features({**change.context, **change.also, key: change.value})
    assert_acts(key, change, stage1.result("features", change.context), changed, moves=("real", "generated"))


@pytest.mark.parametrize("key,value,why", neutral("generate") + neutral("features"))
def test_a_neutral_setting_makes_the_same(stage1, key, value, why):
    stage = key.split(".")[0]
    assert differing(stage1.result(stage, {}), getattr(stage1, stage)({key: value})) == set(), why
