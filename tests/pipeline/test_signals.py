"""SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: one "interrupted:" line, exit 143, finished work kept,
and no stack dump from Ray's core."""
import signal
import subprocess
import sys
import time

import yaml
from conftest import make_cifar_tarball
from lockholder import env, holding
from test_write_lock import CLI, drain, next_line, snapshot, stream_lines

from stores.images import image_set_dir


def _cli(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)], env=env(), cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_stops_a_wait_in_one_line(tmp_path):
    tarball = tmp_path / "cifar.tar.gz"
    make_cifar_tarball(tarball)
    root = tmp_path / "ws"
    with holding(image_set_dir(root, "c-train")):
        before = snapshot(root)
        waiting = _cli(["import", "cifar10", "--from", tarball, "--name", "c", "--wait", "--root", root], tmp_path)
        lines = stream_lines(waiting.stderr)
        next_line(lines, "waiting for image set 'c-train'")
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=60) == 143
        said = [line for line in drain(lines).splitlines() if line.strip()]
        assert said == ["interrupted: stopped waiting for image set 'c-train'; this command wrote nothing"]
        assert snapshot(root) == before


def test_sigterm_during_generate_on_ray_is_one_line_and_exit_143(tmp_path, tiny_model_dir):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "root": str(tmp_path / "ws"), "model": {"spec": f"dra:{tiny_model_dir}"},
        "generate": {"n": 200_000, "steps": 4, "batch_size": 64}, "ray": {"num_cpus": 2, "cpu_actors": 2}}))
    running = _cli(["generate", "-c", config], tmp_path)
    record = image_set_dir(tmp_path / "ws", "digits-gen") / "dataset.json"
    deadline = time.monotonic() + 120
    while not record.exists() and time.monotonic() < deadline and running.poll() is None:
        time.sleep(0.2)
    time.sleep(3.0)                                          # Ray is up and the workers sample
    running.send_signal(signal.SIGTERM)
    out, err = running.communicate(timeout=120)
    assert running.returncode == 143, err
    said = [line for line in err.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("interrupted: ") and "rerun the same command" in said[0], err
    assert "SIGTERM received" not in out + err
