"""Subclasses that override queue.Queue's storage hooks (_init, _qsize, _put, _get).

As with `queue.Queue`, a Channel subclass may keep its items in another order
(LIFO, priority) or fail in its hooks; every operation (batches and the
asyncio side included) then goes through the hooks, and a hook that raises
leaves the channel consistent and nobody stranded.
"""

from __future__ import annotations

import asyncio
import heapq
import threading

import pytest

import conveyor as cv
from test_channel import Worker, wait_until

pytestmark = [pytest.mark.quick, pytest.mark.timeout(30)]


class Priority(cv.Channel[int]):
    def _init(self, maxsize: int) -> None:
        self.queue: list[int] = []

    def _qsize(self) -> int:
        return len(self.queue)

    def _put(self, item: int) -> None:
        heapq.heappush(self.queue, item)

    def _get(self) -> int:
        return heapq.heappop(self.queue)


class Failing(cv.Channel[int]):
    """FIFO, but a _put or _get can be made to raise once, after some that work."""

    def __init__(self, maxsize: int = 0) -> None:
        self.puts_before_failure: int | None = None
        self.gets_before_failure: int | None = None
        super().__init__(maxsize)

    def _put(self, item: int) -> None:
        if self.puts_before_failure is not None:
            self.puts_before_failure -= 1
            if self.puts_before_failure < 0:
                self.puts_before_failure = None
                raise OSError("put failed")
        super()._put(item)

    def _get(self) -> int:
        if self.gets_before_failure is not None:
            self.gets_before_failure -= 1
            if self.gets_before_failure < 0:
                self.gets_before_failure = None
                raise OSError("get failed")
        return super()._get()


def test_batches_go_through_the_hooks() -> None:
    ch = Priority(8)
    ch.put_many([5, 3, 9, 1])
    assert ch.qsize() == 4 and ch.stats().size == 4
    assert ch.get_many(3) == [1, 3, 5]
    assert ch.get_many(9) == [9]


def test_a_hooked_put_many_keeps_the_bound_and_counts_what_it_put() -> None:
    ch = Priority(3)
    with pytest.raises(cv.Full) as info:
        ch.put_many([4, 2, 8, 6], timeout=0.01)
    assert info.value.items_put == 3  # type: ignore[attr-defined]
    assert ch.get_many(9) == [2, 4, 8]
    ch.close()
    with pytest.raises(cv.ShutDown) as closed:
        ch.put_many([])
    assert closed.value.items_put == 0  # type: ignore[attr-defined]


def test_a_hooked_put_many_blocks_partway_and_resumes_when_room_is_made() -> None:
    ch = Priority(2)
    putter = Worker(ch.put_many, [7, 5, 3])
    wait_until(lambda: ch.stats().waiting_producers == 1)
    assert ch.get() == 5
    putter.finish()
    assert ch.get_many(9) == [3, 7]


def test_the_asyncio_side_goes_through_the_hooks() -> None:
    async def main() -> list[int]:
        ch = Priority(2)
        getter = asyncio.ensure_future(ch.aget())
        while ch.stats().waiting_consumers < 1:
            await asyncio.sleep(0)  # let it park
        await ch.aput(4)
        first = await asyncio.wait_for(getter, 10)
        await ch.aput_many([9, 1])
        return [first, *await ch.aget_many(5)]

    assert asyncio.run(main()) == [4, 1, 9]


def test_a_failing_put_hook_changes_nothing_and_strands_nobody() -> None:
    ch = Failing(1)
    ch.put(1)
    blocked = [Worker(ch.put, 2), Worker(ch.put, 3)]
    wait_until(lambda: ch.stats().waiting_producers == 2)
    ch.puts_before_failure = 0
    assert ch.get() == 1  # room for one: the first woken putter's _put raises
    for worker in blocked:
        worker.join(10)
    assert not any(w.is_alive() for w in blocked)
    errors = [w.error for w in blocked if w.error is not None]
    assert len(errors) == 1 and isinstance(errors[0], OSError)
    # The other putter was woken in turn (relayed) and put its item.
    assert ch.get_many(9) in ([2], [3])
    assert ch.stats().total_put == 2  # the failed put was not counted


def test_a_failing_get_hook_loses_nothing() -> None:
    ch = Failing()
    ch.put_many([1, 2, 3, 4])
    ch.gets_before_failure = 0
    with pytest.raises(OSError, match="get failed"):
        ch.get()
    with pytest.raises(OSError, match="get failed"):
        ch.gets_before_failure = 0
        ch.get_many(9)  # fails before taking anything: raises
    assert ch.qsize() == 4
    # A _get failing after the first item ends the batch: the items taken are returned.
    ch.gets_before_failure = 2
    assert ch.get_many(9) == [1, 2]
    assert ch.get_many(9) == [3, 4]


def test_a_failing_get_hook_in_an_immediate_shutdown_still_wakes_everyone() -> None:
    ch = Failing(1)
    ch.put(1)
    putter = Worker(ch.put, 2)
    wait_until(lambda: ch.stats().waiting_producers == 1)
    ch.gets_before_failure = 0
    with pytest.raises(OSError, match="get failed"):
        ch.shutdown(immediate=True)
    assert isinstance(putter.failure(), cv.ShutDown)


def test_a_woken_getter_whose_hook_fails_relays_to_the_next() -> None:
    ch = Failing()
    got: list[int] = []
    lock = threading.Lock()

    def consume() -> None:
        try:
            value = ch.get(timeout=10)
        except OSError:
            return
        with lock:
            got.append(value)

    threads = [threading.Thread(target=consume) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: ch.stats().waiting_consumers == 2)
    ch.gets_before_failure = 0
    ch.put_many([7, 8])  # wakes one; its _get fails; it must pass the wake-up on
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert got in ([7], [8])
    assert ch.qsize() == 1


def test_hooked_channels_close_by_producer_handles_and_iterate() -> None:
    ch = Priority(4)
    with ch.producer() as handle:
        handle.put_many([3, 1, 2])
    assert list(ch) == [1, 2, 3]
