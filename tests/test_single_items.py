"""The workers' single-item path (`_single_items` of `conveyor.runtime.base` and `.aio`).

A thread worker or worker task of one item at a time puts each output on
the next channel itself, as soon as the stage returns, and counts after. These tests check
when that path is taken, that the counters come out exact, and that
failures, retries and stops behave as through the policy. Slow stages are
slow by their work (a sleep per item), never by the test waiting.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import conveyor as cv
from conveyor import metrics
from conveyor.metrics import WorkerCounters
from conveyor.policy import aprocess_batch, process_batch
from conveyor.runtime import aio, base
from conveyor.runtime.base import SingleItemBooks
from conveyor.stage import Stage

SLOW = 0.003  # longer than half a batch's target: batches stay at one item
RUNTIMES = ["thread", "async"]


def slow(fn: Callable[[Any], Any], runtime: str = "thread") -> Callable[[Any], Any]:
    """``fn`` taking SLOW seconds per item, as a plain or (runtime="async") coroutine function."""
    if runtime == "async":

        async def acall(x: Any) -> Any:
            await asyncio.sleep(SLOW)
            return fn(x)

        return acall

    def call(x: Any) -> Any:
        time.sleep(SLOW)
        return fn(x)

    return call


@pytest.fixture
def single_items(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the single-item loops the workers enter: "thread" or "async"."""
    entered: list[str] = []
    real, areal = base._single_items, aio._single_items

    def spy(*args: Any) -> Any:
        entered.append("thread")
        return real(*args)

    async def aspy(*args: Any) -> Any:
        entered.append("async")
        return await areal(*args)

    monkeypatch.setattr(base, "_single_items", spy)
    monkeypatch.setattr(aio, "_single_items", aspy)
    return entered


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_slow_stage_goes_item_by_item_through_the_worker_itself(
    single_items: list[str], runtime: str
) -> None:
    result = (
        cv.Pipeline(range(30))
        .map(slow(lambda x: x * 2, runtime), workers=2, ordered=False, runtime=runtime)
        .run(collect=True)
    )
    assert sorted(result.outputs) == [2 * x for x in range(30)]
    assert runtime in single_items, "the single-item path was not taken"
    (stats,) = result.stats
    assert (stats.items_in, stats.items_out, stats.batches) == (30, 30, 30)
    assert (stats.failed, stats.filtered, stats.retried) == (0, 0, 0)
    assert stats.busy_seconds >= 30 * SLOW / 2  # each item's time was counted


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(
    ("kind", "fn", "outputs", "filtered"),
    [
        ("filter", lambda x: x % 3 == 0, [0, 3, 6, 9], 6),
        ("flat_map", lambda x: [x] * (x % 3), [1, 2, 2, 4, 5, 5, 7, 8, 8], 0),
        ("each", lambda x: None, [], 0),
    ],
)
def test_every_kind_is_counted_exactly(
    single_items: list[str],
    runtime: str,
    kind: str,
    fn: Callable[[Any], Any],
    outputs: list[int],
    filtered: int,
) -> None:
    pipeline = getattr(cv.Pipeline(range(10)), kind)(slow(fn, runtime), runtime=runtime)
    result = pipeline.run(collect=True)
    assert runtime in single_items
    assert sorted(result.outputs) == outputs
    (stats,) = result.stats
    assert (stats.items_in, stats.items_out, stats.filtered) == (10, len(outputs), filtered)


def test_a_quick_stage_moves_on_to_batches_and_keeps_order(single_items: list[str]) -> None:
    result = cv.Pipeline(range(5000)).map(lambda x: x + 1).run(collect=True)
    assert result.outputs == list(range(1, 5001))
    assert "thread" in single_items  # the first batches are of one item
    (stats,) = result.stats
    assert (stats.items_in, stats.items_out) == (5000, 5000)
    assert stats.batches < 5000, "a quick stage should have grown its batches"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_failed_call_is_retried_without_calling_the_item_again_first(
    single_items: list[str], runtime: str
) -> None:
    calls: dict[int, int] = {}

    def flaky(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        if x % 4 == 0 and calls[x] == 1:
            raise ValueError(x)
        return x

    result = (
        cv.Pipeline(range(12))
        .map(slow(flaky, runtime), retries=2, backoff=cv.Backoff(0.0), runtime=runtime)
        .run(collect=True)
    )
    assert runtime in single_items
    assert result.outputs == list(range(12))
    assert calls == {x: 2 if x % 4 == 0 else 1 for x in range(12)}
    (stats,) = result.stats
    assert (stats.items_in, stats.items_out, stats.retried, stats.failed) == (12, 12, 3, 0)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_skipped_items_are_counted_and_recorded(single_items: list[str], runtime: str) -> None:
    def fails_on_odd(x: int) -> int:
        if x % 2:
            raise KeyError(x)
        return x

    result = (
        cv.Pipeline(range(8))
        .map(slow(fails_on_odd, runtime), on_error="skip", runtime=runtime)
        .run(collect=True)
    )
    assert runtime in single_items
    assert result.outputs == [0, 2, 4, 6]
    assert sorted(f.item for f in result.failures) == [1, 3, 5, 7]
    (stats,) = result.stats
    assert (stats.items_in, stats.items_out, stats.failed) == (8, 4, 4)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("error", [ZeroDivisionError, KeyboardInterrupt])
def test_an_error_names_the_stage_and_the_item(
    single_items: list[str], runtime: str, error: type[BaseException]
) -> None:
    # An Exception goes through the policy (on_error="raise"); Ctrl-C past it.
    def fails_on_three(x: int) -> int:
        if x == 3:
            raise error
        return x

    pipeline = cv.Pipeline(range(8)).map(
        slow(fails_on_three, runtime), name="divide", runtime=runtime
    )
    with pytest.raises(error) as info:
        pipeline.run()
    assert runtime in single_items
    notes = getattr(info.value, "__notes__", [])
    assert any("'divide'" in n and "on item 3" in n for n in notes), notes


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_leaving_the_loop_stops_the_single_item_workers(
    single_items: list[str], runtime: str
) -> None:
    pipeline = cv.Pipeline(range(10_000)).map(slow(lambda x: x, runtime), runtime=runtime)
    seen = []
    for x in pipeline:
        seen.append(x)
        if len(seen) == 5:
            break  # leaving the loop stops the run and joins its workers
    assert runtime in single_items
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_byte_budget_still_holds_on_the_single_item_path(
    single_items: list[str], runtime: str
) -> None:
    result = (
        cv.Pipeline(range(40))
        .map(slow(lambda x: bytes(1000), runtime), runtime=runtime)
        .run(collect=True, max_bytes=20_000)
    )
    assert runtime in single_items
    assert len(result.outputs) == 40
    (stats,) = result.stats
    assert (stats.items_in, stats.items_out) == (40, 40)


@pytest.mark.parametrize(
    ("runtime", "options"),
    [
        ("thread", {"timeout": 5.0}),  # the call runs in a helper thread
        ("thread", {"max_items_per_worker": 3}),  # the worker's life is counted in items
        ("thread", {"workers": 2, "ordered": True}),  # the outputs go through the sequencer
        ("async", {"timeout": 5.0}),  # the call goes through asyncio.wait_for
        ("async", {"workers": 2, "ordered": True}),
    ],
    ids=["thread-timeout", "thread-recycling", "thread-ordered", "async-timeout", "async-ordered"],
)
def test_the_path_is_not_taken_where_the_worker_loop_must_run(
    single_items: list[str], runtime: str, options: dict[str, Any]
) -> None:
    result = (
        cv.Pipeline(range(10))
        .map(slow(lambda x: x + 1, runtime), runtime=runtime, **options)
        .run(collect=True)
    )
    assert sorted(result.outputs) == list(range(1, 11))
    assert single_items == []
    (stats,) = result.stats
    assert (stats.items_in, stats.items_out) == (10, 10)


def test_process_batch_takes_over_from_a_first_failure_without_calling_the_item_again() -> None:
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        return x * 10

    stage = Stage("map", fn, "s", retries=1)
    outcome = process_batch(stage, [1, 2], first_error=ValueError("first call"))
    assert calls == [1, 2]  # item 1 once (its retry), item 2 once
    assert outcome.outputs == [10, 20]
    assert (outcome.retried, outcome.processed) == (1, 2)


def test_aprocess_batch_takes_over_from_a_first_failure_without_calling_the_item_again() -> None:
    calls: list[int] = []

    async def fn(x: int) -> int:
        calls.append(x)
        return x * 10

    stage = Stage("map", fn, "s", retries=1)
    outcome = asyncio.run(aprocess_batch(stage, [1, 2], first_error=ValueError("first call")))
    assert calls == [1, 2]
    assert outcome.outputs == [10, 20]
    assert (outcome.retried, outcome.processed) == (1, 2)


def test_a_first_failure_out_of_retries_applies_on_error() -> None:
    stage = Stage("map", lambda x: x, "s", on_error="skip")
    outcome = process_batch(stage, [7, 8], first_error=ValueError("first call"))
    assert outcome.outputs == [8]
    assert [f.item for f in outcome.failures] == [7]
    assert outcome.processed == 2


def test_the_books_add_items_in_bulk_and_exactly() -> None:
    counters = WorkerCounters()
    start = time.perf_counter()
    books = SingleItemBooks(counters, start, limit=512, target=0.002)
    books.due = float("inf")  # nothing is due before the flush below
    for outputs, filtered in [(1, False), (0, True), (3, False)]:
        books.took(object())
        assert counters.current_item is not None
        books.handed_on(time.perf_counter(), outputs, filtered)
        assert counters.current_item is None
    assert (counters.items_in, counters.batches) == (0, 0)  # not added yet
    books.flush()
    assert (counters.items_in, counters.items_out, counters.filtered) == (3, 4, 1)
    assert counters.batches == 3
    assert sum(counters.latency) == 3
    books.flush()  # nothing twice
    assert counters.items_in == 3


def test_a_tally_leaves_the_bucketing_of_item_times_to_the_readers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Regression: the worker put every item's time in its bucket at each tally (about
    # 15 us for a stage of 1 ms per item), between a put and its next call: the woken
    # consumer waited for it, one item in 50, which was the hand-off's p99.
    bucketed: list[float] = []
    bucket = metrics.latency_bucket

    def counting(seconds: float) -> int:
        bucketed.append(seconds)
        return bucket(seconds)

    monkeypatch.setattr(metrics, "latency_bucket", counting)
    counters = WorkerCounters()
    books = SingleItemBooks(counters, time.perf_counter(), limit=512, target=0.002)
    books.busy.extend([1e-3, 2e-3, 1e-3])
    books.flush()
    assert bucketed == [] and counters.items_in == 3 and books.busy == []
    counters.add_busy(0.5, 2)  # a batch of 2 items of 0.25 s: bucketed by the worker
    histogram = counters.latency
    assert sorted(bucketed) == [1e-3, 1e-3, 2e-3, 0.25]
    expected = [0] * metrics.LATENCY_BUCKETS
    for seconds, n in [(1e-3, 2), (2e-3, 1), (0.25, 2)]:
        expected[bucket(seconds)] += n
    assert histogram == expected
    assert counters.latency == expected  # read again: nothing counted twice


def test_readers_bucket_item_times_while_the_worker_hands_more_over_and_lose_none() -> None:
    counters = WorkerCounters()
    tallies, per_tally = 2000, 7
    done = threading.Event()

    def worker() -> None:
        for _ in range(tallies):
            counters.add_items([1e-3] * per_tally, per_tally, 0)
        done.set()

    def reader(seen: list[int]) -> None:
        while not done.is_set():
            seen.append(sum(counters.latency))

    seen: list[list[int]] = [[], []]
    threads = [threading.Thread(target=reader, args=(s,)) for s in seen]
    threads.append(threading.Thread(target=worker))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(counters.latency) == tallies * per_tally == counters.items_in
    for readings in seen:  # never more than was handed over, never going back
        assert readings == sorted(readings) and all(n <= tallies * per_tally for n in readings)


def test_the_books_add_what_is_due_as_items_come() -> None:
    counters = WorkerCounters()
    books = SingleItemBooks(counters, time.perf_counter(), limit=512, target=0.002)
    books.due = 0.0  # due at once: each item is added as it is handed on
    books.took(1)
    books.handed_on(time.perf_counter(), 1, False)
    assert (counters.items_in, counters.items_out) == (1, 1)


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Records (thread name, "take" or "put") for each get and put of one item that succeeds."""
    from conveyor import channel as channel_module

    seen: list[tuple[str, str]] = []
    for cls in (channel_module.Channel, channel_module._BudgetChannel):
        for method, step in (("get", "take"), ("put", "put")):
            real = getattr(cls, method)

            def spy(self: Any, *args: Any, real: Any = real, step: str = step, **kw: Any) -> Any:
                result = real(self, *args, **kw)
                seen.append((threading.current_thread().name, step))
                return result

            monkeypatch.setattr(cls, method, spy)
    return seen


@pytest.mark.parametrize("max_bytes", [None, 1 << 20])
def test_a_thread_worker_puts_each_output_before_it_takes_its_next_item(
    steps: list[tuple[str, str]], max_bytes: int | None
) -> None:
    # Nothing between the stage's return and the put that wakes a waiting consumer:
    # a take there (cold after the stage's wait) delayed that wake-up.
    result = (
        cv.Pipeline(range(20))
        .map(slow(lambda x: x), name="paced")
        .run(collect=True, max_bytes=max_bytes)
    )
    assert result.outputs == list(range(20))
    worker = [step for name, step in steps if name.startswith("conveyor-paced-")]
    assert worker == ["take", "put"] * 20
    (stats,) = result.stats
    assert (stats.items_in, stats.items_out, stats.batches) == (20, 20, 20)


def test_an_async_consumer_waiting_for_an_output_gets_it_before_the_worker_takes_again(
    steps: list[tuple[str, str]],
) -> None:
    # The worker task lets a consumer it woke run first: one turn of the loop, before its
    # counting and its next take.
    async def consume() -> list[int]:
        got = []
        async for x in cv.Pipeline(range(10)).map(slow(lambda x: x, "async"), runtime="async"):
            steps.append(("consumer", f"got {x}"))
            got.append(x)
        return got

    assert asyncio.run(consume()) == list(range(10))
    order = [step for name, step in steps if name in ("MainThread", "consumer")]
    for x in range(9):  # "got x" comes before the take of item x + 1 (the take of x is earlier)
        takes_before = order[: order.index(f"got {x}")].count("take")
        assert takes_before == x + 1, order


def test_nothing_is_lost_when_the_output_waits_for_room() -> None:
    # A one-slot output and a consumer slower than the stage: every put waits for room
    # while the worker holds the next item.
    outputs = []
    for x in cv.Pipeline(range(30)).map(slow(lambda x: x), capacity=1):
        outputs.append(x)
        time.sleep(2 * SLOW)  # the consumer's own work, slower than the stage's
    assert outputs == list(range(30))
