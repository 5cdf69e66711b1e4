"""Wake-ups are relayed: one put_many wakes one consumer, which passes the wake-up on.

A batch put or get wakes a single parked waiter (none while a woken thread has
yet to run); a woken waiter that leaves items (or room) behind wakes the next.
These tests park several waiters, move a batch, and check that every waiter is
served: nothing is stranded by the relay.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import conveyor as cv
from test_channel import wait_until

pytestmark = [pytest.mark.quick, pytest.mark.timeout(30)]


def wait_until_parked(ch: cv.Channel[int], consumers: int = 0, producers: int = 0) -> None:
    """Wait (bounded) until the channel counts that many parked threads."""
    wait_until(
        lambda: (
            ch.stats().waiting_consumers >= consumers and ch.stats().waiting_producers >= producers
        )
    )


def test_one_put_many_serves_every_parked_consumer() -> None:
    ch: cv.Channel[int] = cv.Channel(64)
    got: list[list[int]] = [[] for _ in range(4)]

    def consume(k: int) -> None:
        got[k].append(ch.get())

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_until_parked(ch, consumers=4)
    ch.put_many([10, 11, 12, 13])
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(x for g in got for x in g) == [10, 11, 12, 13]


def test_one_get_many_serves_every_parked_producer() -> None:
    ch: cv.Channel[int] = cv.Channel(4)
    ch.put_many([0, 1, 2, 3])
    threads = [threading.Thread(target=ch.put, args=(100 + k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_until_parked(ch, producers=4)
    assert ch.get_many(4) == [0, 1, 2, 3]
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(ch.get_many(8)) == [100, 101, 102, 103]


def test_parked_batch_producers_all_finish_when_room_comes_in_one_get_many() -> None:
    ch: cv.Channel[int] = cv.Channel(8)
    ch.put_many(list(range(8)))
    threads = [
        threading.Thread(target=ch.put_many, args=([1000 * (k + 1) + i for i in range(2)],))
        for k in range(4)
    ]
    for t in threads:
        t.start()
    wait_until_parked(ch, producers=4)
    assert ch.get_many(8) == list(range(8))
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(ch.get_many(8)) == 8


# ---------------------------------------------------------------------- one wake-up in flight
# The channel's lock is swapped for a re-entrant one so that the test can hold
# it across several calls: a woken thread cannot run (it needs the lock back),
# which is the moment the policy is about.


def hold_able(ch: cv.Channel[int]) -> threading.RLock:
    lock = threading.RLock()
    ch._lock = ch.mutex = lock  # type: ignore[assignment]
    return lock


def consume_batches(ch: cv.Channel[int], got: list[int]) -> None:
    """A consumer of batches: get_many(64) until the channel is closed and drained."""
    while True:
        try:
            got.extend(ch.get_many(64))
        except cv.ShutDown:
            return


def test_batch_puts_while_a_woken_consumer_has_yet_to_run_wake_no_other_thread() -> None:
    # The woken consumer takes batches: it may take all there is, and relays if not.
    ch: cv.Channel[int] = cv.Channel(64)
    lock = hold_able(ch)
    got: list[int] = []
    threads = [
        threading.Thread(target=consume_batches, args=(ch, got), daemon=True) for _ in range(4)
    ]
    for t in threads:
        t.start()
    wait_until_parked(ch, consumers=4)
    with lock:
        ch.put_many([1, 2])
        assert ch.stats().waiting_consumers == 3  # one woken
        ch.put_many([3, 4])
        ch.put_many([5, 6])
        # Still one: the woken consumer relays when it runs, if items are left.
        assert ch.stats().waiting_consumers == 3
    ch.close()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]


def test_items_for_consumers_of_one_item_each_wake_a_consumer_each() -> None:
    # Slow workers take one item at a time (get(), get_many(1)): each item
    # handed on must start a parked one at once, not wait for a chain of
    # relays through the consumers woken before it.
    ch: cv.Channel[int] = cv.Channel(64)
    lock = hold_able(ch)
    got: list[int] = []

    def consume() -> None:
        while True:
            try:
                got.extend(ch.get_many(1) if len(got) % 2 else [ch.get()])
            except cv.ShutDown:
                return

    threads = [threading.Thread(target=consume, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until_parked(ch, consumers=6)
    try:
        with lock:
            for item, parked in ((1, 5), (2, 4), (3, 3)):
                ch.put_many([item])
                assert ch.stats().waiting_consumers == parked
            ch.put_many([4, 5])  # two more items: two more consumers
            assert ch.stats().waiting_consumers == 1
            ch.put_many([6, 7, 8])  # one consumer left for three items
            assert ch.stats().waiting_consumers == 0
    finally:
        ch.close()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_batch_gets_while_a_woken_producer_has_yet_to_run_wake_no_other_thread() -> None:
    ch: cv.Channel[int] = cv.Channel(4)
    lock = hold_able(ch)
    ch.put_many([0, 1, 2, 3])
    threads = [threading.Thread(target=ch.put, args=(100 + k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_until_parked(ch, producers=4)
    with lock:
        assert ch.get_many(1) == [0]
        assert ch.stats().waiting_producers == 3
        assert ch.get_many(3) == [1, 2, 3]
        assert ch.stats().waiting_producers == 3
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(ch.get_many(8)) == [100, 101, 102, 103]


def test_a_consumer_that_never_parked_leaves_the_relay_to_the_woken_one() -> None:
    """Items taken by a running consumer do not strand a parked one."""
    ch: cv.Channel[int] = cv.Channel(64)
    lock = hold_able(ch)
    got: list[int] = []
    parked = threading.Thread(target=lambda: got.extend(ch))
    parked.start()
    wait_until_parked(ch, consumers=1)
    with lock:
        ch.put_many([1, 2, 3])  # wakes the parked consumer, which cannot run yet
        assert ch.get() == 1  # a consumer that was not parked takes one: no relay
    ch.close()
    parked.join(10)
    assert not parked.is_alive()
    assert got == [2, 3]


def test_woken_coroutines_relay_to_the_next_parked_coroutine() -> None:
    async def main() -> list[int]:
        ch: cv.Channel[int] = cv.Channel(8)
        getters = [asyncio.ensure_future(ch.aget()) for _ in range(3)]
        many = asyncio.ensure_future(ch.aget_many(2))
        while ch.stats().waiting_consumers < 4:
            await asyncio.sleep(0)  # let each coroutine park (no time passes)
        await asyncio.get_running_loop().run_in_executor(None, ch.put_many, [1, 2, 3, 4, 5])
        done = await asyncio.wait_for(asyncio.gather(*getters, many), 10)
        return sorted([*done[:3], *done[3]])

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


def test_woken_async_producers_relay_the_room_left() -> None:
    async def main() -> list[int]:
        ch: cv.Channel[int] = cv.Channel(4)
        ch.put_many([0, 1, 2, 3])
        putters = [asyncio.ensure_future(ch.aput(10 + k)) for k in range(3)]
        putters.append(asyncio.ensure_future(ch.aput_many([20])))
        while ch.stats().waiting_producers < 4:
            await asyncio.sleep(0)
        taken = await asyncio.get_running_loop().run_in_executor(None, ch.get_many, 4)
        await asyncio.wait_for(asyncio.gather(*putters), 10)
        return [*taken, *sorted(ch.get_many(8))]

    assert asyncio.run(main()) == [0, 1, 2, 3, 10, 11, 12, 20]


def test_single_puts_and_gets_wake_one_parked_thread_each() -> None:
    """Unlike batches: a woken get() or put() seldom finds nothing to do."""
    ch: cv.Channel[int] = cv.Channel(64)
    lock = hold_able(ch)
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.extend(ch)) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until_parked(ch, consumers=3)
    with lock:
        ch.put(1)
        ch.put(2)
        assert ch.stats().waiting_consumers == 1
    ch.close()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got) == [1, 2]


def test_an_ordered_stage_releasing_single_items_together_wakes_a_consumer_for_each() -> None:
    # The oldest ticket arrives last and releases three single-item batches at
    # once: three consumers downstream start together, without relays between them.
    from conveyor.runtime.base import RunControl
    from conveyor.runtime.ports import Sequencer

    out: cv.Channel[str] = cv.Channel(64)
    lock = hold_able(out)
    sequencer = Sequencer(out, window=8, control=RunControl())
    got: list[str] = []

    def consume() -> None:
        got.extend(out)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until_parked(out, consumers=4)
    with lock:
        sequencer.deposit(2, ["c"])
        sequencer.deposit(1, ["b"])
        assert out.stats().waiting_consumers == 4  # held: ticket 0 is missing
        sequencer.deposit(0, ["a"])
        assert out.stats().waiting_consumers == 1
        assert list(out.queue) == ["a", "b", "c"]
    out.close()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(got) == ["a", "b", "c"]


def test_idle_workers_of_an_ordered_stage_wait_in_the_channel_and_start_together() -> None:
    # Waiting for items inside the ticket lock let one worker wait in the
    # channel while the others queued on the lock, to be started one by one.
    from conveyor.runtime.base import RunControl
    from conveyor.runtime.ports import Sequencer

    source: cv.Channel[str] = cv.Channel(64)
    lock = hold_able(source)
    sequencer = Sequencer(cv.Channel(64), window=8, control=RunControl())
    taken: list[tuple[list[str], int]] = []

    def take() -> None:
        taken.append(sequencer.take(source, 1))

    threads = [threading.Thread(target=take, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until_parked(source, consumers=4)
    with lock:
        source.put_many(["a", "b", "c", "d"])
        assert source.stats().waiting_consumers == 0  # all four woken at once
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sorted(taken, key=lambda bt: bt[1]) == [(["a"], 0), (["b"], 1), (["c"], 2), (["d"], 3)]


def test_waiting_for_an_item_takes_none_and_ends_when_the_channel_is_drained() -> None:
    ch: cv.Channel[int] = cv.Channel(4)
    ch.put_many([1, 2])
    assert ch.wait_for_item() == 2
    assert ch.get_many(4) == [1, 2]
    with pytest.raises(cv.Empty):
        ch.wait_for_item(timeout=0.01)
    ch.close()
    with pytest.raises(cv.ShutDown):
        ch.wait_for_item()
