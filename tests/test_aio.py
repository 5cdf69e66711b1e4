"""The async runtime: coroutine stages, on conveyor's own loop or on the caller's.

Every test that runs a pipeline does it in both modes where it matters:
``run()`` (async stages on a loop in a ``conveyor-async-loop`` thread) and
``await arun()`` / ``async for`` inside ``asyncio.run`` (async stages on the
caller's loop). Coroutines synchronise with `Gate`s, which any thread can
open, never with sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conveyor as cv
from conveyor.channel import Channel
from conveyor.errors import ShutDown
from conveyor.runtime.aio import LOOP_THREAD_NAME, new_event_loop
from conveyor.runtime.base import RunControl
from conveyor.runtime.ports import Sequencer
from test_pipeline_helpers import (  # noqa: F401 - no_thread_left is a fixture
    PROMPT,
    WAIT,
    conveyor_threads,
    must_wait,
    no_thread_left,
)

pytestmark = pytest.mark.usefixtures("no_thread_left", "no_asyncio_errors")

TINY = cv.Backoff(initial=0.001)


class Boom(Exception):
    """The error the tests' stage functions raise."""


@pytest.fixture
def no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail on what asyncio only logs: a task destroyed while pending, an unretrieved error."""
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        yield
    logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not logged


class Gate:
    """An event that coroutines on any loop await and any thread opens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        with self._lock:
            if self._open:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        await asyncio.wait_for(waiter, WAIT)

    def open(self) -> None:
        with self._lock:
            self._open = True
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class InFlight:
    """Counts the calls in flight and their cleanups; signals when ``expected`` are in."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.now = 0
        self.most = 0
        self.cleaned: list[Any] = []
        self.all_in = threading.Event()
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
            if self.now >= self.expected:
                self.all_in.set()

    def leave(self, item: Any) -> None:
        with self._lock:
            self.now -= 1
            self.cleaned.append(item)


def held_in_flight(
    flight: InFlight, gate: Gate, free: tuple[int, ...] = ()
) -> Callable[[int], Awaitable[int]]:
    """A stage function that returns the items of ``free`` at once and holds the others
    until ``gate`` opens, counted in ``flight`` (their cleanup too)."""

    async def held(x: int) -> int:
        if x in free:
            return x
        flight.enter()
        try:
            await gate.wait()
        finally:
            flight.leave(x)
        return x

    return held


def run_in_mode(pipeline: cv.Pipeline[Any], mode: str) -> cv.RunResult:
    """Run to completion with collect=True: ``run()``, or ``arun()`` in ``asyncio.run``."""
    if mode == "run":
        return pipeline.run(collect=True)
    return asyncio.run(pipeline.arun(collect=True))


modes = pytest.mark.parametrize("mode", ["run", "arun"])


# ---------------------------------------------------------------------- no loss, order


async def _pause(x: int) -> None:
    # Uneven interleaving without timing: some items yield to the loop a few times.
    for _ in range(x % 3):
        await asyncio.sleep(0)


@dataclass(frozen=True)
class StageSpec:
    kind: str
    runtime: str
    workers: int
    capacity: int
    ordered: bool

    def reference(self, x: int) -> list[int]:
        if self.kind == "map":
            return [x * 3 + 1]
        if self.kind == "filter":
            return [x] if x % 3 else []
        return [x, -x] if x % 2 else []

    def function(self) -> Callable[[int], Any]:
        ref, kind = self.reference, self.kind

        def plain(x: int) -> Any:
            out = ref(x)
            return bool(out) if kind == "filter" else out[0] if kind == "map" else out

        if self.runtime == "thread":
            return plain

        async def coro(x: int) -> Any:
            await _pause(x)
            return plain(x)

        return coro


stage_specs = st.builds(
    StageSpec,
    kind=st.sampled_from(["map", "filter", "flat_map"]),
    runtime=st.sampled_from(["async", "async", "thread"]),
    workers=st.integers(1, 12),
    capacity=st.integers(1, 16),
    ordered=st.booleans(),
)


@pytest.mark.quick
@settings(
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.lists(st.integers(-100, 100), max_size=150),
    specs=st.lists(stage_specs, min_size=1, max_size=4),
    mode=st.sampled_from(["run", "arun"]),
)
def test_pipelines_mixing_async_and_thread_stages_lose_and_invent_nothing(
    items: list[int], specs: list[StageSpec], mode: str
) -> None:
    expected = items
    pipeline: cv.Pipeline[Any] = cv.Pipeline(items)
    for index, spec in enumerate(specs):
        expected = [y for x in expected for y in spec.reference(x)]
        pipeline = getattr(pipeline, spec.kind)(
            spec.function(),
            workers=spec.workers,
            runtime=spec.runtime,
            capacity=spec.capacity,
            ordered=spec.ordered,
            name=f"s{index}",
        )
    outputs = run_in_mode(pipeline, mode).outputs
    if all(s.ordered or s.workers == 1 for s in specs):
        assert outputs == expected
    else:
        assert Counter(outputs) == Counter(expected)
    assert not conveyor_threads()


@modes
def test_an_async_stage_mixes_with_process_and_thread_stages_in_one_pipeline(mode: str) -> None:
    pipeline = (
        cv.Pipeline(range(300))
        .map(double, workers=8, runtime="async")
        .map(lambda x: x + 1, workers=2, runtime="process")
        .filter(lambda x: x % 3 != 0, workers=2)
        .map(double, workers=3, runtime="async", name="again")
    )
    expected = [2 * y for y in (2 * x + 1 for x in range(300)) if y % 3 != 0]
    assert run_in_mode(pipeline, mode).outputs == expected
    assert not conveyor_threads()


@pytest.mark.quick
def test_an_ordered_async_stage_takes_no_batch_beyond_its_window() -> None:
    output: Channel[Any] = Channel()
    control = RunControl()
    sequencer = Sequencer(output, window=3, control=control)
    source: Channel[Any] = Channel()
    source.put_many(range(10))

    async def main() -> None:
        taken = [await sequencer.atake(source, 1) for _ in range(3)]
        assert [ticket for _, ticket in taken] == [0, 1, 2]
        fourth = asyncio.ensure_future(sequencer.atake(source, 1))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not fourth.done()  # ticket 3 would be 3 ahead of the unreleased ticket 0
        await sequencer.adeposit(2, ["c"])
        await sequencer.adeposit(1, ["b"])
        assert output.qsize() == 0  # released in ticket order: 0 first
        await sequencer.adeposit(0, ["a"])
        assert output.get_many(10) == ["a", "b", "c"]
        assert await asyncio.wait_for(fourth, WAIT) == ([3], 3)
        # Held by ticket 3 now; an abort from another thread ends the wait.
        await sequencer.atake(source, 1)
        await sequencer.atake(source, 1)
        blocked = asyncio.ensure_future(sequencer.atake(source, 1))
        await asyncio.sleep(0)
        await asyncio.to_thread(control.abort)
        with pytest.raises(ShutDown):
            await asyncio.wait_for(blocked, WAIT)

    asyncio.run(main())


@pytest.mark.quick
def test_coroutines_waiting_for_items_count_in_the_window() -> None:
    # Each will hold a batch: under a byte budget the window is the stage's bound.
    output: Channel[Any] = Channel()
    sequencer = Sequencer(output, window=2, control=RunControl())
    source: Channel[Any] = Channel()

    async def main() -> None:
        takers = [asyncio.ensure_future(sequencer.atake(source, 1)) for _ in range(4)]
        await asyncio.sleep(0)  # two pass the window and wait for items, two wait for it
        source.put_many(range(6))
        first = await asyncio.wait_for(asyncio.gather(*takers[:2]), WAIT)
        assert first == [([0], 0), ([1], 1)]
        assert not any(t.done() for t in takers[2:])  # only a release moves the window
        await sequencer.adeposit(0, [0])
        assert await asyncio.wait_for(takers[2], WAIT) == ([2], 2)
        assert not takers[3].done()
        await sequencer.adeposit(1, [1])
        assert await asyncio.wait_for(takers[3], WAIT) == ([3], 3)

    asyncio.run(main())


# ---------------------------------------------------------------------- where it runs


@pytest.mark.quick
def test_every_async_stage_of_a_run_shares_one_loop_in_a_thread_of_its_own() -> None:
    seen: set[tuple[int, str]] = set()

    async def where(x: int) -> int:
        seen.add((id(asyncio.get_running_loop()), threading.current_thread().name))
        return x

    pipeline = (
        cv.Pipeline(range(50))
        .map(where, workers=3, runtime="async", name="a")
        .map(lambda x: x, workers=2)
        .map(where, workers=4, runtime="async", name="b")
    )
    assert pipeline.run(collect=True).outputs == list(range(50))
    assert len(seen) == 1
    assert next(iter(seen))[1] == LOOP_THREAD_NAME
    assert not conveyor_threads()


@pytest.mark.quick
def test_arun_runs_async_stages_on_the_callers_loop_without_blocking_it() -> None:
    freed = threading.Event()
    loops: set[int] = set()

    async def where(x: int) -> int:
        loops.add(id(asyncio.get_running_loop()))
        return x

    def needs_the_loop(x: int) -> int:
        # Set by another task of the caller's loop: a blocked loop would hang here.
        must_wait(freed)
        return x

    async def main() -> cv.RunResult:
        async def free() -> None:
            await asyncio.sleep(0)
            freed.set()

        pipeline = (
            cv.Pipeline(range(20))
            .map(where, workers=4, runtime="async")
            .map(needs_the_loop, workers=2)
        )
        result, _ = await asyncio.gather(pipeline.arun(collect=True), free())
        assert loops == {id(asyncio.get_running_loop())}
        return result

    result = asyncio.run(main())
    assert result.outputs == list(range(20))
    assert result.stats[0].items_in == 20
    assert not conveyor_threads()


async def numbers(n: int, cleaned: list[str] | None = None) -> AsyncIterator[int]:
    """An async generator source that yields to the loop between items."""
    try:
        for i in range(n):
            await asyncio.sleep(0)
            yield i
    finally:
        if cleaned is not None:
            cleaned.append("source")


async def double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


@pytest.mark.quick
@modes
def test_an_async_generator_source_feeds_an_async_stage(mode: str) -> None:
    if mode == "run":
        outputs = (
            cv.Pipeline(numbers(200))
            .map(double, workers=8, runtime="async")
            .run(collect=True)
            .outputs
        )
    else:

        async def main() -> list[int]:
            pipeline = cv.Pipeline(numbers(200)).map(double, workers=8, runtime="async")
            return [x async for x in pipeline]

        outputs = asyncio.run(main())
    assert outputs == [2 * x for x in range(200)]


@pytest.mark.quick
def test_breaking_out_of_async_for_stops_the_run_and_closes_the_source() -> None:
    cleaned: list[str] = []

    async def main() -> list[int]:
        got: list[int] = []
        pipeline = cv.Pipeline(numbers(10**6, cleaned)).map(double, workers=4, runtime="async")
        async with aclosing(pipeline.__aiter__()) as outputs:
            async for x in outputs:
                got.append(x)
                if len(got) == 10:
                    break
        assert not conveyor_threads()
        return got

    assert asyncio.run(main()) == [2 * x for x in range(10)]
    assert cleaned == ["source"]


@pytest.mark.quick
def test_a_cancellation_caught_in_the_body_of_async_for_loses_no_output_of_the_batch() -> None:
    # `async for` over a pipeline takes the outputs a batch at a time and hands
    # them out one by one from the iterator's own buffer: a consumer cancelled
    # in its body (which catches it and goes on) must still get every output,
    # in order, the rest of the batch included.
    done = Gate()

    async def counted(x: int) -> int:
        if x == 299:
            done.open()
        return 2 * x

    async def main() -> list[int]:
        got: list[int] = []
        pipeline = cv.Pipeline(range(300)).map(counted, runtime="async")
        async for x in pipeline:
            got.append(x)
            if len(got) == 1:
                await done.wait()  # every output is in the last channel: batches from now on
            if len(got) in (2, 30, 100, 250):
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    task.uncancel()
                else:
                    pytest.fail("the cancellation did not land")
        return got

    assert asyncio.run(main()) == [2 * x for x in range(300)]


@pytest.mark.quick
def test_cancelling_a_consumer_waiting_in_async_for_stops_the_run_and_ends_the_iterator() -> None:
    flight = InFlight(1)
    held = held_in_flight(flight, Gate(), free=(0,))

    async def main() -> None:
        pipeline = cv.Pipeline(range(5)).map(held, runtime="async")
        outputs = pipeline.__aiter__()
        assert await outputs.__anext__() == 0
        waiting = asyncio.ensure_future(outputs.__anext__())
        while not flight.all_in.is_set():
            await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert flight.cleaned == [1]  # the stage's coroutine was cancelled, its cleanup ran
        assert not pipeline._runs  # joined and forgotten
        with pytest.raises(StopAsyncIteration):
            await outputs.__anext__()
        assert not conveyor_threads()

    asyncio.run(main())


@pytest.mark.quick
def test_an_async_for_iterator_dropped_after_a_break_stops_and_joins_its_run() -> None:
    # Without aclosing: the loop's hooks close what the iterator leaves (as they
    # would an async generator), which stops the run and joins it.
    async def main() -> None:
        pipeline = cv.Pipeline(range(10**6)).map(double, workers=4, runtime="async")
        outputs = pipeline.__aiter__()
        async for x in outputs:
            if x == 20:
                break
        (run,) = pipeline._runs
        assert not run.ended()
        me = asyncio.current_task()
        del outputs  # the closing is scheduled on the loop, as a task
        await asyncio.sleep(0)
        others = [t for t in asyncio.all_tasks() if t is not me]
        await asyncio.gather(*others, return_exceptions=True)
        assert run.ended()
        assert not pipeline._runs
        assert run.control.stopped.is_set()

    asyncio.run(main())


# ---------------------------------------------------------------------- errors and policies


@pytest.mark.quick
@modes
def test_an_exception_in_an_async_stage_reaches_the_caller_as_itself(
    mode: str,
) -> None:
    # Stays outside the contract suite: the caller gets the very exception the
    # coroutine raised, with its original traceback, on conveyor's loop and on the
    # caller's (arun, which the contract suite does not drive). The contract suite
    # checks the error's type, message and note on every runtime x backend.
    async def fragile(x: int) -> int:
        await asyncio.sleep(0)
        if x == 7:
            raise Boom(x)
        return x

    pipeline = cv.Pipeline(range(100)).map(fragile, workers=5, runtime="async")
    with pytest.raises(Boom) as info:
        run_in_mode(pipeline, mode)
    assert info.value.args == (7,)
    if mode == "arun":  # with run(), in the contract suite
        assert "conveyor: stage 'fragile' (map) failed on item 7" in notes(info.value)
    frames = [tb.tb_frame.f_code.co_name for tb in _walk(info.value.__traceback__)]
    assert "fragile" in frames  # the original traceback, not a rebuilt exception


def notes(exc: BaseException) -> list[str]:
    """The PEP 678 notes of ``exc`` (none: an empty list)."""
    return list(getattr(exc, "__notes__", []))


def _walk(tb: Any) -> Iterator[Any]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


@pytest.mark.quick
def test_on_error_skip_records_the_failed_items_and_keeps_the_others() -> None:
    # On the caller's loop (arun) only, which the contract suite does not drive; it
    # checks on_error="skip" on every runtime x backend, the async runtime's on
    # conveyor's own loop.
    async def fragile(x: int) -> int:
        if x % 10 == 3:
            raise Boom(x)
        return x

    pipeline = cv.Pipeline(range(50)).map(fragile, workers=4, runtime="async", on_error="skip")
    result = run_in_mode(pipeline, "arun")
    assert result.outputs == [x for x in range(50) if x % 10 != 3]
    assert sorted(f.item for f in result.failures) == [3, 13, 23, 33, 43]
    assert all(isinstance(f.error, Boom) and f.attempts == 1 for f in result.failures)
    assert result.stats[0].failed == 5


@pytest.mark.quick
def test_retries_call_a_failing_coroutine_again_until_it_succeeds() -> None:
    # On the caller's loop (arun) only, which the contract suite does not drive; it
    # checks retries on every runtime x backend, the async runtime's on conveyor's
    # own loop.
    attempts: Counter[int] = Counter()

    async def flaky(x: int) -> int:
        attempts[x] += 1
        if attempts[x] <= 2:
            raise Boom(x)
        return x

    pipeline = cv.Pipeline(range(30)).map(
        flaky, workers=4, runtime="async", retries=2, backoff=TINY
    )
    result = run_in_mode(pipeline, "arun")
    assert result.outputs == list(range(30))
    assert attempts == Counter(dict.fromkeys(range(30), 3))
    assert result.stats[0].retried == 60


@pytest.mark.quick
def test_an_item_out_of_retries_is_skipped_after_every_attempt() -> None:
    async def broken(x: int) -> int:
        raise Boom(x)

    result = (
        cv.Pipeline(range(5))
        .map(broken, workers=2, runtime="async", retries=2, backoff=TINY, on_error="skip")
        .run()
    )
    assert sorted(f.item for f in result.failures) == list(range(5))
    assert {f.attempts for f in result.failures} == {3}


@pytest.mark.quick
@modes
def test_a_coroutine_over_its_timeout_is_cancelled_and_fails_with_timeout_error(
    mode: str,
) -> None:
    # Stays outside the contract suite: the timed-out coroutine is cancelled and its
    # cleanup runs, the async runtime's own way, on either loop. The contract suite
    # checks a timeout's error, message and note on every runtime x backend.
    never = Gate()
    cleaned: list[int] = []

    async def stuck_on_three(x: int) -> int:
        if x == 3:
            try:
                await never.wait()
            finally:
                cleaned.append(x)
        return x

    pipeline = cv.Pipeline(range(6)).map(stuck_on_three, runtime="async", timeout=0.05)
    with pytest.raises(TimeoutError):
        run_in_mode(pipeline, mode)
    assert cleaned == [3]


@pytest.mark.quick
def test_timed_out_items_are_retried_then_skipped() -> None:
    never = Gate()

    async def stuck_on_odd(x: int) -> int:
        if x % 2:
            await never.wait()
        return x

    result = (
        cv.Pipeline(range(6))
        .map(
            stuck_on_odd,
            workers=3,
            runtime="async",
            timeout=0.02,
            retries=1,
            backoff=TINY,
            on_error="skip",
        )
        .run(collect=True)
    )
    assert result.outputs == [0, 2, 4]
    assert sorted(f.item for f in result.failures) == [1, 3, 5]
    assert all(isinstance(f.error, TimeoutError) and f.attempts == 2 for f in result.failures)


@pytest.mark.quick
def test_a_timeout_error_raised_by_the_coroutine_itself_keeps_its_message() -> None:
    async def own_timeout(x: int) -> int:
        raise TimeoutError("the remote end gave up")

    pipeline = cv.Pipeline([1]).map(own_timeout, runtime="async", timeout=5.0)
    with pytest.raises(TimeoutError, match="the remote end gave up"):
        pipeline.run()


@pytest.mark.quick
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_a_keyboard_interrupt_raised_in_a_coroutine_reaches_the_caller_naming_the_item(
    error: type[BaseException],
) -> None:
    async def interrupted(x: int) -> int:
        if x == 300:  # deep inside a batch: batches grow on quick items
            raise error
        return x

    # on_error="skip" does not apply: Ctrl-C is not an item's failure.
    pipeline = cv.Pipeline(range(1000)).map(
        interrupted, workers=3, runtime="async", on_error="skip"
    )
    with pytest.raises(error) as info:
        pipeline.run()
    ours = [n for n in notes(info.value) if n.startswith("conveyor:")]
    assert ours == ["conveyor: stage 'interrupted' (map) failed on item 300"]
    assert not conveyor_threads()


@pytest.mark.quick
@pytest.mark.parametrize("where", ["stage", "source"])
def test_a_cancelled_error_of_the_users_own_on_the_callers_loop_fails_the_run(where: str) -> None:
    # Repro: `await arun()` returned the outputs before the error, with none: a
    # CancelledError raised by a stage or an async source (it awaited a future that
    # something else cancelled) was taken for a cancellation of the run.
    async def gives_up(x: int) -> int:
        if x == 3:
            raise asyncio.CancelledError("the upstream call was cancelled")
        return x

    async def source() -> AsyncIterator[int]:
        for x in range(10):
            yield await gives_up(x) if where == "source" else x

    pipeline = cv.Pipeline(source()).map(gives_up if where == "stage" else double, runtime="async")

    async def main() -> bool:
        with pytest.raises(asyncio.CancelledError) as info:
            await pipeline.arun()
        expected = (
            "conveyor: stage 'gives_up' (map) failed on item 3"
            if where == "stage"
            else "conveyor: the source failed after 3 items"
        )
        assert expected in notes(info.value)
        task = asyncio.current_task()
        return task is not None and task.cancelling() == 0

    assert asyncio.run(main())  # the caller's own task was never cancelled
    assert not conveyor_threads()


@pytest.mark.quick
@pytest.mark.parametrize("runtime", ["thread", "async"])
def test_a_stop_async_iteration_from_a_stage_does_not_end_async_for_as_if_done(
    runtime: str,
) -> None:
    # Repro: `async for` over the pipeline ended quietly with [] (the stage's
    # StopAsyncIteration left __anext__ as the end of the outputs).
    def gives_up(x: int) -> int:
        if x == 3:
            raise StopAsyncIteration
        return x

    async def agives_up(x: int) -> int:
        return gives_up(x)

    fn: Any = agives_up if runtime == "async" else gives_up
    pipeline = cv.Pipeline(range(10)).map(fn, runtime=runtime, name="gives_up")

    async def main() -> list[int]:
        return [out async for out in pipeline]

    with pytest.raises(RuntimeError) as info:
        asyncio.run(main())
    assert type(info.value.__cause__) is StopAsyncIteration
    assert "conveyor: stage 'gives_up' (map) failed on item 3" in notes(info.value)
    assert not conveyor_threads()


SIGINT_SCRIPT = textwrap.dedent(
    """
    import asyncio, itertools, threading, time
    import conveyor as cv

    started, cleaned = [], []
    all_in = threading.Event()

    async def held(x):
        started.append(x)
        if len(started) == 4:
            all_in.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append(x)
        return x

    try:
        pipeline = cv.Pipeline(itertools.count()).map(held, workers=4, runtime="async")
        with pipeline.start() as handle:
            all_in.wait(10)
            print("ready", flush=True)
            handle.join()
    finally:
        left = [t.name for t in threading.enumerate() if t.name.startswith("conveyor-")]
        print("left", left, "cleaned", len(cleaned), time.monotonic(), flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_a_run_with_coroutines_in_flight_and_runs_their_cleanup() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    words = out.split()
    assert words[:4] == ["left", "[]", "cleaned", "4"], out
    # time.monotonic() is one clock for both processes (CLOCK_MONOTONIC on Linux).
    assert float(words[-1]) - sent_at < PROMPT


# ---------------------------------------------------------------------- cancellation


@pytest.mark.quick
def test_stop_cancels_the_coroutines_in_flight_and_their_finally_blocks_run() -> None:
    flight = InFlight(5)
    held = held_in_flight(flight, Gate())

    pipeline = cv.Pipeline(range(100)).map(held, workers=5, runtime="async")
    with pipeline.start() as handle:
        must_wait(flight.all_in)
        handle.stop()
        result = handle.join(WAIT)
    assert result.stopped
    assert sorted(flight.cleaned) == [0, 1, 2, 3, 4]
    assert flight.now == 0
    assert not conveyor_threads()


@pytest.mark.quick
@modes
def test_an_error_in_a_thread_stage_cancels_the_coroutines_in_flight(mode: str) -> None:
    flight = InFlight(4)
    four_in = Gate()
    never = Gate()

    async def held_after_zero(x: int) -> int:
        if x == 0:
            # Only once 1 to 4 are in flight: each worker takes one item.
            await four_in.wait()
            return x
        flight.enter()
        if flight.all_in.is_set():
            four_in.open()
        try:
            await never.wait()
        finally:
            flight.leave(x)
        return x

    def fails(x: int) -> int:
        raise Boom(x)

    pipeline = cv.Pipeline(range(5)).map(held_after_zero, workers=5, runtime="async").map(fails)
    with pytest.raises(Boom):
        run_in_mode(pipeline, mode)
    assert sorted(flight.cleaned) == [1, 2, 3, 4]
    assert not conveyor_threads()


@pytest.mark.quick
def test_cancelling_the_task_awaiting_arun_cancels_the_run_and_awaits_its_cleanup() -> None:
    flight = InFlight(3)
    never = Gate()

    async def held(x: int) -> int:
        flight.enter()
        try:
            await never.wait()
        finally:
            await asyncio.sleep(0)  # a cleanup that awaits still runs to its end
            flight.leave(x)
        return x

    async def main() -> None:
        pipeline = cv.Pipeline(range(10)).map(held, workers=3, runtime="async")
        task = asyncio.ensure_future(pipeline.arun())
        while not flight.all_in.is_set():
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(flight.cleaned) == [0, 1, 2]
        assert not conveyor_threads()

    asyncio.run(main())


# ---------------------------------------------------------------------- workers, hooks


@pytest.mark.quick
@modes
def test_workers_is_the_most_coroutines_of_a_stage_in_flight_at_once(mode: str) -> None:
    flight = InFlight(4)
    full = Gate()

    async def counted(x: int) -> int:
        flight.enter()
        if flight.all_in.is_set():
            full.open()
        await full.wait()  # the first four wait until all four are in
        for _ in range(3):
            await asyncio.sleep(0)  # room for a fifth to sneak in, if it could
        flight.leave(x)
        return x

    result = run_in_mode(cv.Pipeline(range(40)).map(counted, workers=4, runtime="async"), mode)
    assert result.outputs == list(range(40))
    assert flight.most == 4


@pytest.mark.quick
@pytest.mark.parametrize("error", [Boom, asyncio.CancelledError])
def test_a_failing_coroutine_on_start_fails_the_run_with_the_stage_named(
    error: type[BaseException],
) -> None:
    # Repro (CancelledError, not a cancellation of the worker by the run): every
    # worker ended at once as if stopped, and the run "succeeded" with no output.
    async def cannot_connect() -> None:
        raise error("no database")

    pipeline = cv.Pipeline(range(5)).map(double, runtime="async", on_start=cannot_connect)
    with pytest.raises(error) as info:
        pipeline.run()
    assert "conveyor: on_start of stage 'double' (map) failed" in notes(info.value)


@pytest.mark.quick
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt, asyncio.CancelledError])
def test_a_failing_on_stop_fails_the_run_with_its_error_and_the_stage_named(
    error: type[BaseException],
) -> None:
    async def cannot_close(state: object) -> None:
        raise error("connection reset")

    pipeline = cv.Pipeline(range(5)).map(double, workers=2, runtime="async", on_stop=cannot_close)
    with pytest.raises(error) as info:
        pipeline.run()
    assert "conveyor: on_stop of stage 'double' (map) failed" in notes(info.value)
    assert not conveyor_threads()


# ---------------------------------------------------------------------- the loop


@pytest.mark.quick
def test_conveyors_own_loop_serves_sockets_and_timers() -> None:
    loop = new_event_loop()

    async def exchange() -> bytes:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        with a, b:
            running = asyncio.get_running_loop()
            reader = running.create_task(running.sock_recv(b, 5))
            await asyncio.sleep(0.002)  # a timer, then readiness on the socket
            await running.sock_sendall(a, b"hello")
            return await asyncio.wait_for(reader, WAIT)

    try:
        assert loop.run_until_complete(exchange()) == b"hello"
    finally:
        loop.close()


@pytest.mark.skipif(sys.platform != "linux", reason="the precise selector is Linux's")
def test_a_caller_can_run_async_for_on_conveyors_kind_of_loop() -> None:
    # asyncio.Runner(loop_factory=...) (3.11+) or asyncio.run(..., loop_factory=...) (3.12+):
    # the async stages then run on the caller's loop, which waits to the microsecond.
    from conveyor.runtime.aio import _PreciseEpollSelector

    async def main() -> tuple[list[int], bool]:
        loop = asyncio.get_running_loop()
        precise = isinstance(getattr(loop, "_selector", None), _PreciseEpollSelector)
        pipeline = cv.Pipeline(range(20)).map(double, workers=4, runtime="async")
        return [x async for x in pipeline], precise

    with asyncio.Runner(loop_factory=cv.new_event_loop) as runner:
        outputs, precise = runner.run(main())
    assert outputs == [2 * x for x in range(20)]
    assert precise


def selector_class(loop: asyncio.AbstractEventLoop) -> type:
    return type(getattr(loop, "_selector", None))


@pytest.mark.skipif(sys.platform != "linux", reason="asyncio's epoll selector is Linux's")
@pytest.mark.parametrize("ends", ["done", "raises", "left early"])
def test_asyncios_default_loop_waits_precisely_while_a_run_is_on_it(ends: str) -> None:
    # asyncio's default loop rounds every wait up to 1 ms (I/O stages lose about a
    # tenth of their rate to it): while async stages run on it, its selector waits
    # to the microsecond; once the run ends, however it ends, the loop is as it was.
    import selectors

    from conveyor.runtime.aio import _PreciseEpollSelector

    seen: list[type] = []

    async def look(x: int) -> int:
        seen.append(selector_class(asyncio.get_running_loop()))
        if ends == "raises" and x == 3:
            raise Boom(x)
        return x

    async def main() -> type:
        pipeline = cv.Pipeline(range(10)).map(look, workers=2, runtime="async")
        if ends == "left early":
            async with aclosing(pipeline.__aiter__()) as outputs:
                async for x in outputs:
                    if x == 2:
                        break
        else:
            try:
                assert [x async for x in pipeline] == list(range(10))
            except Boom:
                assert ends == "raises"
        return selector_class(asyncio.get_running_loop())

    loop = asyncio.new_event_loop()
    try:
        assert selector_class(loop) is selectors.EpollSelector
        after = loop.run_until_complete(main())
    finally:
        loop.close()
    assert seen and set(seen) == {_PreciseEpollSelector}
    assert after is selectors.EpollSelector


@pytest.mark.skipif(sys.platform != "linux", reason="asyncio's epoll selector is Linux's")
def test_the_loop_stays_precise_until_the_last_of_two_runs_on_it_ends() -> None:
    import selectors

    from conveyor.runtime.aio import _PreciseEpollSelector

    async def main() -> list[type]:
        loop = asyncio.get_running_loop()
        first_inside, release_first = asyncio.Event(), asyncio.Event()

        async def held(x: int) -> int:
            first_inside.set()
            await release_first.wait()
            return x

        first = asyncio.ensure_future(cv.Pipeline(range(3)).map(held, runtime="async").arun())
        await first_inside.wait()
        classes = [selector_class(loop)]
        await cv.Pipeline(range(3)).map(double, runtime="async").arun()
        classes.append(selector_class(loop))  # the first run is still on it
        release_first.set()
        await first
        classes.append(selector_class(loop))
        return classes

    precise, epoll = _PreciseEpollSelector, selectors.EpollSelector
    assert asyncio.run(main()) == [precise, precise, epoll]


@pytest.mark.skipif(sys.platform != "linux", reason="asyncio's epoll selector is Linux's")
def test_a_loop_with_a_selector_of_the_users_own_class_is_left_alone() -> None:
    import selectors

    class Mine(selectors.EpollSelector):
        pass

    async def main() -> list[type]:
        loop = asyncio.get_running_loop()
        seen = []

        async def look(x: int) -> int:
            seen.append(selector_class(loop))
            return x

        await cv.Pipeline(range(3)).map(look, runtime="async").arun()
        return seen

    loop = asyncio.SelectorEventLoop(Mine())
    try:
        assert set(loop.run_until_complete(main())) == {Mine}
        assert selector_class(loop) is Mine
    finally:
        loop.close()


@pytest.mark.skipif(sys.platform != "linux", reason="asyncio's epoll selector is Linux's")
def test_a_selector_switched_back_while_it_waits_finishes_its_wait() -> None:
    # Regression (a cancelled arun with a stuck stage): the run's end switches the
    # caller's selector back from the joining thread while the loop's thread may be
    # inside the precise select(), which then called super() on an object no longer
    # of its class: TypeError out of the loop. The state, reproduced: the precise
    # method running on a selector already switched back.
    import selectors

    from conveyor.runtime.aio import _make_waits_precise, _PreciseEpollSelector, _restore_waits

    loop = asyncio.new_event_loop()
    try:
        selector = _make_waits_precise(loop)
        assert selector is not None
        _restore_waits(selector)
        assert type(selector) is selectors.EpollSelector
        assert _PreciseEpollSelector.select(selector, 0.001) == []  # waited, nothing ready
        assert _PreciseEpollSelector.select(selector, 0) == []
    finally:
        loop.close()
