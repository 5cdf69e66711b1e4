"""Errors, retries, timeouts, and the promise that a run never hangs.

Every "ends promptly" test measures from the trigger (the raise, the stop,
the break) to the moment the run has joined its threads, against the 1 s
contract, and checks that no ``conveyor-*`` thread is left.
"""

from __future__ import annotations

import inspect
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import conveyor as cv
from test_pipeline_helpers import (  # noqa: F401 - no_thread_left is a fixture
    PROMPT,
    WAIT,
    CountingSource,
    conveyor_threads,
    identity,
    must_wait,
    no_thread_left,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("no_thread_left")

TINY = cv.Backoff(initial=0.001)


class Boom(Exception):
    """The error the tests' stage functions raise."""


class Trigger:
    """Remembers when the event that must end the run happened."""

    def __init__(self) -> None:
        self.at: float | None = None

    def fire(self) -> None:
        if self.at is None:
            self.at = time.perf_counter()

    def elapsed(self) -> float:
        assert self.at is not None, "the trigger never fired"
        return time.perf_counter() - self.at


def stage_notes(exc: BaseException) -> list[str]:
    return [n for n in getattr(exc, "__notes__", []) if n.startswith("conveyor:")]


# ---------------------------------------------------------------------- on_error="raise"


def _failing(kind: str, bad: Any) -> Any:
    def fn(x: Any) -> Any:
        if x == bad:
            raise Boom(f"bad item {x!r}")
        return [x] if kind == "flat_map" else x

    return fn


@pytest.mark.quick
@pytest.mark.parametrize("kind", ["map", "filter", "flat_map", "each"])
@pytest.mark.parametrize("workers", [1, 3])
def test_the_note_of_the_first_error_names_the_stage_its_kind_and_the_item(
    kind: str, workers: int
) -> None:
    # Stays outside the contract suite: the note's text for every stage kind and a
    # str item's repr. It is made by policy.add_stage_note, the same code on every
    # runtime; the contract suite checks the error and its note on every runtime x
    # backend for a map stage (a raise through Redis waits for its dead letters,
    # seconds a run), and every kind's failures with on_error="skip".
    p = getattr(cv.Pipeline(f"item-{i}" for i in range(50)), kind)(
        _failing(kind, "item-17"), workers=workers, name="parse"
    )
    with pytest.raises(Boom) as info:
        p.run()
    assert stage_notes(info.value) == [f"conveyor: stage 'parse' ({kind}) failed on item 'item-17'"]


def test_the_error_is_the_very_exception_raised_with_its_traceback() -> None:
    raised: list[BaseException] = []

    def parse(x: int) -> int:
        if x == 3:
            error = Boom("three")
            raised.append(error)
            raise error
        return x

    with pytest.raises(Boom) as info:
        list(cv.Pipeline(range(10)).map(parse))
    assert info.value is raised[0]
    assert "parse" in [entry.name for entry in info.traceback]


@pytest.mark.parametrize("how", ["iterate", "run", "start"])
def test_an_error_ends_the_run_promptly_stops_the_source_and_joins_every_thread(
    how: str,
) -> None:
    source = CountingSource(limit=10**7)
    trigger = Trigger()

    def fragile(x: int) -> int:
        if x == 100:
            trigger.fire()
            raise Boom(x)
        return x

    p = (
        cv.Pipeline(source)
        .map(identity, workers=3, capacity=8)
        .map(fragile, workers=4, capacity=8)
        .map(identity, workers=2, capacity=8)
    )
    with pytest.raises(Boom):
        if how == "iterate":
            for _ in p:
                pass
        elif how == "run":
            p.run()
        else:
            p.start().join(WAIT)
    assert trigger.elapsed() < PROMPT
    assert not conveyor_threads()
    # Stopped: far from pulled to the end (channels and batches hold a few hundred at most).
    assert source.pulled < 100 + 3 * 8 + 3 * 512


def test_an_error_in_an_ordered_stage_whose_workers_wait_on_the_window_still_ends() -> None:
    gate = threading.Event()
    trigger = Trigger()

    def first_is_slow_then_fails(x: int) -> int:
        if x == 0:
            must_wait(gate)
            trigger.fire()
            raise Boom(x)
        return x

    handle = cv.Pipeline(range(10**6)).map(first_is_slow_then_fails, workers=4).start()
    # White-box: wait until the other workers have taken every batch the reorder
    # window allows and sit waiting for item 0's batch to be released.
    sequencer = handle._run.stage_runs[0].ports[0].sequencer  # type: ignore[attr-defined]
    assert sequencer is not None
    wait_until(lambda: sequencer._next_ticket - sequencer._next >= sequencer._window)
    gate.set()
    with pytest.raises(Boom):
        handle.join(WAIT)
    assert trigger.elapsed() < PROMPT
    assert not conveyor_threads()


def test_an_error_while_downstream_is_full_ends_promptly() -> None:
    """A slow consumer: every channel is full and every worker is blocked on a put."""
    trigger = Trigger()
    first = threading.Event()

    def fails_later(x: int) -> int:
        if x == 0:
            first.set()
        if x == 5000:
            trigger.fire()
            raise Boom(x)
        return x

    p = cv.Pipeline(range(10**6)).map(fails_later, workers=2, capacity=4).map(identity)
    it = iter(p)
    with pytest.raises(Boom):
        assert next(it) == 0
        must_wait(first)
        for _ in it:
            pass
    assert trigger.elapsed() < PROMPT
    assert not conveyor_threads()


# ---------------------------------------------------------------------- on_error="skip"


def test_failures_are_listed_in_the_report_and_the_json() -> None:
    result = cv.Pipeline(range(5)).map(lambda x: 1 // (x - 2), on_error="skip").run()
    (failure,) = result.failures
    assert (failure.item, type(failure.error)) == (2, ZeroDivisionError)
    # The message is the interpreter's own (its wording changes between versions).
    described = f"ZeroDivisionError: {failure.error}"
    assert str(failure.error)
    assert f"2 -> {described}" in result.report()
    (listed,) = json.loads(result.to_json())["failures"]
    assert listed == {"stage": "map", "item": "2", "error": described, "attempts": 1}


# ---------------------------------------------------------------------- retries and backoff


class Flaky:
    """Fails the first ``failures`` calls on each item, then returns the item."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[Any, int] = {}
        self._lock = threading.Lock()

    def __call__(self, x: Any) -> Any:
        with self._lock:
            self.calls[x] = self.calls.get(x, 0) + 1
            attempt = self.calls[x]
        if attempt <= self.failures:
            raise Boom(f"attempt {attempt} on {x!r}")
        return x


def test_an_item_out_of_retries_is_skipped_with_its_number_of_attempts() -> None:
    flaky = Flaky(failures=2)
    result = cv.Pipeline(["a"]).map(flaky, retries=1, backoff=TINY, on_error="skip").run()
    (failure,) = result.failures
    assert (failure.item, failure.attempts, str(failure.error)) == ("a", 2, "attempt 2 on 'a'")
    assert flaky.calls == {"a": 2}
    assert result.stats[0].retried == 1


def test_an_item_out_of_retries_raises_its_last_error() -> None:
    flaky = Flaky(failures=5)
    with pytest.raises(Boom, match="attempt 3 on 7"):
        cv.Pipeline([7]).map(flaky, retries=2, backoff=TINY).run()
    assert flaky.calls == {7: 3}


def test_retries_do_not_duplicate_the_outputs_of_a_flat_map_that_failed_halfway() -> None:
    calls: dict[int, int] = {}

    def halfway(x: int) -> Iterator[int]:
        calls[x] = calls.get(x, 0) + 1
        yield x
        if calls[x] == 1:
            raise Boom(x)
        yield -x

    p = cv.Pipeline(range(5)).flat_map(halfway, retries=1, backoff=TINY)
    assert list(p) == [0, 0, 1, -1, 2, -2, 3, -3, 4, -4]


@pytest.mark.quick
def test_backoff_grows_exponentially_up_to_its_maximum_without_jitter() -> None:
    backoff = cv.Backoff(initial=0.1, maximum=1.0, multiplier=3.0, jitter=False)
    assert [backoff.delay(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.3, 0.9, 1.0])


@pytest.mark.quick
def test_backoff_with_jitter_draws_a_wait_below_the_bound() -> None:
    backoff = cv.Backoff(initial=0.1, maximum=0.5, multiplier=2.0)
    delays = [backoff.delay(3) for _ in range(200)]
    assert all(0.0 <= d <= 0.4 for d in delays)
    assert len(set(delays)) > 100  # drawn, not fixed


@pytest.mark.quick
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"initial": -1}, cv.ConfigurationError),
        ({"maximum": -0.5}, cv.ConfigurationError),
        ({"multiplier": 0.5}, cv.ConfigurationError),
        ({"initial": "1"}, cv.ConfigurationTypeError),
        # Above the default maximum (5 s), which would cap every wait at 5 s unsaid.
        ({"initial": 60}, cv.ConfigurationError),
    ],
)
def test_a_bad_backoff_is_refused_naming_its_field(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    (field,) = kwargs
    with pytest.raises(error, match=f"'{field}'"):
        cv.Backoff(**kwargs)


@pytest.mark.quick
def test_a_backoff_may_start_at_its_maximum_but_not_above_it() -> None:
    assert cv.Backoff(initial=2.0, maximum=2.0).delay(1) <= 2.0
    with pytest.raises(cv.ConfigurationError, match=r"'initial' \(3.0 s\) is more than 'maximum'"):
        cv.Backoff(initial=3.0, maximum=2.0)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_stop_during_a_long_backoff_ends_the_run_promptly_and_is_not_a_failure(
    on_error: str,
) -> None:
    """Regression: the item whose retries the stop cut short was reported as failed."""
    failing = threading.Event()

    def always_fails(x: int) -> int:
        failing.set()
        raise Boom(x)

    slow = cv.Backoff(initial=60.0, maximum=60.0, jitter=False)
    p = cv.Pipeline([1]).map(always_fails, retries=3, backoff=slow, on_error=on_error)
    handle = p.start()
    must_wait(failing)
    stopped_at = time.perf_counter()
    handle.stop()
    result = handle.join(WAIT)  # a stopped run does not raise
    assert time.perf_counter() - stopped_at < PROMPT
    assert result.stopped
    assert result.failures == []
    assert not conveyor_threads()


# ---------------------------------------------------------------------- timeout


class Stuck:
    """A stage function stuck on one item until the test releases it."""

    def __init__(self, stuck_on: Any, times: int = 1) -> None:
        self.stuck_on = stuck_on
        self.times = times
        self.calls = 0
        self.release = threading.Event()

    def __call__(self, x: Any) -> Any:
        if x == self.stuck_on:
            self.calls += 1
            if self.calls <= self.times:
                self.release.wait(WAIT)
        return x


def test_an_item_over_its_timeout_raises_a_timeout_error_naming_stage_and_item() -> None:
    stuck = Stuck("x")
    started = time.perf_counter()
    try:
        with pytest.raises(TimeoutError) as info:
            for _ in cv.Pipeline(["a", "x", "b"]).map(stuck, timeout=0.05, name="slow"):
                pass
        # The run ended promptly after the timeout, while the call is still stuck.
        assert time.perf_counter() - started < 0.05 + PROMPT
        assert not stuck.release.is_set()
        (note,) = stage_notes(info.value)
        assert "'slow'" in note
        assert "'x'" in note
        # The worker gave up on the call: only the abandoned helper may still run.
        assert [n for n in conveyor_threads() if not n.endswith("-timed")] == []
    finally:
        stuck.release.set()


def test_a_timed_out_item_is_retried_and_can_then_succeed() -> None:
    stuck = Stuck(2, times=1)
    try:
        result = (
            cv.Pipeline(range(5))
            .map(stuck, timeout=0.05, retries=1, backoff=TINY, workers=2)
            .run(collect=True)
        )
    finally:
        stuck.release.set()
    assert result.outputs == [0, 1, 2, 3, 4]
    assert stuck.calls == 2
    assert result.stats[0].retried == 1


def test_a_stage_with_a_timeout_still_passes_fast_items_and_errors_through() -> None:
    result = (
        cv.Pipeline(range(200))
        .map(lambda x: 10 // (x % 50), timeout=5.0, workers=3, on_error="skip")
        .run(collect=True)
    )
    assert sorted(f.item for f in result.failures) == [0, 50, 100, 150]
    assert len(result.outputs or []) == 196


def test_a_run_with_a_timed_stage_leaves_no_helper_thread_behind() -> None:
    """Regression: idle helper threads of timed calls were still alive after the run."""
    for _ in range(20):
        cv.Pipeline(range(20)).map(identity, workers=4, timeout=5.0).run()
        assert not conveyor_threads()


# ---------------------------------------------------------------------- never hangs


def test_stop_ends_a_busy_run_promptly_and_leaves_no_thread() -> None:
    # Stays outside the contract suite: the 1 s bound (PROMPT) is the thread
    # runtime's own, here over a busy pipeline of every stage kind. The contract
    # suite checks stop() (a stopped result, nothing left running) on every
    # runtime x backend.
    handle = (
        cv.Pipeline(CountingSource())  # never-ending
        .map(identity, workers=4, capacity=16)
        .flat_map(lambda x: [x, x], workers=2)
        .filter(lambda x: x % 3 != 0, workers=3, ordered=False)
        .batch(10)
        .each(len, workers=2)
        .start()
    )
    trigger = Trigger()
    wait_until(lambda: handle.stats()[-1].items_in >= 100)  # items flow through every stage
    trigger.fire()
    handle.stop()
    handle.join(WAIT)
    assert trigger.elapsed() < PROMPT
    assert not conveyor_threads()


def test_an_error_in_the_source_ends_the_run_with_that_error() -> None:
    trigger = Trigger()

    def source() -> Iterator[int]:
        yield from range(1000)
        trigger.fire()
        raise Boom("the source broke")

    p = cv.Pipeline(source()).map(identity, workers=3, capacity=8).map(identity)
    with pytest.raises(Boom, match="the source broke") as info:
        list(p)
    assert trigger.elapsed() < PROMPT
    assert any("source" in note for note in stage_notes(info.value))
    assert not conveyor_threads()


def test_an_error_in_an_async_source_ends_the_run_with_that_error() -> None:
    async def source() -> Any:
        yield 1
        raise Boom("async source")

    with pytest.raises(Boom, match="async source"):
        list(cv.Pipeline(source()).map(identity))
    assert not conveyor_threads()


@pytest.mark.parametrize("stages", [1, 3])
def test_breaking_out_of_the_loop_ends_the_run_promptly(stages: int) -> None:
    # Stays outside the contract suite: the 1 s bound (PROMPT) and how far the
    # source may have been pulled are the thread runtime's own figures. The
    # contract suite checks leaving a loop early on every runtime x backend.
    source = CountingSource()  # never-ending
    p: cv.Pipeline[Any] = cv.Pipeline(source)
    for i in range(stages):
        p = p.map(identity, workers=3, capacity=4, name=f"s{i}")
    trigger = Trigger()
    for out in p:
        if out == 20:
            trigger.fire()
            break
    assert trigger.elapsed() < PROMPT
    assert not conveyor_threads()
    pulled = source.pulled
    assert pulled < 20 + stages * (4 + 3 * 2) + 1024 + 16
    assert source.pulled == pulled  # nothing pulls the source any more


def test_closing_a_half_consumed_iterator_ends_the_run() -> None:
    it = iter(cv.Pipeline(CountingSource()).map(identity, workers=2))
    assert next(it) == 0
    it.close()  # type: ignore[attr-defined]
    assert not conveyor_threads()


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_a_keyboard_interrupt_raised_in_a_stage_reaches_the_caller_naming_the_item(
    error: type[BaseException], timeout: float | None
) -> None:
    """Regression: the note named the first item of the worker's batch, not the item."""
    trigger = Trigger()

    def interrupted(x: int) -> int:
        if x == 500:  # deep inside a batch: batches grow on quick items
            trigger.fire()
            raise error
        return x

    # on_error="skip" does not apply: Ctrl-C is not an item's failure.
    p = cv.Pipeline(CountingSource()).map(interrupted, workers=3, timeout=timeout, on_error="skip")
    with pytest.raises(error) as info:
        p.map(identity).run()
    assert trigger.elapsed() < PROMPT
    assert not conveyor_threads()
    (note,) = stage_notes(info.value)
    assert note == "conveyor: stage 'interrupted' (map) failed on item 500"


SIGINT_SCRIPT = textwrap.dedent(
    """
    import itertools, sys, threading, time
    import conveyor as cv

    def slowish(x):
        time.sleep(0.005)
        if x == 2 and sys.argv[1] != "iterate":
            print("ready", flush=True)  # the caller may not be waiting on the outputs yet
        return x

    try:
        pipeline = cv.Pipeline(itertools.count()).map(slowish, workers=2).map(str)
        if sys.argv[1] == "iterate":
            for i, out in enumerate(pipeline):
                if i == 0:
                    print("ready", flush=True)
        elif sys.argv[1] == "run":
            pipeline.run()
        else:
            pipeline.start().join()
    finally:
        left = [t.name for t in threading.enumerate() if t.name.startswith("conveyor-")]
        print("left", left, time.monotonic(), flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("how", ["iterate", "run", "join"])
def test_ctrl_c_in_a_program_running_a_pipeline_stops_it_promptly(how: str) -> None:
    """Regression (run, join): Ctrl-C just after the start, or while join() waited,
    left the run going with its threads."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT, how],
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
    assert proc.returncode != 0
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    words = out.split()
    assert words[0] == "left"
    assert out.startswith("left []"), out  # every conveyor thread joined before going on
    # time.monotonic() is one clock for both processes (CLOCK_MONOTONIC on Linux).
    assert float(words[-1]) - sent_at < PROMPT


def test_a_coroutine_a_thread_stage_returns_is_closed_and_retried_like_any_error() -> None:
    """Regression: ``map(lambda x: fetch(x))`` on threads sent coroutine objects on, and
    each warned "coroutine 'fetch' was never awaited" only when collected (with
    ``filterwarnings = error`` here, that warning fails the test)."""
    made: list[Any] = []

    async def fetch(x: int) -> int:
        return x

    def wrong(x: int) -> Any:
        made.append(fetch(x))
        return made[-1]

    pipeline = cv.Pipeline(range(3)).map(wrong, retries=1, backoff=TINY, on_error="skip")
    result = pipeline.run(collect=True)
    assert result.outputs == []
    assert [(f.item, f.attempts) for f in sorted(result.failures, key=lambda f: f.item)] == [
        (0, 2),
        (1, 2),
        (2, 2),
    ]
    assert len(made) == 6  # each item called twice: the retry applies
    assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in made)
    assert "runtime='thread'" in str(result.failures[0].error)


class Scratch:
    """What a stage holds while it works on an item (a decoded file, say)."""


_scratches: list[Any] = []  # weak references to every Scratch a stage made


def fails_holding_scratch(x: int) -> int:
    import weakref

    scratch = Scratch()
    _scratches.append(weakref.ref(scratch))
    raise ValueError(f"cannot take {x} ({type(scratch).__name__} held)")


async def afails_holding_scratch(x: int) -> int:
    return fails_holding_scratch(x)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runtime", ["thread", "async"])
def test_a_recorded_failure_does_not_keep_what_the_stage_held_alive(runtime: str) -> None:
    # The repro: 1,000 failures of a stage holding 1 MiB each kept 1 GiB alive, through
    # the frames of the recorded errors' tracebacks (a worker process's came back
    # without frames). The traceback still prints the stage's line.
    import gc
    import traceback

    _scratches.clear()
    fn = afails_holding_scratch if runtime == "async" else fails_holding_scratch
    result = cv.Pipeline(range(20)).map(fn, runtime=runtime, on_error="skip").run()  # type: ignore[arg-type]
    assert len(result.failures) == 20
    gc.collect()
    assert len(_scratches) == 20
    assert [ref() for ref in _scratches] == [None] * 20
    printed = "".join(traceback.format_exception(result.failures[0].error))
    assert 'raise ValueError(f"cannot take' in printed
    assert "in fails_holding_scratch" in printed
