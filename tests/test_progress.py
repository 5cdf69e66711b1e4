"""Live progress: the rich table on a terminal, log lines elsewhere, the monitor thread."""

from __future__ import annotations

import io
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

import conveyor as cv
from conveyor.engine import Run
from conveyor.metrics import StageStats
from conveyor.progress import LiveDisplay, LogDisplay, Monitor, source_length
from test_metrics import slow_middle, stats
from test_pipeline_helpers import WAIT, conveyor_log, must_wait, no_thread_left  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_thread_left")

SRC = Path(__file__).resolve().parent.parent / "src"


def run_in_pty(
    argv: Sequence[str], cwd: Path, timeout: float = 30.0, columns: int = 150
) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its stdin, stdout and stderr.

    Returns the exit code and everything it wrote (escape codes included).
    Reads until the child closes the terminal, within ``timeout`` seconds.
    """
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns)}
    for name in ("NO_COLOR", "TTY_COMPATIBLE", "FORCE_COLOR"):
        env.pop(name, None)
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def started_run(pipeline: cv.Pipeline[int]) -> Run:
    """A run of ``pipeline`` started directly on the engine (to attach a custom monitor)."""
    run = Run(pipeline.source, list(pipeline.stages))
    run.start()
    return run


def drain(run: Run) -> None:
    for _ in run.outputs():
        pass


class LineCatcher(logging.Handler):
    """Collects the 'conveyor' logger's records; signals when ``wanted`` have arrived."""

    def __init__(self, wanted: int) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.enough = threading.Event()
        self._wanted = wanted

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if len(self.messages) >= self._wanted:
            self.enough.set()


@pytest.fixture
def lines() -> Iterator[LineCatcher]:
    catcher = LineCatcher(wanted=2)
    with conveyor_log(catcher):
        yield catcher


# ---------------------------------------------------------------------- not a terminal


def test_progress_off_a_terminal_logs_a_final_line_through_the_conveyor_logger(
    lines: LineCatcher, capsys: pytest.CaptureFixture[str]
) -> None:
    slow_middle(30).run(progress=True)
    (last,) = [m for m in lines.messages if m.endswith("(done)")]
    for name in ("read 30 in", "parse 30 in", "write 30 in", "30/30 items in (100%)"):
        assert name in last
    assert capsys.readouterr().out == ""  # library code never prints


def test_progress_off_a_terminal_logs_a_line_every_interval(lines: LineCatcher) -> None:
    gate = threading.Event()

    def held(x: int) -> int:
        must_wait(gate)
        return x

    run = started_run(cv.Pipeline(range(5)).map(held, name="held"))
    monitor = Monitor(run, LogDisplay(total=5, interval=0.02), tick=0.01)
    monitor.begin()
    try:
        must_wait(lines.enough)  # two periodic lines while the stage is held
    finally:
        gate.set()
        drain(run)
        monitor.close()
    assert all("held 0 in" in m for m in lines.messages[:2])
    assert "0/5 items in (0%)" in lines.messages[0]
    assert lines.messages[-1].endswith("(done)")


def test_progress_lines_count_the_failed_and_retried_items_of_the_stages_that_have_some(
    lines: LineCatcher,
) -> None:
    # The repro: 3 of 10 items skipped with on_error="skip" (and retried first), and
    # the progress lines said "check 10 in, ..." with no word of a failure.
    tried: dict[int, int] = {}

    def check(x: int) -> int:
        tried[x] = tried.get(x, 0) + 1
        if x % 4 == 1:
            raise ValueError(f"bad item {x}")
        return x

    pipeline = (
        cv.Pipeline(range(10))
        .map(check, retries=1, backoff=cv.Backoff(initial=0.001), on_error="skip")
        .map(str, name="show")
    )
    result = pipeline.run(progress=True)
    assert len(result.failures) == 3
    (last,) = [m for m in lines.messages if m.endswith("(done)")]
    check_part, show_part = last.split(" | ")[:2]
    # The report's names: `failed` (skipped items too), `retried` (extra calls).
    assert check_part.startswith("conveyor: ") and "check 10 in, 3 failed, 3 retried, " in last
    assert "failed" not in show_part and "retried" not in show_part  # only when non-zero


class BrokenDisplay:
    """A display whose drawing fails, as a closed terminal would."""

    def __init__(self) -> None:
        self.failed = threading.Event()

    def update(self, stats: Sequence[StageStats], elapsed: float) -> None:
        self.failed.set()
        raise OSError("terminal gone")

    def close(self, stats: Sequence[StageStats], elapsed: float) -> None:
        raise AssertionError("a display that failed is not used again")


def test_a_failing_display_is_turned_off_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()

    def held(x: int) -> int:
        must_wait(gate)
        return x

    run = started_run(cv.Pipeline(range(5)).map(held, name="held"))
    display = BrokenDisplay()
    monitor = Monitor(run, display, tick=0.01)
    monitor.begin()
    must_wait(display.failed)
    gate.set()
    drain(run)
    monitor.close()
    assert run.result().stats[0].items_in == 5
    assert "the progress display failed; it is turned off" in caplog.text


# ---------------------------------------------------------------------- the live table


def test_the_live_table_shows_every_stage_and_the_total() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, color_system=None)
    p = slow_middle(150)  # about 0.3 s: long enough for parse to be busy most of the run
    run = started_run(p)
    monitor = Monitor.start(run, source=p.source, progress=True, console=console)
    drain(run)
    monitor.close()
    text = out.getvalue()
    for word in ("stage", "workers", "items/s", "busy", "queue", "read", "parse", "write"):
        assert word in text
    assert "150/150 items in (100%)" in text
    assert "bottleneck: parse" in text


@pytest.mark.quick
def test_a_stage_name_utf8_cannot_encode_is_escaped_before_the_live_table_is_laid_out() -> None:
    # The repro: the name was measured, then escaped on output, pushing its row askew.
    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    display = LiveDisplay(console, total=100)
    try:
        rows = [stats("read \udcff", items_in=25), stats("write", items_in=5)]
        rendered = Console(file=io.StringIO(), width=140, record=True)
        rendered.print(display.render(rows, 5.0))
        lines = rendered.export_text().splitlines()[1:4]  # the header and a row per stage
    finally:
        display.close([], 5.0)
    assert lines[1].startswith("read \\udcff  ")
    assert len(lines[1].rstrip()) == len(lines[2].rstrip())
    assert lines[0].index("workers") + len("workers") == lines[1].index(" 1 ") + 2


@pytest.mark.quick
def test_the_total_gives_an_eta_from_the_first_stages_recent_rate() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    display = LiveDisplay(console, total=100)
    try:
        first = replace(stats("read", items_in=25, rate_now=5.0), elapsed_seconds=5.0)
        rendered = Console(file=io.StringIO(), width=140, record=True)
        rendered.print(display.render([first], 5.0))
        text = rendered.export_text()
    finally:
        display.close([], 5.0)
    assert "25/100 items in (25%), ETA 15 s" in text
    assert "5.0 s elapsed" in text


@pytest.mark.quick
def test_without_a_known_length_the_total_is_a_count() -> None:
    line = LogDisplay.line([stats("read", items_in=7)], None, 1.0)
    assert line.endswith("| 7 items in")


@pytest.mark.quick
def test_the_source_length_comes_from_len_or_a_length_hint() -> None:
    class Broken:
        def __len__(self) -> int:
            raise RuntimeError("no")

        def __iter__(self) -> Iterator[int]:
            return iter(())

    assert source_length([1, 2, 3]) == 3
    assert source_length(range(10)) == 10
    assert source_length(iter(range(10))) == 10
    assert source_length(x for x in range(10)) is None
    assert source_length(Broken()) is None


def test_run_with_progress_draws_a_live_table_on_a_real_terminal(tmp_path: Path) -> None:
    script = tmp_path / "live.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(SRC)!r})\n"
        "import conveyor as cv\n"
        "def slow(x):\n"
        "    time.sleep(0.002)\n"
        "    return x\n"
        "p = cv.Pipeline(range(300)).map(slow, name='fetch').map(abs, name='store')\n"
        "p.run(progress=True)\n"
    )
    code, out = run_in_pty([sys.executable, str(script)], tmp_path, timeout=WAIT * 3)
    assert code == 0, out
    assert "\x1b[?25l" in out  # rich hid the cursor: a live display, not log lines
    assert "fetch" in out and "store" in out
    assert "stage  workers" in out and "300/300 items in (100%)" in out
