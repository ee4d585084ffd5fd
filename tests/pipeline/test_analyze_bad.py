"""`dra-pipe analyze` on bad input: one line, exit 2 (1 for damaged stored data), nothing written (the rows run
through the real CLI against a copy of the shared bad-input workspace, as tests/pipeline/test_bad_values.py)."""
from __future__ import annotations

import json
import shutil

import pytest
from badinputs import check_one_line

ROWS = [
    ("no-eval-json", "analyze tiny --root {base}/an-ws", 2,
     "run tiny has no eval.json: the teacher probe attacks with the run's evaluation PGD"),
    ("unknown-measure", "analyze tiny --measures rank,bogus --root {base}/an-ws", 2,
     "'analyze.measures': 'bogus' is not one of teacher-probe, cka, rank"),
    ("timestep-over", "analyze tiny --timestep 1000 --root {base}/an-ws", 2,
     "'analyze.timesteps' items must be <= 999"),
    ("timestep-negative", "analyze tiny --timestep -1 --measures rank --root {base}/an-ws", 2,
     "'analyze.timesteps' items must be >= 0"),
    ("features-of-another-set", "analyze tiny --measures cka --features {key} --root {base}/an-ws", 2,
     "was computed from image set digits-test"),
    ("features-unknown", "analyze tiny --measures cka --features 0123456789abcdef --root {base}/an-ws", 2,
     "no feature set 0123456789abcdef"),
    ("cka-without-teacher", "analyze tiny --measures cka --root {base}/an-ws", 2,
     "no teacher feature set of digits-train to measure CKA against"),
    ("unknown-run", "analyze nosuch --measures rank --root {base}/an-ws", 2, "no run nosuch under"),
    ("damaged-analysis", "analyze bad-analysis --measures rank --root {base}/an-ws", 1,
     "analysis.json: not an analysis record (damaged)"),
]


@pytest.fixture(scope="module")
def an_bad(bad):
    """The bad-input workspace's digits sets and its finished run `tiny` (no eval.json), a feature set of the test
    images, and a run whose analysis.json is damaged."""
    from trainsets import feature_set

    from stores.images import ImageSet
    ws = bad["base"] / "an-ws"
    if not ws.exists():
        shutil.copytree(bad["ws"] / "images", ws / "images")
        shutil.copytree(bad["ws"] / "runs" / "tiny", ws / "runs" / "tiny")
        shutil.copytree(bad["ws"] / "runs" / "tiny", ws / "runs" / "bad-analysis")
        (ws / "runs" / "bad-analysis" / "analysis.json").write_text('{"format": "something else"}')
        feature_set(ws, ImageSet.open(ws, "digits-test"), shape=(4, 4, 4))
    key = next((ws / "features").iterdir()).name
    return {**bad, "key": key}


@pytest.mark.parametrize("argv, code, fragment", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_analyze_input_gets_one_line(cli, an_bad, tmp_path, argv, code, fragment):
    check_one_line(cli, an_bad, tmp_path, argv, code, fragment)


def test_the_run_stage_leaves_out_what_it_cannot_measure(an_bad, tmp_path, capsys, one_thread):
    """`dra-pipe run`'s analyze stage (not strict): a run without eval.json and a workspace without a teacher feature
    set get the other measures, and a note for each left out; the command refuses the same in one line."""
    from pipeline.analyze import run_analyze
    from pipeline.config import load_config
    ws = tmp_path / "ws"
    shutil.copytree(an_bad["base"] / "an-ws" / "images", ws / "images")
    shutil.copytree(an_bad["base"] / "an-ws" / "runs" / "tiny", ws / "runs" / "tiny")
    cfg = load_config(None, {"root": str(ws), "analyze.n_train": 256, "analyze.sae_epochs": 2,
                             "analyze.probe_epochs": 2})
    run_analyze(cfg, ["tiny"], strict=False)
    out = capsys.readouterr().out
    assert "note: teacher-probe skipped: run tiny has no eval.json" in out and "note: cka skipped" in out
    entries = json.loads((ws / "runs" / "tiny" / "analysis.json").read_bytes())["entries"]
    assert sorted(entries) == ["align-uniform", "dimension", "rank", "sae", "saliency"]
    assert not any(p.name.startswith("clean-") for p in (ws / "runs").iterdir())
