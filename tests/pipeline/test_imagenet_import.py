"""`dra-pipe import imagenet` on Ray: labels, bad-file counts and list, resume, 1 worker = 2 workers, bad layouts."""
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
from test_imagenet_folder import SYNSETS, make_imagenet  # noqa: E402

from stores.images import ImageSet  # noqa: E402


@pytest.fixture
def source(tmp_path, ray_local):
    return make_imagenet(tmp_path / "in")


def shard_bytes(root, name):
    return {p.name: p.read_bytes() for p in sorted((root / "images" / name).glob("shard-*.tar"))}


def test_import_counts_skips_and_labels(cli, tmp_path, source):
    code, out, err = cli("import", "imagenet", "--from", source, "--resolution", "16", "--shard-size", "4")
    assert code == 0, err
    assert "imported imagenet-train: 12 images (3 converted, 2 skipped" in out          # 9 + grey, cmyk, png
    train = ImageSet.open(tmp_path / "dra-data", "imagenet-train")
    assert (train.n, train.resolution, train.classes) == (12, 16, 3)
    assert train.identity["source"]["skipped"] == [f"train/{SYNSETS[1]}/empty.JPEG",
                                                   f"train/{SYNSETS[1]}/truncated.JPEG"]
    assert train.identity["source"]["filter"] == "lanczos"
    notes = {f["file"]: f["note"] for f in train.meta["provenance"]["files"]}
    assert "mode CMYK" in notes[f"train/{SYNSETS[1]}/cmyk.JPEG"]
    # labels follow the synset, not the position: skipped files shift nothing
    assert list(train.read_range(0, 12).labels) == [0] * 3 + [1] * 6 + [2] * 3
    val = ImageSet.open(tmp_path / "dra-data", "imagenet-val")
    assert list(val.read_range(0, 2).labels) == [2, 0]
    code, out, _ = cli("import", "imagenet", "--from", source, "--resolution", "16", "--shard-size", "4")
    assert code == 0 and "already imported: imagenet-train" in out


def test_resume_and_two_workers_give_the_same_bytes(cli, tmp_path, source, monkeypatch):
    code, _, err = cli("import", "imagenet", "--from", source, "--resolution", "16", "--shard-size", "4",
                       "--root", "one", "--workers", "1")
    assert code == 0, err
    code, _, err = cli("import", "imagenet", "--from", source, "--resolution", "16", "--shard-size", "4",
                       "--root", "two", "--workers", "2")
    assert code == 0, err
    assert shard_bytes(tmp_path / "one", "imagenet-train") == shard_bytes(tmp_path / "two", "imagenet-train")
    from stores.images import ImageSetWriter
    real_record, calls = ImageSetWriter.record, []

    def interrupted(self, record):
        calls.append(record)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_record(self, record)
    monkeypatch.setattr(ImageSetWriter, "record", interrupted)
    code, _, _ = cli("import", "imagenet", "--from", source, "--resolution", "16", "--shard-size", "4",
                     "--root", "cut")
    assert code != 0
    monkeypatch.setattr(ImageSetWriter, "record", real_record)
    staged = sorted((tmp_path / "cut" / "images").glob(".staging-imagenet-train-*/chunk-*.npz"))
    assert len(staged) == 4
    staged[1].unlink()                                   # as if stopped while decoding that chunk
    code, out, err = cli("import", "imagenet", "--from", source, "--resolution", "16", "--shard-size", "4",
                         "--root", "cut")
    assert code == 0, err
    assert "decoded 4 train images" in out               # only the chunk that was not staged
    assert shard_bytes(tmp_path / "cut", "imagenet-train") == shard_bytes(tmp_path / "one", "imagenet-train")
    assert not list((tmp_path / "cut" / "images").glob(".staging-*"))


def test_an_import_of_a_changed_folder_drops_the_staging_of_the_old_listing(cli, tmp_path, source):
    """As left by a decode pass stopped before the folder changed (its chunks can never be resumed)."""
    images = tmp_path / "dra-data" / "images"
    stale = images / ".staging-imagenet-train-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "chunk-000000.npz").write_bytes(b"decoded once")
    other = images / ".staging-imagenet-train-repair"                   # not a listing's: kept
    other.mkdir()
    code, out, err = cli("import", "imagenet", "--from", source, "--resolution", "16", "--shard-size", "4")
    assert code == 0, err
    assert f"removing {stale}" in " ".join(out.split()) and not stale.exists() and other.exists()
    assert ImageSet.open(tmp_path / "dra-data", "imagenet-train").n == 12


def test_other_layouts_exit_2_in_one_line(cli, tmp_path, source):
    code, _, err = cli("import", "imagenet", "--from", source / "train")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "DIR/train/<synset>" in err
    (source / "LOC_val_solution.csv").unlink()
    code, _, err = cli("import", "imagenet", "--from", source)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "LOC_val_solution.csv" in err


def test_repair_decodes_only_the_chunks_a_damaged_shard_needs_and_restores_its_bytes(cli, tmp_path, source):
    code, _, err = cli("import", "imagenet", "--from", source, "--resolution", "16", "--shard-size", "4")
    assert code == 0, err
    ws = tmp_path / "dra-data"
    before = shard_bytes(ws, "imagenet-train")
    damaged = ws / "images" / "imagenet-train" / "shard-000002.tar"
    data = damaged.read_bytes()
    damaged.write_bytes(data[:600] + bytes(255 - b for b in data[600:700]) + data[700:])   # same size, other bytes
    code, _, err = cli("verify", "imagenet-train")
    assert code == 1 and "shard 2" in err + _
    moved = tmp_path / "moved"
    source.rename(moved)
    shutil.copytree(moved, tmp_path / "copy")
    code, _, err = cli("repair", "imagenet-train")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pass --from DIR" in err
    changed = Path(shutil.copytree(moved, tmp_path / "changed"))                   # copies keep their mtimes
    (changed / "train" / SYNSETS[0] / f"{SYNSETS[0]}_0.JPEG").write_bytes(b"not the same file")
    code, _, err = cli("repair", "imagenet-train", "--from", changed)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not the folder" in err
    assert shard_bytes(ws, "imagenet-train")["shard-000002.tar"] != before["shard-000002.tar"]   # nothing written
    code, out, err = cli("repair", "imagenet-train", "--from", tmp_path / "copy")
    assert code == 0, err
    # 14 files in chunks of 4 keep 4, 3, 3 and 2 images (2 skipped): shard 2 (ids 8-11) needs chunks 2 and 3 alone
    assert "decoded 6 train images" in out
    assert shard_bytes(ws, "imagenet-train") == before
    code, _, _ = cli("verify", "imagenet-train")
    assert code == 0


def test_an_import_into_a_bucket_gives_the_bytes_of_a_local_import_and_leaves_no_staging(cli, tmp_path, source,
                                                                                         s3_root, s3_server):
    args = ("import", "imagenet", "--from", source, "--resolution", "16", "--shard-size", "4")
    assert cli(*args)[0] == 0
    code, out, err = cli(*args, "--root", s3_root)
    assert code == 0, err
    bucket = s3_root.split("/")[2]
    stored = s3_server.objects(bucket)
    for name in ("imagenet-train", "imagenet-val"):
        local = shard_bytes(tmp_path / "dra-data", name)
        assert local and {k.rsplit("/", 1)[1]: v for k, v in stored.items() if f"/images/{name}/shard-" in k} == local
    assert not [k for k in stored if "staging" in k]            # the decoded chunks went with the folder
