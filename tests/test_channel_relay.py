"""Wake-ups are relayed: one put_many wakes one consumer, which passes the wake-up on.

A batch put or get wakes a single parked waiter; whoever leaves items (or room)
behind wakes the next. These tests park several waiters, move a batch, and
check that every waiter is served: nothing is stranded by the relay.
"""

from __future__ import annotations

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
