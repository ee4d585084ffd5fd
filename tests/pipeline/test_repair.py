"""`dra-pipe repair` and the stage reruns redo exactly the damaged shards, with the original bytes.

One workspace is built per module (an imported digits set, a generated set from a tiny model, a feature set of
two views); each test damages a copy of it.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_cifar_tarball, run_cli

FEATURE_ARRAYS = ("targets", "targets_v1", "ids")


def config_text(model_dir: Path) -> str:
    return (f"model:\n  spec: dra:{model_dir}\n"
            f"data:\n  shard_size: 32\n  test_fraction: 0.9\n"
            f"generate:\n  n: 96\n  name: gen\n  steps: 2\n  sampler: euler\n  batch_size: 32\n"
            f"features:\n  views: 2\n  timesteps: [100]\n  batch_size: 64\n"
            f"train:\n  crop_pad: 1\n"
            f"ray:\n  cpu_actors: 1\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, ray_local):
    """<tmp>/ws: digits-train (180 images, 6 shards); gen (64 images, 2 shards), generated from a copy of the tiny
    model inside the workspace (models/tiny, the workspace's own model); one feature set of digits-train with 2
    views, from the tiny model outside it (a user's file)."""
    base = tmp_path_factory.mktemp("repair")
    ws = base / "ws"
    shutil.copytree(tiny_model_dir, ws / "models" / "tiny")
    for name, model in (("inside", ws / "models" / "tiny"), ("outside", tiny_model_dir)):
        (base / f"{name}.yaml").write_text(config_text(model))
    run_cli("import", "digits", "--config", base / "outside.yaml", "--root", ws)
    run_cli("generate", "--config", base / "inside.yaml", "--root", ws)
    run_cli("extract-features", "--images", "digits-train", "--config", base / "outside.yaml", "--root", ws)
    return ws


@pytest.fixture
def ws(built, tmp_path):
    """A copy of the built workspace, and pipeline.yaml in the folder the `cli` fixture runs in."""
    copy = tmp_path / "dra-data"
    shutil.copytree(built, copy)
    (tmp_path / "pipeline.yaml").write_text(config_text(copy / "models" / "tiny"))
    return copy


def feature_dir(ws: Path) -> Path:
    (folder,) = (ws / "features").iterdir()
    return folder


def shard_files(ws: Path, kind: str) -> dict[int, list[Path]]:
    """Every shard file of the set, by shard index."""
    if kind == "features":
        store = feature_dir(ws) / "features.zarr"
        files: dict[int, list[Path]] = {}
        for array in FEATURE_ARRAYS:
            for shard in sorted((store / array / "c").iterdir()):
                files.setdefault(int(shard.name), []).append(
                    shard if array == "ids" else shard / "0" / "0" / "0")
        return files
    folder = ws / "images" / ("digits-train" if kind == "imported" else "gen")
    return {int(p.stem.split("-")[1]): [p] for p in sorted(folder.glob("shard-*.tar"))}


def snapshot(files: dict[int, list[Path]]) -> dict[Path, tuple[bytes, int]]:
    """Bytes and inode of each file: a rewritten file has a new inode (written under a temporary name)."""
    return {p: (p.read_bytes(), p.stat().st_ino) for paths in files.values() for p in paths}


def tree(root: Path) -> dict:
    """Every file of the workspace with its bytes."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def damage(path: Path, how: str) -> None:
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.unlink()


KINDS = ("imported", "generated", "features")
RERUN = {"imported": ("import", "digits"), "generated": ("generate",),
         "features": ("extract-features", "--images", "digits-train")}


def damage_sets(ws: Path, plan: dict[str, dict[int, tuple[int, str]]]) -> tuple[dict, dict]:
    """plan: kind -> {shard: (which of its files, how)}; the feature set's files are (targets, targets_v1, ids).
    Returns each kind's shard files and their snapshot from before."""
    files = {kind: shard_files(ws, kind) for kind in KINDS}
    before = {kind: snapshot(files[kind]) for kind in KINDS}
    for kind, shards in plan.items():
        for index, (which, how) in shards.items():
            damage(files[kind][index][which], how)
    return files, before


def assert_original_bytes(ws: Path, files: dict, before: dict, plan: dict) -> None:
    """Every shard file holds its original bytes; the files of intact shards were not even rewritten."""
    for kind in KINDS:
        after = snapshot(shard_files(ws, kind))
        assert set(after) == set(before[kind])
        intact = [p for index, paths in files[kind].items() if index not in plan[kind] for p in paths]
        for path, (data, inode) in before[kind].items():
            assert after[path][0] == data, f"{path} differs from the original bytes"
            if path in intact:
                assert after[path][1] == inode, f"{path} of an intact shard was rewritten"


# every kind of damage in every kind of set: in the feature set a view > 0 (targets_v1), view 0 and the ids
EVERY_DAMAGE = {"imported": {1: (0, "flip"), 3: (0, "truncate"), 5: (0, "delete")},
                "generated": {0: (0, "flip"), 1: (0, "truncate"), 2: (0, "delete")},
                "features": {1: (1, "flip"), 3: (0, "truncate"), 5: (2, "delete")}}


def test_repair_redoes_every_kind_of_damage_with_the_original_bytes(cli, ws):
    files, before = damage_sets(ws, EVERY_DAMAGE)
    code, out, err = cli("verify")
    assert code == 1 and out.count("corrupted") == 3 and out.count("truncated") == 3 and out.count("deleted") == 3
    assert f"`dra-pipe repair digits-train gen {feature_dir(ws).name}`" in err
    code, out, err = cli("repair")
    assert code == 0, err
    for name, shards in (("digits-train", "1, 3, 5"), ("gen", "0, 1, 2"), (feature_dir(ws).name, "1, 3, 5")):
        assert f"set {name}: shard(s) {shards} redone" in out
    assert out.count("images/s)") == 3 and out.count("nothing damaged") == 1          # digits-test
    assert_original_bytes(ws, files, before, EVERY_DAMAGE)
    code, out, err = cli("verify")
    assert code == 0, out + err


RERUN = {"imported": ("import", "digits"), "generated": ("generate",),
         "features": ("extract-features", "--images", "digits-train")}
RERUN_DAMAGE = {"imported": {1: (0, "delete")}, "generated": {2: (0, "flip")}, "features": {4: (1, "truncate")}}


def test_stage_reruns_redo_damaged_shards(cli, ws):
    files, before = damage_sets(ws, RERUN_DAMAGE)
    for kind in KINDS:
        code, out, err = cli(*RERUN[kind])
        assert code == 0, err
        shard = next(iter(RERUN_DAMAGE[kind]))
        assert (f"redid damaged shard(s) {shard}" in out if kind == "imported"
                else f"shard(s) {shard} are damaged" in out)
        assert "cached" not in out and "is complete" not in out and "already imported: digits-train" not in out
    assert_original_bytes(ws, files, before, RERUN_DAMAGE)
    code, out, err = cli("verify")
    assert code == 0, out + err


def test_intact_workspace_repairs_nothing(cli, ws):
    before = tree(ws)
    code, out, err = cli("repair")
    assert code == 0, err
    assert out.count("nothing damaged") == 4 and "repaired" not in out
    assert tree(ws) == before


def test_moved_source_is_named_in_one_line_and_nothing_is_touched(cli, tmp_path, ws):
    tarball = tmp_path / "cifar.tar.gz"
    make_cifar_tarball(tarball, n_train=40, n_test=10)
    code, _, err = cli("import", "cifar10", "--from", tarball)
    assert code == 0, err
    damage(ws / "images" / "cifar10-train" / "shard-000001.tar", "delete")
    moved = tmp_path / "elsewhere.tar.gz"
    tarball.rename(moved)
    before = tree(ws)
    code, out, err = cli("repair")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(tarball) in err and "--from" in err
    assert tree(ws) == before and "repaired" not in out
    code, out, err = cli("repair", "cifar10-train", "--from", moved)
    assert code == 0 and "shard(s) 1 redone" in out, err
    assert cli("verify", "cifar10-train")[0] == 0
    other = tmp_path / "other.tar.gz"
    make_cifar_tarball(other, n_train=40, n_test=10, seed=1)
    damage(ws / "images" / "cifar10-train" / "shard-000000.tar", "flip")
    code, _, err = cli("repair", "cifar10-train", "--from", other)
    assert code == 2 and "checksum differs" in err and len(err.strip().splitlines()) == 1


def record_model(record: Path, spec: str) -> None:
    """Make a set record another model path (as if the user's model file had moved since)."""
    meta = json.loads(record.read_text())
    meta["provenance"] = {"model_spec": spec, "batch_size": meta["provenance"]["batch_size"]}
    record.write_text(json.dumps(meta))


def test_moved_model_is_named_and_nothing_is_touched(cli, tmp_path, ws, tiny_model_dir):
    damage(shard_files(ws, "generated")[0][0], "flip")
    damage(shard_files(ws, "features")[2][0], "truncate")
    gone = tmp_path / "gone"
    record_model(ws / "images" / "gen" / "dataset.json", f"dra:{gone}")
    record_model(feature_dir(ws) / "meta.json", f"dra:{gone}")
    (tmp_path / "pipeline.yaml").write_text(config_text(gone))         # the recorded model is what counts
    before = tree(ws)
    for name in ("gen", feature_dir(ws).name):
        code, out, err = cli("repair", name)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert str(gone) in err and "pass --model" in err
        assert tree(ws) == before
    damage(ws / "images" / "digits-train" / "shard-000000.tar", "flip")  # repairable, and checked first
    before = tree(ws)
    code, out, err = cli("repair")                                      # every set: checked before any is written
    assert code == 2 and tree(ws) == before
    moved = tmp_path / "tiny-moved"
    shutil.copytree(tiny_model_dir, moved)
    code, out, err = cli("repair", "--model", f"dra:{moved}")
    assert code == 0, err
    assert out.count("redone") == 3
    assert cli("verify")[0] == 0


def test_missing_workspace_model_is_damaged_data(cli, ws):
    shutil.rmtree(ws / "models" / "tiny")
    damage(ws / "images" / "gen" / "shard-000001.tar", "truncate")
    before = tree(ws)
    code, out, err = cli("repair", "gen")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "models/tiny" in err and "workspace" in err
    assert tree(ws) == before


def test_unreadable_record_is_one_line(cli, ws):
    (ws / "images" / "gen" / "dataset.json").write_bytes(b"\xff\x00 not json")
    code, out, err = cli("repair", "gen")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "dataset.json" in err and "Traceback" not in err


def test_extract_refuses_a_damaged_image_set_before_any_work(cli, ws):
    damage(ws / "images" / "digits-train" / "shard-000002.tar", "truncate")
    (ws / "features" / feature_dir(ws).name / "meta.json").unlink()      # not cached: extraction would start
    before = tree(ws)
    code, out, err = cli(*RERUN["features"])
    assert code == 1 and len(err.strip().splitlines()) == 1 and "`dra-pipe repair digits-train`" in err, err
    assert tree(ws) == before


def test_repair_holds_the_sets_lock(cli, ws):
    """Another process writing the set: repair is refused in one line and changes nothing."""
    import subprocess
    import sys
    damage(ws / "images" / "digits-train" / "shard-000001.tar", "flip")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(ws / "images" / "digits-train" / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(ws)
        code, out, err = cli("repair", "digits-train")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "is being written by" in err, err
        assert tree(ws) == before
    finally:
        holder.kill()
        holder.wait()
    code, out, err = cli("repair", "digits-train")
    assert code == 0 and "shard(s) 1 redone" in out, err


def test_generated_npz_set_is_repaired_from_its_files(cli, tmp_path, ws):
    """`import npz --generated` from two files: repair reads both again; one of them moved is named in one line."""
    import numpy as np
    rng = np.random.default_rng(1)
    halves = [tmp_path / "part1.npz", tmp_path / "part2.npz"]
    for path, n, save in zip(halves, (20, 13), (np.savez, np.savez_compressed)):
        save(path, image=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), label=rng.integers(0, 10, n))
    code, _, err = cli("import", "npz", "--generated", "--from", halves[0], "--from", halves[1], "--name", "dmat")
    assert code == 0, err
    folder = ws / "images" / "dmat"
    shards = sorted(folder.glob("shard-*.tar"))
    before = {p: p.read_bytes() for p in shards}
    damage(shards[0], "truncate")                    # ids 0..31: from both files
    damage(shards[1], "delete")
    moved = tmp_path / "moved.npz"
    halves[1].rename(moved)
    untouched = tree(ws)
    code, out, err = cli("repair", "dmat")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(halves[1]) in err and "2 files" in err, err
    assert tree(ws) == untouched
    code, out, err = cli("repair", "dmat", "--from", halves[0], "--from", moved)
    assert code == 0 and "shard(s) 0, 1 redone" in out, err
    assert {p: p.read_bytes() for p in shards} == before
    assert cli("verify", "dmat")[0] == 0


@pytest.mark.parametrize("inner", [False, True])
def test_an_interrupted_repair_says_what_is_kept_once(monkeypatch, capsys, inner):
    """Ctrl-C while a set is redone: one `interrupted:` line, the redo's own (a Ray stage reports its shards)
    where it gave one, else repair's."""
    from pipeline import console
    from pipeline.repair import RepairPlan, redo
    monkeypatch.setattr(console, "_interrupt_reported", False)

    def interrupted() -> int:
        if inner:
            console.report_interrupt("1 of 2 shards of gen are complete; rerun the same command to resume")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        redo(RepairPlan("images", "gen", [1], interrupted, on_ray=inner))
    said = "1 of 2 shards of gen are complete; rerun the same command to resume" if inner else \
        "shards of gen redone so far are kept; rerun `dra-pipe repair` to finish"
    assert capsys.readouterr().err.splitlines() == [f"interrupted: {said}"]
