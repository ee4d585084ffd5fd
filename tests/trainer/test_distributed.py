"""Ray Train capacity: a worker count the cluster cannot hold is refused in one line, never waited on for ever."""
from __future__ import annotations

import pytest
import yaml
from trainsets import workspace

from stores.errors import UserError
from trainer.distributed import check_capacity


def test_more_workers_than_cpus_or_gpus_refused():
    check_capacity(2, False, [{"CPU": 2}])
    check_capacity(4, False, [{"CPU": 2}, {"CPU": 2}])                     # counted over the nodes
    with pytest.raises(UserError, match="train.workers is 8 but the Ray cluster has 2 CPUs .* --workers 2"):
        check_capacity(8, False, [{"CPU": 2}])
    with pytest.raises(UserError, match="has 4 GPUs .* --workers 4"):
        check_capacity(8, True, [{"CPU": 64, "GPU": 4}])
    with pytest.raises(UserError, match="has 0 GPUs"):
        check_capacity(1, True, [{"CPU": 8}])


def test_train_with_too_many_workers_stops_at_once(cli, tmp_path, ray_local):
    """`train --workers 8` on the 2-CPU local Ray: one line, exit 2, no run folder (it used to wait without end)."""
    ws = tmp_path / "ws"
    workspace(ws, n_real=80, n_gen=0, features=False)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(ws), "train": {
        "arch": "small-cnn", "epochs": 1, "batch_size": 16, "holdout": 16, "dra": False, "unsup_fraction": 0.0}}))
    code, _, err = cli("train", "--workers", "8")
    assert code == 2 and err.count("\n") == 1, err
    assert "train.workers is 8 but the Ray cluster has 2 CPUs" in err and "--workers 2" in err
    assert not (ws / "runs").exists()


@pytest.mark.slow
def test_ctrl_c_during_ray_train_is_one_clean_line(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: the driver says "interrupted" once and
    exits 130; Ray's own processes print no native stack dump."""
    import os
    import signal
    import subprocess
    import sys
    import time
    ws = tmp_path / "ws"
    workspace(ws, n_real=600, n_gen=0, features=False)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"root": str(ws), "train": {
        "arch": "small-cnn", "epochs": 50, "batch_size": 32, "holdout": 16, "dra": False, "unsup_fraction": 0.0}}))
    script = ("import sys; from pipeline.cli.main import main; "
              "sys.argv = ['dra-pipe', 'train', '--workers', '2']; main()")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (ws / "runs").exists():
        time.sleep(0.5)
    time.sleep(8)                                   # the Ray Train workers are up and training
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert out.count("interrupted: rerun the same command to resume") == 1, out[-2000:]
    assert "PC: @" not in out and "logging.cc" not in out, out[-2000:]
