"""``conveyor demo``: the producer-consumer lesson over one bounded Channel."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest
from rich.console import Console

from conveyor import demo

pytestmark = [pytest.mark.quick, pytest.mark.timeout(60)]


def test_conveyor_demo_exits_0_and_shows_the_check_quickly() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", "demo"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert demo.CHECK_OK in result.stdout
    assert "MISMATCH" not in result.stdout
    for name in ("producer 1", "producer 3", "consumer 2", "Channel statistics"):
        assert name in result.stdout
    assert took < 5.0, f"the demo took {took:.1f} s"


def test_channel_demo_moves_every_number_through_a_closed_channel() -> None:
    out = io.StringIO()
    result = demo.channel_demo(Console(file=out, width=120), seed=1)
    assert result.ok
    assert result.produced == result.consumed == demo.PRODUCERS * demo.NUMBERS_PER_PRODUCER
    stats = result.stats
    assert stats.capacity == demo.CAPACITY
    assert stats.closed
    assert stats.total_put == stats.total_got == result.produced
    assert (stats.size, stats.open_producers) == (0, 0)
    assert demo.CHECK_OK in out.getvalue()


def test_the_demo_reports_a_mismatch_and_returns_1(monkeypatch: pytest.MonkeyPatch) -> None:
    consume = demo._consume

    def lossy_consume(channel: demo.Channel[int], side: demo._Side, rng: object) -> None:
        consume(channel, side, rng)  # type: ignore[arg-type]
        if side.numbers:
            side.numbers.pop()  # "lose" one number

    monkeypatch.setattr(demo, "_consume", lossy_consume)
    out = io.StringIO()
    monkeypatch.setattr(demo, "Console", lambda: Console(file=out, width=120))
    assert demo.run_demo() == 1
    assert "MISMATCH" in out.getvalue()
    assert demo.CHECK_OK not in out.getvalue()
