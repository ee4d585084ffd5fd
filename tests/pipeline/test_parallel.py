"""Jobs side by side (run.parallel): each child's lines reach the parent prefixed and in order, the cores are split,
errors keep their kind, and the eval stage writes the same eval.json side by side as one run after the other.

The job functions below are module-level so that the spawned children can unpickle them."""
from __future__ import annotations

import json
import os

import pytest
from evalruns import make_workspace

from pipeline.config import load_config
from pipeline.parallel import Job, JobFailed, cpu_cores, parallel_slots, run_jobs
from stores.errors import IntegrityError, UserError


def say(word: str, count: int) -> None:
    import torch
    for i in range(count):
        print(f"{word} {i}")
    print(f"cores {len(os.sched_getaffinity(0))} threads {torch.get_num_threads()}")


def say_long(width: int) -> None:
    from pipeline.console import console
    console.print("word " * width, highlight=False)


def refuse() -> None:
    raise UserError("no such flag; pass --n")


def damaged() -> None:
    raise IntegrityError("shard 3 fails its crc32c")


def crash() -> None:
    raise ZeroDivisionError("boom")


def die() -> None:
    os._exit(3)


def collect(jobs: list[Job], slots: int = 2) -> list[tuple[str, bool]]:
    lines: list[tuple[str, bool]] = []
    run_jobs(jobs, slots, lambda line, err: lines.append((line, err)))
    return lines


@pytest.mark.skipif(cpu_cores() < 2, reason="needs two cores to run two jobs at once")
def test_lines_come_prefixed_in_order_and_cores_are_split():
    lines = collect([Job("a", say, ("alpha", 3)), Job("b", say, ("beta", 2))])
    a = [text for text, _ in lines if text.startswith("[a] ")]
    b = [text for text, _ in lines if text.startswith("[b] ")]
    share = cpu_cores() // 2
    assert a == ["[a] alpha 0", "[a] alpha 1", "[a] alpha 2", f"[a] cores {share} threads {share}"]
    assert b == ["[b] beta 0", "[b] beta 1", f"[b] cores {share} threads {share}"]
    assert len(lines) == len(a) + len(b) and not any(err for _, err in lines)


def test_a_long_console_line_stays_one_line():
    lines = collect([Job("a", say_long, (60,))], slots=2)
    assert [text.rstrip() for text, _ in lines] == ["[a] " + ("word " * 60).rstrip()]


def test_bad_input_and_damaged_data_keep_their_kind():
    with pytest.raises(UserError, match="no such flag; pass --n"):
        collect([Job("a", refuse, ()), Job("b", say, ("x", 1))])
    with pytest.raises(IntegrityError, match="crc32c"):
        collect([Job("a", damaged, ()), Job("b", say, ("x", 1))])


def test_an_unexpected_error_names_the_job_and_sends_its_traceback():
    lines: list[tuple[str, bool]] = []
    with pytest.raises(JobFailed, match="job boom failed: ZeroDivisionError: boom"):
        run_jobs([Job("boom", crash, ()), Job("b", say, ("x", 1))], 2, lambda line, err: lines.append((line, err)))
    assert ("[boom] Traceback (most recent call last):", True) in lines


def test_a_job_that_dies_is_reported_not_waited_for():
    with pytest.raises(JobFailed, match=r"job gone died \(exit code 3\)"):
        collect([Job("gone", die, ()), Job("b", say, ("x", 1))])


def test_slots_only_on_the_cpu_when_enabled():
    assert parallel_slots(2, False, True) == 1
    assert parallel_slots(2, True, False) == 1
    assert parallel_slots(1, True, True) == 1
    assert parallel_slots(5, True, True) == min(5, cpu_cores())


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "created" and "second" not in k}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_eval_stage_side_by_side_equals_one_after_the_other(tmp_path, capsys):
    from pipeline.run import _stage_eval
    ws = make_workspace(tmp_path)
    runs = {"tiny-dra": ws["dra"], "tiny-big-eps": ws["big"]}
    results = {}
    for parallel in (False, True):
        for run in runs.values():
            (run.path / "eval.json").unlink(missing_ok=True)
        cfg = load_config(None, {"root": str(tmp_path), "eval.n": 24, "eval.autoattack": False, "eval.rank_n": 24,
                                 "run.parallel": parallel})
        _stage_eval(cfg, list(runs))
        results[parallel] = {name: _without_times(json.loads((run.path / "eval.json").read_text()))
                             for name, run in runs.items()}
    out = capsys.readouterr().out
    assert results[True] == results[False]
    assert results[True]["tiny-dra"] != results[True]["tiny-big-eps"]
    if cpu_cores() >= 2:
        assert "evaluating 2 runs side by side" in out
        assert any(line.startswith("[tiny-dra] ") for line in out.splitlines())
        assert any(line.startswith("[tiny-big-eps] ") for line in out.splitlines())


def sleeper(marker: str) -> None:
    import time
    from pathlib import Path
    print("started", flush=True)
    try:
        time.sleep(60)
    finally:
        Path(marker).write_text("unwound")


@pytest.mark.skipif(cpu_cores() < 2, reason="needs two cores to run two jobs at once")
def test_ctrl_c_stops_every_job_cleanly(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it): the children ignore it, the parent stops them
    with SIGTERM, which unwinds each like a KeyboardInterrupt (its finally blocks run), and nothing is left."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    markers = [tmp_path / "a", tmp_path / "b"]
    script = ("import sys; sys.path[:0] = sys.argv[1].split(':'); from test_parallel import sleeper; "
              "from pipeline.parallel import Job, run_jobs; "
              "run_jobs([Job('a', sleeper, (sys.argv[2],)), Job('b', sleeper, (sys.argv[3],))], 2, "
              "lambda line, err: print(line, flush=True))")
    process = subprocess.Popen([sys.executable, "-c", script, f"{Path(__file__).parent}:{Path(__file__).parents[1]}",
                                *map(str, markers)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), os.setpgrp()))
    started = {process.stdout.readline().strip() for _ in range(2)}
    assert started == {"[a] started", "[b] started"}
    os.killpg(process.pid, signal.SIGINT)
    begun = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert process.returncode != 0 and time.monotonic() - begun < 20
    assert all(m.read_text() == "unwound" for m in markers)
    assert "KeyboardInterrupt" in err and "leaked" not in err
