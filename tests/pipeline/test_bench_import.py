"""`dra-pipe bench import` runs end to end on a tiny generated folder and prints its table with the projection."""
from pipeline.bench.imports import make_jpegs


def test_bench_import_prints_ratio_and_projection(cli, ray_local):
    code, out, err = cli("bench", "import", "--n", "8")
    assert code == 0, err
    assert "x bare (goal >= 0.9)" in out and "projection: 1,281,167 images, 16 cores" in out


def test_generated_jpegs_have_imagenet_like_sizes(tmp_path):
    from PIL import Image
    make_jpegs(tmp_path, 12)
    sizes = [Image.open(f).size for f in sorted(tmp_path.glob("train/*/*.JPEG"))]
    assert len(sizes) == 12 and all(300 <= w <= 500 and 250 <= h <= 450 for w, h in sizes)
