"""RobustBench's shape: export a run as a state dict in RobustBench's layout with its model_info, and load such a
state dict back (eval --model, select --scorer) with identical logits."""
import json

import pytest
import torch
import torch.nn.functional as F
from trainsets import image_set

from pipeline.config import defaults
from trainer.classifier_files import load_classifier
from trainer.classifiers import build_classifier
from trainer.robustbench import ASSUMED_EPS, robustbench_names, to_robustbench
from trainer.runs import RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def trained_looking(arch: str, mean=CIFAR_MEAN, std=CIFAR_STD, seed: int = 0) -> torch.nn.Module:
    """A classifier whose BN statistics and affine terms are not the identity, so a misplaced tensor shows."""
    torch.manual_seed(seed)
    model = build_classifier(arch, 10, 3, 32, mean, std)
    for name, t in model.state_dict().items():
        if name.endswith(("running_mean", "bias")):
            t.copy_(0.1 * torch.randn_like(t))
        elif name.endswith(("running_var", "bn0.weight", "bn1.weight", "bn2.weight", "bn.weight")):
            t.copy_(0.5 + torch.rand_like(t))
    return model.eval()


def dm_wide_resnet_logits(state: dict, x: torch.Tensor, depth: int) -> torch.Tensor:
    """RobustBench's DMWideResNet forward, written from its layout with F.* over the state dict's names: Swish
    activations, (0, 1, 0, 1) padding before a stride-2 conv, a width-changing block's shortcut on the activated
    input, normalisation by the `mean`/`std` buffers, global average pool over the last 8x8 map."""
    def bn_swish(prefix, h):
        h = F.batch_norm(h, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                         state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-5)
        return h * torch.sigmoid(h)

    h = F.conv2d((x - state["mean"]) / state["std"], state["init_conv.weight"], padding=1)
    for g, stride in enumerate((1, 2, 2)):
        for i in range((depth - 4) // 6):
            p = f"layer.{g}.block.{i}"
            step = stride if i == 0 else 1
            a = bn_swish(f"{p}.batchnorm_0", h)
            shortcut = state.get(f"{p}.shortcut.weight")
            skip = h if shortcut is None else F.conv2d(a, shortcut, stride=step)
            out = F.conv2d(F.pad(a, (1, 1, 1, 1) if step == 1 else (0, 1, 0, 1)), state[f"{p}.conv_0.weight"],
                           stride=step)
            h = skip + F.conv2d(bn_swish(f"{p}.batchnorm_1", out), state[f"{p}.conv_1.weight"], padding=1)
    h = F.avg_pool2d(bn_swish("batchnorm", h), 8).flatten(1)                       # (B, 640)
    return F.linear(h, state["logits.weight"], state["logits.bias"])


def test_wrn_28_10_maps_onto_robustbench_dm_wide_resnet():
    model = trained_looking("wrn-28-10")
    state = to_robustbench(model)
    assert len(state) == 3 * 4 * 12 + 3 + 1 + 5 + 2 + 2          # blocks, shortcuts, init_conv, BN, logits, mean/std
    assert {"init_conv.weight", "layer.0.block.0.shortcut.weight", "layer.2.block.3.conv_1.weight",
            "layer.1.block.2.batchnorm_0.num_batches_tracked", "batchnorm.running_var", "logits.bias"} <= set(state)
    assert state["mean"].shape == (3, 1, 1) and "layer.0.block.1.shortcut.weight" not in state
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dm_wide_resnet_logits(state, x, 28), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,mean,std", [("wrn-28-10", CIFAR_MEAN, CIFAR_STD), ("resnet18", 0.0, 1.0),
                                           ("preact-resnet18", 0.0, 1.0)])
@pytest.mark.parametrize("wrap", ["bare", "state_dict", "module"])
def test_a_robustbench_state_dict_loads_with_identical_logits(tmp_path, arch, mean, std, wrap):
    model = trained_looking(arch, mean, std)
    state = to_robustbench(model)
    saved = {"bare": state, "state_dict": {"state_dict": state, "epoch": 7},
             "module": {f"module.{k}": v for k, v in state.items()}}[wrap]
    torch.save(saved, tmp_path / "rb.pt")
    loaded, record = load_classifier(tmp_path / "rb.pt")
    assert record["arch"] == arch and record["threat_model"] == {"norm": "Linf", "epsilon": ASSUMED_EPS}
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_resnet_names_follow_robustbench_resnet18_and_preact():
    names = robustbench_names(trained_looking("resnet18"))
    assert names["stages.stem.0.weight"] == "conv1.weight" and names["stages.stem.1.running_mean"] == "bn1.running_mean"
    assert names["stages.layer2.0.shortcut.1.weight"] == "layer2.0.shortcut.1.weight" and names["fc.bias"] == \
        "linear.bias" and names["mean"] is None
    names = robustbench_names(trained_looking("preact-resnet18"))
    assert names["stages.layer3.0.shortcut.weight"] == "layer3.0.shortcut.0.weight"
    assert names["stages.final.bn.weight"] == "bn.weight" and names["stages.stem.weight"] == "conv1.weight"


@pytest.mark.parametrize("damage,message", [
    (lambda s: {k: v for k, v in s.items() if k != "logits.weight"}, "not a dra-pipe classifier, nor"),
    (lambda s: {**s, "extra.weight": torch.zeros(1)}, "1 unexpected"),
    (lambda s: {**s, "layer.0.block.0.conv_0.weight": torch.zeros(160, 16, 1, 1)}, "has shape"),
    (lambda s: {"weights": s}, "not a dra-pipe classifier, nor a state dict"),
])
def test_a_foreign_state_dict_is_one_line(cli, tmp_path, damage, message):
    torch.save(damage(to_robustbench(trained_looking("wrn-28-10"))), tmp_path / "bad.pt")
    code, out, err = cli("eval", "--model", tmp_path / "bad.pt", "--root", tmp_path / "ws", "--no-autoattack")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def finished_run(root, name: str, model, eps: float) -> RunFolder:
    config = defaults()
    config["root"] = str(root)
    run = RunFolder(root / "runs" / name)
    run.prepare({"test": name}, config)
    run.append_metrics({"epoch": 1, "loss": 1.0, "clean_acc": 0.5, "pgd_acc": 0.2, "images_per_s": 1.0})
    run.save_final({"arch": model.arch, "num_classes": 10, "in_channels": model.in_channels, "resolution": 32,
                    "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                    "state_dict": model.state_dict(), "threat_model": {"norm": "Linf", "epsilon": eps}, "run": name,
                    "dra": False, "objective": "trades", "steps": 10, "image_set": "test"})
    return run


def test_export_robustbench_then_eval_model_gives_the_run_numbers(cli, tmp_path):
    root = tmp_path / "ws"
    image_set(root, "digits-test", "real", 6, 8, res=32, channels=3, seed=2)
    finished_run(root, "rn", trained_looking("resnet18", 0.0, 1.0), ASSUMED_EPS)
    args = ("--root", root, "--no-autoattack", "--pgd-steps", "2")
    code, out, err = cli("eval", "rn", *args)
    assert code == 0, err
    code, out, err = cli("export", "rn", "--format", "robustbench", "--root", root, "--out", tmp_path / "rn.pt")
    assert code == 0, err
    assert "robustbench.model_zoo.architectures.resnet.ResNet18()" in out and "TO FILL" in out
    info = json.loads((tmp_path / "rn.json").read_text())
    assert set(info) >= {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                         "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "unreliable"}
    assert info["eps"] == "8/255" and info["architecture"] == "ResNet-18" and info["dataset"] == "digits"
    assert info["link"].startswith("TO FILL") and info["autoattack_acc"].startswith("TO FILL")
    run_eval = json.loads((root / "runs" / "rn" / "eval.json").read_text())
    assert info["clean_acc"] == f"{100 * run_eval['clean']:.2f}"
    assert "conv1.weight" in torch.load(tmp_path / "rn.pt", weights_only=True)
    code, out, err = cli("eval", "--model", tmp_path / "rn.pt", *args)
    assert code == 0, err
    again = json.loads((tmp_path / "rn.pt.eval.json").read_text())
    assert (again["clean"], again["pgd_ce"], again["pgd_margin"]) == \
        (run_eval["clean"], run_eval["pgd_ce"], run_eval["pgd_margin"])


def test_export_small_cnn_says_robustbench_has_no_definition(cli, tmp_path):
    root = tmp_path / "ws"
    model = build_classifier("small-cnn", 10, 3, 32, 0.5, 0.3).eval()
    finished_run(root, "cnn", model, 0.1)
    code, out, err = cli("export", "cnn", "--format", "robustbench", "--root", root, "--out", tmp_path / "c.pt")
    assert code == 0, err
    assert "RobustBench has no definition of small-cnn" in out
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state.keys() == model.state_dict().keys()
    info = json.loads((tmp_path / "c.json").read_text())
    assert "dra-pipe's own" in info["architecture"] and info["eps"] == "0.1"
    assert info["clean_acc"].startswith("TO FILL")                   # no eval.json for these weights
    code, out, err = cli("export", "cnn", "--format", "onnx", "--root", root, "--out", tmp_path / "d.pt")
    assert code == 2 and "--format 'onnx'" in err
