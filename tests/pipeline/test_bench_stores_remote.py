"""`dra-pipe bench stores --root s3://...` against the local S3 server, at a tiny size: the set is in the bucket,
the cold passes fetch every shard file and the warm ones none, and the ratios are those of the measured rates."""
from __future__ import annotations

import io
import re

from rich.console import Console

from stores import remote


def test_the_bucket_bench_reads_cold_then_warm_and_reports_measured_ratios(cli, s3_root, s3_server, monkeypatch):
    code, out, err = cli("bench", "stores", "--samples", "40", "--workers", "0", "--root", s3_root)
    assert code == 0, err
    for row in ("bare", "ours cold", "ours warm", "trainer cold", "trainer warm"):
        assert re.search(rf"{row}\s+│\s+[\d,]+\s+│", out), row
    keys = s3_server.objects(s3_root.split("/")[2])
    assert any(k.endswith("images/bench-remote-40/shard-000000.tar") for k in keys)
    assert sum("/features.zarr/" in k and "/c/" in k for k in keys) == 2            # targets + ids of one shard

    from pipeline.bench.stores_remote import bench_stores_remote
    downloads = []
    real = remote._download
    monkeypatch.setattr(remote, "_download", lambda m, key, local: downloads.append(key) or real(m, key, local))
    root = remote.attach(s3_root)
    results = bench_stores_remote(root / "bench" / "stores-remote", 40, 8, 0, Console(file=io.StringIO()))
    assert sorted(downloads) == sorted(k for k in downloads if remote.is_shard_data(k)) and len(downloads) == 2 * 3
    assert all(rate > 0 for rate in results.values())
