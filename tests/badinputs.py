"""The bad-input workspace the one-line tests run against: an imported digits set with finished and damaged runs,
damaged roots, damaged fitted models and malformed input files; and the check every row makes."""
from __future__ import annotations

import io
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from conftest import tiny_edm_config


def make_bad_workspace(base: Path) -> dict[str, Path]:
    """Everything under `base`; returns the placeholders rows use: {ws}, {fit}, {flip}, {base}."""
    import torch

    from stages.importers import import_source
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ws = base / "ws"
        import_source(ws, "digits", None, None, 10000, "png")
        _runs(ws)
        _bad_inputs(base)
        _damaged_roots(base, ws)
        _fitted_models(base, ws)
    finally:
        torch.set_num_threads(threads)
    return {"base": base, "ws": ws, "fit": base / "fit", "flip": base / "flip"}


def check_one_line(cli, bad: dict, tmp_path: Path, argv: str | list[str], code: int, fragment: str) -> None:
    """The row's exit status, exactly one short line on stderr holding `fragment`, no traceback, nothing changed."""
    places = {k: str(v) for k, v in bad.items()}
    args = argv.format(**places).split() if isinstance(argv, str) else [a.format(**places) for a in argv]
    before = snapshot(bad["base"], tmp_path)
    got, out, err = cli(*args)
    assert "Traceback" not in out + err
    assert (got, err.count("\n")) == (code, 1), err
    assert len(err) < 600, f"{len(err)} characters: a value or a traceback went into the message"
    assert err.startswith("error: " if code == 2 else "data error: ") and fragment in err, err
    assert snapshot(bad["base"], tmp_path) == before


def snapshot(*folders: Path) -> dict:
    """Every file's (size, mtime) and every folder, under the given folders."""
    out = {}
    for top in folders:
        for p in sorted(top.rglob("*")):
            out[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
    return out


def _cifar_tar(path: Path, batch: dict) -> None:
    """A CIFAR-10 python tarball whose five train batches and test batch are all `batch`."""
    folder = "cifar-10-batches-py"
    members = {f"{folder}/data_batch_{i}": batch for i in range(1, 6)}
    members[f"{folder}/test_batch"] = batch
    members[f"{folder}/batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _bad_inputs(base: Path) -> None:
    images = np.zeros((4, 8, 8, 1), np.uint8)
    np.savez(base / "float.npz", image=images, label=np.array([0.5, 1.7, 2.2, 3.9]))
    np.savez(base / "huge.npz", image=images, label=np.array([0, 1, 2, 10 ** 9]))
    np.savez(base / "zero.npz", image=images[:0], label=np.zeros(0, np.int64))
    np.savez(base / "gen8.npz", image=np.zeros((4, 8, 8, 3), np.uint8), label=np.arange(4))
    np.savez(base / "gen4.npz", image=np.zeros((4, 4, 4, 3), np.uint8), label=np.arange(4))
    np.savez(base / "object.npz", image=images, label=np.array([0, None, 1, 2], dtype=object))
    with zipfile.ZipFile(base / "short.npz", "w", zipfile.ZIP_STORED) as z:     # header says 4 images, holds 1
        z.writestr("image.npy", _npy_bytes(images)[:-3 * 64])
        z.writestr("label.npy", _npy_bytes(np.arange(4)))
    rows = np.zeros((4, 3072), np.uint8)
    _cifar_tar(base / "nodata.tar.gz", {b"labels": [0, 1, 2, 3]})
    _cifar_tar(base / "objlabels.tar.gz", {b"data": rows, b"labels": np.array([0, None, 1, 2], dtype=object)})
    _cifar_tar(base / "floatlabels.tar.gz", {b"data": rows, b"labels": [0.5, 1.5, 2.0, 3.0]})
    _cifar_tar(base / "floatdata.tar.gz", {b"data": rows.astype(np.float64) / 255, b"labels": [0, 1, 2, 3]})
    _cifar_tar(base / "widedata.tar.gz", {b"data": rows.astype(np.uint16) + 300, b"labels": [0, 1, 2, 3]})
    np.savez(base / "empty-images.npz", image=np.zeros((4, 0, 0, 1), np.uint8), label=np.arange(4))
    _image_folders(base)
    from PIL import Image
    (base / "classes" / "a").mkdir(parents=True)
    (base / "classes" / "b").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(base / "classes" / "a" / f"{i}.png")
    (base / "binary.yaml").write_bytes(b"\xff\xfe\x00\x9c binary \x80\x81")
    (base / "list.yaml").write_text("- 1\n- 2\n")
    (base / "huge.yaml").write_text("# padding\n" * 120_000)
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    (base / "bomb.yaml").write_text("\n".join(lines) + "\n")              # 9 levels of aliases: 9^9 leaves
    (base / "deep.yaml").write_text("train: " + "[" * 3000 + "]" * 3000 + "\n")
    (base / "long-value.yaml").write_text("train:\n  epochs: [" + ", ".join(["[1, 2, 3]"] * 20000) + "]\n")
    (base / "no-levels.yaml").write_text("fit_diffusion:\n  channel_mult: []\n")
    (base / "six-levels.yaml").write_text("fit_diffusion:\n  channel_mult: [1, 1, 1, 1, 1, 1]\n")
    (base / "model-dtype.yaml").write_text("model:\n  dtype: float64\n")
    (base / "features-dtype.yaml").write_text("features:\n  dtype: bfloat16\n")
    (base / "precision.yaml").write_text("train:\n  precision: fp16\n")
    (base / "attack-precision.yaml").write_text("train:\n  attack_precision: bfloat16\n")
    (base / "real-only.yaml").write_text("train:\n  dra: false\n  unsup_fraction: 0.0\n  epochs: 1\n")
    (base / "junk.pt").write_bytes(bytes(range(256)) * 4)
    (base / "unet").mkdir()
    (base / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8}')


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels (the data is one empty row): enough for a
    decoder's size check, which reads only the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _image_folders(base: Path) -> None:
    """sixteen/: 16-bit grey PNGs (converting would clip every pixel to 255); bomb/: a 20000 x 20000 PNG header."""
    from PIL import Image
    for k in ("a", "b"):
        (base / "sixteen" / k).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(base / "sixteen" / k / "0.png")
        (base / "bomb" / k).mkdir(parents=True)
        (base / "bomb" / k / "0.png").write_bytes(_png_claiming(20000, 20000))


def _damaged_roots(base: Path, ws: Path) -> None:
    for name, text in (("dmg-utf8", b"\xff\xfe{not utf-8"), ("dmg-shape", b"[1, 2, 3]")):
        shutil.copytree(ws / "images" / "digits-test", base / name / "images" / "digits-test")
        (base / name / "images" / "digits-test" / "dataset.json").write_bytes(text)
    (base / "dmg-meta" / "features" / "abc").mkdir(parents=True)
    (base / "dmg-meta" / "features" / "abc" / "meta.json").write_bytes(b'{"identity": 5, "\xff": 1}')


def _runs(ws: Path) -> None:
    from evalruns import fit_small_cnn, save_run

    from stores.images import ImageSet
    save_run(ws, "tiny", fit_small_cnn(ImageSet.open(ws, "digits-train"), steps=3), 0.1, dra=False, unsup_fraction=0.0)
    runs = ws / "runs"
    for name in ("garbage-best", "cut-final", "bad-metrics", "bad-eval", "bad-config", "bad-record"):
        shutil.copytree(runs / "tiny", runs / name)
    (runs / "bad-eval" / "eval.json").write_bytes(b"\xff\xfe{")
    (runs / "bad-config" / "config.yaml").write_text("train: [\n")
    (runs / "bad-record" / "run.json").write_text("{garbage")
    (runs / "bad-record" / "final.pt").unlink()                # unfinished: train would resume it
    (runs / "garbage-best" / "best.pt").write_bytes(b"not a checkpoint" * 64)
    final = (runs / "cut-final" / "final.pt").read_bytes()
    (runs / "cut-final" / "final.pt").write_bytes(final[: len(final) // 2])
    with open(runs / "bad-metrics" / "metrics.jsonl", "a") as f:
        f.write("{garbage\n")


def _fitted_models(base: Path, ws: Path) -> None:
    """Roots `fit` and `flip` whose fitted model (for the default fit settings) has a truncated model.safetensors,
    or one flipped byte in its weights; `given-model`, truncated, outside any workspace."""
    import torch

    from pipeline.config import load_config
    from pipeline.models import fitted_model_dir
    from stages.edm.networks import EDMPrecond
    from stages.models import save_own
    torch.manual_seed(0)
    net = EDMPrecond(**tiny_edm_config()).eval()
    folders = {}
    for name in ("fit", "flip"):
        shutil.copytree(ws / "images" / "digits-train", base / name / "images" / "digits-train")
        folders[name] = fitted_model_dir(load_config(None, {"root": str(base / name)}))
    for damage, folder in (("cut", folders["fit"]), ("flip", folders["flip"]), ("cut", base / "given-model")):
        save_own(net, folder, {"test": "bad input"})
        data = bytearray((folder / "model.safetensors").read_bytes())
        if damage == "flip":
            data[-5] ^= 0x40                                   # inside the last tensor's bytes
        (folder / "model.safetensors").write_bytes(bytes(data) if damage == "flip" else bytes(data[:-100]))
