"""Unit tests of `conveyor.Channel` and `conveyor.Producer`, thread side.

Every blocking scenario is synchronised through the channel's own statistics
(``waiting_producers`` / ``waiting_consumers``), events and barriers: a test
waits until a thread is *known* to be parked before it acts. The only sleep is
inside `wait_until`, a bounded polling helper. The asyncio side is in
``test_channel_async.py``, the property and stress tests in
``test_channel_properties.py``.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import pickle
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import conveyor
from conveyor import (
    Channel,
    ChannelStats,
    ConfigurationError,
    ConfigurationTypeError,
    Empty,
    Full,
    Producer,
    ShutDown,
)

pytestmark = [pytest.mark.quick, pytest.mark.timeout(20)]

WAIT = 5.0  # seconds: the bound of every wait for another thread


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds.

    The channel offers no event for "a thread is now parked", so tests poll its
    statistics. The tiny sleep only paces this bounded loop (as trio's thread
    tests do); it never stands in for a synchronisation.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout} s: {predicate}")
        time.sleep(0.001)


class Worker(threading.Thread):
    """Run ``fn(*args)`` in a daemon thread and keep its result or its exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self._args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException as exc:  # kept for the test to inspect
            self.error = exc

    def finish(self, timeout: float = WAIT) -> Any:
        """Join (bounded), re-raise the thread's exception, else return its result."""
        self.join(timeout)
        assert not self.is_alive(), f"{self._fn} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result

    def failure(self, timeout: float = WAIT) -> BaseException:
        """Join (bounded) and return the exception the thread raised."""
        self.join(timeout)
        assert not self.is_alive(), f"{self._fn} still running after {timeout} s"
        assert self.error is not None, f"{self._fn} returned {self.result!r} instead of raising"
        return self.error


def parked_producers(ch: Channel[Any], n: int) -> Callable[[], bool]:
    return lambda: ch.stats().waiting_producers == n


def parked_consumers(ch: Channel[Any], n: int) -> Callable[[], bool]:
    return lambda: ch.stats().waiting_consumers == n


def full_channel(capacity: int) -> Channel[int]:
    ch: Channel[int] = Channel(capacity)
    for i in range(capacity):
        ch.put(i)
    return ch


# ---------------------------------------------------------------------------- construction


def test_default_channel_is_unbounded() -> None:
    ch: Channel[int] = Channel()
    assert ch.maxsize == 0
    for i in range(10_000):
        ch.put_nowait(i)
    assert ch.qsize() == 10_000
    assert not ch.full()
    assert ch.stats().capacity == 0


@pytest.mark.parametrize("maxsize", [-1, -100])
def test_negative_maxsize_is_a_configuration_error_naming_the_parameter(maxsize: int) -> None:
    with pytest.raises(ConfigurationError) as info:
        Channel(maxsize)
    assert isinstance(info.value, ValueError)
    # queue.Queue's negative maxsize means unbounded: the message says what does here.
    assert str(info.value) == (
        f"Channel 'maxsize' must be an int >= 0 (0 for unbounded), got {maxsize}"
    )


@pytest.mark.parametrize(
    ("maxsize", "type_name"),
    [(1.5, "float"), ("8", "str"), (None, "NoneType"), (True, "bool"), (False, "bool")],
)
def test_non_int_or_bool_maxsize_is_a_configuration_type_error(
    maxsize: Any, type_name: str
) -> None:
    with pytest.raises(ConfigurationTypeError) as info:
        Channel(maxsize)
    assert isinstance(info.value, TypeError)
    assert str(info.value) == (
        f"Channel 'maxsize' must be an int >= 0 (0 for unbounded), got {type_name} {maxsize!r}"
    )


@pytest.mark.parametrize("max_bytes", [None, 1 << 20])
@pytest.mark.parametrize(
    "copy_it", [pickle.dumps, copy.copy, copy.deepcopy], ids=["pickle", "copy", "deepcopy"]
)
def test_a_channel_cannot_be_pickled_or_copied_and_says_what_to_use(
    copy_it: Callable[[Any], Any], max_bytes: int | None
) -> None:
    # Repro: pickle.dumps(Channel(4)) raised "cannot pickle '_thread.lock' object".
    ch: Channel[int] = Channel(4, max_bytes=max_bytes)
    with pytest.raises(TypeError, match=r"cannot be pickled or copied.*runtime='process'"):
        copy_it(ch)


@pytest.mark.parametrize(
    "copy_it", [pickle.dumps, copy.copy, copy.deepcopy], ids=["pickle", "copy", "deepcopy"]
)
def test_a_producer_handle_cannot_be_pickled_or_copied_and_says_to_clone_it(
    copy_it: Callable[[Any], Any],
) -> None:
    # Repro: copy.copy(handle) made a second handle the channel did not count; closing
    # it and the original closed the channel while another producer still had items.
    ch: Channel[int] = Channel(4)
    handle, other = ch.producer(), ch.producer()
    with pytest.raises(TypeError, match=r"producer handle cannot be pickled or copied.*clone\(\)"):
        copy_it(handle)
    handle.close()
    other.put(1)  # the channel is still open for the other producer
    other.close()
    assert list(ch) == [1]


def test_configuration_errors_are_conveyor_errors() -> None:
    assert issubclass(ConfigurationError, conveyor.ConveyorError)
    assert issubclass(ConfigurationTypeError, conveyor.ConveyorError)


# ---------------------------------------------------------------------------- exceptions


def test_empty_and_full_are_the_queue_modules_exceptions() -> None:
    assert conveyor.Empty is queue.Empty
    assert conveyor.Full is queue.Full


@pytest.mark.skipif(sys.version_info < (3, 13), reason="queue.ShutDown is new in 3.13")
def test_shutdown_is_queue_shutdown_on_313_and_later() -> None:
    assert conveyor.ShutDown is queue.ShutDown  # type: ignore[attr-defined,unused-ignore]


def test_shutdown_is_an_exception_and_not_a_conveyor_error() -> None:
    assert issubclass(ShutDown, Exception)
    assert not issubclass(ShutDown, conveyor.ConveyorError)


# ---------------------------------------------------------------------------- put / get


def test_items_come_out_in_fifo_order() -> None:
    ch: Channel[int] = Channel(5)
    for i in range(5):
        ch.put(i)
    assert [ch.get() for _ in range(5)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("value", [None, "THE END", 0, "", False, (), Ellipsis])
def test_any_value_including_none_and_the_end_is_data(value: object) -> None:
    ch: Channel[object] = Channel(3)
    with ch.producer() as p:
        p.put(value)
        p.put_many([value, value])
    assert list(ch) == [value, value, value]


def test_put_nowait_on_a_full_channel_raises_full() -> None:
    ch = full_channel(2)
    with pytest.raises(Full):
        ch.put_nowait(9)
    with pytest.raises(Full):
        ch.put(9, block=False)
    assert ch.qsize() == 2
    assert ch.stats().total_put == 2


def test_get_nowait_on_an_empty_channel_raises_empty() -> None:
    ch: Channel[int] = Channel(2)
    with pytest.raises(Empty):
        ch.get_nowait()
    with pytest.raises(Empty):
        ch.get(block=False)


def test_non_blocking_forms_work_when_they_can() -> None:
    ch: Channel[int] = Channel(1)
    ch.put_nowait(1)
    assert ch.get_nowait() == 1
    ch.put(2, False)
    assert ch.get(False) == 2


def test_put_with_a_timeout_on_a_full_channel_raises_full_after_the_timeout() -> None:
    ch = full_channel(1)
    start = time.monotonic()
    with pytest.raises(Full):
        ch.put(9, timeout=0.05)
    assert time.monotonic() - start >= 0.05
    assert ch.stats().waiting_producers == 0  # the timed-out waiter removed itself
    assert ch.qsize() == 1


def test_get_with_a_timeout_on_an_empty_channel_raises_empty_after_the_timeout() -> None:
    ch: Channel[int] = Channel(1)
    start = time.monotonic()
    with pytest.raises(Empty):
        ch.get(timeout=0.05)
    assert time.monotonic() - start >= 0.05
    assert ch.stats().waiting_consumers == 0


def test_zero_timeout_fails_at_once() -> None:
    ch = full_channel(1)
    with pytest.raises(Full):
        ch.put(9, timeout=0)
    ch.get()
    with pytest.raises(Empty):
        ch.get(timeout=0)


@pytest.mark.parametrize("timeout", [-1, -0.001, math.nan])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda ch, t: ch.put(1, timeout=t), id="put"),
        pytest.param(lambda ch, t: ch.get(timeout=t), id="get"),
        pytest.param(lambda ch, t: ch.put_many([1], timeout=t), id="put_many"),
        pytest.param(lambda ch, t: ch.get_many(4, timeout=t), id="get_many"),
    ],
)
def test_negative_or_nan_timeout_is_a_configuration_error(
    call: Callable[[Channel[int], float], object], timeout: float
) -> None:
    ch: Channel[int] = Channel(4)
    ch.put(0)  # an item and room are available: the timeout is still checked
    with pytest.raises(ConfigurationError, match="'timeout' must be a non-negative number") as e:
        call(ch, timeout)
    assert isinstance(e.value, ValueError)
    assert ch.qsize() == 1


def test_blocked_put_resumes_when_a_consumer_makes_room() -> None:
    ch = full_channel(2)
    putter = Worker(ch.put, 99)
    wait_until(parked_producers(ch, 1))
    assert ch.get() == 0
    putter.finish()
    assert [ch.get(), ch.get()] == [1, 99]
    assert ch.stats().waiting_producers == 0


def test_blocked_get_resumes_when_a_producer_puts() -> None:
    ch: Channel[str] = Channel(2)
    getter = Worker(ch.get)
    wait_until(parked_consumers(ch, 1))
    ch.put("x")
    assert getter.finish() == "x"
    assert ch.stats().waiting_consumers == 0


def test_put_with_a_timeout_succeeds_when_room_is_made_in_time() -> None:
    ch = full_channel(1)
    putter = Worker(lambda: ch.put(7, timeout=WAIT))
    wait_until(parked_producers(ch, 1))
    ch.get()
    putter.finish()
    assert ch.get_nowait() == 7


def test_get_with_a_timeout_succeeds_when_an_item_comes_in_time() -> None:
    ch: Channel[int] = Channel(1)
    getter = Worker(lambda: ch.get(timeout=WAIT))
    wait_until(parked_consumers(ch, 1))
    ch.put(7)
    assert getter.finish() == 7


@pytest.mark.parametrize("timeout", [1e12, math.inf])
def test_a_huge_or_infinite_timeout_waits_instead_of_overflowing(timeout: float) -> None:
    # Regression: the private lock's acquire() rejects timeouts above
    # threading.TIMEOUT_MAX with OverflowError; the channel clamps them.
    ch: Channel[int] = Channel(1)
    getter = Worker(lambda: ch.get(timeout=timeout))
    wait_until(parked_consumers(ch, 1))
    ch.put(5)
    assert getter.finish() == 5
    ch.put(6)
    putter = Worker(lambda: ch.put(7, timeout=timeout))
    wait_until(parked_producers(ch, 1))
    assert ch.get() == 6
    putter.finish()
    assert ch.get() == 7


def test_parked_getters_are_served_oldest_first() -> None:
    ch: Channel[int] = Channel(4)
    first = Worker(ch.get)
    wait_until(parked_consumers(ch, 1))
    second = Worker(ch.get)
    wait_until(parked_consumers(ch, 2))
    ch.put(1)
    assert first.finish() == 1
    assert second.is_alive()
    ch.put(2)
    assert second.finish() == 2


def test_parked_putters_are_served_oldest_first() -> None:
    ch = full_channel(1)  # holds 0
    first = Worker(ch.put, 1)
    wait_until(parked_producers(ch, 1))
    second = Worker(ch.put, 2)
    wait_until(parked_producers(ch, 2))
    assert ch.get() == 0
    first.finish()
    assert ch.get() == 1
    second.finish()
    assert ch.get() == 2


# ---------------------------------------------------------------------------- qsize / empty / full


def test_qsize_empty_and_full_follow_the_contents() -> None:
    ch: Channel[int] = Channel(2)
    assert (ch.qsize(), ch.empty(), ch.full()) == (0, True, False)
    ch.put(1)
    assert (ch.qsize(), ch.empty(), ch.full()) == (1, False, False)
    ch.put(2)
    assert (ch.qsize(), ch.empty(), ch.full()) == (2, False, True)
    ch.get()
    assert (ch.qsize(), ch.empty(), ch.full()) == (1, False, False)


def test_an_unbounded_channel_is_never_full() -> None:
    ch: Channel[int] = Channel(0)
    ch.put_many(range(1000))
    assert not ch.full()
    assert ch.qsize() == 1000


# ---------------------------------------------------------------------------- task_done / join


def joiner_is_waiting(ch: Channel[Any]) -> Callable[[], bool]:
    # Condition keeps its sleepers in `_waiters` (CPython 3.11-3.15 alike): the
    # only way to know that join() is really blocked rather than not yet called.
    return lambda: len(ch.all_tasks_done._waiters) == 1  # type: ignore[attr-defined]


def test_join_returns_at_once_when_nothing_was_put() -> None:
    ch: Channel[int] = Channel(2)
    ch.join()
    assert ch.unfinished_tasks == 0


def test_join_blocks_until_every_item_is_marked_done() -> None:
    ch: Channel[int] = Channel(4)
    ch.put_many([1, 2, 3])
    assert ch.unfinished_tasks == 3
    joiner = Worker(ch.join)
    wait_until(joiner_is_waiting(ch))
    for expected_left in (2, 1):
        ch.get()
        ch.task_done()
        assert ch.unfinished_tasks == expected_left
        assert joiner.is_alive()
    ch.get()
    ch.task_done()
    joiner.finish()
    assert ch.unfinished_tasks == 0


def test_task_done_called_too_many_times_raises_value_error() -> None:
    ch: Channel[int] = Channel(2)
    with pytest.raises(ValueError, match="task_done"):
        ch.task_done()
    ch.put(1)
    ch.get()
    ch.task_done()
    with pytest.raises(ValueError, match="task_done"):
        ch.task_done()


def test_join_returns_after_an_immediate_shutdown_discards_the_items() -> None:
    ch: Channel[int] = Channel(4)
    ch.put_many([1, 2, 3])
    joiner = Worker(ch.join)
    wait_until(joiner_is_waiting(ch))
    ch.shutdown(immediate=True)
    joiner.finish()
    assert ch.unfinished_tasks == 0


def test_join_after_an_immediate_shutdown_still_waits_for_items_already_taken() -> None:
    # As in Python 3.13: only the discarded items count as done.
    ch: Channel[int] = Channel(4)
    ch.put_many([1, 2, 3])
    taken = ch.get()
    ch.shutdown(immediate=True)
    assert ch.unfinished_tasks == 1
    joiner = Worker(ch.join)
    wait_until(joiner_is_waiting(ch))
    assert taken == 1
    ch.task_done()
    joiner.finish()
    assert ch.unfinished_tasks == 0


def test_join_works_after_get_many() -> None:
    ch: Channel[int] = Channel(8)
    ch.put_many(range(5))
    batch = ch.get_many(8)
    joiner = Worker(ch.join)
    wait_until(joiner_is_waiting(ch))
    for _ in batch:
        ch.task_done()
    joiner.finish()


# ---------------------------------------------------------------------------- shutdown / close


def test_put_after_shutdown_raises_shutdown() -> None:
    ch: Channel[int] = Channel(2)
    ch.shutdown()
    with pytest.raises(ShutDown):
        ch.put(1)
    with pytest.raises(ShutDown):
        ch.put_nowait(1)
    with pytest.raises(ShutDown):
        ch.put(1, timeout=1.0)


def test_getters_drain_the_items_left_then_raise_shutdown() -> None:
    ch: Channel[int] = Channel(4)
    ch.put_many([1, 2, 3])
    ch.shutdown()
    assert ch.get() == 1
    assert ch.get_nowait() == 2
    assert ch.get(timeout=1.0) == 3
    for get in (ch.get, ch.get_nowait, lambda: ch.get(timeout=1.0), ch.get_many):
        with pytest.raises(ShutDown):
            get()


def test_shutdown_makes_every_blocked_putter_raise_shutdown() -> None:
    ch = full_channel(2)
    putters = [Worker(ch.put, 10), Worker(lambda: ch.put(11, timeout=WAIT))]
    wait_until(parked_producers(ch, 2))
    ch.shutdown()
    for putter in putters:
        assert isinstance(putter.failure(), ShutDown)
    assert ch.stats().waiting_producers == 0
    assert list(ch) == [0, 1]  # the items already in are kept for the consumers


def test_shutdown_makes_every_blocked_getter_raise_shutdown() -> None:
    ch: Channel[int] = Channel(2)
    getters = [Worker(ch.get), Worker(lambda: ch.get(timeout=WAIT)), Worker(ch.get_many)]
    wait_until(parked_consumers(ch, 3))
    ch.shutdown()
    for getter in getters:
        assert isinstance(getter.failure(), ShutDown)
    assert ch.stats().waiting_consumers == 0


def test_immediate_shutdown_discards_the_items_left() -> None:
    ch: Channel[int] = Channel(4)
    ch.put_many([1, 2, 3])
    ch.shutdown(immediate=True)
    assert ch.qsize() == 0
    assert ch.empty()
    with pytest.raises(ShutDown):
        ch.get_nowait()
    stats = ch.stats()
    assert (stats.size, stats.total_put, stats.total_got, stats.closed) == (0, 3, 3, True)


def test_immediate_shutdown_makes_blocked_getters_and_putters_raise() -> None:
    ch: Channel[int] = Channel(1)
    getter = Worker(ch.get)
    wait_until(parked_consumers(ch, 1))
    ch.shutdown(immediate=True)
    assert isinstance(getter.failure(), ShutDown)

    ch = full_channel(1)
    putter = Worker(ch.put, 1)
    wait_until(parked_producers(ch, 1))
    ch.shutdown(immediate=True)
    assert isinstance(putter.failure(), ShutDown)
    assert ch.qsize() == 0


def test_immediate_shutdown_after_a_normal_one_still_discards() -> None:
    ch: Channel[int] = Channel(4)
    ch.put_many([1, 2])
    ch.shutdown()
    ch.shutdown(immediate=True)
    assert ch.qsize() == 0
    with pytest.raises(ShutDown):
        ch.get()


def test_shutdown_and_close_are_idempotent() -> None:
    ch: Channel[int] = Channel(4)
    ch.put(1)
    ch.close()
    ch.close()
    ch.shutdown()
    assert ch.closed
    assert ch.is_shutdown
    assert ch.get() == 1
    with pytest.raises(ShutDown):
        ch.get()


def test_close_is_shutdown_without_discarding() -> None:
    ch: Channel[int] = Channel(4)
    assert not ch.closed
    ch.put_many([1, 2])
    ch.close()
    assert ch.closed
    assert ch.stats().closed
    assert list(ch) == [1, 2]


def test_iteration_ends_when_the_channel_is_closed_and_drained() -> None:
    ch: Channel[int] = Channel(2)
    consumer = Worker(lambda: list(ch))
    for i in range(10):
        ch.put(i)
    ch.close()
    assert consumer.finish() == list(range(10))


def test_iteration_of_a_closed_empty_channel_yields_nothing() -> None:
    ch: Channel[int] = Channel(2)
    ch.close()
    assert list(ch) == []


def test_a_consumer_parked_in_iteration_ends_on_close() -> None:
    ch: Channel[int] = Channel(2)
    consumer = Worker(lambda: list(ch))
    wait_until(parked_consumers(ch, 1))
    ch.close()
    assert consumer.finish() == []


# ---------------------------------------------------------------------------- producer handles


def test_the_channel_closes_when_the_last_producer_handle_closes() -> None:
    ch: Channel[int] = Channel(4)
    first, second = ch.producer(), ch.producer()
    assert ch.stats().open_producers == 2
    first.put(1)
    first.close()
    assert first.closed
    assert not ch.closed
    assert ch.stats().open_producers == 1
    second.put(2)
    second.close()
    assert ch.closed
    assert ch.stats().open_producers == 0
    assert list(ch) == [1, 2]


def test_closing_a_handle_twice_counts_once() -> None:
    ch: Channel[int] = Channel(4)
    first, second = ch.producer(), ch.producer()
    first.close()
    first.close()
    assert not ch.closed
    assert ch.stats().open_producers == 1
    second.close()
    assert ch.closed


def test_a_consumer_loop_ends_when_the_last_handle_closes() -> None:
    ch: Channel[int] = Channel(2)
    handles = [ch.producer() for _ in range(3)]
    consumer = Worker(lambda: sorted(ch))
    wait_until(parked_consumers(ch, 1))

    def produce(handle: Producer[int], base: int) -> None:
        with handle:
            for i in range(20):
                handle.put(base + i)

    producers = [Worker(produce, h, 100 * n) for n, h in enumerate(handles)]
    for p in producers:
        p.finish()
    assert consumer.finish() == sorted(100 * n + i for n in range(3) for i in range(20))


def test_an_exception_inside_with_producer_still_closes_its_handle() -> None:
    ch: Channel[int] = Channel(4)
    other = ch.producer()
    with pytest.raises(ZeroDivisionError), ch.producer() as p:
        p.put(1)
        1 / 0  # noqa: B018
    assert p.closed
    assert not ch.closed  # another handle is open
    other.close()
    assert ch.closed
    assert list(ch) == [1]


def test_an_exception_inside_the_last_with_producer_closes_the_channel() -> None:
    ch: Channel[int] = Channel(4)
    consumer = Worker(lambda: list(ch))
    with pytest.raises(RuntimeError, match="boom"), ch.producer() as p:
        p.put(1)
        raise RuntimeError("boom")
    assert ch.closed
    assert consumer.finish() == [1]


def test_clone_adds_a_handle_on_the_same_channel() -> None:
    ch: Channel[int] = Channel(4)
    original = ch.producer()
    clone = original.clone()
    assert isinstance(clone, Producer)
    assert clone.channel is ch is original.channel
    assert ch.stats().open_producers == 2
    original.close()
    clone.put(5)
    assert not ch.closed
    clone.close()
    assert ch.closed
    assert list(ch) == [5]


def test_clone_of_a_closed_handle_raises_shutdown() -> None:
    ch: Channel[int] = Channel(4)
    keep = ch.producer()
    closed = ch.producer()
    closed.close()
    with pytest.raises(ShutDown):
        closed.clone()
    assert ch.stats().open_producers == 1
    keep.close()


def test_producer_on_a_closed_channel_raises_shutdown() -> None:
    ch: Channel[int] = Channel(4)
    ch.close()
    with pytest.raises(ShutDown):
        ch.producer()
    assert ch.stats().open_producers == 0


def test_producer_after_the_last_handle_closed_raises_shutdown() -> None:
    ch: Channel[int] = Channel(4)
    ch.producer().close()
    with pytest.raises(ShutDown):
        ch.producer()


def test_puts_through_a_closed_handle_raise_shutdown_while_the_channel_is_open() -> None:
    # Regression: a closed handle used to keep putting while other handles
    # held the channel open.
    ch: Channel[int] = Channel(4)
    keep = ch.producer()
    with ch.producer() as p:
        p.put(1)
    for put in (lambda: p.put(2), lambda: p.put_many([2, 3]), lambda: p.put(2, False)):
        with pytest.raises(ShutDown):
            put()
    assert not ch.closed
    keep.put(4)
    keep.close()
    assert list(ch) == [1, 4]


def test_explicit_close_with_open_handles_stops_their_puts() -> None:
    ch: Channel[int] = Channel(4)
    handle = ch.producer()
    ch.close()
    with pytest.raises(ShutDown):
        handle.put(1)
    handle.close()  # still fine: closing a handle of a closed channel
    assert handle.closed


def test_a_handle_put_blocks_like_a_channel_put() -> None:
    ch = full_channel(1)
    handle = ch.producer()
    putter = Worker(handle.put, 1)
    wait_until(parked_producers(ch, 1))
    assert ch.get() == 0
    putter.finish()
    handle.close()
    assert list(ch) == [1]


# ---------------------------------------------------------------------------- put_many / get_many


def test_put_many_and_get_many_keep_the_order() -> None:
    ch: Channel[int] = Channel(10)
    ch.put_many([1, 2, 3])
    ch.put_many(x for x in (4, 5))  # any iterable
    ch.put_many([])
    assert ch.get_many(2) == [1, 2]
    assert ch.get_many(64) == [3, 4, 5]
    assert ch.stats().total_put == 5


def test_get_many_returns_between_one_and_max_items() -> None:
    ch: Channel[int] = Channel(100)
    ch.put_many(range(100))
    assert len(ch.get_many(1)) == 1
    assert len(ch.get_many()) == 64  # the default
    assert len(ch.get_many(1000)) == 35
    getter = Worker(lambda: ch.get_many(10))
    wait_until(parked_consumers(ch, 1))
    ch.put(7)
    assert getter.finish() == [7]  # it does not wait to fill the batch


@pytest.mark.parametrize("max_items", [0, -1])
def test_get_many_rejects_max_items_below_one(max_items: int) -> None:
    ch: Channel[int] = Channel(4)
    ch.put(1)
    with pytest.raises(
        ConfigurationError, match=r"get_many\(\) 'max_items' must be an int >= 1, got"
    ) as e:
        ch.get_many(max_items)
    assert isinstance(e.value, ValueError)
    assert ch.qsize() == 1


@pytest.mark.parametrize(("max_items", "type_name"), [(2.5, "float"), ("3", "str"), (True, "bool")])
def test_get_many_rejects_max_items_that_is_not_an_int(max_items: Any, type_name: str) -> None:
    # Regression: 2.5 and True were accepted, "3" failed with a bare TypeError.
    ch: Channel[int] = Channel(4)
    ch.put(1)
    with pytest.raises(ConfigurationTypeError) as e:
        ch.get_many(max_items)
    assert str(e.value) == (
        f"Channel.get_many() 'max_items' must be an int >= 1, got {type_name} {max_items!r}"
    )
    assert ch.qsize() == 1


@pytest.mark.parametrize("max_bytes", [None, 1000])
@pytest.mark.parametrize(("items", "type_name"), [(5, "int"), (None, "NoneType")])
def test_put_many_refuses_what_is_no_iterable_naming_items(
    items: Any, type_name: str, max_bytes: int | None
) -> None:
    # Regression: a bare "TypeError: 'int' object is not iterable" named nothing.
    ch: Channel[int] = Channel(4, max_bytes=max_bytes)
    message = f"Channel.put_many() 'items' must be an iterable of items, got {type_name}"
    with pytest.raises(ConfigurationTypeError, match=re.escape(message)):
        ch.put_many(items)

    async def aput_many() -> None:
        await ch.aput_many(items)

    amessage = re.escape(message.replace("put_many", "aput_many"))
    with pytest.raises(ConfigurationTypeError, match=amessage):
        asyncio.run(aput_many())
    assert ch.qsize() == 0


def test_get_many_non_blocking_and_timeout_forms_raise_empty() -> None:
    ch: Channel[int] = Channel(4)
    with pytest.raises(Empty):
        ch.get_many(4, block=False)
    with pytest.raises(Empty):
        ch.get_many(4, timeout=0.02)
    ch.put(1)
    assert ch.get_many(4, block=False) == [1]


def test_get_many_drains_after_close_then_raises_shutdown() -> None:
    ch: Channel[int] = Channel(8)
    ch.put_many(range(5))
    ch.close()
    assert ch.get_many(3) == [0, 1, 2]
    assert ch.get_many(3) == [3, 4]
    with pytest.raises(ShutDown):
        ch.get_many(3)
    with pytest.raises(ShutDown):
        ch.get_many(3, block=False)


def test_get_many_wakes_as_many_parked_putters_as_it_frees_room() -> None:
    ch = full_channel(2)
    putters = [Worker(ch.put, 10), Worker(ch.put, 11)]
    wait_until(parked_producers(ch, 2))
    assert ch.get_many(2) == [0, 1]
    for putter in putters:
        putter.finish()
    assert sorted(ch.get_many(2)) == [10, 11]


def test_put_many_wakes_as_many_parked_getters_as_it_brings_items() -> None:
    ch: Channel[int] = Channel(4)
    getters = [Worker(ch.get) for _ in range(3)]
    wait_until(parked_consumers(ch, 3))
    ch.put_many([1, 2, 3])
    assert sorted(g.finish() for g in getters) == [1, 2, 3]


def test_a_put_many_larger_than_the_room_blocks_partway_and_never_overfills() -> None:
    capacity, n = 4, 50
    ch: Channel[int] = Channel(capacity)
    ch.put(-1)
    putter = Worker(ch.put_many, list(range(n)))
    wait_until(parked_producers(ch, 1))
    # It filled the room it had, and no more, then parked.
    stats = ch.stats()
    assert (stats.size, stats.total_put) == (capacity, capacity)

    def consume() -> tuple[list[int], int]:
        got, biggest = [], 0
        while len(got) < n + 1:
            got.append(ch.get())
            biggest = max(biggest, ch.stats().size)
        return got, biggest

    consumer = Worker(consume)
    got, biggest = consumer.finish()
    putter.finish()
    assert got == [-1, *range(n)]
    assert biggest <= capacity
    assert ch.stats().total_put == n + 1


def test_a_put_many_larger_than_the_room_is_seen_within_capacity_by_a_watcher() -> None:
    capacity, n = 3, 300
    ch: Channel[int] = Channel(capacity)
    stop = threading.Event()

    def watch() -> int:
        biggest = 0
        while not stop.is_set():
            biggest = max(biggest, ch.stats().size)
        return biggest

    watcher = Worker(watch)
    consumer = Worker(lambda: [x for batch in iter_batches(ch) for x in batch])
    with ch.producer() as p:
        p.put_many(range(n))
    got = consumer.finish()
    stop.set()
    assert watcher.finish() <= capacity
    assert got == list(range(n))


def iter_batches(ch: Channel[int]) -> list[list[int]]:
    batches = []
    while True:
        try:
            batches.append(ch.get_many(2))
        except ShutDown:
            return batches


def test_put_many_non_blocking_on_too_little_room_raises_full_with_items_put() -> None:
    ch: Channel[str] = Channel(3)
    ch.put("a")
    with pytest.raises(Full) as info:
        ch.put_many(["b", "c", "d", "e"], block=False)
    assert info.value.items_put == 2  # type: ignore[attr-defined]
    assert ch.get_many(10) == ["a", "b", "c"]


def test_put_many_with_a_timeout_raises_full_with_items_put() -> None:
    ch: Channel[int] = Channel(2)
    start = time.monotonic()
    with pytest.raises(Full) as info:
        ch.put_many([1, 2, 3], timeout=0.05)
    assert time.monotonic() - start >= 0.05
    assert info.value.items_put == 2  # type: ignore[attr-defined]
    assert ch.stats().waiting_producers == 0


def test_put_many_on_a_full_channel_non_blocking_puts_nothing() -> None:
    ch = full_channel(2)
    with pytest.raises(Full) as info:
        ch.put_many([5], block=False)
    assert info.value.items_put == 0  # type: ignore[attr-defined]


def test_a_blocked_put_many_raises_shutdown_with_items_put() -> None:
    ch: Channel[int] = Channel(2)
    putter = Worker(ch.put_many, list(range(6)))
    wait_until(lambda: ch.stats().waiting_producers == 1 and ch.stats().total_put == 2)
    assert ch.get_many(2) == [0, 1]  # room for two more; then it parks again
    wait_until(lambda: ch.stats().waiting_producers == 1 and ch.stats().total_put == 4)
    ch.shutdown()
    error = putter.failure()
    assert isinstance(error, ShutDown)
    assert error.items_put == 4  # type: ignore[attr-defined]
    assert list(ch) == [2, 3]


@pytest.mark.parametrize("items", [[1, 2], []])
def test_put_many_on_a_closed_channel_raises_shutdown_with_nothing_put(items: list[int]) -> None:
    # An empty batch too (regression: it used to be silently accepted).
    ch: Channel[int] = Channel(2)
    ch.close()
    with pytest.raises(ShutDown) as info:
        ch.put_many(items)
    assert info.value.items_put == 0  # type: ignore[attr-defined]


def test_put_many_on_an_unbounded_channel_never_blocks() -> None:
    ch: Channel[int] = Channel()
    ch.put_many(range(10_000), block=False)
    assert ch.qsize() == 10_000


# ---------------------------------------------------------------------------- stats


def test_stats_is_a_frozen_snapshot_of_every_field() -> None:
    ch: Channel[int] = Channel(4)
    handle = ch.producer()
    handle.put_many([1, 2, 3])
    ch.get()
    stats = ch.stats()
    assert isinstance(stats, ChannelStats)
    assert stats == ChannelStats(
        size=2,
        capacity=4,
        waiting_producers=0,
        waiting_consumers=0,
        total_put=3,
        total_got=1,
        closed=False,
        open_producers=1,
    )
    assert stats.fill == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.size = 0  # type: ignore[misc]
    handle.close()
    assert ch.stats().closed
    assert stats.closed is False  # a snapshot does not change afterwards


def test_stats_counts_waiting_producers_and_consumers() -> None:
    ch: Channel[int] = Channel(1)
    getters = [Worker(ch.get) for _ in range(2)]
    wait_until(parked_consumers(ch, 2))
    assert ch.stats().waiting_producers == 0
    ch.put_many([1, 2])
    for g in getters:
        g.finish()
    ch.put(3)
    putters = [Worker(ch.put, 4), Worker(ch.put, 5)]
    wait_until(parked_producers(ch, 2))
    assert ch.stats().waiting_consumers == 0
    assert ch.stats().fill == 1.0
    ch.shutdown(immediate=True)
    for p in putters:
        p.failure()
    stats = ch.stats()
    assert (stats.waiting_producers, stats.waiting_consumers) == (0, 0)
    assert (stats.total_put, stats.total_got) == (3, 3)


def test_fill_of_an_unbounded_channel_is_zero() -> None:
    ch: Channel[int] = Channel()
    ch.put(1)
    assert ch.stats().fill == 0.0


def test_repr_shows_state_size_and_capacity() -> None:
    ch: Channel[int] = Channel(3)
    ch.put(1)
    assert repr(ch) == "<Channel open size=1 maxsize=3>"
    ch.close()
    assert repr(ch) == "<Channel closed size=1 maxsize=3>"


# ---------------------------------------------------------------------------- cross-thread sanity


@pytest.mark.parametrize("capacity", [1, 3, 0])
def test_many_threads_through_one_channel_lose_and_duplicate_nothing(capacity: int) -> None:
    ch: Channel[tuple[int, int]] = Channel(capacity)
    handles = [ch.producer() for _ in range(3)]
    start = threading.Barrier(3 + 2)

    def produce(handle: Producer[tuple[int, int]], pid: int) -> None:
        start.wait(WAIT)
        with handle:
            for i in range(500):
                handle.put((pid, i))

    def consume() -> list[tuple[int, int]]:
        start.wait(WAIT)
        return list(ch)

    consumers = [Worker(consume) for _ in range(2)]
    producers = [Worker(produce, h, pid) for pid, h in enumerate(handles)]
    for p in producers:
        p.finish()
    results = [c.finish() for c in consumers]
    got = sorted(x for r in results for x in r)
    assert got == sorted((pid, i) for pid in range(3) for i in range(500))
    for r in results:  # FIFO per producer, as each consumer sees it
        for pid in range(3):
            seq = [i for p, i in r if p == pid]
            assert seq == sorted(seq)


# ---------------------------------------------------------------------------- wait_for_room


def test_wait_for_room_returns_the_room_left_at_once() -> None:
    ch: Channel[int] = Channel(5)
    ch.put_many([1, 2])
    assert ch.wait_for_room() == 3
    assert ch.wait_for_room(timeout=0) == 3
    assert ch.qsize() == 2  # it puts nothing


def test_wait_for_room_of_an_unbounded_channel_is_sys_maxsize() -> None:
    ch: Channel[int] = Channel()
    ch.put_many(range(100))
    assert ch.wait_for_room() == sys.maxsize


def test_wait_for_room_blocks_until_a_consumer_makes_room() -> None:
    ch = full_channel(3)
    waiter = Worker(ch.wait_for_room)
    wait_until(parked_producers(ch, 1))
    ch.get_many(2)
    assert waiter.finish() == 2


def test_wait_for_room_raises_full_after_its_timeout() -> None:
    ch = full_channel(1)
    with pytest.raises(Full):
        ch.wait_for_room(timeout=0.02)
    assert ch.stats().waiting_producers == 0
    with pytest.raises(ConfigurationError):
        ch.wait_for_room(timeout=-1)


def test_wait_for_room_raises_shutdown_on_a_closed_channel_and_when_closed() -> None:
    ch = full_channel(1)
    waiter = Worker(ch.wait_for_room)
    wait_until(parked_producers(ch, 1))
    ch.close()
    assert isinstance(waiter.failure(), ShutDown)
    with pytest.raises(ShutDown):
        ch.wait_for_room()


def test_a_wait_for_room_that_does_not_put_does_not_strand_a_parked_putter() -> None:
    # Regression: wait_for_room() took the wake-up of the only free slot and,
    # when its caller then put nothing (source exhausted), a putter parked
    # behind it slept on with room in the channel.
    ch = full_channel(1)
    waiter = Worker(ch.wait_for_room)
    wait_until(parked_producers(ch, 1))
    putter = Worker(ch.put, 99)
    wait_until(parked_producers(ch, 2))
    assert ch.get() == 0  # one slot: wakes the oldest, the room waiter
    assert waiter.finish() == 1
    putter.finish()  # it must get the slot the room waiter did not use
    assert ch.get_nowait() == 99


def test_wait_for_room_with_least_returns_once_that_much_room_is_free() -> None:
    ch = full_channel(4)
    waiter = Worker(lambda: ch.wait_for_room(least=3))
    wait_until(parked_producers(ch, 1))
    ch.get_many(2)
    waiter.join(0.05)
    assert waiter.is_alive()  # two free slots: not yet
    assert ch.get() == 2
    assert waiter.finish() == 3


def test_wait_for_room_least_counts_at_most_the_capacity() -> None:
    ch: Channel[int] = Channel(2)
    assert ch.wait_for_room(least=10) == 2
    ch.put(1)
    with pytest.raises(Full):
        ch.wait_for_room(timeout=0.02, least=5)
    assert ch.stats().waiting_producers == 0
    assert Channel[int]().wait_for_room(least=3) == sys.maxsize  # unbounded: never waits


def test_a_wait_for_room_with_least_does_not_strand_a_putter_parked_behind_it() -> None:
    ch = full_channel(2)
    waiter = Worker(lambda: ch.wait_for_room(least=2))
    wait_until(parked_producers(ch, 1))
    putter = Worker(ch.put, 99)
    wait_until(parked_producers(ch, 2))
    assert ch.get() == 0  # one slot: too little for the room waiter, enough for the put
    putter.finish()
    assert ch.get_many(2) == [1, 99]
    assert waiter.finish() == 2


def test_a_putter_parked_before_a_wait_for_room_with_least_is_woken_by_one_get() -> None:
    ch = full_channel(2)
    putter = Worker(ch.put, 99)
    wait_until(parked_producers(ch, 1))
    waiter = Worker(lambda: ch.wait_for_room(least=2))
    wait_until(parked_producers(ch, 2))
    assert ch.get() == 0
    putter.finish()
    assert ch.get_many(2) == [1, 99]
    assert waiter.finish() == 2


def test_wait_for_room_with_least_under_a_byte_budget_waits_for_the_slots_and_the_bytes() -> None:
    ch: Channel[bytes] = Channel(3, max_bytes=30)
    ch.put_many([b"x" * 10, b"y" * 10, b"z" * 10])
    waiter = Worker(lambda: ch.wait_for_room(least=2))
    wait_until(parked_producers(ch, 1))
    ch.get()
    waiter.join(0.05)
    assert waiter.is_alive()  # one slot free
    ch.get()
    assert waiter.finish() == 2


class _InterruptedOnRelease:
    """A channel's lock whose first release() is followed by a KeyboardInterrupt, as a
    Ctrl-C lands when Python runs signal handlers right after that call returns."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.armed = True

    def acquire(self, *args: Any) -> bool:
        return bool(self._lock.acquire(*args))

    def release(self) -> None:
        self._lock.release()
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def locked(self) -> bool:
        return bool(self._lock.locked())

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@pytest.mark.parametrize("call", ["get", "get_many", "put"])
def test_a_ctrl_c_right_as_a_waiter_lets_go_of_the_lock_is_itself_and_the_channel_goes_on(
    call: str,
) -> None:
    # Repro (an intermittent failure of a Ctrl-C test): a KeyboardInterrupt landing
    # as the waiting thread let go of the lock escaped with the lock not held; the
    # caller's `finally: release()` then raised "release unlocked lock", which hid
    # the KeyboardInterrupt, and the waiter stayed on the channel's deque.
    ch: Channel[int] = Channel(1)
    if call == "put":
        ch.put(0)
    real = ch._lock
    ch._lock = _InterruptedOnRelease(real)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        if call == "get":
            ch.get(timeout=5.0)
        elif call == "get_many":
            ch.get_many(4, timeout=5.0)
        else:
            ch.put(1, timeout=5.0)
    ch._lock = real
    assert real.acquire(blocking=False), "the lock was left held"
    real.release()
    assert not ch._getters and not ch._putters  # no waiter left behind
    if call == "put":
        assert ch.get(timeout=5.0) == 0
    ch.put(2, timeout=5.0)
    assert ch.get(timeout=5.0) == 2
