"""Progress of runs driven through Redis: the displays of local runs, fed from Redis."""

from __future__ import annotations

import _thread
import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from rich.console import Console

import conveyor as cv
import conveyor.progress as progress_module
from conveyor.progress import LogDisplay
from conveyor.redis import DeadLettersError, RedisBackend
from conveyor.redis.status import ProgressWatcher
from redis_helpers import new_namespace, poisoned, three_stages, triple, wait_until
from test_pipeline_helpers import (  # noqa: F401 - no_thread_left is a fixture
    WAIT,
    conveyor_log,
    conveyor_threads,
    must_wait,
    no_thread_left,
)
from test_report import Page

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90), pytest.mark.usefixtures("no_thread_left")]


class Lines(logging.Handler):
    """Collects the messages of the ``conveyor`` logger and its children."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def final(self) -> str:
        """The one line that ends with "(done)"."""
        done = [m for m in self.messages if m.endswith("(done)")]
        assert len(done) == 1, f"not one final line in {self.messages}"
        return done[0]


@pytest.fixture
def lines() -> Iterator[Lines]:
    catcher = Lines()
    with conveyor_log(catcher):
        yield catcher


def progress_threads() -> list[str]:
    return [name for name in conveyor_threads() if name == "conveyor-redis-progress"]


def stage_counts(s: cv.StageStats) -> str:
    return f"{s.name} {s.items_in:,} in, {s.items_out:,} out, {s.failed:,} failed"


def test_progress_off_a_terminal_ends_with_a_line_naming_every_stage_with_its_counts(
    redis_server: RedisServer, lines: Lines, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = three_stages(3000)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    result = pipeline.run(backend=backend, progress=True)
    assert lines.messages[-1].endswith("(done)")
    last = lines.final()
    assert [s.name for s in result.stats] == ["triple", "keep", "spread"]
    assert result.stats[0].items_in == 3000
    for s in result.stats:
        assert stage_counts(s) in last
    assert "3,000/3,000 items in (100%)" in last
    assert capsys.readouterr().out == ""  # library code never prints
    assert conveyor_threads() == []


def quick_lines(source: object = None, console: Any = None, *, outcomes: bool = False) -> Any:
    """A log display that writes a line every 0.05 s, for tests that watch the lines come."""
    return LogDisplay(5, interval=0.05, outcomes=outcomes)


def test_log_lines_come_while_the_run_goes_on_with_what_is_pending(
    redis_server: RedisServer, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress_module, "new_display", quick_lines)
    gate = threading.Event()

    def held(x: int) -> int:
        must_wait(gate)
        return x

    pipeline = cv.Pipeline(range(5)).map(held, name="held").map(triple, name="after")
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    results: list[cv.RunResult] = []
    driver = threading.Thread(
        target=lambda: results.append(pipeline.run(backend=backend, progress=True))
    )
    driver.start()
    try:
        # Every item fed and none through: all five are pending at the first stage.
        wait_until(
            lambda: any(
                "held 0 in, 0 out, 0 failed" in m and "queue 5/" in m for m in lines.messages
            ),
            "a progress line while the stage holds its items",
        )
    finally:
        gate.set()
        driver.join(WAIT)
    assert not driver.is_alive()
    last = lines.final()
    assert "held 5 in, 5 out, 0 failed" in last
    assert "after 5 in, 5 out, 0 failed" in last
    assert "queue 0/" in last
    assert results[0].items_out == 5


def test_on_a_terminal_the_driver_draws_the_live_table_of_local_runs(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(
        progress_module,
        "Console",
        lambda **_: Console(file=screen, force_terminal=True, width=120),
    )
    pipeline = three_stages(500)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    pipeline.run(backend=backend, progress=True)
    table = screen.getvalue()
    for header in ("stage", "workers", "in", "out", "failed", "items/s", "busy", "queue"):
        assert header in table
    for name in ("triple", "keep", "spread"):
        assert name in table
    assert "500/500 items in (100%)" in table
    assert progress_threads() == []


def test_progress_on_a_run_stopped_by_dead_letters_ends_with_a_final_line(
    redis_server: RedisServer, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_TEST_FIXED", raising=False)
    pipeline = poisoned(50)
    namespace = new_namespace()
    backend = RedisBackend(
        redis_server.url,
        namespace=namespace,
        run_id="dead",
        visibility_timeout=0.2,
        max_deliveries=2,
        local_workers=True,
    )
    with pytest.raises(DeadLettersError):
        pipeline.run(backend=backend, progress=True)
    # The dead letter is counted as failed; the run stays in Redis, read once more.
    assert "fragile 50 in" not in lines.final()
    assert "fragile 49 in, 49 out, 1 failed" in lines.final()
    assert progress_threads() == []
    assert backend.cancel(pipeline, "dead")
    backend.close()


def test_progress_on_a_run_whose_source_fails_ends_cleanly(
    redis_server: RedisServer, lines: Lines
) -> None:
    def source() -> Iterator[int]:
        yield from range(10)
        raise OSError("the disk went away")

    pipeline = cv.Pipeline(source()).map(triple, name="tripled")
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    with pytest.raises(OSError, match="the disk went away"):
        pipeline.run(backend=backend, progress=True)
    assert "tripled" in lines.final()
    assert progress_threads() == []


def test_ctrl_c_during_a_run_with_progress_leaves_no_thread_behind(
    redis_server: RedisServer, lines: Lines
) -> None:
    interrupted = threading.Event()

    def interrupting(x: int) -> int:
        if x == 100 and not interrupted.is_set():
            interrupted.set()
            _thread.interrupt_main()  # what Ctrl-C does to the driver's thread
        return x

    pipeline = cv.Pipeline(range(1000)).map(interrupting, name="stopper")
    backend = RedisBackend(
        redis_server.url, namespace=new_namespace(), run_id="stopped", local_workers=True
    )
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(backend=backend, progress=True)
    assert "stopper" in lines.final()
    assert conveyor_threads() == []
    assert backend.cancel(pipeline, "stopped")  # the interrupted run was left to resume
    backend.close()


def test_a_watcher_that_cannot_read_redis_says_so_once_and_the_run_goes_on(
    redis_server: RedisServer, lines: Lines, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect = ProgressWatcher._connect
    attempts: list[int] = []
    recovered = threading.Event()

    def flaky_connect(self: ProgressWatcher) -> Any:
        attempts.append(1)
        if len(attempts) <= 3:
            raise redis.ConnectionError("Redis is away for a moment")
        recovered.set()
        return real_connect(self)

    monkeypatch.setattr(ProgressWatcher, "_connect", flaky_connect)

    def waits_for_the_watcher(x: int) -> int:
        must_wait(recovered)  # the run outlives the hiccup
        return x

    pipeline = cv.Pipeline(range(20)).map(waits_for_the_watcher, name="patient")
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    result = pipeline.run(backend=backend, progress=True, collect=True)
    assert result.outputs == list(range(20))
    warnings = [m for m in lines.messages if "could not read Redis" in m]
    assert len(warnings) == 1, lines.messages  # the messages say what happened, if not
    assert "Redis is away for a moment" in warnings[0]
    assert "patient 20 in, 20 out, 0 failed" in lines.final()


# ---------------------------------------------------------------------- HTML reports


def test_a_report_of_a_run_driven_through_redis_has_its_charts_and_stages(
    redis_server: RedisServer, lines: Lines, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(progress_module, "new_display", quick_lines)
    gate = threading.Event()

    def held(x: int) -> int:
        must_wait(gate)
        return x

    path = tmp_path / "redis.html"
    pipeline = cv.Pipeline(range(5)).map(held, name="held").map(triple, name="after")
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    driver = threading.Thread(
        target=lambda: pipeline.run(backend=backend, progress=True, report=path)
    )
    driver.start()
    try:
        # Each progress line follows a sample of the report's timeline.
        wait_until(lambda: sum("held" in m for m in lines.messages) >= 3, "three samples")
    finally:
        gate.set()
        driver.join(WAIT)
    assert not driver.is_alive()
    page = Page(path.read_text(encoding="utf-8"))
    assert page.count("svg") == 3  # throughput, queue fill, where the time went
    assert page.count("polyline") >= 2
    for text in ("held", "after", "Throughput per stage", "Stages", "No errors."):
        assert text in page.text


def test_a_report_alone_shows_no_progress_and_a_failed_run_reports_its_error(
    redis_server: RedisServer, lines: Lines, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CONVEYOR_TEST_FIXED", raising=False)
    path = tmp_path / "dead.html"
    backend = RedisBackend(
        redis_server.url,
        namespace=new_namespace(),
        run_id="dead-report",
        visibility_timeout=0.2,
        max_deliveries=2,
        local_workers=True,
    )
    pipeline = poisoned(20)
    with pytest.raises(DeadLettersError):
        pipeline.run(backend=backend, report=path)
    assert not [m for m in lines.messages if m.endswith("(done)")]  # no progress asked
    page = Page(path.read_text(encoding="utf-8"))
    assert "DeadLettersError" in page.text
    assert "fragile" in page.text
    assert backend.cancel(pipeline, "dead-report")
    backend.close()


def test_with_a_backend_a_bad_report_path_or_a_stall_timeout_is_refused_before_the_run(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    pipeline = three_stages(10)
    with pytest.raises(cv.ConfigurationError, match="'report'"):
        pipeline.run(backend=backend, report=tmp_path / "missing" / "r.html")
    with pytest.raises(cv.ConfigurationError, match="'stall_timeout' applies to runs in this"):
        pipeline.run(backend=backend, stall_timeout=5.0)
    backend.close()
    client = redis.Redis.from_url(redis_server.url)
    assert not client.keys(f"{backend.namespace}:*")  # nothing was started
    client.close()


# ---------------------------------------------------------------------- iterate()


def test_iterate_starts_local_workers_shows_progress_and_leaves_no_thread(
    redis_server: RedisServer, lines: Lines
) -> None:
    """Regression: iterate() did not start ``local_workers``, so it waited for ever."""
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    outputs = list(backend.iterate(cv.Pipeline(range(300)).map(triple, name="x3"), progress=True))
    assert outputs == [3 * x for x in range(300)]
    assert "x3 300 in, 300 out, 0 failed" in lines.final()
    assert conveyor_threads() == []


def test_leaving_iterate_early_stops_its_threads_and_leaves_the_run_to_resume(
    redis_server: RedisServer,
) -> None:
    pipeline = cv.Pipeline(range(5000)).map(triple, name="x3")
    backend = RedisBackend(
        redis_server.url, namespace=new_namespace(), run_id="left", local_workers=True
    )
    outputs = backend.iterate(pipeline, progress=True)
    assert next(outputs) == 0
    outputs.close()  # what leaving a for loop early does, once the iterator is dropped
    assert conveyor_threads() == []
    assert backend.cancel(pipeline, "left")  # still there: resumable, or deleted so
    backend.close()
