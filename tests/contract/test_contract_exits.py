"""Every exit is bounded: Ctrl-C, stop() and a cancelled arun return within a second,
even when user code is stuck in a stage or in the source.

A thread cannot be interrupted: the run leaves it behind (a daemon, so the
interpreter can still exit) and the caller's exception names the stage or
the source it belongs to; worker processes are killed; nothing else is left
running. Each test releases the stuck user code at its end, so that the
threads left behind end before the next test.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from process_events import WAIT, ProcessEvent
from runners import Leftovers, Runner, ctrl_c_when, described

import conveyor as cv

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BOUND = 1.0
"""The contract: control is back in the caller within this many seconds."""


def stuck_at(at: int, stuck: ProcessEvent, release: ProcessEvent) -> Any:
    """A stage that gets stuck in user code on item ``at``: it says so, then waits for
    ``release`` (a blocking wait: on the async runtime it blocks the event loop)."""

    def hang(x: int) -> int:
        if x == at:
            stuck.set()
            release.wait(WAIT)
        return x

    return hang


class Stuck:
    """The events of one test: ``stuck`` (set by the user code once stuck) and
    ``release`` (set by the test at its end, to let the user code go)."""

    def __init__(self, folder: Path) -> None:
        self.stuck = ProcessEvent(folder, "stuck")
        self.release = ProcessEvent(folder, "release")

    def close(self) -> None:
        self.release.set()
        self.stuck.close()
        self.release.close()


@pytest.fixture
def events(tmp_path: Path) -> Iterator[Stuck]:
    made = Stuck(tmp_path)
    try:
        yield made
    finally:
        made.close()


def stuck_stage(runner: Runner, events: Stuck) -> cv.Pipeline[int]:
    return cv.Pipeline(itertools.count()).map(
        runner.fn(stuck_at(3, events.stuck, events.release)),
        workers=2,
        runtime=runner.runtime,
        name="sticky",
    )


def identity(x: int) -> int:
    return x


def stuck_source(runner: Runner, events: Stuck) -> cv.Pipeline[int]:
    def source() -> Iterator[int]:
        yield from range(10)
        events.stuck.set()
        events.release.wait(WAIT)
        yield from range(10, 20)

    return cv.Pipeline(source()).map(runner.fn(identity), runtime=runner.runtime)


def assert_left_behind_named(error: BaseException, leftovers: Leftovers, who: str) -> None:
    """Threads left behind are daemons, named on the caller's error with ``who``, and
    nothing else is said to be stuck: with only the source stuck, no stage is named
    (the async runtime's loop was, when the source's wait used up the join's time)."""
    daemons = leftovers.assert_only_daemons_left()
    if daemons and not any(d.startswith("conveyor-redis-") for d in daemons):
        text = described(error)
        assert who in text and "left behind" in text, (daemons, text)
        if who == "source":
            stuck = [line for line in text.splitlines() if "stuck in user code" in line]
            assert stuck and not any("stage" in line for line in stuck), (daemons, text)


@pytest.mark.parametrize("where", ["stage", "source"])
def test_ctrl_c_with_user_code_stuck_returns_within_a_second_naming_what_is_stuck(
    runner: Runner, events: Stuck, where: str
) -> None:
    leftovers = Leftovers()
    pipeline = (stuck_stage if where == "stage" else stuck_source)(runner, events)
    with ctrl_c_when(events.stuck) as press, pytest.raises(KeyboardInterrupt) as info:
        runner.run(pipeline)
    assert press.at is not None, "the user code never got stuck"
    took = time.monotonic() - press.at
    assert took < BOUND, f"Ctrl-C took {took:.2f} s to return"
    assert_left_behind_named(info.value, leftovers, "'sticky'" if where == "stage" else "source")
    events.release.set()
    leftovers.assert_none()


@pytest.mark.parametrize("where", ["stage", "source"])
def test_stop_with_user_code_stuck_returns_within_a_second(
    runner: Runner, events: Stuck, where: str
) -> None:
    leftovers = Leftovers()
    pipeline = (stuck_stage if where == "stage" else stuck_source)(runner, events)
    handle = runner.start(pipeline)
    with handle:
        assert events.stuck.wait(WAIT), "the user code never got stuck"
        stopping = time.monotonic()
        handle.stop()
        result = handle.join(WAIT)
        took = time.monotonic() - stopping
    assert took < BOUND, f"stop() took {took:.2f} s to end the run"
    assert result.stopped
    leftovers.assert_only_daemons_left()
    events.release.set()
    leftovers.assert_none()


def test_cancelling_arun_with_a_stage_stuck_returns_within_a_second(
    runner: Runner, events: Stuck, caplog: pytest.LogCaptureFixture
) -> None:
    leftovers = Leftovers()
    pipeline = stuck_stage(runner, events)
    if runner.runtime == "async":
        # An async stage of arun runs on the caller's loop: blocked, nothing could
        # run there. The stuck stage is a thread stage beside an async one.
        pipeline = (
            cv.Pipeline(itertools.count())
            .map(runner.fn(identity), runtime="async")
            .map(stuck_at(3, events.stuck, events.release), workers=2, name="sticky")
        )
    backend = runner.backend_for() if runner.on_redis else None

    async def main() -> tuple[float, BaseException]:
        task = asyncio.create_task(pipeline.arun(backend=backend))
        stuck = await asyncio.to_thread(events.stuck.wait, WAIT)
        assert stuck, "the user code never got stuck"
        cancelling = time.monotonic()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=WAIT)
        took = time.monotonic() - cancelling
        assert done, "the cancelled arun did not end"
        with pytest.raises(asyncio.CancelledError) as info:
            task.result()
        return took, info.value

    took, error = asyncio.run(main())
    assert took < BOUND, f"cancelling arun took {took:.2f} s"
    if runner.on_redis:
        # The backend's run was stopped, not failed: its warning names the stage.
        daemons = leftovers.assert_only_daemons_left()
        if any(d.startswith("conveyor-sticky-") for d in daemons):
            assert "stage 'sticky' (map) is stuck in user code: left behind" in caplog.text
    else:
        assert_left_behind_named(error, leftovers, "'sticky'")
    events.release.set()
    leftovers.assert_none()
