"""Tests of `conveyor.Channel`'s asyncio side, alone and mixed with threads.

Coroutines are known to be parked through the channel's statistics; threads
are known to be parked the same way.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from conveyor import (
    Channel,
    ConfigurationError,
    ConfigurationTypeError,
    Empty,
    Producer,
    ShutDown,
)
from test_channel import Worker  # the same thread-runner as the thread-side tests

pytestmark = [pytest.mark.quick, pytest.mark.timeout(20)]

WAIT = 5.0  # seconds: the bound of every wait
R = TypeVar("R")


def run(coro: Coroutine[Any, Any, R]) -> R:
    """Run ``coro`` in a fresh event loop, bounded by WAIT seconds."""
    return asyncio.run(asyncio.wait_for(coro, WAIT))


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Let the loop run until ``predicate`` is true; fail after ``timeout`` seconds.

    The predicate usually reads channel statistics changed by other tasks or
    threads. The tiny sleep only paces this bounded loop and lets other tasks
    run; it is never a synchronisation in itself.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout} s: {predicate}")
        await asyncio.sleep(0.001)


async def callbacks_run() -> None:
    """Return once every callback already scheduled on the loop has run.

    The loop runs ready callbacks in FIFO order, so a future resolved by a
    callback scheduled now completes after all those scheduled before.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


def parked_producers(ch: Channel[Any], n: int) -> Callable[[], bool]:
    return lambda: ch.stats().waiting_producers == n


def parked_consumers(ch: Channel[Any], n: int) -> Callable[[], bool]:
    return lambda: ch.stats().waiting_consumers == n


async def in_thread(fn: Callable[[], R]) -> R:
    """Run a blocking call in a helper thread without blocking the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn)


# ---------------------------------------------------------------------------- aput / aget


def test_aput_and_aget_keep_fifo_order() -> None:
    async def main() -> list[int]:
        ch: Channel[int] = Channel(4)
        for i in range(4):
            await ch.aput(i)
        return [await ch.aget() for _ in range(4)]

    assert run(main()) == [0, 1, 2, 3]


def test_aput_waits_for_room_without_blocking_the_loop() -> None:
    async def main() -> list[int]:
        ch: Channel[int] = Channel(1)
        await ch.aput(0)
        putter = asyncio.ensure_future(ch.aput(1))
        await until(parked_producers(ch, 1))
        assert not putter.done()
        first = await ch.aget()
        await putter
        return [first, await ch.aget()]

    assert run(main()) == [0, 1]


def test_aget_waits_for_an_item_without_blocking_the_loop() -> None:
    async def main() -> object:
        ch: Channel[object] = Channel(1)
        getter = asyncio.ensure_future(ch.aget())
        await until(parked_consumers(ch, 1))
        await ch.aput(None)
        return await getter

    assert run(main()) is None


def test_aput_on_a_closed_channel_raises_shutdown() -> None:
    async def main() -> None:
        ch: Channel[int] = Channel(1)
        ch.close()
        with pytest.raises(ShutDown):
            await ch.aput(1)
        with pytest.raises(ShutDown):
            await ch.aput_many([1])

    run(main())


def test_aget_drains_a_closed_channel_then_raises_shutdown() -> None:
    async def main() -> None:
        ch: Channel[int] = Channel(4)
        ch.put_many([1, 2, 3])
        ch.close()
        assert await ch.aget() == 1
        assert await ch.aget_many(10) == [2, 3]
        with pytest.raises(ShutDown):
            await ch.aget()
        with pytest.raises(ShutDown):
            await ch.aget_many()

    run(main())


def test_shutdown_wakes_parked_coroutines_with_shutdown() -> None:
    async def main() -> None:
        empty: Channel[int] = Channel(1)
        getters = [asyncio.ensure_future(empty.aget()), asyncio.ensure_future(empty.aget_many())]
        full: Channel[int] = Channel(1)
        full.put(0)
        putters = [asyncio.ensure_future(full.aput(1)), asyncio.ensure_future(full.aput_many([2]))]
        await until(parked_consumers(empty, 2))
        await until(parked_producers(full, 2))
        empty.shutdown()
        full.shutdown()
        for task in getters + putters:
            with pytest.raises(ShutDown):
                await task
        assert full.get() == 0  # a normal shutdown keeps what is in

    run(main())


def test_async_for_ends_when_the_channel_closes() -> None:
    async def main() -> list[object]:
        ch: Channel[object] = Channel(2)

        async def produce() -> None:
            async with ch.producer() as p:
                for x in [1, None, "THE END", 4]:
                    await p.aput(x)

        producer = asyncio.ensure_future(produce())
        got = [x async for x in ch]
        await producer
        return got

    assert run(main()) == [1, None, "THE END", 4]


def test_wait_for_bounds_an_aget_and_leaves_no_waiter_behind() -> None:
    async def main() -> None:
        ch: Channel[int] = Channel(1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ch.aget(), 0.02)
        assert ch.stats().waiting_consumers == 0
        ch.put(1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ch.aput(2), 0.02)
        assert ch.stats().waiting_producers == 0
        assert ch.get_nowait() == 1

    run(main())


# ---------------------------------------------------------------------------- batches


def test_aput_many_larger_than_the_capacity_is_fed_through_by_aget_many() -> None:
    async def main() -> tuple[list[int], int]:
        ch: Channel[int] = Channel(3)
        biggest = 0

        async def produce() -> None:
            with ch.producer() as p:
                await p.aput_many(range(40))

        async def consume() -> list[int]:
            nonlocal biggest
            got: list[int] = []
            while True:
                biggest = max(biggest, ch.stats().size)
                try:
                    got += await ch.aget_many(2)
                except ShutDown:
                    return got

        producer = asyncio.ensure_future(produce())
        got = await consume()
        await producer
        return got, biggest

    got, biggest = run(main())
    assert got == list(range(40))
    assert biggest <= 3


def test_aget_many_returns_between_one_and_max_items() -> None:
    async def main() -> None:
        ch: Channel[int] = Channel(10)
        await ch.aput_many([1, 2, 3])
        assert await ch.aget_many(2) == [1, 2]
        assert await ch.aget_many(2) == [3]
        getter = asyncio.ensure_future(ch.aget_many(5))
        await until(parked_consumers(ch, 1))
        await ch.aput(4)
        assert await getter == [4]
        with pytest.raises(ConfigurationError):
            await ch.aget_many(0)

    run(main())


def test_aget_many_refuses_a_bad_max_items_at_once_on_an_empty_channel() -> None:
    # Regression guard: aget_many parks before it tries again; a bad max_items
    # must still fail at once, not after an item arrives.
    async def main() -> None:
        ch: Channel[int] = Channel(10)
        for bad in (0, -1, 2.0):
            with pytest.raises((ConfigurationError, ConfigurationTypeError), match="max_items"):
                await asyncio.wait_for(ch.aget_many(bad), WAIT)  # type: ignore[arg-type]
        assert ch.stats().waiting_consumers == 0

    run(main())


def test_aget_many_names_itself_when_refusing_a_bad_max_items_on_a_channel_with_items() -> None:
    # Repro: with items waiting, the fast path's get_many() refused it, and the
    # message named Channel.get_many(), which the caller never called.
    async def main() -> None:
        ch: Channel[int] = Channel(10)
        ch.put_many([1, 2])
        for bad in (0, -1, 2.0):
            with pytest.raises(
                (ConfigurationError, ConfigurationTypeError),
                match=r"^Channel\.aget_many\(\) 'max_items'",
            ):
                await ch.aget_many(bad)  # type: ignore[arg-type]
        assert ch.qsize() == 2

    run(main())


def test_coroutines_parked_in_the_slow_paths_are_woken_by_a_get_a_put_and_a_close() -> None:
    # The slow paths park first (their fast path has just failed) and re-check
    # under the lock there; a wake-up, and a close, still reach them.
    async def main() -> None:
        ch: Channel[int] = Channel(1)
        ch.put(1)
        putter = asyncio.ensure_future(ch.aput(2))
        await until(parked_producers(ch, 1))
        assert ch.get() == 1  # wakes the parked putter
        await asyncio.wait_for(putter, WAIT)
        assert ch.stats().waiting_producers == 0
        getter = asyncio.ensure_future(ch.aget_many(5))
        assert await asyncio.wait_for(getter, WAIT) == [2]
        getter = asyncio.ensure_future(ch.aget_many(5))
        await until(parked_consumers(ch, 1))
        ch.close()
        with pytest.raises(ShutDown):
            await asyncio.wait_for(getter, WAIT)

    run(main())


def test_aput_many_reports_every_item_it_put_when_shut_down() -> None:
    # Regression: items_put counted only the items of the last attempt.
    async def main() -> None:
        ch: Channel[int] = Channel(2)
        putter = asyncio.ensure_future(ch.aput_many(list(range(6))))
        await until(lambda: ch.stats().waiting_producers == 1 and ch.stats().total_put == 2)
        assert ch.get_many(2) == [0, 1]
        await until(lambda: ch.stats().waiting_producers == 1 and ch.stats().total_put == 4)
        ch.shutdown()
        with pytest.raises(ShutDown) as info:
            await putter
        assert info.value.items_put == 4  # type: ignore[attr-defined]

    run(main())


def test_aput_many_of_an_empty_batch_on_a_closed_channel_raises_shutdown() -> None:
    async def main() -> None:
        ch: Channel[int] = Channel(2)
        ch.close()
        with pytest.raises(ShutDown) as info:
            await ch.aput_many([])
        assert info.value.items_put == 0  # type: ignore[attr-defined]

    run(main())


# ---------------------------------------------------------------------------- producer handles


def test_async_puts_through_a_closed_handle_raise_shutdown() -> None:
    async def main() -> None:
        ch: Channel[int] = Channel(2)
        keep = ch.producer()
        async with ch.producer() as p:
            await p.aput(1)
        assert p.closed
        with pytest.raises(ShutDown):
            await p.aput(2)
        with pytest.raises(ShutDown):
            await p.aput_many([2])
        keep.close()
        assert [x async for x in ch] == [1]

    run(main())


# ---------------------------------------------------------------------------- cancellation


async def two_parked_agets(ch: Channel[str]) -> tuple[asyncio.Future[str], asyncio.Future[str]]:
    """Two aget() tasks, parked on ``ch`` in this order."""
    first = asyncio.ensure_future(ch.aget())
    await until(parked_consumers(ch, 1))
    second = asyncio.ensure_future(ch.aget())
    await until(parked_consumers(ch, 2))
    return first, second


def put_from_another_thread(ch: Channel[str], item: str) -> None:
    """put() from a thread of its own, joined: a wake-up sent through the loop's self-pipe."""
    thread = threading.Thread(target=ch.put, args=(item,))
    thread.start()
    thread.join()


@pytest.mark.parametrize(
    "when",
    [
        "before-the-put",  # cancelled while parked: it just leaves the queue of waiters
        # put() in the loop's thread popped it and resolved its future; the task has not run
        "after-the-wake-up-is-sent",
        # put() from another thread popped it; its future is resolved by the loop later
        "before-a-wake-up-from-another-thread-lands",
        # the loop resolved its future (sent from another thread); the task has not run yet
        "after-its-future-resolved",
    ],
)
def test_cancelling_a_parked_aget_does_not_lose_a_wake_up(when: str) -> None:
    async def main() -> None:
        ch: Channel[str] = Channel(4)
        first, second = await two_parked_agets(ch)
        loop = asyncio.get_running_loop()
        if when == "before-the-put":
            first.cancel()
            ch.put("item")
        elif when == "after-the-wake-up-is-sent":
            ch.put("item")  # wakes `first`, the oldest...
            first.cancel()  # ...which gives up before it could take the item
        elif when == "before-a-wake-up-from-another-thread-lands":
            put_from_another_thread(ch, "item")
            first.cancel()  # the loop has not run since: its future is not resolved yet
        else:
            put_from_another_thread(ch, "item")  # the resolution is in the loop's queue...
            loop.call_soon(first.cancel)  # ...and runs before this
        assert await second == "item"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert ch.stats().waiting_consumers == 0
        assert ch.qsize() == 0

    run(main())


def test_a_put_in_the_loops_thread_resolves_the_woken_aget_at_once() -> None:
    # As asyncio.Queue does: the woken coroutine runs at the loop's next turn,
    # before anything scheduled after the put (here a cancel, which comes too
    # late: the coroutine has the item).
    async def main() -> None:
        ch: Channel[str] = Channel(4)
        first, second = await two_parked_agets(ch)
        ch.put("item")
        asyncio.get_running_loop().call_soon(first.cancel)
        assert await first == "item"
        assert ch.stats().waiting_consumers == 1  # `second` is parked still: no wake-up lost
        ch.put("next")
        assert await second == "next"

    run(main())


@pytest.mark.parametrize(
    "when",
    [
        "after-the-wake-up-is-sent",  # its future resolved at once: the task has not run
        "before-a-wake-up-from-another-thread-lands",
        "after-its-future-resolved",  # by the loop, sent from another thread; not run yet
    ],
)
def test_cancelling_a_parked_aput_does_not_lose_a_wake_up(when: str) -> None:
    async def main() -> None:
        ch: Channel[str] = Channel(1)
        ch.put("old")
        first = asyncio.ensure_future(ch.aput("first"))
        await until(parked_producers(ch, 1))
        second = asyncio.ensure_future(ch.aput("second"))
        await until(parked_producers(ch, 2))
        if when == "after-the-wake-up-is-sent":
            assert ch.get() == "old"  # room for one: wakes `first`
            first.cancel()
        else:
            got: list[str] = []
            taker = threading.Thread(target=lambda: got.append(ch.get()))
            taker.start()
            taker.join()
            assert got == ["old"]
            if when == "before-a-wake-up-from-another-thread-lands":
                first.cancel()
            else:
                asyncio.get_running_loop().call_soon(first.cancel)
        await second
        with pytest.raises(asyncio.CancelledError):
            await first
        assert ch.get_nowait() == "second"
        assert ch.stats().waiting_producers == 0

    run(main())


def test_a_cancelled_getter_passes_a_thread_wake_up_on_to_a_parked_thread() -> None:
    # The wake-up of a cancelled coroutine goes to the next waiter, whatever its kind.
    async def main() -> None:
        ch: Channel[int] = Channel(2)
        coro_getter = asyncio.ensure_future(ch.aget())
        await until(parked_consumers(ch, 1))
        thread_getter = Worker(ch.get)
        await until(parked_consumers(ch, 2))
        ch.put(42)
        coro_getter.cancel()
        assert await in_thread(thread_getter.finish) == 42
        with pytest.raises(asyncio.CancelledError):
            await coro_getter

    run(main())


# ---------------------------------------------------------------------------- threads and asyncio


def test_thread_producers_feed_an_asyncio_consumer() -> None:
    ch: Channel[tuple[int, int]] = Channel(4)
    handles = [ch.producer() for _ in range(3)]

    def produce(handle: Producer[tuple[int, int]], pid: int) -> None:
        with handle:
            for i in range(300):
                if i % 3:
                    handle.put((pid, i))
                else:
                    handle.put_many([(pid, i)])

    async def consume() -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        async for item in ch:
            got.append(item)
            assert ch.stats().size <= 4
        return got

    producers = [Worker(produce, h, pid) for pid, h in enumerate(handles)]
    got = run(consume())
    for p in producers:
        p.finish()
    assert sorted(got) == sorted((pid, i) for pid in range(3) for i in range(300))
    for pid in range(3):
        assert [i for p, i in got if p == pid] == list(range(300))


def test_an_asyncio_producer_feeds_thread_consumers() -> None:
    ch: Channel[int] = Channel(3)
    consumers = [Worker(lambda: list(ch)) for _ in range(2)]

    async def produce() -> None:
        async with ch.producer() as p:
            for i in range(0, 600, 3):
                await p.aput(i)
                await p.aput_many([i + 1, i + 2])

    run(produce())
    results = [c.finish() for c in consumers]
    assert sorted(results[0] + results[1]) == list(range(600))
    for r in results:
        assert r == sorted(r)


def test_coroutines_in_two_event_loops_share_one_channel() -> None:
    ch: Channel[int] = Channel(2)
    handle = ch.producer()

    async def produce() -> None:
        with handle:
            for i in range(500):
                await handle.aput(i)

    async def consume() -> list[int]:
        return [x async for x in ch]

    producer = Worker(lambda: asyncio.run(produce()))
    got = run(consume())
    producer.finish()
    assert got == list(range(500))


def test_thread_and_coroutine_putters_are_woken_in_arrival_order() -> None:
    async def main() -> list[str]:
        ch: Channel[str] = Channel(1)
        ch.put("old")
        coro_putter = asyncio.ensure_future(ch.aput("coroutine"))
        await until(parked_producers(ch, 1))
        thread_putter = Worker(ch.put, "thread")
        await until(parked_producers(ch, 2))
        got = [ch.get()]  # room: the coroutine arrived first
        await coro_putter
        got.append(await ch.aget())  # room again: now the thread
        await in_thread(thread_putter.finish)
        got.append(await ch.aget())
        return got

    assert run(main()) == ["old", "coroutine", "thread"]


def test_callbacks_run_helper_lets_a_woken_coroutine_finish() -> None:
    # Checks the helper used to reason about wake-up ordering.
    async def main() -> None:
        ch: Channel[int] = Channel(1)
        getter = asyncio.ensure_future(ch.aget())
        await until(parked_consumers(ch, 1))
        ch.put(1)
        for _ in range(3):
            await callbacks_run()
        assert getter.done()
        assert getter.result() == 1

    run(main())


async def _await_all(aws: list[Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*aws))


def test_many_coroutines_on_a_small_channel_lose_and_duplicate_nothing() -> None:
    async def main() -> list[int]:
        ch: Channel[int] = Channel(2)
        handles = [ch.producer() for _ in range(4)]

        async def produce(handle: Producer[int], base: int) -> None:
            async with handle:
                for i in range(100):
                    await handle.aput(base + i)

        async def consume() -> list[int]:
            return [x async for x in ch]

        consumers = [asyncio.ensure_future(consume()) for _ in range(3)]
        await _await_all([produce(h, 1000 * n) for n, h in enumerate(handles)])
        results = await _await_all(consumers)
        return sorted(x for r in results for x in r)

    assert run(main()) == sorted(1000 * n + i for n in range(4) for i in range(100))


# ---------------------------------------------------------------------------- await_room


def test_await_room_returns_the_room_left() -> None:
    async def main() -> None:
        ch: Channel[int] = Channel(4)
        ch.put(1)
        assert await ch.await_room() == 3
        unbounded: Channel[int] = Channel()
        assert await unbounded.await_room() == sys.maxsize
        ch.close()
        with pytest.raises(ShutDown):
            await ch.await_room()

    run(main())


def test_await_room_waits_for_a_consumer_and_raises_shutdown_when_closed() -> None:
    async def main() -> None:
        ch: Channel[int] = Channel(2)
        ch.put_many([1, 2])
        waiter = asyncio.ensure_future(ch.await_room())
        await until(parked_producers(ch, 1))
        ch.get()
        assert await waiter == 1
        ch.put(3)
        waiter = asyncio.ensure_future(ch.await_room())
        await until(parked_producers(ch, 1))
        ch.close()
        with pytest.raises(ShutDown):
            await waiter

    run(main())


def test_an_await_room_that_does_not_put_does_not_strand_a_parked_putter() -> None:
    # Regression: the wake-up await_room() took was lost when its caller put nothing.
    async def main() -> None:
        ch: Channel[int] = Channel(1)
        ch.put(0)
        waiter = asyncio.ensure_future(ch.await_room())
        await until(parked_producers(ch, 1))
        putter = Worker(ch.put, 99)
        await until(parked_producers(ch, 2))
        assert ch.get() == 0  # wakes the oldest: the coroutine
        assert await waiter == 1
        await in_thread(putter.finish)
        assert ch.get_nowait() == 99

    run(main())


# ---------------------------------------------------------------------------- wake-up paths


def test_a_coroutine_woken_from_its_own_loop_is_not_woken_through_the_self_pipe() -> None:
    """Same thread: `call_soon`; only a wake-up from another thread needs `call_soon_threadsafe`."""
    calls: list[str] = []

    class Loop(asyncio.SelectorEventLoop):
        def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("threadsafe")
            return super().call_soon_threadsafe(*args, **kwargs)

    async def main() -> None:
        ch: Channel[str] = Channel(4)
        parked = asyncio.ensure_future(ch.aget())
        await until(parked_consumers(ch, 1))
        await ch.aput("same loop")
        assert await parked == "same loop"
        assert calls == []
        parked = asyncio.ensure_future(ch.aget())
        await until(parked_consumers(ch, 1))
        putter = threading.Thread(target=ch.put, args=("other thread",))
        putter.start()
        assert await parked == "other thread"
        putter.join(WAIT)
        assert calls == ["threadsafe"]

    loop = Loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), WAIT))
    finally:
        loop.close()


def test_aget_waits_when_the_item_it_saw_is_taken_before_it() -> None:
    """aget's fast path saw an item that another consumer took first: it parks, not raises."""

    async def main() -> None:
        ch: Channel[str] = Channel(4)
        ch.put("first")
        real_get = ch.get

        def raced(block: bool = True, timeout: float | None = None) -> str:
            ch.get = real_get  # type: ignore[method-assign]
            real_get(False)  # another consumer takes "first" in between
            raise Empty

        ch.get = raced  # type: ignore[method-assign]
        waiting = asyncio.ensure_future(ch.aget())
        await until(parked_consumers(ch, 1))
        ch.put("second")
        assert await waiting == "second"

    run(main())
