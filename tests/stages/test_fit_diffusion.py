import json

import pytest
import torch

from stages.edm.networks import EDMPrecond
from stages.fingerprint import model_fingerprint
from stages.fit_diffusion import FitSettings, Trainer, edm_loss, network_config
from stages.importers import import_source
from stages.models import load_model, save_own
from stores.errors import UserError
from stores.images import ImageSet

TINY = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, batch_size=32, duration_kimg=0.32, seed=3,
            checkpoint_seconds=1e9)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    import_source(root, "digits", None, None, 500, "png")
    return ImageSet.open(root, "digits-train")


def test_exact_resume_after_interrupt(digits, tmp_path):
    straight = Trainer(digits, FitSettings(**TINY), tmp_path / "a")
    straight.run()
    interrupted = Trainer(digits, FitSettings(**TINY), tmp_path / "b")
    data = interrupted.batches()
    for _ in range(4):                                   # 4 of 10 steps, then the process "dies"
        interrupted.train_step(*next(data))
    interrupted.save_checkpoint()
    resumed = Trainer(digits, FitSettings(**{**TINY, "checkpoint_seconds": 5.0}), tmp_path / "b")   # changes nothing
    assert resumed.resumed and resumed.step == 4
    resumed.run()
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["provenance"]["steps"] == 10


def test_training_lowers_the_edm_loss(digits, tmp_path):
    settings = FitSettings(**{**TINY, "duration_kimg": 3.2, "lr": 2e-3})
    trainer = Trainer(digits, settings, tmp_path / "m")
    images, labels = next(trainer.batches())
    probe = torch.Generator().manual_seed(0)
    before = sum(edm_loss(trainer.net.eval(), images, labels, probe.manual_seed(i)).item() for i in range(5))
    trainer.net.train()
    trainer.run()
    after = sum(edm_loss(trainer.net.eval(), images, labels, probe.manual_seed(i)).item() for i in range(5))
    assert after < 0.7 * before


def test_own_format_round_trip_and_fingerprint(digits, tmp_path):
    net = EDMPrecond(**network_config(digits, FitSettings(**TINY))).eval()
    fp = save_own(net, tmp_path / "m", {"test": True})
    loaded = load_model(f"dra:{tmp_path / 'm'}")
    assert model_fingerprint(loaded) == fp == model_fingerprint(net)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    assert torch.equal(loaded(x, sigma, torch.tensor([1, 2])), net(x, sigma, torch.tensor([1, 2])))
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] += 1
    assert model_fingerprint(net) != fp


def test_tampered_weights_refused(digits, tmp_path):
    net = EDMPrecond(**network_config(digits, FitSettings(**TINY)))
    save_own(net, tmp_path / "m", {})
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["fingerprint"] = "0" * 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="fingerprint"):
        load_model(f"dra:{tmp_path / 'm'}")


@pytest.mark.parametrize("spec, needle", [("nope", "not understood"), ("dra:/nonexistent", "does not exist"),
                                          ("edm:/etc/hostname", "EDM network pickle")])
def test_bad_specs(spec, needle):
    with pytest.raises(UserError, match=needle):
        load_model(spec)


def test_cli_fit_then_cached_and_model_info(cli, tmp_path):
    cli("import", "digits")
    flags = ["--duration-kimg", "0.064", "--batch-size", "32"]
    (tmp_path / "pipeline.yaml").write_text("fit_diffusion:\n  model_channels: 8\n  num_blocks: 1\n")
    code, out, err = cli("fit-diffusion", *flags)
    assert code == 0, err
    assert "saved model" in out and "images/s" in out
    code, out, _ = cli("fit-diffusion", *flags)
    assert code == 0 and "cached: model fit-" in out
    (tmp_path / "pipeline.yaml").write_text("fit_diffusion:\n  model_channels: 8\n  num_blocks: 1\n"
                                            "  duration_kimg: 0.064\n  batch_size: 32\n")
    code, out, err = cli("model", "info", "--model", "fit")
    assert code == 0, err
    assert "dec.4x4_in1" in out and "8x4x4" not in out.split("dec.4x4_in1")[0][-5:]
    words = " ".join(out.split())       # the summary line may wrap at the console width (absolute root paths)
    assert "parameters" in words and "10 classes" in words


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_mid_step_resumes_into_the_uninterrupted_model(digits, tmp_path, signum):
    """A real SIGINT (SIGTERM) delivered inside the network's forward (mid-step, mid-epoch): the fit finishes that
    step, checkpoints, stops with KeyboardInterrupt (Terminated); the rerun resumes into the very model of an
    uninterrupted fit, and the process's own handlers are back."""
    import os
    import signal

    from stores.errors import Terminated
    settings = FitSettings(**{**TINY, "duration_kimg": 1.6, "dropout": 0.1})           # 50 steps, ~2 epochs
    straight = Trainer(digits, settings, tmp_path / "a")
    expected = straight.run()
    interrupted = Trainer(digits, settings, tmp_path / "b")
    calls = []

    def signal_on_call(module, inputs):
        calls.append(1)
        if len(calls) == 37:                                # inside step 37's forward
            os.kill(os.getpid(), getattr(signal, signum))
    hook = interrupted.net.register_forward_pre_hook(signal_on_call)
    term_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated if signum == "SIGTERM" else KeyboardInterrupt) as stopped:
        interrupted.run()
    assert isinstance(stopped.value, Terminated) == (signum == "SIGTERM")
    Terminated.seen = False
    hook.remove()
    resumed = Trainer(digits, settings, tmp_path / "b")
    assert resumed.resumed and resumed.run() == expected
    assert interrupted.step == 37                           # the step the signal arrived in was finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # the fit's handlers are gone again
    assert signal.getsignal(signal.SIGTERM) is term_handler
