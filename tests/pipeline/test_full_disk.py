"""A full disk (here: a file-size limit, which fails a write the same way without root or a tmpfs) is one line and
exit 1; what was written stays consistent, and the rerun without the limit completes as if nothing happened."""
import resource
import subprocess
import sys

import pytest
from lockholder import env
from test_write_lock import CLI

LIMIT = 150_000          # bytes: the digits shard tar is about 3 MB, a tiny fit's checkpoint a few hundred KB


def _limited(args, cwd, limit=LIMIT) -> subprocess.CompletedProcess:
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], env=env(), cwd=cwd, text=True,
                          capture_output=True, preexec_fn=apply, timeout=300)


def _free(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], env=env(), cwd=cwd, text=True,
                          capture_output=True, timeout=300)


@pytest.mark.parametrize("stage", ["import", "fit-diffusion"])
def test_a_write_past_the_limit_is_one_line_and_the_rerun_completes(tmp_path, stage):
    (tmp_path / "pipeline.yaml").write_text("root: ws\nfit_diffusion:\n  model_channels: 16\n  duration_kimg: 0.256\n")
    if stage != "import":
        assert _free(["import", "digits"], tmp_path).returncode == 0
    args = ["import", "digits"] if stage == "import" else ["fit-diffusion"]
    failed = _limited(args, tmp_path)
    lines = [line for line in failed.stderr.splitlines()              # progress lines come every 30 s in logs
             if line.strip() and not line.startswith(("fit-diffusion: ", "import: "))]
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert lines[0].startswith("error: a file grew past the file-size limit") and "rerun" in lines[0]
    verify = _free(["verify"], tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr        # nothing recorded that is not whole
    rerun = _free(args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    leftovers = [p.name for p in (tmp_path / "ws").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
