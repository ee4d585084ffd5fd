"""An import's source in a bucket (`--from s3://BUCKET/KEY`) against the local S3 server: brought into the node's
cache once, imported to the bytes a local file gives, recorded by its URL so that `repair` on a fresh node brings
it again; a missing object, a whole bucket and an ImageNet folder in a bucket are one line and exit 2."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest


@pytest.fixture
def source(s3_server, s3_root, tmp_path):
    """(the URL of a small DM-AT-layout .npz in the bucket, its local twin)."""
    rng = np.random.default_rng(0)
    local = tmp_path / "tiny.npz"
    np.savez(local, image=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), label=rng.integers(0, 10, 40))
    bucket = s3_root.split("/")[2]
    s3_server.client().upload_file(str(local), bucket, "sources/tiny.npz")
    return f"s3://{bucket}/sources/tiny.npz", local


def shards(root):
    return {p.name: p.read_bytes() for p in sorted((root / "images" / "npz-train").glob("shard-*.tar"))}


def test_a_source_in_a_bucket_imports_as_the_local_file_does_and_repair_brings_it_again(cli, source, tmp_path):
    url, local = source
    args = ("--shard-size", "16")
    assert cli("import", "npz", "--from", local, "--root", tmp_path / "a", *args)[0] == 0
    code, out, err = cli("import", "npz", "--from", url, "--root", tmp_path / "b", *args)
    assert code == 0 and f"brought {url} into this node's cache" in out, out + err
    assert shards(tmp_path / "b") == shards(tmp_path / "a") and len(shards(tmp_path / "a")) == 3
    record = json.loads((tmp_path / "b" / "images" / "npz-train" / "dataset.json").read_text())
    assert record["provenance"]["sources"] == [url]
    copy = next((tmp_path / "cache" / "sources").rglob("tiny.npz"))
    inode = copy.stat().st_ino
    code, out, err = cli("import", "npz", "--from", url, "--root", tmp_path / "b", *args)
    assert code == 0 and "already imported" in out and "brought" not in out, out + err
    assert copy.stat().st_ino == inode                       # unchanged in the bucket: not downloaded again

    shutil.rmtree(tmp_path / "cache")                         # a fresh node repairs from the recorded URL
    shard = tmp_path / "b" / "images" / "npz-train" / "shard-000001.tar"
    damaged = bytearray(shard.read_bytes())
    damaged[600] ^= 1
    shard.write_bytes(bytes(damaged))
    code, out, err = cli("repair", "--root", tmp_path / "b")
    assert code == 0, out + err
    assert shards(tmp_path / "b") == shards(tmp_path / "a")
    record = json.loads((tmp_path / "b" / "images" / "npz-train" / "dataset.json").read_text())
    assert record["provenance"]["sources"] == [url]          # still the URL, not this node's cache path


@pytest.mark.parametrize("importer, where, says", [
    ("npz", "sources/missing.npz", "no such object, and no objects under it"),
    ("npz", "", "names a whole bucket"),
    ("imagenet", "sources", "not a bucket; copy it to each node"),
])
def test_a_bad_source_url_is_one_line_and_exit_2(cli, source, tmp_path, importer, where, says):
    url = "/".join(source[0].split("/")[:3]) + (f"/{where}" if where else "")
    code, out, err = cli("import", importer, "--from", url, "--root", tmp_path / "ws")
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "ws" / "images").exists()
