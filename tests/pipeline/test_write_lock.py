"""One writer per set, run or model: every writing command is refused (exit 2, one line naming the holder's host
and pid, nothing changed) while another process writes the same output, or waits for it with --wait."""
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_cifar_tarball
from evalruns import fit_small_cnn, save_run
from lockholder import Holder, env, holding
from trainsets import image_set

from pipeline.config import load_config
from stores.images import ImageSet, ImageSetWriter, image_set_dir
from stores.locks import LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

CLI = "import sys; from pipeline.cli.main import main; sys.argv = ['dra-pipe', *sys.argv[1:]]; main()"


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    """digits-train/-test/-gen, a finished run, a tiny diffusion model, a CIFAR tarball and a pipeline.yaml."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("locks")
    root = base / "ws"
    train = image_set(root, "digits-train", "real", 128, 64, seed=1)
    image_set(root, "digits-test", "real", 16, 64, seed=2)
    image_set(root, "digits-gen", "generated", 32, 32, seed=3)
    save_run(root, "tiny", fit_small_cnn(train, steps=2), 0.05, dra=False, unsup_fraction=0.0)
    torch.set_num_threads(threads)
    make_cifar_tarball(base / "cifar.tar.gz")
    config = base / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"root": str(root), "model": {"spec": f"dra:{tiny_model_dir}"},
                                      "generate": {"n": 8, "steps": 2, "batch_size": 4},
                                      "fit_diffusion": {"duration_kimg": 0.1, "batch_size": 16},
                                      "train": {"holdout": 16}, "ray": {"num_cpus": 2, "cpu_actors": 1}}))
    return {"root": root, "config": config, "tarball": base / "cifar.tar.gz"}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def feature_dir(config: Path) -> Path:
    from pipeline.extract import noise_levels, open_image_sets, plan_outputs
    from stages.models import load_model
    cfg = load_config(config)
    net = load_model(cfg.model.spec)
    outputs, _ = plan_outputs(cfg, cfg.model.spec, net, open_image_sets(cfg, ["digits-train"]), noise_levels(cfg, []))
    return outputs[0].writer.path


def fit_dir(config: Path) -> Path:
    from pipeline.models import fitted_model_dir
    from stages.fit_diffusion import training_dir
    return training_dir(fitted_model_dir(load_config(config)))


WRITERS = {                # command -> (its arguments, the folder it writes: what another process holds)
    "import": (["import", "cifar10", "--from", "{tarball}", "--name", "fresh"],
               lambda ws: image_set_dir(ws["root"], "fresh-train")),
    "generate": (["generate", "--name", "race", "--seed", "1"], lambda ws: image_set_dir(ws["root"], "race")),
    "extract-features": (["extract-features", "--images", "digits-train"], lambda ws: feature_dir(ws["config"])),
    "fit-diffusion": (["fit-diffusion"], lambda ws: fit_dir(ws["config"])),
    "train": (["train", "--name", "held", "--no-dra", "--epochs", "1"], lambda ws: ws["root"] / "runs" / "held"),
    "select": (["select", "--scorer", "tiny", "--fraction", "0.5"],
               lambda ws: image_set_dir(ws["root"], "digits-gen-top50")),
    "eval": (["eval", "tiny", "--n", "8", "--pgd-steps", "1", "--no-autoattack"],
             lambda ws: ws["root"] / "runs" / "tiny"),
}


@pytest.mark.parametrize("command", list(WRITERS))
def test_every_writer_is_refused_while_another_process_writes_and_changes_nothing(cli, ws, command):
    args, folder = WRITERS[command]
    with holding(folder(ws)) as holder:
        before = snapshot(ws["root"])
        code, out, err = cli(*(a.format(tarball=ws["tarball"]) for a in args), "-c", ws["config"])
        assert code == 2, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "is being written by" in lines[0], err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in lines[0]
        assert snapshot(ws["root"]) == before


def test_readers_do_not_wait_for_a_writer(cli, ws):
    """ls and verify read while sets are written: a complete one, and a new one that holds only its lock yet
    (not a set, so not listed)."""
    with holding(image_set_dir(ws["root"], "digits-train")), holding(image_set_dir(ws["root"], "starting")):
        started = time.monotonic()
        code, out, _ = cli("ls", "-c", ws["config"])
        assert code == 0 and "digits-train" in out and "error" not in out and "starting" not in out
        code, out, _ = cli("verify", "-c", ws["config"])
        assert code == 0 and "all 3 set(s) intact" in out, out
        code, out, _ = cli("verify", "digits-train", "-c", ws["config"])
        assert code == 0 and "ok: image set digits-train" in out
        assert time.monotonic() - started < 30


def test_the_second_generate_with_another_seed_waits_then_is_refused(ws, tmp_path):
    """The issue's race: two `generate --name race` runs, seeds 0 and 1. The second starts while the first holds
    the lock on a set without identity yet, waits, and when the first leaves a complete seed-0 set it is refused,
    exit 2: that set keeps the seed-0 images."""
    from stages.generate import GenerateSettings, generated_identity
    from stages.models import load_model
    cfg = load_config(ws["config"])
    model = load_model(cfg.model.spec)
    seed0 = GenerateSettings("heun", 2, 0.0, 0, 4, cfg.data.image_format)
    staged = ImageSetWriter(tmp_path, "race", generated_identity(model, seed0, cfg.data.shard_size, None), 8)
    staged.begin()
    for p in staged.pending():
        staged.write(p, np.full((p.count, 8, 8, 1), 7, np.uint8), np.arange(p.count) % 10)
    staged.close()
    folder = image_set_dir(ws["root"], "race")
    with holding(folder, copy_from=staged.path) as first:
        second = subprocess.Popen([sys.executable, "-c", CLI, "generate", "--name", "race", "--seed", "1", "--wait",
                                   "-c", str(ws["config"])], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        lines = stream_lines(second.stderr)
        waiting = next_line(lines, "waiting for image set 'race'")
        assert f"pid {first.pid} on host {socket.gethostname()}" in waiting
        first.release()                                     # the first finishes its seed-0 set and exits
        code = second.wait(timeout=120)
    rest = drain(lines)
    assert code == 2 and "another identity" in rest and "source.seed: 0 there vs 1 here" in rest, rest
    race = ImageSet(folder)
    assert race.complete and race.identity["source"]["seed"] == 0
    assert {k: v for k, v in snapshot(folder).items() if k != LOCK_NAME} == \
        {k: v for k, v in snapshot(staged.path).items() if k != LOCK_NAME}


def test_import_with_wait_proceeds_once_the_holder_releases(tmp_path):
    tarball = tmp_path / "cifar.tar.gz"
    make_cifar_tarball(tarball)
    root = tmp_path / "ws"
    with holding(image_set_dir(root, "c-train")) as first:
        second = subprocess.Popen([sys.executable, "-c", CLI, "import", "cifar10", "--from", str(tarball), "--name",
                                   "c", "--wait", "--root", str(root)], env=env(), cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = stream_lines(second.stderr)
        assert f"pid {first.pid}" in next_line(lines, "waiting for image set 'c-train'")
        assert second.poll() is None and not (image_set_dir(root, "c-train") / "dataset.json").exists()
        first.release()
        assert second.wait(timeout=120) == 0, drain(lines)
    assert ImageSet.open(root, "c-train").complete and ImageSet.open(root, "c-test").complete
    assert "imported c-train" in second.stdout.read()


def test_ctrl_c_stops_a_wait_cleanly(tmp_path):
    tarball = tmp_path / "cifar.tar.gz"
    make_cifar_tarball(tarball)
    root = tmp_path / "ws"
    with holding(image_set_dir(root, "c-train")):
        before = snapshot(root)
        waiting = subprocess.Popen([sys.executable, "-c", CLI, "import", "cifar10", "--from", str(tarball), "--name",
                                    "c", "--wait", "--root", str(root)], env=env(), cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   # a runner that ignores SIGINT (nohup, a background job) passes that on: undo it
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines = stream_lines(waiting.stderr)
        next_line(lines, "waiting for image set 'c-train'")
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=60) == 130
        rest = drain(lines)
        said = [line for line in rest.splitlines() if line.strip()]
        assert said == ["interrupted: stopped waiting for image set 'c-train'; this command wrote nothing"], rest
        assert snapshot(root) == before


def test_a_killed_writer_releases_the_set(cli, tmp_path):
    tarball = tmp_path / "cifar.tar.gz"
    make_cifar_tarball(tarball)
    holder = Holder(image_set_dir(tmp_path / "ws", "c-train"))
    code, _, err = cli("import", "cifar10", "--from", tarball, "--name", "c", "--root", tmp_path / "ws")
    assert code == 2 and f"pid {holder.pid}" in err
    holder.kill()                                            # SIGKILL: the OS releases its lock
    code, out, err = cli("import", "cifar10", "--from", tarball, "--name", "c", "--root", tmp_path / "ws")
    assert code == 0 and "imported c-train" in out, err


def stream_lines(pipe) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in pipe:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def next_line(lines: queue.Queue, start: str, timeout: float = 120) -> str:
    """The first line that starts with `start` (the process prints it once), or fail with what came instead."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            break
        if line is None:
            break
        if line.startswith(start):
            return line
        seen.append(line)
    raise AssertionError(f"no line starting {start!r}; got {''.join(seen)!r}")


def drain(lines: queue.Queue) -> str:
    out = []
    while (line := lines.get(timeout=30)) is not None:
        out.append(line)
    return "".join(out)
