"""Plans of work this machine will not run: counted FLOPs, the stated GPU rate, and dry runs of the real recipe
(pipeline.cifar10.yaml) where neither the EDM checkpoint nor the data sets are here."""
import re

import pytest
import torch
import yaml
from conftest import REPO

from pipeline.config import load_config
from pipeline.estimates import count_flops, duration, forward_flops, gpu_hours
from stages.edm.networks import EDMPrecond
from stages.published import PUBLISHED, published_name, published_stand_in

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


CIFAR_YAML = REPO / "pipeline.cifar10.yaml"


def test_count_flops_is_exact_on_a_linear_layer_and_survives_autograd_grad():
    layer = torch.nn.Linear(32, 16)
    x = torch.rand(4, 32)
    assert count_flops(lambda: layer(x)) == 2 * 4 * 32 * 16

    def input_gradient():                      # what every PGD step does; module-tracking counters fail here
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(layer(xx).sum(), xx)
    assert count_flops(input_gradient) == 2 * (2 * 4 * 32 * 16)   # the weights' gradient is not computed


def test_edm_cifar10_costs_what_design_states():
    """42.4 GFLOP per evaluation; 20M images x 35 evaluations ~ 21 GPU-hours at the stated rate."""
    net = published_stand_in("edm:/nowhere/edm-cifar10-32x32-cond-vp.pkl")
    per_eval = forward_flops(net)
    assert per_eval == pytest.approx(42.4e9, rel=2e-3)
    assert gpu_hours(20e6 * 35 * per_eval) == pytest.approx(21, abs=0.5)


@pytest.mark.parametrize("name, n_params", [("edm-cifar10-32x32-cond-vp.pkl", 55_735_299),
                                            ("edm-cifar10-32x32-cond-ve.pkl", 56_400_643),
                                            ("edm-imagenet-64x64-cond-adm.pkl", 295_899_267)])
def test_published_architectures_have_their_parameter_counts(name, n_params):
    assert published_name(f"edm:/any/where/{name}") == name
    with torch.device("meta"):
        net = EDMPrecond(**PUBLISHED[name])
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_published_name_needs_an_edm_spec_and_a_known_file():
    assert published_name("dra:/x/edm-cifar10-32x32-cond-vp.pkl") is None
    assert published_name("edm:/x/my-own-model.pkl") is None


def test_durations_read_naturally():
    assert duration(30) == "30 s" and duration(600) == "10.0 min" and duration(5 * 3600) == "5.0 h"
    assert duration(10 * 86400) == "10.0 days" and duration(4 * 365.25 * 86400) == "4.0 years"


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1).replace(",", ""))


def test_generate_dry_run_of_the_real_recipe_plans_without_the_checkpoint(cli, tmp_path):
    code, out, err = cli("generate", "--dry-run", "-c", CIFAR_YAML, "--root", tmp_path / "ws")
    assert code == 0, err
    text = " ".join(out.split())
    assert "plan: 20,000,000 images -> cifar10-gen-20m: 2,000 shards of up to 10,000" in text
    assert "is not here: planned with the published architecture of edm-cifar10-32x32-cond-vp.pkl (55,735,299" in text
    assert "heun 20 steps = 39 network evaluations x 42.4 GFLOP" in text
    assert _number(r"~([\d,.]+) GPU-hours", text) == pytest.approx(20e6 * 39 * 42.38e9 / 989.4e12 / 0.4 / 3600,
                                                                   rel=0.03)
    # an incompressible 32x32x3 PNG fills 7 tar blocks plus its header, the label 2: 10 x 512 bytes
    assert "5,120 B/image, at most" in text and "~102.4 GB on disk" in text
    assert "dry run: nothing written" in text and not (tmp_path / "ws").exists()


def test_generate_dry_run_takes_the_size_of_a_real_set_when_it_is_here(cli, tmp_path):
    """Generated images compress like the real ones: the plan uses the real set's bytes per image."""
    from stores.images import ImageSet
    config = yaml.safe_load(CIFAR_YAML.read_text())
    config["root"] = str(tmp_path / "ws")
    config["data"]["source"] = str(tmp_path / "cifar.tar.gz")
    from conftest import make_cifar_tarball
    make_cifar_tarball(tmp_path / "cifar.tar.gz")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    code, _, err = cli("import", "cifar10", "--from", tmp_path / "cifar.tar.gz")
    assert code == 0, err
    real = ImageSet.open(tmp_path / "ws", "cifar10-train")
    code, out, err = cli("generate", "--dry-run")
    assert code == 0, err
    per_image = _number(r"\(([\d,]+) B/image, as the real set cifar10-train\)", " ".join(out.split()))
    assert per_image == round(real.bytes_on_disk() / real.n)


def test_generate_dry_run_with_an_unknown_missing_model_is_one_line_exit_2(cli, tmp_path):
    config = {"root": str(tmp_path / "ws"), "model": {"spec": f"edm:{tmp_path}/mine.pkl"}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    code, out, err = cli("generate", "--dry-run")
    assert code == 2 and err.count("\n") == 1 and "mine.pkl does not exist" in err


def test_train_dry_run_plans_missing_stores_from_the_config(cli, tmp_path):
    """CIFAR-10 planned from the importer, the generated set from generate.n, the targets from the published
    teacher's layer; FLOPs counted on the real classifier (PreAct ResNet-18 here: quick on a CPU)."""
    config = yaml.safe_load(CIFAR_YAML.read_text())
    config["root"] = str(tmp_path / "ws")
    config["train"].update(arch="preact-resnet18", epochs=10, dra_hidden=64)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    code, out, err = cli("train", "--dry-run")
    assert code == 0, err
    text = " ".join(out.split())
    assert ("image set cifar10-train is not here yet" in text
            and "planned as 50,000 images of 3x32x32, 10 classes" in text)
    assert "cifar10-gen-20m is not here yet" in text and "planned as 20,000,000 images" in text
    assert ("planned as dec.8x8_in1 at timestep 100, pool none, 256x8x8 per image, 16 view(s) for crop pad 4, flip on"
            in text)
    assert "targets views (16 stored views per real image, 4 per generated, exact)" in text
    assert "24 steps per epoch (ceil(48976 / 2048)) x 10 epochs = 240 steps" in text
    assert "layer3 -> head (hidden 64, depth 3) -> targets 256x8x8" in text
    per_image = _number(r"compute: ([\d,.]+) GFLOP per training image", text) * 1e9
    forward = count_flops(lambda: _preact_forward())
    # TRADES: 10 attack steps (forward + input gradient, ~2 forwards each) + clean and adversarial forward and
    # backward (~3 forwards each): about 26 forwards, a little more with the DRA head
    assert 24 * forward < per_image < 30 * forward
    images = _number(r"x ([\d,]+) images;", text)
    assert images == 240 * 2048
    hours = _number(r"~([\d,.]+) GPU-hours", text)
    held_out = _number(r"held-out evaluation ([\d,.]+) GFLOP per image x ([\d,]+)", text) * 1e9 * 1024 * 10
    assert hours == pytest.approx((images * per_image + held_out) / (989.4e12 * 0.4) / 3600, rel=0.05)
    assert "dry run: nothing trained" in text and not (tmp_path / "ws").exists()


def _preact_forward():
    from trainer.classifiers import build_classifier
    model = build_classifier("preact-resnet18", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    model(torch.rand(1, 3, 32, 32))


def test_train_dry_run_without_a_knowable_real_set_is_one_line_exit_2(cli, tmp_path):
    config = {"root": str(tmp_path / "ws"), "data": {"importer": "npz", "source": str(tmp_path / "x.npz")}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    code, out, err = cli("train", "--dry-run")
    assert code == 2 and err.count("\n") == 1 and "run `dra-pipe import` first, even for a dry run" in err


def test_cifar10_example_config_validates():
    cfg = load_config(CIFAR_YAML)
    assert cfg.generate.n == "20M" and cfg.train.arch == "wrn-28-10" and cfg.train.dra


def test_train_dry_run_of_the_real_recipe(cli, tmp_path):
    """The shipped example as is: WRN-28-10 (a TRADES step of one image takes about 5 s on one CPU thread)."""
    code, out, err = cli("train", "--dry-run", "-c", CIFAR_YAML, "--root", tmp_path / "ws")
    assert code == 0, err
    text = " ".join(out.split())
    assert "57600 steps" in text and "classifier layer block3" in text
    assert 20 < _number(r"~([\d,.]+) GPU-hours", text) < 30


def test_extract_dry_run_of_the_real_recipe_plans_without_model_or_images(cli, tmp_path):
    code, out, err = cli("extract-features", "--dry-run", "-c", CIFAR_YAML, "--root", tmp_path / "ws")
    assert code == 0, err
    text = " ".join(out.split())
    assert "plan: layer dec.8x8_in1, targets 256x8x8 float16 per view at t=100" in text
    assert "views made for crop pad 4, flip on" in text
    assert ("cifar10-train: 50,000 images x 16 view(s) x 1 noise level(s) x 32.8 KB = "
            "524.3 KB per image, 26.2 GB") in text
    assert ("cifar10-gen-20m: 20,000,000 images x 4 view(s) x 1 noise level(s) x 32.8 KB = "
            "131.1 KB per image, 2.6 TB") in text
    tap = _number(r"x ([\d.]+) GFLOP \(the network up to dec.8x8_in1", text)
    full = _number(r"a full forward is ([\d.]+)\)", text)
    assert full == pytest.approx(42.4, abs=0.05) and tap < full / 2          # the tap skips most of the decoder
    forwards = 20e6 * 4 + 50e3 * 16                                          # one tapped forward per view
    assert _number(r"~([\d.]+) GPU-hours", text) == pytest.approx(forwards * tap * 1e9 / 989.4e12 / 0.4 / 3600,
                                                                  rel=0.05)
    assert "--pool 2 stores 4x less" in text and not (tmp_path / "ws").exists()


def test_a_tap_returns_what_the_full_forward_computes_at_that_layer():
    """Stopping after the last requested layer changes nothing that was captured."""
    from stages.taps import features
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=3, model_type="SongUNet", model_channels=8,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=0).eval()
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.eye(3)[[0, 2]]
    names = net.layer_names()
    seen = {}
    handles = [net.layer_module(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in names]
    with torch.no_grad():
        net(x, sigma, labels)
        for h in handles:
            h.remove()
        early = features(net, x, sigma, labels, [names[2], names[len(names) // 2]])
    assert (torch.equal(early[names[2]], seen[names[2]])
            and torch.equal(early[names[len(names) // 2]], seen[names[len(names) // 2]]))
    saw_after = []
    late = net.layer_module(names[-1]).register_forward_hook(lambda *a: saw_after.append(1))
    with torch.no_grad():
        features(net, x, sigma, labels, [names[2]])
    late.remove()
    assert saw_after == []                                                     # the last block never ran


def test_dry_runs_of_the_default_plan_everything_before_anything_exists(cli, tmp_path):
    """The digits default in an empty workspace: the model fit-diffusion would train stands in for itself."""
    stand_in = "the model fit-diffusion trains on digits-train is not there yet"
    for command, needle in (("generate", "plan: 5,000 images -> digits-gen"),
                            ("extract-features", "digits-train: 1,438 images x 1 view(s)"),
                            ("train", "11 steps per epoch (ceil(1294 / 128)) x 30 epochs = 330 steps")):
        code, out, err = cli(command, "--dry-run", "--root", tmp_path / "ws")
        text = " ".join(out.split())
        assert code == 0, (command, err)
        assert stand_in in text and needle in text and "GPU-hours" in text, command
        if command == "generate":                  # a random network's samples say nothing about image sizes
            assert "B/image, at most" in text
    assert not (tmp_path / "ws").exists()


def test_more_loader_workers_than_cpus_refused():
    from pipeline.plans.train import check_loader_workers
    from stores.errors import UserError
    check_loader_workers(2, 2)
    with pytest.raises(UserError, match="train.loader_workers is 3 but this machine has 2 CPUs; "
                                        "set train.loader_workers to 2"):
        check_loader_workers(3, 2)
