"""Shared fixtures: a CLI runner that goes through `main()` (so exit codes are the user's), small data makers."""
from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# The persistent checksum cache of this test session, never the user's (subprocesses and Ray workers inherit it).
os.environ["DRA_PIPE_CHECKSUM_CACHE"] = str(Path(tempfile.mkdtemp(prefix="dra-checksums-")) / "checksums.json")
# Likewise the object-store cache: the session's Ray workers keep this one (another node's disk, as it were) when a
# test points its own process at another (the s3_root fixture).
os.environ["DRA_PIPE_CACHE"] = tempfile.mkdtemp(prefix="dra-store-cache-")


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Run `dra-pipe ARGS` in-process from tmp_path; returns (exit code, stdout, stderr)."""
    from pipeline.cli.main import main

    def run(*args: str):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["dra-pipe", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def run_cli(*args: str) -> None:
    """`dra-pipe ARGS` in-process for module-scoped fixtures (the `cli` fixture is per test); must succeed."""
    from pipeline.cli.main import main
    saved, sys.argv = sys.argv, ["dra-pipe", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), f"dra-pipe {' '.join(map(str, args))} exited {exc.code}"
    finally:
        sys.argv = saved


class FakeClock:
    """Stands in for the `time` module of code under test: perf_counter moves only when a test moves `now`."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def make_cifar_tarball(path: Path, classes: int = 10, n_train: int = 30, n_test: int = 12, seed: int = 0,
                       bad_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A small tarball in the layout of the official python CIFAR archives; returns (train rows, train labels)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, n_train + n_test)
    if bad_label:
        labels[3] = classes + 4
    def blob(obj):
        return pickle.dumps(obj, protocol=2)
    members = {}
    if classes == 10:
        folder, key = "cifar-10-batches-py", b"labels"
        per = n_train // 5
        for i in range(5):
            sl = slice(i * per, (i + 1) * per)
            members[f"{folder}/data_batch_{i + 1}"] = blob({b"data": rows[sl], key: labels[sl].tolist()})
        members[f"{folder}/test_batch"] = blob({b"data": rows[n_train:], key: labels[n_train:].tolist()})
        members[f"{folder}/batches.meta"] = blob({b"label_names": [f"class{i}".encode() for i in range(10)]})
    else:
        folder, key = "cifar-100-python", b"fine_labels"
        members[f"{folder}/train"] = blob({b"data": rows[:n_train], key: labels[:n_train].tolist()})
        members[f"{folder}/test"] = blob({b"data": rows[n_train:], key: labels[n_train:].tolist()})
        members[f"{folder}/meta"] = blob({b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return rows[:n_train], labels[:n_train]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every test that needs it (start-up costs seconds); the stages reuse it."""
    import ray
    if not ray.is_initialized():
        import logging
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


def tiny_edm_config(resolution: int = 8, channels: int = 1, classes: int = 10) -> dict:
    """A small DDPM++ EDM network: fast enough for per-test sampling and feature extraction."""
    return dict(img_resolution=resolution, img_channels=channels, label_dim=classes, model_type="SongUNet",
                model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[resolution // 2], dropout=0.0)


def save_tiny_generator(tmp_path_factory, seed: int, classes: int) -> str:
    """A spec (dra:DIR) of a saved 8x8 grey SongUNet with one level and no attention: the cheapest generator the
    generate tests sample from; `seed` gives its random weights."""
    import torch

    from stages.edm.networks import EDMPrecond
    from stages.models import save_own
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=classes, model_type="SongUNet", model_channels=8,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0, augment_dim=0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_own(net.eval(), folder, {"test": True})
    return f"dra:{folder}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model (own format) for `--model dra:DIR`."""
    import torch

    from stages.edm.networks import EDMPrecond
    from stages.models import save_own
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_own(EDMPrecond(**tiny_edm_config()).eval(), folder, {"test": "tiny"})
    return folder


def conformance_dir() -> Path:
    """../shared/conformance next to the repo; else $DRA_SHARED/conformance; else /work/shared/conformance."""
    import os
    candidates = [REPO.parent / "shared"]
    if os.environ.get("DRA_SHARED"):
        candidates.insert(0, Path(os.environ["DRA_SHARED"]))
    candidates.append(Path("/work/shared"))
    for base in candidates:
        if (base / "conformance").is_dir():
            return base / "conformance"
    return candidates[0] / "conformance"


def songunet_small():
    """(network, json, npz) of the conformance songunet-small EDMPrecond with its official parameters; skips the
    test when the conformance data is not there."""
    import json

    import torch

    from stages.edm import EDMPrecond
    root = conformance_dir()
    if not (root / "songunet-small.npz").is_file():
        pytest.skip("conformance data songunet-small not found (set DRA_SHARED)")
    cfg = json.loads((root / "songunet-small.json").read_text())
    z = np.load(root / "songunet-small.npz")
    net = EDMPrecond(**cfg["config"]).eval()
    net.load_state_dict({k.removeprefix("param:"): torch.from_numpy(z[k]) for k in z.files if k.startswith("param:")},
                        strict=False)
    return net, cfg, z


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny models on a shared 2-core machine: one torch thread, as each CPU worker has. Two OpenMP threads spin
    against every other process there and run several times slower. Training's own thread setting is disabled."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr("trainer.loop.set_cpu_threads", lambda loader_workers: None)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_for_module():
    """one_thread for modules whose module-scoped fixtures train or attack models."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bad(tmp_path_factory):
    """The bad-input workspace (tests/badinputs.py), built once for every module that runs rows against it."""
    from badinputs import make_bad_workspace
    return make_bad_workspace(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture(scope="session")
def s3_server():
    """One real S3 API server on localhost (moto's, authentication on) for the session's object-store tests."""
    from s3server import start_server
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def s3_root(s3_server, monkeypatch, tmp_path):
    """`s3://<fresh bucket>/ws` as the workspace root: credentials and endpoint in the environment as a user sets
    them, and this test's own cache folder (a node's local disk)."""
    from stores import remote
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DRA_PIPE_CACHE", str(tmp_path / "cache"))
    bucket = s3_server.new_bucket()
    yield f"s3://{bucket}/ws"
    remote.detach_all()
