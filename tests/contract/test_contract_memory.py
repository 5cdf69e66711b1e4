"""Bounded memory in bytes: ``max_bytes=`` on a run bounds the bytes in flight.

Every test runs on every runtime x backend (the ``runner`` fixture,
conftest.py). Runs in this process split the budget between their channels,
runs on Redis between their streams (docs/design.md); tests/test_redis_budget.py
measures the streams' memory in Redis itself.

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
from runners import WAIT, Runner

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
    return 2 if runner.runtime in ("process", "interpreter") else 1


def bound_in_items(budget: int, stages: int, batches: int, runner: Runner, workers: int) -> int:
    """The bound of `local_bound_in_items`, or on Redis of `redis_bound_in_items`."""
    if runner.on_redis:
        return redis_bound_in_items(budget, stages, batches, workers)
    return local_bound_in_items(budget, stages, batches)


def redis_bound_in_items(budget: int, stages: int, batches: int, workers: int) -> int:
    """The most items in flight docs/design.md promises on Redis for ``stages`` map
    stages of ``workers`` each.

    ``k`` entries per share of ``budget // (stages + 1)`` (an entry costs what Redis
    allocates for it, `entry_cost`; one when it is larger than a share), in each of
    the stages + 1 streams, plus one hand-off (a batch's outputs, ``k`` at most) per
    worker writing to it; in each of the ``batches`` workers' batches; and, in the
    driver, the feeder's pulled items (a share of ``size_of`` bytes), the part it
    adds (as many), and the one item it has pulled.
    """
    from conveyor.redis.budget import entry_cost

    share = budget // (stages + 1)
    k = max(1, share // entry_cost({b"d": bytes(SIZE + 8), b"q": b"[240]"}))
    pulled = max(1, share // SIZE)
    return k * ((stages + 1) * (1 + workers) + batches) + 2 * pulled + 1


def local_bound_in_items(budget: int, stages: int, batches: int) -> int:
    """The most items in flight docs/design.md promises for ``stages`` map stages.

    ``k`` items per share of ``budget // (stages + 1)`` (one when an item is
    larger than a share) in each of the stages + 1 channels, in each of the
    ``batches`` workers' batches (each lane of a process worker counts), in
    the caller's chunk, plus the one item the feeder has pulled.
    """
    k = max(1, budget // (stages + 1) // SIZE)
    return k * (stages + 1 + batches + 1) + 1


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("budget", [1024 * 1024, 1000], ids=["1MiB", "under-one-item"])
def test_max_bytes_bounds_the_bytes_in_flight_and_loses_nothing(
    runner: Runner, budget: int, workers: int, stages: int
) -> None:
    # workers=2 (and a process worker's two lanes) make an ordered stage's reorder
    # window: outputs waiting for a slow batch must stay within the bound too.
    source = CountingSource()
    pipeline = cv.Pipeline(source)
    for _ in range(stages):
        pipeline = pipeline.map(runner.fn(passed_on), runtime=runner.runtime, workers=workers)
    backend = runner.backend_for() if runner.on_redis else None
    received = []
    for item in pipeline.iterate(max_bytes=budget, backend=backend):
        hashlib.sha256(item).digest()  # the caller's work: the stage runs ahead
        received.append(item[:4])
        source.receive()
    assert received == [i.to_bytes(4, "big") for i in range(ITEMS)]  # all, in order
    batches = stages * workers * lanes(runner)
    assert source.peak <= bound_in_items(budget, stages, batches, runner, workers)
    assert source.peak * SIZE < ITEMS * SIZE / 3  # far from the whole input


def test_a_budget_given_as_a_size_with_a_unit_bounds_the_run_as_its_bytes(
    runner: Runner,
) -> None:
    # "1MiB" is 1048576 bytes on every runtime and backend: the same bound holds.
    source = CountingSource()
    pipeline = cv.Pipeline(source).map(runner.fn(passed_on), runtime=runner.runtime)
    backend = runner.backend_for() if runner.on_redis else None
    received = 0
    for item in pipeline.iterate(max_bytes="1MiB", backend=backend):
        hashlib.sha256(item).digest()
        received += 1
        source.receive()
    assert received == ITEMS
    assert source.peak <= bound_in_items(1024 * 1024, 1, lanes(runner), runner, 1)
    assert source.peak * SIZE < ITEMS * SIZE / 3


def test_max_bytes_is_validated_on_every_backend(runner: Runner) -> None:
    pipeline = cv.Pipeline(range(3)).map(runner.fn(passed_on), runtime=runner.runtime)
    with pytest.raises(cv.ConfigurationTypeError, match=r"run\(\) 'max_bytes' must be an int"):
        runner.run(pipeline, max_bytes=True)
    with pytest.raises(cv.ConfigurationError, match=r"run\(\) 'max_bytes' must be an int >= 1"):
        runner.run(pipeline, max_bytes=-5)
    with pytest.raises(cv.ConfigurationError, match=r"a size such as '256MiB'.*got '12 pc'"):
        runner.run(pipeline, max_bytes="12 pc")


@pytest.mark.parametrize("budget", [2**64, 10**30], ids=["2**64", "10**30"])
def test_a_budget_larger_than_any_memory_runs_as_an_unbounded_run(
    runner: Runner, budget: int
) -> None:
    # The repro: on Redis, a stream's share over 2**63 never had room (the scripts count
    # in Lua numbers) and the run waited for ever; locally it ran.
    pipeline = cv.Pipeline(range(20)).map(runner.fn(passed_on), runtime=runner.runtime)
    handle = runner.start(pipeline, max_bytes=budget, collect=True)
    assert handle.join(timeout=WAIT).outputs == list(range(20))
