"""When stage functions fail: raise, retries, skip, per-item timeouts.

Every test runs on every runtime x backend (the ``runner`` fixture, conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from runners import PROCESS_ONLY, SYNC_ONLY, Leftovers, Runner, described, wait_gone

import conveyor as cv
from conveyor.metrics import RunResult

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Boom(Exception):
    """The user's own exception class, raised by the stages below."""


BAD = 7
"""The item the failing stages fail on."""


def fail_on_bad(x: int) -> int:
    if x == BAD:
        raise Boom(f"cannot take {x}")
    return x * 10


def test_a_failing_item_ends_the_run_with_an_error_naming_the_stage_and_the_users_type(
    runner: Runner,
) -> None:
    pipeline = cv.Pipeline(range(20)).map(
        runner.fn(fail_on_bad), workers=2, runtime=runner.runtime, name="checker"
    )
    with pytest.raises(Exception) as info:
        # Dead letters come after the deliveries: two are enough to see them on Redis.
        runner.run(pipeline, backend_options={"max_deliveries": 2})
    text = described(info.value)
    assert "'checker'" in text
    assert f"item {BAD}" in text
    assert isinstance(info.value, Boom) or "Boom" in text, text


def test_the_users_exception_reaches_the_caller_with_its_type_and_a_note(
    runner: Runner,
) -> None:
    pipeline = cv.Pipeline(range(20)).map(
        runner.fn(fail_on_bad), workers=2, runtime=runner.runtime, name="checker"
    )
    # On one machine the run fails with the user's exception itself. Through Redis an
    # item that keeps raising is delivered again and parked in dead letters (the run
    # can be finished after a fix and a replay): the error is DeadLettersError, and
    # its cause is the user's exception as itself.
    with pytest.raises((Boom, cv.DeadLettersError)) as info:
        runner.run(pipeline, backend_options={"max_deliveries": 2})
    if runner.backend == "redis":
        assert isinstance(info.value, cv.DeadLettersError)
        assert info.value.dead == {"checker": 1}
        # Its text is a summary naming the error, not the worker's traceback
        # (which its cause carries): str() of it was the whole traceback.
        assert f"Last error of the first one: Boom: cannot take {BAD}." in str(info.value)
        assert "Traceback" not in str(info.value)
        error = info.value.__cause__
    else:
        error = info.value
    assert isinstance(error, Boom)
    assert str(error) == f"cannot take {BAD}"
    notes = [n for n in getattr(error, "__notes__", []) if n.startswith("conveyor:")]
    assert notes == [f"conveyor: stage 'checker' (map) failed on item {BAD}"]
    # Printed, it shows where the user's function raised it (its own traceback,
    # or the worker's as text in its cause).
    printed = "".join(traceback.format_exception(error))
    assert "fail_on_bad" in printed
    assert 'raise Boom(f"cannot take {x}")' in printed


def test_an_item_that_fails_twice_succeeds_on_its_third_attempt_with_retries_2(
    runner: Runner, tmp_path: Path
) -> None:
    folder = str(tmp_path)

    def flaky(x: int) -> int:
        # The attempt number is the first free marker file: counts across processes.
        attempt = 0
        while True:
            try:
                os.close(os.open(Path(folder, f"{x}-{attempt}"), os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                attempt += 1
        if attempt < 2:
            raise Boom(f"attempt {attempt} on {x}")
        return x + 100

    pipeline = cv.Pipeline(range(10)).map(
        runner.fn(flaky),
        workers=2,
        runtime=runner.runtime,
        retries=2,
        backoff=cv.Backoff(initial=0.001, maximum=0.01),
        name="flaky",
    )
    result = runner.run(pipeline, collect=True)
    assert result.outputs == [x + 100 for x in range(10)]
    # Three calls on each item, no more.
    calls = sorted(p.name for p in tmp_path.iterdir())
    assert calls == sorted(f"{x}-{attempt}" for x in range(10) for attempt in range(3))
    [stats] = result.stats
    assert (stats.items_in, stats.items_out, stats.retried, stats.failed) == (10, 10, 20, 0)
    assert result.failures == []


def bad_on_odd_tens(kind: str) -> Callable[[Any], Any]:
    """A ``kind`` stage function that fails on 10 and 30 and passes the rest on."""

    def picky(x: Any) -> Any:
        if x in (10, 30):
            raise Boom(f"cannot take {x}")
        return {"map": x, "filter": True, "flat_map": [x], "each": None}[kind]

    return picky


@pytest.mark.parametrize("kind", ["map", "filter", "flat_map", "each"])
def test_skip_records_each_failure_with_its_item_and_the_users_error(
    runner: Runner, kind: str
) -> None:
    items: list[Any] = [*range(40), None, "THE END"]
    pipeline = getattr(cv.Pipeline(items), kind)(
        runner.fn(bad_on_odd_tens(kind)),
        workers=3,
        runtime=runner.runtime,
        on_error="skip",
        retries=1,
        backoff=cv.Backoff(initial=0.001, maximum=0.01),
        name="picky",
    )
    result = runner.run(pipeline, collect=True)
    passed = [x for x in items if x not in (10, 30)]
    assert result.outputs == ([] if kind == "each" else passed)
    failures = sorted(result.failures, key=lambda f: repr(f.item))
    assert [(f.stage, f.item, f.attempts) for f in failures] == [
        ("picky", 10, 2),
        ("picky", 30, 2),
    ]
    for failure in failures:
        assert isinstance(failure.error, Boom), repr(failure.error)
        assert str(failure.error) == f"cannot take {failure.item}"
    [stats] = result.stats
    items_out = 0 if kind == "each" else 40
    assert (stats.items_in, stats.items_out, stats.failed, stats.retried) == (42, items_out, 2, 2)


def always_fails(x: int) -> int:
    raise Boom(f"cannot take {x}")


def test_a_run_records_its_first_failures_and_counts_every_one(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The repro: a run where every item failed kept every failure (with the stage's
    # frames) in memory; on Redis the record kept the last 10,000, and the report's
    # "... and N more" counted only those. Both keep the first FAILURES_KEPT (5 here).
    import conveyor.redis.port
    import conveyor.runtime.base

    for module in (conveyor.runtime.base, conveyor.redis.port):
        monkeypatch.setattr(module, "FAILURES_KEPT", 5)
    pipeline = cv.Pipeline(range(20)).map(
        runner.fn(always_fails), runtime=runner.runtime, on_error="skip", name="fails"
    )
    result = runner.run(pipeline)
    assert len(result.failures) == 5
    assert result.failures_not_kept == 15
    assert result.failed_counts()["skipped"] == 20
    assert result.stats[0].failed == 20
    assert all(isinstance(f.error, Boom) for f in result.failures)
    assert "... and 15 more (result.failures holds the first 5)" in result.report()
    assert result.as_dict()["failures_not_kept"] == 15


@dataclass
class Row:
    """A record of the user's, of a class defined beside the stage (sent by value)."""

    n: int


class BadRow(Exception):
    """The user's exception: its ``__init__`` takes a Row, its ``args`` hold the text."""

    def __init__(self, row: Row) -> None:
        super().__init__(f"bad {row}")
        self.row = row


def reject_bad_row(x: int) -> int:
    if x == BAD:
        raise BadRow(Row(x))
    return x


def test_an_exception_holding_an_object_of_the_users_class_is_recorded_as_itself(
    runner: Runner,
) -> None:
    # The repro (a script's own classes, sent to worker processes by value): the
    # worker process died of "PicklingError: Can't pickle <class '__main__.Row'>: it's
    # not the same object" and the item was recorded as WorkerCrashed; and once it
    # crossed, unpickling called BadRow.__init__ again with its text ("bad bad Row").
    pipeline = cv.Pipeline(range(10)).map(
        runner.fn(reject_bad_row), runtime=runner.runtime, on_error="skip", name="rows"
    )
    leftovers = Leftovers()
    result = runner.run(pipeline, collect=True)
    leftovers.assert_none()
    assert result.outputs == [x for x in range(10) if x != BAD]
    [failure] = result.failures
    assert isinstance(failure.error, BadRow), repr(failure.error)
    assert str(failure.error) == f"bad Row(n={BAD})"
    assert failure.attempts == 1
    if not runner.on_redis:  # msgpack carries plain data: the attribute stays behind
        assert failure.error.row == Row(BAD)


async def fetch_both(x: int) -> int:
    """Two calls at once in an asyncio.TaskGroup, which raises an ExceptionGroup."""
    if x != BAD:
        return x

    async def fails(error: Exception) -> None:
        await asyncio.sleep(0)
        raise error

    async with asyncio.TaskGroup() as group:
        group.create_task(fails(Boom("first")))
        group.create_task(fails(KeyError("second")))
    return x


def test_an_exception_group_is_recorded_as_itself_with_each_of_its_exceptions(
    runner: Runner,
) -> None:
    # The repro: a stage whose asyncio.TaskGroup failed (an ExceptionGroup) was
    # recorded through Redis as RemoteError('ExceptionGroup: ...'), so `except*`
    # and `.exceptions` did not work; on one machine it was the group itself.
    pipeline = cv.Pipeline(range(10)).map(
        runner.fn(fetch_both), runtime=runner.runtime, on_error="skip", name="both"
    )
    result = runner.run(pipeline, collect=True)
    assert result.outputs == [x for x in range(10) if x != BAD]
    [failure] = result.failures
    group = failure.error
    assert isinstance(group, ExceptionGroup), repr(group)
    assert group.message == "unhandled errors in a TaskGroup"
    inner = sorted(group.exceptions, key=lambda e: type(e).__name__)
    assert [type(e) for e in inner] == [Boom, KeyError]
    assert [e.args for e in inner] == [("first",), ("second",)]


HUNG = 3
"""The item that hangs in the timeout test."""
HANG_SECONDS = 10.0
"""Far longer than the timeouts: a hung call waits this long at most for its release."""


async def _hang_until_released(folder: str) -> None:
    """Hang like a stuck call, until the test releases it (a file: process workers
    see it too), so that an abandoned thread ends with its test, not during the next.
    A bounded polling loop: nothing else reaches a stuck call in another process."""
    Path(folder, "hung").write_text(str(os.getpid()))
    deadline = time.monotonic() + HANG_SECONDS
    while not Path(folder, "release").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _release(folder: str, leftovers: Leftovers) -> None:
    """Let a hung call end, and wait for the thread that ran it (abandoned by a
    timeout on the thread runtime) to be gone."""
    Path(folder, "release").touch()
    leftovers.assert_none()


def _run_skipping(
    runner: Runner, fn: Callable[[int], Any], timeout: float, name: str, folder: str
) -> tuple[RunResult, float]:
    """Run range(8) through ``fn`` with ``timeout`` and ``on_error="skip"``; release the
    hung call, whatever happened; return the result and how long the run took."""
    pipeline = cv.Pipeline(range(8)).map(
        runner.fn(fn),
        workers=2,
        runtime=runner.runtime,
        timeout=timeout,
        on_error="skip",
        name=name,
    )
    leftovers = Leftovers()
    started = time.monotonic()
    try:
        result = runner.run(pipeline, collect=True)
    finally:
        took = time.monotonic() - started
        _release(folder, leftovers)
    return result, took


def test_an_item_over_its_timeout_is_skipped_as_a_timeout_error_and_its_call_given_up(
    runner: Runner, tmp_path: Path
) -> None:
    folder = str(tmp_path)

    async def hang_on_3(x: int) -> int:
        if x == HUNG:
            # A process worker is killed, a coroutine cancelled, a thread abandoned
            # (it ends when released, below).
            await _hang_until_released(folder)
        return x

    result, took = _run_skipping(runner, hang_on_3, 0.5, "hangs", folder)
    assert took < 5.0, f"the run took {took:.1f} s: it waited for the hung call"
    assert result.outputs == [x for x in range(8) if x != HUNG]
    pid = int(Path(folder, "hung").read_text())
    if runner.runtime == "process":
        assert pid != os.getpid()
        assert not wait_gone([pid]), f"the worker process {pid} that hung is still alive"
    [failure] = result.failures
    assert (failure.stage, failure.item, failure.attempts) == ("hangs", HUNG, 1)
    assert isinstance(failure.error, TimeoutError), repr(failure.error)
    assert "stage 'hangs' (map) took longer than its timeout of 0.5 s" in str(failure.error)


@pytest.mark.parametrize("then", ["returns", "raises"])
def test_a_call_that_swallows_its_timeouts_cancellation_is_still_a_timeout(
    runner: Runner, tmp_path: Path, then: str
) -> None:
    """Regression: on the async runtime, a coroutine that caught the CancelledError of
    its timeout and returned a value counted as a success (its value went on), where
    the thread and process runtimes, which give up on the call, report a timeout."""
    folder = str(tmp_path)

    async def swallow_on_3(x: int) -> int:
        if x == HUNG:
            try:
                await _hang_until_released(folder)
            except asyncio.CancelledError:  # the timeout's, on the async runtime
                if then == "raises":
                    raise Boom("cleaning up after the cancellation failed") from None
                return -1
        return x

    result, _ = _run_skipping(runner, swallow_on_3, 0.2, "swallows", folder)
    assert result.outputs == [x for x in range(8) if x != HUNG]
    [failure] = result.failures
    assert (failure.stage, failure.item, failure.attempts) == ("swallows", HUNG, 1)
    assert isinstance(failure.error, TimeoutError), repr(failure.error)
    assert "stage 'swallows' (map) took longer than its timeout of 0.2 s" in str(failure.error)


def test_an_item_over_its_timeout_with_on_error_raise_ends_the_run_with_a_timeout_error(
    runner: Runner, tmp_path: Path
) -> None:
    folder = str(tmp_path)

    async def hang_on_3(x: int) -> int:
        if x == HUNG:
            await _hang_until_released(folder)
        return x

    pipeline = cv.Pipeline(range(8)).map(
        runner.fn(hang_on_3), workers=2, runtime=runner.runtime, timeout=0.2, name="hangs"
    )
    leftovers = Leftovers()
    started = time.monotonic()
    # Through Redis, as for any error of an item: DeadLettersError, with the
    # TimeoutError as its cause (one delivery is enough to see it).
    try:
        with pytest.raises((TimeoutError, cv.DeadLettersError)) as info:
            runner.run(pipeline, backend_options={"max_deliveries": 1})
    finally:
        took = time.monotonic() - started
        _release(folder, leftovers)
    assert took < 10.0, f"the run took {took:.1f} s: it waited for the hung call"
    error = info.value.__cause__ if runner.on_redis else info.value
    assert isinstance(error, TimeoutError), repr(error)
    assert "stage 'hangs' (map) took longer than its timeout of 0.2 s" in str(error)
    notes = [n for n in getattr(error, "__notes__", []) if n.startswith("conveyor:")]
    assert notes == [f"conveyor: stage 'hangs' (map) failed on item {HUNG}"]
    if runner.runtime == "process":
        pid = int(Path(folder, "hung").read_text())
        assert not wait_gone([pid]), f"the worker process {pid} that hung is still alive"


UNSENDABLE = 2
"""The item whose result cannot leave the worker (a lock: neither pickled nor encoded)."""


def lock_on_2(x: int) -> Any:
    return threading.Lock() if x == UNSENDABLE else x


def locker(runner: Runner, **options: Any) -> cv.Pipeline[Any]:
    """Five items through a stage 'locker' whose result for `UNSENDABLE` is a lock."""
    stage = runner.fn(lock_on_2)
    return cv.Pipeline(range(5)).map(stage, runtime=runner.runtime, name="locker", **options)


def _results_cross(runner: Runner) -> bool:
    """Whether a stage's results are serialized on their way to the caller (a worker
    process or interpreter, or a Redis stream), not handed on as they are."""
    return runner.on_redis or runner.runtime in ("process", "interpreter")


def test_a_result_that_cannot_go_on_is_a_serialization_error_that_skip_records(
    runner: Runner,
) -> None:
    result = runner.run(locker(runner, on_error="skip"), collect=True)
    if not _results_cross(runner):
        assert len(result.outputs) == 5 and result.failures == []  # handed on as it is
        return
    assert result.outputs == [x for x in range(5) if x != UNSENDABLE]
    [failure] = result.failures
    assert (failure.stage, failure.item) == ("locker", UNSENDABLE)
    assert isinstance(failure.error, cv.SerializationError), repr(failure.error)
    assert "stage 'locker' (map): a result of type _thread.lock cannot" in str(failure.error)


def test_a_result_that_cannot_go_on_with_on_error_raise_ends_the_run_with_a_serialization_error(
    runner: Runner,
) -> None:
    pipeline = locker(runner)
    if not _results_cross(runner):
        outputs = runner.run(pipeline, collect=True).outputs
        assert isinstance(outputs[UNSENDABLE], type(threading.Lock()))  # handed on as it is
        return
    # Through Redis, as for any error of an item: DeadLettersError, with the
    # SerializationError as its cause (one delivery is enough to see it).
    with pytest.raises((cv.SerializationError, cv.DeadLettersError)) as info:
        runner.run(pipeline, backend_options={"max_deliveries": 1})
    error = info.value.__cause__ if runner.on_redis else info.value
    assert isinstance(error, cv.SerializationError), repr(error)
    assert "stage 'locker' (map): a result of type _thread.lock cannot" in str(error)
    notes = [n for n in getattr(error, "__notes__", []) if n.startswith("conveyor:")]
    assert notes == [f"conveyor: stage 'locker' (map) failed on item {UNSENDABLE}"]


def exit_on_bad(x: int) -> int:
    if x == BAD:
        raise SystemExit(3)
    return x


def cancel_on_bad(x: int) -> int:
    # Stands for awaiting a future that something else cancelled: the stage's own
    # CancelledError, not a cancellation of the worker by the run.
    if x == BAD:
        raise asyncio.CancelledError(f"gave up on {x}")
    return x


def os_error_on_bad(x: int) -> int:
    if x == BAD:
        raise FileNotFoundError(2, "No such file or directory", f"/data/{x}.csv")
    return x


def test_an_os_error_from_a_stage_keeps_its_errno_and_filename(runner: Runner) -> None:
    # Repro: rebuilt across a process, an interpreter or Redis, an OSError kept its
    # args but lost errno, strerror and filename (None), which handlers test.
    pipeline = cv.Pipeline(range(20)).map(runner.fn(os_error_on_bad), runtime=runner.runtime)
    with pytest.raises((FileNotFoundError, cv.DeadLettersError)) as info:
        runner.run(pipeline, backend_options={"max_deliveries": 1})
    error = info.value.__cause__ if runner.on_redis else info.value
    assert isinstance(error, FileNotFoundError), repr(error)
    assert (error.errno, error.filename) == (2, f"/data/{BAD}.csv")
    assert str(error) == f"[Errno 2] No such file or directory: '/data/{BAD}.csv'"


def interrupt_on_bad(x: int) -> int:
    if x == BAD:
        raise KeyboardInterrupt
    return x


@pytest.mark.parametrize(
    ("fn", "kind"),
    [
        (exit_on_bad, SystemExit),
        (interrupt_on_bad, KeyboardInterrupt),
        (cancel_on_bad, asyncio.CancelledError),
    ],
)
def test_a_stage_raising_a_base_exception_ends_the_run_with_it(
    runner: Runner, fn: Callable[[int], int], kind: type[BaseException]
) -> None:
    # The repro: on threads and asyncio the run ended with the stage's SystemExit(3)
    # at once; a worker process (or interpreter) died of it instead, printing its
    # traceback, and the run failed with WorkerCrashed ("exited with code 3"), or,
    # on Redis, after every delivery, with DeadLettersError.
    # And on asyncio, a stage's own CancelledError (not the run cancelling the
    # worker) ended the run as if it were complete: no error, the items from the
    # failing one on silently lost, with on_error="skip" too.
    pipeline = cv.Pipeline(range(20)).map(runner.fn(fn), runtime=runner.runtime, name="quits")
    leftovers = Leftovers()
    started = time.monotonic()
    with pytest.raises(kind) as info:
        runner.run(pipeline)
    took = time.monotonic() - started
    leftovers.assert_none()
    assert took < 5.0, f"the run took {took:.1f} s to end"
    if kind is SystemExit:
        assert info.value.args == (3,)
        # Repro: across a process, an interpreter or Redis the code was None, so an
        # uncaught SystemExit of a failed stage ended the program with status 0.
        assert info.value.code == 3  # type: ignore[attr-defined]
    assert f"conveyor: stage 'quits' (map) failed on item {BAD}" in info.value.__notes__


def test_a_stages_own_cancelled_error_is_neither_skipped_nor_lost_when_iterating(
    runner: Runner,
) -> None:
    # Repro: on asyncio, iterating gave [0, ..., 6] and stopped, with no error.
    pipeline = cv.Pipeline(range(20)).map(
        runner.fn(cancel_on_bad), runtime=runner.runtime, on_error="skip", name="quits"
    )
    seen: list[int] = []
    with pytest.raises(asyncio.CancelledError) as info:
        for out in runner.iterate(pipeline):
            seen.append(out)
    assert BAD not in seen
    assert f"conveyor: stage 'quits' (map) failed on item {BAD}" in info.value.__notes__


def dies_on_bad(x: int) -> int:
    if x == BAD:
        os._exit(1)  # stands for a crash in C code
    return x * 10


@pytest.mark.parametrize("retries", [0, 1])
@pytest.mark.parametrize("runner", PROCESS_ONLY, indirect=True)
def test_an_item_that_kills_its_worker_is_recorded_after_retries_plus_one_attempts(
    runner: Runner, retries: int
) -> None:
    # The item crashed its worker in a batch of several, then alone: it said 2 attempts
    # with retries=0 (1 when it happened to be alone), against 1 for an item that raises.
    pipeline = cv.Pipeline(range(20)).map(
        dies_on_bad,
        runtime=runner.runtime,
        retries=retries,
        backoff=cv.Backoff(initial=0.001, maximum=0.01),
        on_error="skip",
        name="fragile",
    )
    result = runner.run(pipeline, collect=True)
    assert sorted(result.outputs or []) == [x * 10 for x in range(20) if x != BAD]
    [failure] = result.failures
    assert (failure.stage, failure.item, failure.attempts) == ("fragile", BAD, retries + 1)
    assert isinstance(failure.error, cv.WorkerCrashed)
    # The calls the stage counts agree with the attempts: it once counted the
    # batch that died as a retry (retried 1 with retries=0).
    [stats] = result.stats
    assert (stats.items_in, stats.items_out, stats.failed) == (20, 19, 1)
    assert stats.retried == retries


class SourceBroke(Exception):
    """What the failing sources below raise."""


def identity(x: int) -> int:
    return x


def broken_source(error: BaseException) -> Iterator[int]:
    yield 1
    yield 2
    raise error


async def broken_async_source(error: BaseException) -> AsyncIterator[int]:
    yield 1
    yield 2
    raise error


@pytest.mark.parametrize(
    "make_source",
    [
        lambda: broken_source(SourceBroke("the file went away")),
        lambda: broken_async_source(SourceBroke("the connection went away")),
        # Stands for an async source awaiting a future that something else cancelled.
        lambda: broken_async_source(asyncio.CancelledError("the feed was cancelled")),
    ],
    ids=["sync", "async", "async-cancelled-error"],
)
def test_a_source_that_raises_midway_ends_the_run_with_its_error_and_a_note(
    runner: Runner, make_source: Callable[[], Any]
) -> None:
    # Repro: an async source raising its own CancelledError ended the run as if
    # complete, with the items it had given and no error (the feeder thread died,
    # printing its traceback on stderr).
    source = make_source()
    pipeline = cv.Pipeline(source).map(runner.fn(identity), runtime=runner.runtime)
    leftovers = Leftovers()
    with pytest.raises((SourceBroke, asyncio.CancelledError)) as info:
        runner.run(pipeline)
    leftovers.assert_none()
    assert "conveyor: the source failed after 2 items" in info.value.__notes__


def stop_iteration_on_bad(x: int) -> int:
    if x == BAD:
        raise StopIteration  # a next() on an empty iterator, say
    return x


def stop_async_iteration_on_bad(x: int) -> int:
    if x == BAD:
        raise StopAsyncIteration
    return x


@pytest.mark.parametrize(
    ("fn", "how"), [(stop_iteration_on_bad, "iterate"), (stop_async_iteration_on_bad, "run")]
)
def test_a_stop_iteration_from_a_stage_is_a_runtime_error_naming_the_stage_and_item(
    runner: Runner, fn: Callable[[int], int], how: str
) -> None:
    # Repro: StopIteration became a bare RuntimeError("generator raised StopIteration"),
    # without the note naming the stage and the item (the iterator protocol forbids
    # raising it as itself: it would end the caller's loop as if done).
    pipeline = cv.Pipeline(range(20)).map(runner.fn(fn), runtime=runner.runtime, name="nexts")
    # Through Redis, as for any error of an item: DeadLettersError, its cause the error.
    with pytest.raises((RuntimeError, cv.DeadLettersError)) as info:
        options = {"max_deliveries": 2} if runner.backend == "redis" else {}
        if how == "run":
            runner.run(pipeline, backend_options=options)
        else:
            list(runner.iterate(pipeline, backend_options=options))
    raised = StopIteration if fn is stop_iteration_on_bad else StopAsyncIteration
    if runner.backend == "redis":
        assert isinstance(info.value, cv.DeadLettersError)
        assert info.value.dead == {"nexts": 1}
        error = info.value.__cause__
        assert error is not None
        # The stage's error as the worker saw it (an async stage's StopIteration is
        # Python's RuntimeError by then): under DeadLettersError, it ends no for loop.
        assert type(error) is raised or (
            type(error) is RuntimeError and raised.__name__ in str(error)
        )
    else:
        error = info.value
        assert type(error) is RuntimeError and type(error.__cause__) is raised
        if runner.runtime == "async" and raised is StopIteration:
            # Python itself turns it into a RuntimeError as it leaves the coroutine.
            assert str(error) == "coroutine raised StopIteration"
        else:
            assert f"{raised.__name__} raised in the pipeline" in str(error)
    assert f"conveyor: stage 'nexts' (map) failed on item {BAD}" in error.__notes__


async def doubled(x: int) -> int:
    return 2 * x


def calls_a_coroutine_function(x: int) -> Any:
    """The mistake: a plain function (a lambda, often) around an ``async def``."""
    return doubled(x)


@pytest.mark.parametrize("runner", SYNC_ONLY, indirect=True)
def test_a_plain_function_returning_a_coroutine_is_a_type_error_naming_the_stage(
    runner: Runner,
) -> None:
    # Repro: the coroutine objects went on as items, with only a RuntimeWarning
    # ("coroutine 'doubled' was never awaited") when they were collected.
    pipeline = cv.Pipeline(range(5)).map(
        calls_a_coroutine_function, runtime=runner.runtime, name="dbl"
    )
    with pytest.raises((TypeError, cv.DeadLettersError)) as info:
        runner.run(pipeline, backend_options={"max_deliveries": 2})
    error = info.value.__cause__ if runner.on_redis else info.value
    assert isinstance(error, TypeError), described(info.value)
    assert str(error).startswith(
        f"stage 'dbl' (map) returned a coroutine (doubled) on runtime={runner.runtime!r}"
    )
    assert 'runtime="async"' in str(error) and "async def" in str(error)


@pytest.mark.parametrize("runner", SYNC_ONLY, indirect=True)
@pytest.mark.parametrize("kind", ["map", "filter", "flat_map", "each"])
def test_a_coroutine_returned_by_a_plain_function_is_an_item_error_that_skip_records(
    runner: Runner, kind: str
) -> None:
    pipeline = getattr(cv.Pipeline(range(4)), kind)(
        calls_a_coroutine_function, runtime=runner.runtime, on_error="skip", name="dbl"
    )
    result = runner.run(pipeline, collect=True)
    assert result.outputs == []
    assert sorted(f.item for f in result.failures) == [0, 1, 2, 3]
    assert all(isinstance(f.error, TypeError) for f in result.failures)
    assert [s.failed for s in result.stats] == [4]


def one_not_a_list(x: int) -> int:
    return x


@pytest.mark.timeout(60)
def test_a_flat_map_function_returning_no_iterable_says_what_it_must_return(
    runner: Runner,
) -> None:
    # The repro: flat_map(lambda x: x) failed with "'int' object is not iterable",
    # which named neither flat_map nor what its function must return.
    pipeline = cv.Pipeline([1]).flat_map(
        runner.fn(one_not_a_list), name="split", runtime=runner.runtime
    )
    with pytest.raises(Exception) as info:
        runner.run(pipeline)
    assert (
        "a flat_map function must return an iterable of the item's outputs (a list, "
        "a tuple, a generator), got int"
    ) in described(info.value)
