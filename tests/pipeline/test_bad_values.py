"""Values that pass a type check but cannot work, names past what a file system holds: one line, exit 2, nothing
written (issue 23's kinds; the rows run through the real CLI against the shared bad-input workspace)."""
from __future__ import annotations

import os
import shutil
import stat

import pytest
from badinputs import check_one_line

LONG = "n" * 300                      # a folder name stops at 255 bytes
BIG_SEED = "99999999999999999999999"  # past 2^64: torch's generators overflow

ROWS = [
    ("run-seeds-huge", f"run --seeds 0,{BIG_SEED} --root {{ws}}", 2, "run.seeds' items must be <= 4294967295"),
    ("train-seed-huge", "train --config {base}/big-seed.yaml --root {ws}", 2, "'train.seed' must be <= 4294967295"),
    ("fit-seed-huge", "fit-diffusion --config {base}/big-fit-seed.yaml --root {ws}", 2,
     "'fit_diffusion.seed' must be <= 4294967295"),
    ("generate-seed-huge", f"generate --seed {BIG_SEED} --dry-run --root {{ws}}", 2, "'generate.seed' must be <="),
    ("fit-odd-channels", "fit-diffusion --config {base}/odd-channels.yaml --root {ws}", 2,
     "fit_diffusion.model_channels 5 with channel_mult [1, 2] makes layers"),
    ("train-huge-head", "train --config {base}/huge-head.yaml --root {ws}", 2, "'train.dra_hidden' must be <= 65536"),
    ("extract-huge-views", "extract-features --views 1000000 --root {ws}", 2, "'features.views' must be <= 1024"),
    ("train-long-name", f"train --name {LONG} --dry-run --root {{ws}}", 2, "300 bytes long; use at most 128"),
    ("run-long-name", f"run --name {LONG} --root {{ws}}", 2, "300 bytes long; use at most 128"),
    ("generate-long-name", f"generate --name {LONG} --dry-run --root {{ws}}", 2, "300 bytes long; use at most 128"),
    ("import-long-name", f"import digits --name {LONG} --root {{base}}/new", 2, "bytes long; use at most 128"),
    ("sweep-long-name", f"sweep train.dra_lambda=1 --name {LONG} --root {{ws}}", 2, "300 bytes long; use at most 128"),
    # explicit values are never read as "the default"
    ("root-empty", ["ls", "--root", ""], 2, "invalid value for '--root': is empty"),
    ("import-name-empty", ["import", "digits", "--name", "", "--root", "{base}/new"], 2,
     "invalid value for '--name': is empty"),
    ("generate-name-empty", ["generate", "--name", "", "--dry-run", "--root", "{ws}"], 2,
     "invalid value for '--name': is empty"),
    ("select-out-empty", ["select", "digits-train", "--scorer", "tiny", "--out", "", "--root", "{ws}"], 2,
     "invalid value for '--out': is empty"),
    ("config-empty-string", "generate --dry-run --config {base}/empty-name.yaml --root {ws}", 2,
     "key 'generate.name' is empty"),
    ("extract-sigma-and-timestep", "extract-features --sigma 0.5 --timestep 100 --root {ws}", 2,
     "--timestep or as --sigma, not both"),
    # another set's records copied into a set: damaged stored data (exit 1), never rewritten with the wrong data
    ("foreign-manifest-train", "train --dry-run --no-dra --root {base}/foreign-manifest", 1,
     "manifest.parquet records shard(s) [0] that its dataset.json does not plan"),
    ("foreign-manifest-fit", "fit-diffusion --root {base}/foreign-manifest", 1, "does not plan"),
    ("foreign-dataset-repair", "repair digits-train --root {base}/foreign-dataset", 1,
     "describes set 'digits-test', not digits-train"),
    ("foreign-dataset-train", "train --dry-run --no-dra --root {base}/foreign-dataset", 1,
     "describes set 'digits-test', not digits-train"),
    # --out never replaces what is not a regular file, the workspace's stored files, or an existing file
    ("export-out-device", "export tiny --out {base}/device --root {ws}", 2, "not a regular file"),
    ("eval-out-device", "eval tiny --no-autoattack --out {base}/device --root {ws}", 2, "not a regular file"),
    ("export-out-fifo", "export tiny --out {base}/fifo --root {ws}", 2, "not a regular file"),
    ("export-out-other-run", "export tiny --out {ws}/runs/cut-final/final.pt --root {ws}", 2,
     "inside the workspace's runs/"),
    ("eval-out-other-run", "eval tiny --no-autoattack --out {ws}/runs/bad-eval/final.pt --root {ws}", 2,
     "inside the workspace's runs/"),
    ("eval-out-dataset-json", "eval tiny --no-autoattack --out {ws}/images/digits-test/dataset.json --root {ws}", 2,
     "inside the workspace's images/"),
    ("export-out-shard", "export tiny --out {ws}/images/digits-test/shard-000000.tar --root {ws}", 2,
     "inside the workspace's images/"),
    ("export-out-exists", "export tiny --out {base}/list.yaml --root {ws}", 2, "exists; pass --force to replace it"),
    ("bench-gpu-out-device", "bench gpu --smoke --out {base}/device --root {ws}", 2, "not a regular file"),
    ("repair-from-for-digits", "repair digits-test --from {base}/nodata.tar.gz --root {ws}", 2,
     "none of the sets to repair (digits-test) was imported from a file"),
]


def _device_like(path) -> None:
    """A character device node like /dev/full, made in the test's folder (as root, which CI is); elsewhere a FIFO.
    Never the system's own node: a regression that writes through it must not destroy /dev/full (one did)."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError:
        os.mkfifo(path)


@pytest.fixture(scope="module")
def values(bad):
    base = bad["base"]
    (base / "big-seed.yaml").write_text(f"train:\n  seed: {BIG_SEED}\n")
    (base / "big-fit-seed.yaml").write_text(f"fit_diffusion:\n  seed: {BIG_SEED}\n")
    (base / "odd-channels.yaml").write_text("fit_diffusion:\n  model_channels: 5\n")
    (base / "huge-head.yaml").write_text("train:\n  dra_hidden: 1000000000\n")
    (base / "empty-name.yaml").write_text("generate:\n  name: ''\n")
    if not (base / "fifo").exists():
        os.mkfifo(base / "fifo")
    if not (base / "device").exists():
        _device_like(base / "device")
    for name, record in (("foreign-manifest", "manifest.parquet"), ("foreign-dataset", "dataset.json")):
        images = base / name / "images"
        shutil.copytree(bad["ws"] / "images", images)
        shutil.copy(images / "digits-test" / record, images / "digits-train" / record)
    return bad


@pytest.mark.parametrize("argv, code, fragment", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_unworkable_value_gets_one_line(cli, values, tmp_path, argv, code, fragment):
    check_one_line(cli, values, tmp_path, argv, code, fragment)


def test_export_replaces_an_existing_file_only_with_force(cli, bad, tmp_path):
    target = tmp_path / "tiny.pt"
    assert cli("export", "tiny", "--out", target, "--root", bad["ws"])[0] == 0
    first = target.read_bytes()
    code, _, err = cli("export", "tiny", "--out", target, "--root", bad["ws"])
    assert code == 2 and "pass --force" in err and target.read_bytes() == first
    code, _, err = cli("export", "tiny", "--out", target, "--force", "--root", bad["ws"])
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]          # no temporary left beside it


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(cli, bad, monkeypatch):
    """An allocation failure while the trainer is built (stood in for by a raising build_classifier: a real
    one needs the memory to fail) leaves no run folder behind for the next `train` to mistake for a run."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("not enough memory: you tried to allocate 256 GB")
    monkeypatch.setattr("trainer.loop.build_classifier", out_of_memory)
    with pytest.raises(RuntimeError, match="not enough memory"):
        cli("train", "--name", "oom", "--config", bad["base"] / "real-only.yaml", "--root", bad["ws"])
    assert not (bad["ws"] / "runs" / "oom").exists()
