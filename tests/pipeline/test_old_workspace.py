"""A workspace written by an earlier version is read, verified and reused as it is.

`tests/fixtures/workspace-19fb8e4.tgz` was written by commit 19fb8e4 (before the second pass over the house) with
`dra-pipe run -c workspace-19fb8e4.yaml`: a 64-image npz imported as `tiny-train`, a fitted 4-channel EDM, 40
generated images, a feature set for each image set, and the DRA run `small-cnn-dra-0` (2 epochs). To keep the
file small, the run's checkpoint.pt and best.pt and the fit's training checkpoint were deleted afterwards; the
nodra run was deleted whole. Nothing in it was edited.

If a change alters a store's bytes, an identity (so a feature key, a model key or a run's identity) or how the
records are read, the rerun below does work or refuses, and these tests go red.
"""
from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures"
ARCHIVE, CONFIG = FIXTURE / "workspace-19fb8e4.tgz", FIXTURE / "workspace-19fb8e4.yaml"


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def old_workspace(tmp_path) -> Path:
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(tmp_path, filter="data")
    config = tmp_path / "pipeline.yaml"
    shutil.copy(CONFIG, config)
    return tmp_path


def test_old_workspace_verifies_and_lists(old_workspace, cli):
    code, out, err = cli("verify", "-c", old_workspace / "pipeline.yaml")
    assert code == 0, err
    code, out, err = cli("ls", "-c", old_workspace / "pipeline.yaml")
    assert code == 0, err
    for name in ("tiny-train", "tiny-gen"):
        assert name in out
    assert out.count("complete") >= 4                     # two image sets and two feature sets


def test_rerun_on_old_workspace_does_nothing_and_changes_nothing(old_workspace, cli, one_thread):
    """Every stage finds its output by identity: nothing imported, fitted, sampled, extracted or trained again,
    and not one byte of the workspace changes."""
    ws = old_workspace / "ws"
    before = _digests(ws)
    config = old_workspace / "pipeline.yaml"
    code, out, err = cli("import", "npz", "-c", config, "--from", old_workspace / "tiny.npz", "--name", "tiny")
    assert code == 0, err
    assert "already imported" in out
    code, out, err = cli("fit-diffusion", "-c", config)
    assert code == 0, err
    assert "cached: model fit-ee0a93a73f38" in out
    code, out, err = cli("generate", "-c", config)
    assert code == 0, err
    assert "is complete" in out and "nothing to do" in out
    code, out, err = cli("extract-features", "-c", config)
    assert code == 0, err
    assert out.count("cached:") == 2
    code, out, err = cli("train", "-c", config, "--dra")
    assert code == 0, err
    assert "run small-cnn-dra-0 is complete" in out
    after = _digests(ws)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, sorted(changed)
