"""Every bad input, one line: a hostile user's inputs to every command, through the real CLI.

Each row: the exit status (2 bad input, 1 damaged stored data), exactly one line on stderr naming the problem,
no traceback, and the workspace (every file's size and mtime, every folder) unchanged.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from badinputs import check_one_line

# (id, argv with {ws} {fit} {base} placeholders, exit status, fragment stderr must contain)
ROWS = [
    # usage errors: one line naming the option, not a rich box
    ("unknown-option", "train --frobnicate", 2, "no such option: --frobnicate; see dra-pipe train --help"),
    ("bad-int", "verify --recompute abc", 2, "'--recompute'"),
    ("missing-argument", "import", 2, "missing argument 'importer'"),
    ("no-such-command", "frobnicate", 2, "no such command 'frobnicate'"),
    ("float-for-int", "eval tiny --n 1.5 --root {ws}", 2, "'--n'"),
    ("missing-value", "export tiny --out", 2, "'--out' requires an argument"),
    # configuration files and roots
    ("config-binary", "ls --config {base}/binary.yaml", 2, "not UTF-8"),
    ("config-folder", "ls --config {base}", 2, "is a folder"),
    ("config-device", "ls --config /dev/zero", 2, "is not a regular file"),
    ("config-huge", "ls --config {base}/huge.yaml", 2, "over 1 MiB"),
    ("root-is-file", "ls --root {base}/list.yaml", 2, "is a file, not a folder"),
    ("config-list", "config --config {base}/list.yaml", 2, "must be a mapping"),
    ("config-alias-bomb", "config --config {base}/bomb.yaml", 2, "YAML aliases (*a) are not accepted"),
    ("config-deep", "config --config {base}/deep.yaml", 2, "nested more than 16 levels deep"),
    ("config-huge-value", "config --config {base}/long-value.yaml", 2, "key 'train.epochs' must be integer, got"),
    ("config-missing", "config --config {base}/none.yaml", 2, "does not exist"),
    ("config-bad-value", "eval tiny --weights frob --root {ws}", 2, "eval.weights"),
    ("model-dtype", "generate --dry-run --config {base}/model-dtype.yaml --root {ws}", 2,
     "key 'model.dtype' must be one of float32, bfloat16, float16; got 'float64'"),
    ("features-dtype-bf16", "extract-features --dry-run --config {base}/features-dtype.yaml --root {ws}", 2,
     "key 'features.dtype' must be one of float16, float32; got 'bfloat16'"),
    ("train-precision", "train --dry-run --config {base}/precision.yaml --root {ws}", 2,
     "key 'train.precision' must be one of float32, bf16; got 'fp16'"),
    ("attack-precision", "train --dry-run --config {base}/attack-precision.yaml --root {ws}", 2,
     "key 'train.attack_precision' must be one of float32, bf16; got 'bfloat16'"),
    ("root-proc", "import digits --root /proc/dra-ws", 2, "not writable"),
    ("root-sys", "import digits --root /sys/dra-ws", 2, "not writable"),
    # importers: malformed content, wrong data
    ("npz-float-labels", "import npz --from {base}/float.npz --root {base}/new", 2, "float64"),
    ("npz-billion-classes", "import npz --from {base}/huge.npz --root {base}/new", 2, "1,000,000,001 classes"),
    ("npz-no-images", "import npz --from {base}/zero.npz --root {base}/new", 2, "no images"),
    ("npz-object-labels", "import npz --from {base}/object.npz --root {base}/new", 2,
     "'label' is not a readable array"),
    ("npz-ends-early", "import npz --from {base}/short.npz --root {base}/new", 2, "ends early"),
    ("npz-not-zip", "import npz --from {base}/list.yaml --root {base}/new", 2, "not an .npz file"),
    ("cifar-no-data", "import cifar10 --from {base}/nodata.tar.gz --root {base}/new", 2, "lacks 'data'"),
    ("cifar-object-labels", "import cifar10 --from {base}/objlabels.tar.gz --root {base}/new", 2, "labels are object"),
    ("cifar-float-labels", "import cifar10 --from {base}/floatlabels.tar.gz --root {base}/new", 2,
     "labels are float64"),
    ("npz-zero-size-images", "import npz --from {base}/empty-images.npz --root {base}/new", 2, "at least 1x1"),
    ("npz-zero-size-npy", "import npz --from {base}/empty-images.npz --format npy --root {base}/new", 2,
     "at least 1x1"),
    ("cifar-float-data", "import cifar10 --from {base}/floatdata.tar.gz --root {base}/new", 2, "'data' is float64"),
    ("cifar-uint16-data", "import cifar10 --from {base}/widedata.tar.gz --root {base}/new", 2, "'data' is uint16"),
    ("folder-16-bit", "import folder --from {base}/sixteen --root {base}/new", 2, "mode I;16 is not 8 bits"),
    ("folder-bomb", "import folder --from {base}/bomb --root {base}/new", 2, "too large to decode safely"),
    ("folder-empty-class", "import folder --from {base}/classes --root {base}/new", 2, "class folder b holds no"),
    ("unknown-importer", "import imagenet21k --root {base}/new", 2, "unknown importer"),
    ("npz-from-folder", "import npz --from {base}/classes --root {base}/new", 2, "import npz reads a file"),
    ("generated-not-npz", "import cifar10 --generated --from {base}/nodata.tar.gz --root {base}/new", 2,
     "--generated applies to import npz"),
    ("cifar-two-from", "import cifar10 --from {base}/nodata.tar.gz --from {base}/objlabels.tar.gz --root {base}/new", 2,
     "import cifar10 reads one --from file, got 2"),
    ("npz-second-shape", "import npz --generated --from {base}/gen8.npz --from {base}/gen4.npz --root {base}/new", 2,
     "gen4.npz: images are 3x4x4, but"),
    ("npz-same-file-twice", "import npz --generated --from {base}/gen8.npz --from {base}/gen8.npz --root {base}/new", 2,
     "given twice"),
    # generate: a plan is arithmetic, absurd N refused
    ("generate-1e30", "generate --n 1e30 --dry-run --root {ws}", 2, "the most a set can hold"),
    ("generate-zero", "generate --n 0 --dry-run --root {ws}", 2, "invalid count"),
    ("generate-words", "generate --n lots --dry-run --root {ws}", 2, "invalid count"),
    ("generate-escape", "generate --name ../escape --dry-run --root {ws}", 2, "invalid set name"),
    # sweep: axes are checked before any work
    ("sweep-no-equals", "sweep frob --root {ws}", 2, "write KEY=V1,V2"),
    ("sweep-unknown-key", "sweep train.nokey=1 --root {ws}", 2, "unknown configuration key 'train.nokey'"),
    ("sweep-bad-value", "sweep train.dra_lambda=a,b --root {ws}", 2, "must be number, got 'a'"),
    ("sweep-list-value", ["sweep", "features.timesteps=[25,100]", "--root", "{ws}"], 2, "'[25' is not a plain value"),
    ("sweep-broken-yaml", ["sweep", "train.dra_lambda=[0", "--root", "{ws}"], 2, "'[0' is not a plain value"),
    ("sweep-yaml-alias", ["sweep", "train.arch=*x", "--root", "{ws}"], 2, "'*x' is not a plain value"),
    ("sweep-twice", "sweep train.dra_lambda=1 train.dra_lambda=2 --root {ws}", 2, "is given twice"),
    ("sweep-root-axis", "sweep root=/tmp/elsewhere --root {ws}", 2, "a sweep runs in one workspace"),
    ("sweep-seeds", "sweep train.dra_lambda=1 --seeds x --root {ws}", 2, "--seeds must be comma-separated"),
    ("sweep-escape", "sweep train.dra_lambda=1 --name ../x --root {ws}", 2, "invalid sweep name"),
    # verify, ls: damaged records are data errors
    ("verify-negative", "verify --recompute -1 --root {ws}", 2, "--recompute -1"),
    ("verify-unknown", "verify nosuch --root {ws}", 2, "no image or feature set named 'nosuch'"),
    ("ls-dataset-not-utf8", "ls --root {base}/dmg-utf8", 1, "damaged set(s) (digits-test)"),
    ("verify-dataset-not-utf8", "verify --root {base}/dmg-utf8", 1, "1 problem(s) found"),
    ("verify-dataset-shape", "verify --root {base}/dmg-shape", 1, "1 problem(s) found"),
    ("ls-meta-shape", "ls --root {base}/dmg-meta", 1, "damaged set(s) (abc)"),
    ("verify-meta-not-utf8", "verify --root {base}/dmg-meta", 1, "1 problem(s) found"),
    # bench: sizes must be positive
    ("bench-generate-n0", "bench generate --n 0 --root {ws}", 2, "bench --n 0"),
    ("bench-samples-0", "bench stores --samples 0 --root {ws}", 2, "bench --samples 0"),
    ("bench-samples-neg", "bench stores --samples -5 --root {ws}", 2, "bench --samples -5"),
    ("bench-batch-0", "bench stores --batch 0 --root {ws}", 2, "bench --batch 0"),
    ("bench-foreign-dir", "bench stores --samples 10 --dir {base}/classes --root {ws}", 2, "not a bench folder"),
    ("bench-unknown", "bench frob --root {ws}", 2, "unknown benchmark"),
    # run names and set names stay inside the workspace
    ("train-escape", "train --name ../escape --dry-run --root {ws}", 2, "invalid run name '../escape'"),
    ("train-slash", "train --name a/b --dry-run --root {ws}", 2, "invalid run name 'a/b'"),
    ("select-escape", "select digits-train --scorer tiny --out ../escape --root {ws}", 2,
     "invalid set name '../escape'"),
    ("select-junk-scorer", "select digits-train --scorer {base}/junk.pt --root {ws}", 2, "not a readable classifier"),
    # eval: weights chosen explicitly, outputs checked before the work, damaged run files are data errors
    ("eval-best-missing", "eval tiny --weights best --no-autoattack --root {ws}", 2, "has no best.pt"),
    ("eval-out-no-folder", "eval tiny --out {base}/nofolder/e.json --no-autoattack --root {ws}", 2, "does not exist"),
    ("eval-out-proc", "eval tiny --out /proc/e.json --no-autoattack --root {ws}", 2, "cannot write /proc/e.json"),
    ("eval-out-folder", "eval tiny --out {base} --no-autoattack --root {ws}", 2, "it is a folder"),
    ("eval-junk-model", "eval --model {base}/junk.pt --no-autoattack --root {ws}", 2, "not a readable classifier"),
    ("eval-garbage-best", "eval garbage-best --no-autoattack --root {ws}", 1, "is damaged"),
    ("eval-cut-final", "eval cut-final --weights final --no-autoattack --root {ws}", 1, "is damaged"),
    ("eval-no-run", "eval nosuch --root {ws}", 2, "no run nosuch"),
    ("eval-run-and-model", "eval tiny --model {base}/junk.pt --root {ws}", 2, "one of them"),
    # export, report
    ("export-best-missing", "export tiny --weights best --out {base}/x.pt --root {ws}", 2, "has no best.pt"),
    ("export-garbage-best", "export garbage-best --out {base}/x.pt --root {ws}", 1, "is damaged"),
    ("export-no-folder", "export tiny --out {base}/nofolder/x.pt --root {ws}", 2, "does not exist"),
    ("report-garbage-best", "report garbage-best --out {base}/rep --root {ws}", 1, "is damaged"),
    ("report-bad-metrics", "report bad-metrics --out {base}/rep --root {ws}", 1, "line 4 is not a JSON object"),
    ("report-out-proc", "report tiny --out /proc/rep --root {ws}", 2, "report folder /proc/rep is not writable"),
    ("report-no-run", "report nosuch --root {ws}", 2, "no run nosuch"),
    # diffusion models: the workspace's own fitted model is stored data, a file given by path is input
    ("model-fitted-truncated", "model info --root {fit}", 1, "model.safetensors: weights unreadable"),
    ("model-fitted-flipped", "model info --root {flip}", 1, "do not match the recorded fingerprint"),
    ("model-given-truncated", "model info --model dra:{base}/given-model --root {fit}", 2, "weights unreadable"),
    ("diffusers-no-weights", "model info --model diffusers:{base}/unet --root {ws}", 2, "it has no weights"),
    ("model-bad-spec", "model info --model frob --root {ws}", 2, "not understood"),
    ("generate-fitted-truncated", "generate --n 100 --root {fit}", 1, "weights unreadable"),
    # run files the pipeline wrote: damaged is exit 1
    ("report-cut-final", "report cut-final --out {base}/rep --root {ws}", 1, "final.pt: unreadable"),
    ("report-eval-json", "report bad-eval --out {base}/rep --root {ws}", 1, "eval.json: unreadable"),
    ("report-config-yaml", "report bad-config --out {base}/rep --root {ws}", 1, "config.yaml: unreadable"),
    ("train-run-json", "train --name bad-record --config {base}/real-only.yaml --root {ws}", 1,
     "run.json: not valid JSON"),
    # the other stages
    ("fit-no-images", "fit-diffusion --images nosuch --root {ws}", 2, "nosuch"),
    ("fit-empty-levels", "fit-diffusion --config {base}/no-levels.yaml --root {ws}", 2, "needs at least 1 item"),
    ("fit-too-many-levels", "fit-diffusion --config {base}/six-levels.yaml --root {ws}", 2, "cannot be halved 5 times"),
    ("extract-timestep", "extract-features --timestep 5000 --root {ws}", 2, "5000"),
    ("run-bad-seeds", "run --seeds a,b --root {ws}", 2, "seeds"),
]



@pytest.mark.parametrize("argv, code, fragment", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_gets_one_line(cli, bad, tmp_path, argv, code, fragment):
    check_one_line(cli, bad, tmp_path, argv, code, fragment)


def test_fallback_to_final_is_said_and_recorded(cli, bad, tmp_path):
    """eval.weights best (the default) on a run without best.pt: one note, and eval.json says which weights."""
    out_file = tmp_path / "e.json"
    code, out, err = cli("eval", "tiny", "--no-autoattack", "--n", "8", "--pgd-steps", "1", "--out", out_file,
                         "--root", bad["ws"])
    assert code == 0 and err == ""
    assert "note: run tiny has no best.pt" in out and "using final.pt" in out
    assert json.loads(out_file.read_text())["weights"] == "final"
    code, out, err = cli("report", "tiny", "--rank-n", "16", "--out", tmp_path / "rep", "--root", bad["ws"])
    assert code == 0 and err == "" and "note: run tiny has no best.pt" in out


def test_help_keeps_placeholders(cli):
    """Help is markdown, where `<root>` would be an HTML tag and vanish."""
    code, out, _ = cli("eval", "--help")
    assert code == 0 and "<root>/runs" in out


def test_huge_plans_are_arithmetic():
    from pipeline.config import parse_count
    from stores.errors import UserError
    from stores.images import ShardPlans, plan_shards
    assert parse_count("20M") == 20_000_000 and parse_count("10G") == 10 ** 10
    with pytest.raises(UserError, match="sample ids have 10 digits"):
        parse_count("10.5G")
    plans = plan_shards(10 ** 10, 1)
    assert len(plans) == 10 ** 10 and plans[-1].first_id == 10 ** 10 - 1
    left = ShardPlans(25, 10, done=[1])
    assert [(p.index, p.first_id, p.count) for p in left] == [(0, 0, 10), (2, 20, 5)]
    assert len(left) == 2 and left[1].index == 2 and left.samples == 15


def test_recompute_caps_k_at_the_cached_samples(tiny_model_dir, tmp_path):
    """verify --recompute K with K far above the set size checks every cached sample once, and returns."""
    from trainsets import image_set

    from stages.extract import NoiseLevel, compute_targets, recompute_deviation
    from stages.models import load_model
    from stores.features import FeatureSet, FeatureSetWriter, write_feature_shard
    from stores.views import ViewSpec
    net = load_model(f"dra:{tiny_model_dir}")
    images = image_set(tmp_path, "t-train", "real", 20, 8)
    identity = {"image_set": images.fingerprint, "image_set_name": images.name, "model": "tiny", "timestep": 100,
                "layer": "dec.4x4_in1", "sigma": 0.5, "noise_seed": 0, "pool": "none",
                "views": ViewSpec(1, 0, False).identity()}
    shards = [images.read_shard(p.index) for p in images.plan()]
    targets = [compute_targets(net, s.ids, s.images, s.labels, "dec.4x4_in1", NoiseLevel(0.5, 100), 0, "none",
                               ViewSpec(1, 0, False), images.fingerprint)[:, 0] for s in shards]
    writer = FeatureSetWriter(tmp_path, identity, images.n, images.shard_size, targets[0].shape[1:], 1)
    writer.begin()
    for p, s, t in zip(images.plan(), shards, targets):
        writer.record(write_feature_shard(writer.path, p.index, p.first_id, s.ids, t.astype(np.float16)))
    result = recompute_deviation(net, images, FeatureSet(writer.path), 10 ** 9)
    assert result["samples"] == images.n and result["max_rel"] < 1e-2


def test_half_built_bench_folder_is_rebuilt(cli, tmp_path):
    """A bench stores build that died midway (no ready stamp) does not block the next one, of any size."""
    work = tmp_path / "bench"
    code, _, err = cli("bench", "stores", "--samples", "7", "--warm-only", "--workers", "0", "--dir", work)
    assert code == 0, err
    (work / "ready-7").unlink()
    code, out, err = cli("bench", "stores", "--samples", "9", "--warm-only", "--workers", "0", "--dir", work)
    assert code == 0 and err == "" and (work / "ready-9").exists() and not (work / "ready-7").exists(), err
