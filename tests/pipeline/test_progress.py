"""Progress on long work reaches a log file too: plain lines where stderr is not a terminal, a bar where it is."""
from __future__ import annotations

import io

from conftest import FakeClock
from rich.console import Console

from pipeline import progress
from pipeline.progress import RateBar


def test_a_log_gets_a_line_every_interval_with_count_rate_and_time_left(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress, "time", clock)
    text = io.StringIO()
    bar = RateBar("fit-diffusion", "images", total=1000, console=Console(file=text, width=200))
    for _ in range(10):                       # 100 images per 10 s: a line at 30, 60 and 90 s
        clock.now += 10
        bar.advance(100, "loss 0.0500")
    bar.close()
    lines = text.getvalue().splitlines()
    assert lines == [f"fit-diffusion: {n:,}/1,000 images, 10 images/s, about {(1000 - n) / 10 / 60:.1f} min left, "
                     f"loss 0.0500" for n in (300, 600, 900)]


def test_a_terminal_gets_the_bar_and_no_plain_lines(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress, "time", clock)
    text = io.StringIO()
    bar = RateBar("generate", "images", total=10, console=Console(file=text, width=200, force_terminal=True))
    clock.now += 60
    bar.advance(5)
    assert bar._bar is not None and "generate: 5/10 images" not in text.getvalue()
    bar.close()


def test_shard_progress_says_what_is_kept_once_on_ctrl_c(monkeypatch, capsys):
    """The one shard-progress loop (generate, extract-features, repair): the bar follows the runner's progress,
    the caller's hook sees it too, and Ctrl-C gives one `interrupted:` line built when it happens."""
    import pytest

    from pipeline import console
    from pipeline.shards import progress as shard_progress
    from pipeline.shards.runner import Progress
    from stores.manifest import ShardJob
    monkeypatch.setattr(console, "_interrupt_reported", False)
    done, seen, asked = [0], [], []

    def runner(jobs, factory, actors, *, max_attempts, record, on_progress, on_event, poll_seconds):
        assert poll_seconds == 0.01 and max_attempts == 3
        done[0] = 7
        on_progress(Progress(shards_done=0, shards_total=2, items_done=7, items_total=16, workers=[]))
        raise KeyboardInterrupt
    monkeypatch.setattr(shard_progress, "run_shards", runner)

    def kept() -> str:
        asked.append(done[0])
        return f"{done[0]} images are kept"
    with pytest.raises(KeyboardInterrupt):
        shard_progress.run_with_progress("generate", "images", [ShardJob(0, 0, 8), ShardJob(1, 8, 8)], None, None,
                                         3, lambda job, result: None, seen.append, 0.01, kept=kept)
    assert [p.items_done for p in seen] == [7] and asked == [7] and console.interrupt_reported()
    assert capsys.readouterr().err.splitlines() == ["interrupted: 7 images are kept"]
