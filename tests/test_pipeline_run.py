"""Running a pipeline: run() and its result, start() and its handle, the context
manager, and the per-worker hooks."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import conveyor as cv
from test_pipeline_helpers import (  # noqa: F401 - no_thread_left is a fixture
    WAIT,
    CountingSource,
    conveyor_threads,
    identity,
    must_wait,
    no_thread_left,
    quiet_after,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("no_thread_left")


class Boom(Exception):
    """The error the tests' stage functions raise."""


def three_stages(n: int = 100) -> cv.Pipeline[int]:
    return (
        cv.Pipeline(range(n))
        .map(lambda x: x * 2, workers=3, name="double")
        .filter(lambda x: x % 3 == 0, workers=2, name="thirds")
        .flat_map(lambda x: [x, x + 1], name="pairs")
    )


# ---------------------------------------------------------------------- run()


@pytest.mark.quick
def test_run_returns_one_consistent_stats_row_per_stage() -> None:
    result = three_stages().run()
    double, thirds, pairs = result.stats
    assert [s.name for s in result.stats] == ["double", "thirds", "pairs"]
    assert [s.kind for s in result.stats] == ["map", "filter", "flat_map"]
    assert [s.workers for s in result.stats] == [3, 2, 1]
    assert {s.runtime for s in result.stats} == {"thread"}
    assert (double.items_in, double.items_out, double.filtered) == (100, 100, 0)
    assert (thirds.items_in, thirds.items_out, thirds.filtered) == (100, 34, 66)
    assert (pairs.items_in, pairs.items_out) == (34, 68)
    assert all(s.failed == s.retried == 0 for s in result.stats)
    assert result.items_out == 68
    assert result.outputs is None  # not collected
    assert result.failures == []
    assert not result.stopped
    assert result.elapsed_seconds > 0
    for s in result.stats:
        assert 0.0 <= s.utilisation <= 1.0
        assert s.busy_seconds >= 0 and s.elapsed_seconds > 0


def test_the_report_is_a_table_naming_every_stage() -> None:
    report = three_stages().run().report()
    for name in ("double", "thirds", "pairs"):
        assert name in report
    assert "68 outputs" in report


def test_to_json_parses_and_holds_the_stats_and_failures() -> None:
    p = cv.Pipeline(range(10)).map(lambda x: 10 // (x - 4), on_error="skip", name="div")
    data = json.loads(p.run().to_json())
    (stage,) = data["stages"]
    assert (stage["name"], stage["items_in"], stage["items_out"], stage["failed"]) == (
        "div",
        10,
        9,
        1,
    )
    assert {"utilisation", "throughput", "queue_fill"} <= set(stage)
    (failure,) = data["failures"]
    assert (failure["stage"], failure["item"], failure["attempts"]) == ("div", "4", 1)
    assert failure["error"].startswith("ZeroDivisionError")
    assert data["items_out"] == 9


# ---------------------------------------------------------------------- start() and the handle


def test_a_started_run_shows_live_stats_and_join_returns_the_result() -> None:
    gate = threading.Event()

    def held(x: int) -> int:
        must_wait(gate)
        return x

    p = cv.Pipeline(range(20)).map(identity, name="quick").map(held, name="held")
    handle = p.start(collect=True)
    try:
        wait_until(lambda: handle.stats()[0].items_in == 20)
        quick, held_stats = handle.stats()
        assert not handle.done()
        assert quick.items_out == 20
        assert held_stats.items_out == 0
    finally:
        gate.set()
    result = handle.join(WAIT)
    assert handle.done()
    assert result.outputs == list(range(20))
    assert [s.items_out for s in result.stats] == [20, 20]


def test_join_with_a_timeout_raises_timeout_error_while_the_run_goes_on() -> None:
    gate = threading.Event()
    handle = cv.Pipeline([1, 2]).map(lambda x: must_wait(gate)).start()
    try:
        with pytest.raises(TimeoutError):
            handle.join(timeout=0.01)
        assert not handle.done()
    finally:
        gate.set()
    handle.join(WAIT)


def test_join_raises_the_error_of_the_run() -> None:
    def fails(x: int) -> int:
        raise Boom(x)

    handle = cv.Pipeline([1]).map(fails).start()
    with pytest.raises(Boom):
        handle.join(WAIT)


@pytest.mark.parametrize("drain", [False, True])
def test_stopping_a_run_that_has_ended_leaves_its_result_as_it_was(drain: bool) -> None:
    """Regression: a stop() after the end turned a complete result into a stopped one."""
    handle = cv.Pipeline(range(10)).map(identity).start(collect=True)
    assert not handle.join(WAIT).stopped
    handle.stop(drain=drain)
    result = handle.join(WAIT)
    assert not result.stopped
    assert result.outputs == list(range(10))


def test_an_exception_in_the_loop_body_ends_the_run() -> None:
    with pytest.raises(Boom):
        for out in cv.Pipeline(CountingSource()).map(identity, workers=3):
            if out == 10:
                raise Boom
    assert not conveyor_threads()


def test_stop_with_drain_processes_every_item_pulled_and_pulls_no_more() -> None:
    """Regression: items the source yielded while the stop came were dropped."""
    inside = threading.Event()
    release = threading.Event()
    yielded: list[int] = []

    def source() -> Iterator[int]:
        for i in range(10):
            yielded.append(i)
            yield i
        inside.set()
        must_wait(release)  # the feeder is inside the source when the stop comes
        for i in range(10, 1000):
            yielded.append(i)
            yield i

    handle = cv.Pipeline(source()).map(lambda x: x + 1, workers=2).start(collect=True)
    must_wait(inside)
    handle.stop(drain=True)
    release.set()
    result = handle.join(WAIT)
    assert result.outputs == [x + 1 for x in yielded]  # nothing lost
    assert len(yielded) <= 11  # the item being pulled when the stop came, and no more
    assert result.stopped
    assert result.stats[0].items_in == len(yielded)


def test_stop_with_drain_lets_the_items_inside_finish() -> None:
    gate = threading.Event()
    inside = threading.Event()
    source = CountingSource()  # never-ending

    def held(x: int) -> int:
        inside.set()
        must_wait(gate)
        return x

    p = cv.Pipeline(source).map(held, capacity=4).map(identity, workers=2)
    handle = p.start(collect=True)
    must_wait(inside)
    wait_until(lambda: handle.stats()[0].queue_size == 4)  # the feeder waits for room
    handle.stop(drain=True)
    gate.set()
    result = handle.join(WAIT)
    assert result.outputs == list(range(source.pulled))
    assert source.pulled == 5  # the held item and a full channel
    assert result.stopped


def test_a_drain_stop_of_an_async_source_loses_nothing() -> None:
    inside = threading.Event()
    release = threading.Event()
    yielded: list[int] = []

    async def source() -> Any:
        for i in range(10**6):
            if i == 5:
                inside.set()
                release.wait(WAIT)  # blocks the feeder thread's own loop, as a slow source does
            yielded.append(i)
            yield i

    handle = cv.Pipeline(source()).map(identity).start(collect=True)
    must_wait(inside)
    handle.stop(drain=True)
    release.set()
    result = handle.join(WAIT)
    assert result.outputs == yielded
    assert len(yielded) <= 6
    assert result.stopped


def test_a_drain_stop_ends_the_run_while_an_async_source_awaits_its_next_item() -> None:
    # Repro: the run waited for the source's next item, which never came: the
    # join timed out though every item inside was through. An async source waits
    # by awaiting, and has given nothing up there: the wait is cancelled.
    waiting, cleaned = threading.Event(), threading.Event()
    source = quiet_after(5, waiting, cleaned)
    handle = cv.Pipeline(source).map(lambda x: x * 2).start(collect=True)
    must_wait(waiting)
    handle.stop(drain=True)
    result = handle.join(WAIT)
    assert result.outputs == [0, 2, 4, 6, 8]
    assert result.stopped
    assert cleaned.is_set()


def test_a_drain_stop_keeps_the_item_an_async_source_gives_when_its_wait_is_cancelled() -> None:
    waiting = threading.Event()

    async def source() -> Any:
        yield "first"
        waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            yield "last"  # given up by the source: it must not be lost
            raise

    handle = cv.Pipeline(source()).map(identity).start(collect=True)
    must_wait(waiting)
    handle.stop(drain=True)
    result = handle.join(WAIT)
    assert result.outputs == ["first", "last"]
    assert result.stopped


def test_a_handle_is_a_context_manager_that_stops_the_run() -> None:
    with cv.Pipeline(CountingSource()).map(identity).start() as handle:
        wait_until(lambda: handle.stats()[0].items_in > 0)
    assert handle.done()
    assert not conveyor_threads()


# ---------------------------------------------------------------------- with pipeline:


def test_the_pipeline_context_manager_stops_and_joins_its_runs_on_exit() -> None:
    p = cv.Pipeline(CountingSource()).map(identity, workers=2).map(identity)
    with p:
        first = p.start()
        second = p.start()
        it = iter(p)
        assert next(it) == 0
        wait_until(lambda: first.stats()[1].items_out > 0 and second.stats()[1].items_out > 0)
    assert first.done()
    assert second.done()
    assert not conveyor_threads()
    assert first.join(WAIT).stopped


def test_the_pipeline_context_manager_stops_on_an_exception_and_lets_it_through() -> None:
    p = cv.Pipeline(CountingSource()).map(identity)
    with pytest.raises(Boom), p:
        p.start()
        raise Boom
    assert not conveyor_threads()


def test_leaving_the_context_after_runs_ended_is_harmless() -> None:
    p = cv.Pipeline(range(3)).map(identity)
    with p:
        assert list(p) == [0, 1, 2]
        assert p.start(collect=True).join(WAIT).outputs == [0, 1, 2]
    assert not conveyor_threads()


# ---------------------------------------------------------------------- per-worker hooks


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_on_start_runs_in_each_worker_thread_itself(timeout: float | None) -> None:
    # Stays outside the contract suite: that each worker thread runs its own
    # on_start, with or without a timeout (which runs the calls in helper threads),
    # is the thread runtime's own matter. The contract suite checks the hooks, once
    # per worker with its own state (also under a timeout), on every runtime x backend.
    names: list[str] = []
    lock = threading.Lock()

    def on_start() -> None:
        with lock:
            names.append(threading.current_thread().name)

    cv.Pipeline(range(300)).map(identity, workers=4, on_start=on_start, timeout=timeout).run()
    assert len(names) == 4
    assert len(set(names)) == 4  # one per worker thread


def test_worker_state_is_none_without_on_start_and_outside_a_worker() -> None:
    assert cv.worker_state() is None
    assert list(cv.Pipeline([1, 2]).map(lambda x: cv.worker_state())) == [None, None]


def test_an_error_in_on_start_fails_the_run_clearly() -> None:
    def broken_setup() -> None:
        raise ConnectionError("database is down")

    p = cv.Pipeline(range(100)).map(identity, workers=3, on_start=broken_setup, name="load")
    with pytest.raises(ConnectionError, match="database is down") as info:
        p.run()
    notes = getattr(info.value, "__notes__", [])
    assert any("on_start" in n and "'load'" in n for n in notes)
    assert not conveyor_threads()


def test_an_error_in_on_stop_fails_the_run() -> None:
    def broken_teardown(state: Any) -> None:
        raise OSError("could not close")

    p = cv.Pipeline(range(10)).map(identity, on_stop=broken_teardown, name="save")
    with pytest.raises(OSError, match="could not close") as info:
        p.run()
    assert any("on_stop" in n and "'save'" in n for n in getattr(info.value, "__notes__", []))


def test_after_a_failed_join_the_result_so_far_names_the_error_that_ended_the_run() -> None:
    # Repro: result_so_far() had no word of the error, and its report said "0 items
    # failed" under a table whose stage showed 1 failed: read later, a failed run
    # looked like a complete one.
    def parse(x: int) -> int:
        if x == 50:
            raise Boom(f"bad record {x}")
        return x

    handle = cv.Pipeline(range(100)).map(parse).start(collect=True)
    with pytest.raises(Boom) as info:
        handle.join(timeout=WAIT)
    result = handle.result_so_far()
    assert result.error is info.value
    assert result.stats[0].failed == 1
    assert result.outputs is not None and result.outputs == list(range(len(result.outputs)))
    report = result.report()
    assert (
        "the run failed: Boom: bad record 50 (conveyor: stage 'parse' (map) failed on item 50)"
        in report.replace("\n", " ")
    )
    assert cv.Pipeline(range(3)).map(parse).run().error is None
