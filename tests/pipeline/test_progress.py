"""Progress on long work reaches a log file too: plain lines where stderr is not a terminal, a bar where it is."""
from __future__ import annotations

import io

from rich.console import Console

from conftest import FakeClock
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
