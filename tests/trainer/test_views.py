"""Targets that match what the classifier sees: in `views` mode the trainer applies a stored view's augmentation
and aligns with its stored target; that target equals the online teacher's for the very same augmented image."""
import pickle

import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.plans.teacher import OnlineTeacher, teacher_for
from pipeline.plans.train import make_job
from stages.extract import FeaturePayload, FeatureWorker, NoiseLevel, feature_identity, target_shape
from stages.fingerprint import model_fingerprint
from stages.importers import import_source
from stages.models import load_model
from stores.errors import UserError
from stores.features import FeatureSet, FeatureSetWriter
from stores.images import ImageSet
from stores.manifest import ShardJob
from stores.views import ViewSpec
from trainer.loader import MixPlan, Source, make_loader
from trainer.loop import Dist, mix_plan, train
from trainer.runs import RunFolder
from trainer.views import align

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER, PAD, VIEWS = "dec.4x4_in1", 2, 6
TRAIN = {"epochs": 1, "batch_size": 32, "attack_steps": 1, "dra_hidden": 16, "holdout": 20, "holdout_pgd_steps": 1,
         "loader_workers": 0, "unsup_fraction": 0.0, "crop_pad": PAD, "flip": True}


def extract(root, images: ImageSet, spec: str, views: ViewSpec, level: NoiseLevel) -> FeatureSet:
    """What extract-features does for one image set, in this process (the shard worker without Ray)."""
    net = load_model(spec)
    identity = feature_identity(images, model_fingerprint(net), LAYER, level, 0, "none", views, bool(net.label_dim))
    writer = FeatureSetWriter(root, identity, images.n, images.shard_size, target_shape(net, LAYER, "none"),
                              views.count, provenance={"model_spec": spec})
    writer.begin()
    worker = FeatureWorker(spec, LAYER, "none", 0, 64)
    for p in images.plan():
        job = ShardJob(p.index, p.first_id, p.count,
                       FeaturePayload(str(images.path), ((str(writer.path), level),), views))
        for record in worker.finish(job, worker.compute(job, lambda n: None)):
            writer.record(record)
    return FeatureSet(writer.path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory, tiny_model_dir):
    """180 digits in 3 shards, their feature set of 6 views made for crop pad 2 with flips, and a config."""
    root = tmp_path_factory.mktemp("views")
    ws = root / "ws"
    import_source(ws, "digits", None, None, 64, "png", test_fraction=0.9)
    images = ImageSet.open(ws, "digits-train")
    spec = f"dra:{tiny_model_dir}"
    fs = extract(ws, images, spec, ViewSpec(VIEWS, PAD, True, seed=4), NoiseLevel.from_timestep(100))
    (root / "pipeline.yaml").write_text(yaml.safe_dump({
        "root": str(ws), "model": {"spec": spec},
        "features": {"views": VIEWS, "view_seed": 4, "layer": LAYER, "timesteps": [100]}, "train": TRAIN}))
    return {"root": root, "ws": ws, "images": images, "features": fs, "spec": spec}


def config(digits, **train):
    return load_config(digits["root"] / "pipeline.yaml", {f"train.{k}": v for k, v in train.items()})


def first_batch(digits, seed=0):
    source = Source.open(digits["images"], digits["features"], 0, stop=160)
    plan = MixPlan(source, None, 48, 0, seed, keys=("ids", "images", "labels", "targets", "views"),
                   view_counts=(VIEWS, 0))
    return next(iter(make_loader(plan)))


def test_views_targets_equal_the_online_teachers_for_the_same_augmented_images(digits):
    fs = digits["features"]
    ident = fs.identity
    teacher = OnlineTeacher(digits["spec"], LAYER, ident["sigma"], ident["timestep"], ident["noise_seed"], "none",
                            (ident["image_set"], None), ident["model"])
    for seed in (0, 1):
        batch = first_batch(digits, seed)
        stored = align("views", batch, PAD, True, torch.Generator(), view_seed=4)
        assert stored.flips.any() and not stored.flips.all() and (stored.shifts != 0).any()   # flips and crops
        assert (stored.shifts[~stored.flips] != 0).any() and (stored.shifts[stored.flips] != 0).any()
        online = align("online", batch, PAD, True, torch.Generator(), teacher=teacher,
                       draw=(stored.flips, stored.shifts))
        assert torch.equal(stored.x, online.x)                          # the same augmented images
        a, b = stored.targets.float(), online.targets.float()
        assert a.shape == b.shape == (48, 16, 4, 4)
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1e-3, rel                                          # float16 rounding
        assert torch.allclose(a, b, rtol=2e-3, atol=2e-3 * b.abs().max().item())
        augmented = batch["views"] != 0                                 # these targets differ from the image's own
        assert (a[augmented] - online_of_view0(teacher, batch)[augmented]).norm() > 0.05 * b[augmented].norm()
    shipped = pickle.loads(pickle.dumps(teacher))                     # Ray Train ships it; each rank loads its own
    assert teacher._model is not None and shipped._model is None
    assert torch.equal(shipped(batch["images"][:4], batch["ids"][:4], batch["labels"][:4], batch["generated"][:4]),
                       online_of_view0(teacher, batch)[:4])


def test_online_teacher_keys_each_rows_noise_by_its_image_set(digits):
    ident = digits["features"].identity
    teacher = OnlineTeacher(digits["spec"], LAYER, ident["sigma"], ident["timestep"], ident["noise_seed"], "none",
                            (ident["image_set"], "g" * 64), ident["model"])
    shard = digits["images"].read_shard(0)
    args = torch.from_numpy(shard.images[:8]), torch.from_numpy(shard.ids[:8]), torch.from_numpy(shard.labels[:8])
    as_real = teacher(*args, torch.zeros(8, dtype=torch.bool))
    as_generated = teacher(*args, torch.ones(8, dtype=torch.bool))
    assert (as_real - as_generated).norm() > 0.01 * as_real.norm()
    stored = torch.from_numpy(digits["features"].read_shard(0)["targets"][:8]).float()   # extract keyed by the real set
    assert (as_real - stored).norm() < 1e-2 * stored.norm()


def online_of_view0(teacher, batch):
    """The teacher's target of the un-augmented image (what a cache without views holds)."""
    return teacher(batch["images"], batch["ids"], batch["labels"], batch["generated"]).float()


def test_a_feature_set_made_for_another_crop_or_flip_is_refused(digits):
    for settings, needle in (({"crop_pad": 1}, "crop pad 1, flip on"), ({"flip": False}, "crop pad 2, flip off")):
        with pytest.raises(UserError, match="holds views made for crop pad 2, flip on") as caught:
            make_job(config(digits, **settings), "refused")
        assert needle in str(caught.value) and "train.crop_pad" in str(caught.value)
    make_job(config(digits, crop_pad=1, dra_targets="shifted"), "shifted-ok")    # the approximation takes any set


@pytest.mark.parametrize("mode", ["views", "online", "shifted"])
def test_every_mode_trains_and_reports_views_seen(digits, mode):
    job = make_job(config(digits, dra_targets=mode), f"run-{mode}")
    assert job.view_counts == (VIEWS, 0) and job.view_seed == 4 and job.mirror_view
    keys = mix_plan(job, Dist()).keys
    assert {"views": "views" in keys, "online": "targets" not in keys, "shifted": "targets_v1" in keys}[mode]
    RunFolder(job.run_dir).prepare(job.identity(), job.config)
    row = train(job, teacher=teacher_for(job, digits["ws"]))
    assert row["dra"] > 0 and row["visits_real"] == pytest.approx(5 * 32 / 160)
    online = row["views_seen_real_online"]
    assert 0 < row["views_seen_real"] <= online + 1e-9 and online < 50


def test_train_targets_flag_and_plan(cli, digits):
    for mode, needle in (("online", "targets online (the teacher in the step, exact)"),
                         ("views", "targets views (6 stored views per real image, exact)"),
                         ("shifted",
                          "targets shifted (whole-cell shift of the un-augmented target: an approximation)")):
        code, out, err = cli("train", "--dry-run", "--targets", mode, "-c", digits["root"] / "pipeline.yaml")
        assert code == 0 and needle in " ".join(out.split()), (mode, err)
    code, _, err = cli("train", "--dry-run", "--targets", "nearest", "-c", digits["root"] / "pipeline.yaml")
    assert code == 2 and "dra_targets" in err and err.count("\n") == 1
