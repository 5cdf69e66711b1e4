"""Bounded memory in bytes: ``max_bytes=`` on a run bounds the bytes in flight.

Every test runs on every runtime x backend (the ``runner`` fixture,
conftest.py). Runs in this process split the budget between their channels
(docs/design.md); the Redis backend refuses the option, saying so.

The bytes in flight are measured from both ends, in this process: the
source counts what it has given (at each pull, under a lock) and the caller
counts what it has received; their difference, at the source's every pull,
is everything the run holds at that moment (channels, workers' batches, the
caller's current chunk). No sleeps: the caller hashes each item, so the
stage runs ahead of it and the channels fill.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Iterator

import cloudpickle
import pytest
from runners import Runner

import conveyor as cv

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SIZE = 64 * 1024
ITEMS = 240


class CountingSource:
    """``ITEMS`` distinct bytes items of ``SIZE``; records the most ever handed out and
    not yet received (``peak``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.given = 0
        self.received = 0
        self.peak = 0

    def __iter__(self) -> Iterator[bytes]:
        for i in range(ITEMS):
            with self.lock:
                self.given += 1
                self.peak = max(self.peak, self.given - self.received)
            yield i.to_bytes(4, "big") + bytes(SIZE - 4)

    def receive(self) -> None:
        with self.lock:
            self.received += 1


def passed_on(b: bytes) -> bytes:
    return b


def lanes(runner: Runner) -> int:
    """Batches one worker holds at once: a process worker keeps two in flight."""
    return 2 if runner.runtime == "process" else 1


@pytest.mark.parametrize("budget", [1024 * 1024, 1000], ids=["1MiB", "under-one-item"])
def test_max_bytes_bounds_the_bytes_in_flight_and_loses_nothing(
    runner: Runner, budget: int
) -> None:
    source = CountingSource()
    pipeline = cv.Pipeline(source).map(runner.fn(passed_on), runtime=runner.runtime)
    if runner.on_redis:
        with pytest.raises(cv.ConfigurationError, match=r"'max_bytes'.*RedisBackend"):
            runner.run(pipeline, max_bytes=budget)
        return
    received = []
    for item in pipeline.iterate(max_bytes=budget):
        hashlib.sha256(item).digest()  # the caller's work: the stage runs ahead
        received.append(item[:4])
        source.receive()
    assert sorted(int.from_bytes(x, "big") for x in received) == list(range(ITEMS))
    # Two channels (the stage's input, the output), each with half the budget, or
    # one item when an item is larger; each worker lane holds a batch taken from
    # its input (within that share) and its outputs; the caller holds a chunk of
    # the output; the source, the item it is giving.
    share_in_items = max(1, budget // 2 // SIZE)
    bound = share_in_items * (2 + 2 * lanes(runner) + 1) + 1
    assert source.peak <= bound
    assert source.peak * SIZE < ITEMS * SIZE / 3  # far from the whole input


def test_max_bytes_is_validated_on_every_backend(runner: Runner) -> None:
    pipeline = cv.Pipeline(range(3)).map(runner.fn(passed_on), runtime=runner.runtime)
    with pytest.raises(cv.ConfigurationTypeError, match=r"run\(\) 'max_bytes' must be an int"):
        runner.run(pipeline, max_bytes=True)
    with pytest.raises(cv.ConfigurationError, match=r"run\(\) 'max_bytes' must be an int >= 1"):
        runner.run(pipeline, max_bytes=-5)
