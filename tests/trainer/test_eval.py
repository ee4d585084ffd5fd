import json
import logging
import warnings

import pytest
import torch
from evalruns import EPS, make_workspace

from stores.images import ImageSet
from trainer.classifier_files import load_classifier, state_fingerprint
from trainer.evaluate import (
    AUTOATTACK_LOGGER,
    EvalSettings,
    capture,
    consistency_notes,
    evaluate,
    read_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    torch.set_num_threads(1)
    return make_workspace(tmp_path_factory.mktemp("ws"))


def one_line(err: str) -> bool:
    return err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_eval_run_pgd_only(cli, ws):
    code, out, err = cli("eval", "tiny-dra", "--root", ws["root"], "--n", "40", "--no-autoattack")
    assert code == 0, err
    result = json.loads((ws["dra"].path / "eval.json").read_text())
    model, record = load_classifier(ws["dra"].final)
    x, y = read_images(ImageSet.open(ws["root"], "digits-test"), 40)
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert result["clean"] == pytest.approx(expected) and result["n"] == 40 and result["eps"] == EPS
    assert 0.3 < result["clean"] and result["pgd_ce"] < result["clean"] and result["pgd_margin"] < result["clean"]
    assert result["worst"] <= min(result["pgd_ce"], result["pgd_margin"])
    assert result["autoattack"] is None and result["counts"]["clean"] == round(40 * result["clean"])
    assert result["fingerprint"] == state_fingerprint(record["state_dict"])
    assert result["steps"] == 20 and result["restarts"] == 1 and result["step_size"] == pytest.approx(2.5 * EPS / 20)
    assert set(result["seconds"]) == {"clean", "pgd_ce", "pgd_margin", "total"}
    assert result["settings"]["n"] == 40 and result["settings"]["autoattack"] is False
    assert "PGD-20 cross-entropy" in out and "AutoAttack skipped" in out and "eval.json" in out


def test_stronger_pgd_breaks_at_least_as_much(ws):
    x, y = read_images(ImageSet.open(ws["root"], "digits-test"), 32)
    run = lambda **kw: evaluate(ws["model"], x, y, EPS, EvalSettings(autoattack=False, device="cpu", **kw))  # noqa: E731
    one, many, restarts = run(pgd_steps=1), run(pgd_steps=10), run(pgd_steps=10, pgd_restarts=2)
    assert one["clean"] == many["clean"]
    for key in ("pgd_ce", "pgd_margin"):
        assert many[key] <= one[key] < one["clean"]
        assert restarts[key] <= many[key]           # the first restart is the 1-restart run; each image keeps its worst


def test_eval_with_autoattack_reports_each_attack(cli, ws):
    """eps 0.3: APGD-CE breaks every image, so AutoAttack stops early (the full run is test_autoattack_full)."""
    code, out, err = cli("eval", "tiny-big-eps", "--root", ws["root"], "--n", "16", "--pgd-steps", "5")
    assert code == 0, err
    result = json.loads((ws["big"].path / "eval.json").read_text())
    assert result["clean"] > 0.3 and result["autoattack"] == 0.0 and result["eps"] == 0.3
    assert result["autoattack_per_attack"] == {"apgd-ce": 0.0}
    assert result["autoattack_version"] == "standard" and result["versions"]["pyautoattack"]
    assert any("no robust datapoints left" in line for line in result["autoattack_log"])
    assert "AutoAttack standard" in out and "after apgd-ce" in out


def test_autoattack_full_run_is_at_least_as_strong_as_its_parts(ws):
    """All four attacks on 16 images (about 9 s with one thread)."""
    x, y = read_images(ImageSet.open(ws["root"], "digits-test"), 16)
    r = evaluate(ws["model"], x, y, EPS, EvalSettings(pgd_steps=10, device="cpu"))
    after = list(r["autoattack_per_attack"].values())
    assert list(r["autoattack_per_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert r["clean"] >= after[0] and after == sorted(after, reverse=True) and after[-1] == r["autoattack"]
    assert r["worst"] <= min(r["autoattack"], r["pgd_ce"], r["pgd_margin"])


class Rounded(torch.nn.Module):
    """Gradient masking: the input is rounded, so every input gradient is zero and only Square succeeds."""

    def __init__(self, net):
        super().__init__()
        self.net, self.num_classes = net, net.num_classes

    def forward(self, x):
        return self.net(torch.round(x * 8) / 8)


@pytest.mark.slow
def test_autoattack_warnings_are_reported(ws):
    x, y = read_images(ImageSet.open(ws["root"], "digits-test"), 8)
    r = evaluate(Rounded(ws["model"]), x, y, EPS, EvalSettings(pgd_steps=5, device="cpu"))
    assert r["pgd_ce"] == r["clean"]                           # zero gradients: PGD finds nothing
    assert any("zero gradient" in w for w in r["warnings"])
    assert any(w.startswith("Square Attack has decreased the robust accuracy") for w in r["warnings"])
    assert r["autoattack"] < r["clean"]


def test_capture_collects_logger_warnings_and_prints(capsys):
    seen = []
    with capture(AUTOATTACK_LOGGER, seen.append) as said:
        logging.getLogger(AUTOATTACK_LOGGER).debug("robust accuracy after APGD-CE: 50.00%")
        logging.getLogger(AUTOATTACK_LOGGER).warning("Square Attack has decreased the robust accuracy")
        warnings.warn("a python warning", stacklevel=1)
        print("a printed line")
    assert said.log == ["robust accuracy after APGD-CE: 50.00%", "a printed line"]
    assert said.warnings == ["Square Attack has decreased the robust accuracy", "UserWarning: a python warning"]
    assert seen == ["robust accuracy after APGD-CE: 50.00%", "Square Attack has decreased the robust accuracy"]
    assert "a printed line" not in capsys.readouterr().out
    assert logging.getLogger(AUTOATTACK_LOGGER).propagate and not logging.getLogger(AUTOATTACK_LOGGER).handlers


def test_consistency_notes_flag_images_pgd_broke_but_autoattack_did_not():
    t = torch.tensor
    flags = {"clean": t([1, 1, 1]).bool(), "pgd_ce": t([1, 0, 0]).bool(), "pgd_margin": t([1, 1, 0]).bool(),
             "autoattack": t([1, 1, 0]).bool()}
    assert consistency_notes(flags) == ["AutoAttack left 1 image(s) robust that pgd_ce broke; `worst` counts them as "
                                        "broken"]


def test_export_then_eval_model_gives_the_run_numbers(cli, ws, tmp_path):
    args = ("--root", ws["root"], "--n", "24", "--no-autoattack", "--pgd-steps", "5")
    code, _, err = cli("eval", "tiny-dra", *args)
    assert code == 0, err
    from_run = json.loads((ws["dra"].path / "eval.json").read_text())
    code, out, err = cli("export", "tiny-dra", "--root", ws["root"], "--out", tmp_path / "shared.pt")
    assert code == 0, err
    assert f"to {tmp_path / 'shared.pt'}" in out and "fingerprint" in out
    exported = torch.load(tmp_path / "shared.pt", weights_only=True)
    assert exported["arch"] == "small-cnn" and exported["threat_model"] == {"norm": "Linf", "epsilon": EPS}
    assert exported["mean"] == [0.5] and exported["num_classes"] == 10 and exported["dra_pipe_version"]
    assert exported["fingerprint"] == from_run["fingerprint"]
    code, out, err = cli("eval", "--model", tmp_path / "shared.pt", *args)
    assert code == 0, err
    from_file = json.loads((tmp_path / "shared.pt.eval.json").read_text())
    for key in ("clean", "pgd_ce", "pgd_margin", "fingerprint", "n", "eps"):
        assert from_file[key] == from_run[key], key


def test_fingerprint_changes_with_any_weight(ws):
    state = {k: v.clone() for k, v in ws["model"].state_dict().items()}
    before = state_fingerprint(state)
    state["fc.bias"][3] += 1e-6
    assert state_fingerprint(state) != before


@pytest.fixture
def bad_files(ws, tmp_path):
    state = ws["model"].state_dict()
    record = torch.load(ws["dra"].final, weights_only=True)
    torch.save({**record, "arch": "resnet18"}, tmp_path / "other-arch.pt")
    torch.save({"weights": state}, tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    unfinished = ws["root"] / "runs" / "unfinished"
    unfinished.mkdir(exist_ok=True)
    (unfinished / "run.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("args, needle", [
    (("eval", "nope"), "no run nope under"),
    (("eval", "unfinished"), "run unfinished has no final.pt"),
    (("eval",), "give a run name or --model FILE"),
    (("eval", "--model", "{tmp}/other-arch.pt"), "not those of a resnet18 classifier"),
    (("eval", "--model", "{tmp}/foreign.pt"), "not a dra-pipe classifier"),
    (("eval", "--model", "{tmp}/garbage.pt"), "not a readable classifier file"),
    (("eval", "--model", "{tmp}/missing.pt"), "no classifier file"),
    (("eval", "tiny-dra", "--images", "four-test"),
     "four-test has 4 classes of 1x8x8 images; the classifier predicts 10"),
    (("eval", "tiny-dra", "--images", "cifar10-test"), "no image set cifar10-test"),
    (("export", "nope"), "no run nope under"),
    (("export", "tiny-dra", "--out", "{tmp}/no/such/dir/x.pt"), "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(cli, ws, bad_files, args, needle):
    args = [str(a).replace("{tmp}", str(bad_files)) for a in args]
    code, out, err = cli(*args, "--root", ws["root"], *(["--no-autoattack"] if args[0] == "eval" else []))
    assert code == 2 and one_line(err), (code, err)
    assert needle in err


def test_missing_pyautoattack_is_one_line_unless_autoattack_is_off(cli, ws, monkeypatch):
    monkeypatch.setattr("trainer.evaluate.autoattack_available", lambda: False)
    code, _, err = cli("eval", "tiny-dra", "--root", ws["root"], "--n", "8")
    assert code == 2 and one_line(err) and "pip install pyautoattack" in err and "--no-autoattack" in err
    code, out, err = cli("eval", "tiny-dra", "--root", ws["root"], "--n", "8", "--no-autoattack", "--pgd-steps", "2")
    assert code == 0, err


def test_a_run_is_evaluated_on_its_best_weights_unless_told_final(cli, ws):
    run = ws["dra"]
    record = torch.load(run.final, weights_only=True)
    record["state_dict"] = {k: v * 0 if v.is_floating_point() else v for k, v in record["state_dict"].items()}
    record["selected"] = {"epoch": 2, "by": "held-out PGD-20", "pgd_acc": 0.5, "clean_acc": 0.75}
    torch.save(record, run.best)
    try:
        code, out, err = cli("eval", "tiny-dra", "--root", ws["root"], "--n", "16", "--no-autoattack")
        assert code == 0, err
        result = json.loads((run.path / "eval.json").read_text())
        assert result["model"]["file"] == str(run.best) and result["model"]["selected"]["epoch"] == 2
        assert result["fingerprint"] == state_fingerprint(record["state_dict"])
        assert "epoch 2, the best by held-out PGD-20" in out
        code, out, err = cli("eval", "tiny-dra", "--root", ws["root"], "--n", "16", "--no-autoattack",
                             "--weights", "final")
        assert code == 0, err
        result = json.loads((run.path / "eval.json").read_text())
        assert result["model"]["file"] == str(run.final) and result["model"]["selected"] is None
        code, _, err = cli("export", "tiny-dra", "--root", ws["root"], "--out", ws["root"] / "best-export.pt")
        assert code == 0, err
        assert torch.load(ws["root"] / "best-export.pt", weights_only=True)["selected"]["epoch"] == 2
    finally:
        run.best.unlink()
        (run.path / "eval.json").unlink(missing_ok=True)


def test_per_class_subset_takes_each_class_lowest_ids_and_refuses_what_it_cannot_balance(cli, ws):
    test = ImageSet.open(ws["root"], "digits-test")
    every = test.read_range(0, test.n)
    x, y = read_images(test, 30, "per-class")
    assert torch.bincount(y, minlength=10).tolist() == [3] * 10
    want = sorted(i for c in range(10) for i in [j for j in range(test.n) if every.labels[j] == c][:3])
    assert torch.equal(x, torch.from_numpy(every.images[want]).permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(y, torch.from_numpy(every.labels[want]))
    most = int(torch.bincount(torch.from_numpy(every.labels)).min()) + 1
    for n, wanted in ((25, "give a multiple of the 10 classes"), (10 * most, "fewer than")):
        code, _, err = cli("eval", "tiny-dra", "--root", ws["root"], "--n", str(n), "--subset", "per-class",
                           "--no-autoattack", "--out", str(ws["root"].parent / "never.json"))
        assert code == 2 and one_line(err) and wanted in err, err
        assert not (ws["root"].parent / "never.json").exists()
