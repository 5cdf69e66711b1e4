"""A run's byte budget on Redis: ``max_bytes=`` bounds what its streams hold in Redis.

Measured in Redis itself: ``MEMORY USAGE`` of every stream of the run, summed,
stays under the budget, with `SLACK` for Redis's own bookkeeping of each
stream. The run is held by its sink, which asks a sampling thread for a
sample before it takes each item and waits for it (events, no sleeps): the
stages run ahead of the sink until the budget stops them, and every state the
run goes through while the sink is busy is sampled.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle
import pytest
import redis

import conveyor as cv
from conveyor.redis import RedisBackend
from conveyor.redis.budget import entry_cost, fitting, need_of, share_of
from conveyor.redis.state import RunInfo
from conveyor.redis.streams import Keys
from redis_helpers import (
    BIG,
    GATE_ENV,
    WAIT,
    gate_keys,
    held_large,
    large_items,
    new_namespace,
    passed_on,
    wait_until,
    worker_logs,
    worker_processes,
)

if TYPE_CHECKING:
    from conftest import RedisServer

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

BUDGET = 1024 * 1024
ITEMS = 60
SLACK = 4096
"""Per stream, what Redis's ``MEMORY USAGE`` counts besides its entries: the stream
itself, its consumer group and consumers (656 bytes measured for an empty stream
with a group), and the radix tree nodes of its last node."""


class Sampler:
    """A thread that sums ``MEMORY USAGE`` of ``keys`` each time `sample` asks it to."""

    def __init__(self, url: str, keys: list[str]) -> None:
        self.client = redis.Redis.from_url(url)
        self.keys = keys
        self.peak = 0
        self.samples = 0
        self._asked = threading.Event()
        self._done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._asked.set()
        self._thread.join(WAIT)
        self.client.close()

    def sample(self) -> None:
        """Take one sample now (from the sink: the run holds still meanwhile)."""
        self._done.clear()
        self._asked.set()
        assert self._done.wait(WAIT), "the sampler did not answer"

    def memory(self) -> int:
        """The summed memory of the keys now."""
        return sum(self.client.memory_usage(k, samples=0) or 0 for k in self.keys)

    def _serve(self) -> None:
        while self._asked.wait(WAIT) and not self._stop.is_set():
            self._asked.clear()
            self.peak = max(self.peak, self.memory())
            self.samples += 1
            self._done.set()


def streams_of(backend: RedisBackend, pipeline: cv.Pipeline[Any], run_id: str) -> list[str]:
    """The run's streams: each stage's input and the final stream."""
    keys = backend.keys(pipeline, run_id)
    return [keys.stream(i) for i in range(len(pipeline.stages) + 1)]


def stage_fn(runtime: str) -> Callable[[bytes], Any]:
    """The identity, as the runtime takes it."""
    if runtime == "async":

        async def passed_on_async(item: bytes) -> bytes:
            await asyncio.sleep(0)
            return item

        return passed_on_async
    return passed_on


def counted_bytes(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """The run's byte counters (``bytes:<stream>``), by stream."""
    counters = client.hgetall(keys.counters)
    return {k.decode()[6:]: int(v) for k, v in counters.items() if k.startswith(b"bytes:")}


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_server.url) as c:
        yield c


@dataclass
class SampledRun:
    """What `run_sampled` saw: the items the sink took (their numbers), the sampler,
    and the run's byte counters and stream lengths at its end."""

    received: list[bytes]
    sampler: Sampler
    streams: list[str]
    counted: dict[str, int]
    lengths: list[int]


def run_sampled(
    url: str,
    client: redis.Redis,
    items: int,
    max_bytes: int,
    stage: Callable[..., Any],
    source: Callable[[int], Iterable[Any]] = large_items,
    **kw: Any,
) -> SampledRun:
    """Run ``source(items)`` (`large_items`) through ``map(stage, **kw)`` and a sink that
    has the run's streams sampled before it takes each item (see the module docstring)."""
    run_id = "sampled"
    backend = RedisBackend(
        url, namespace=new_namespace(), run_id=run_id, local_workers=True, keep=True
    )
    received: list[bytes] = []
    sampler: Sampler

    def slow_sink(item: bytes) -> None:
        sampler.sample()  # the stages run ahead meanwhile: the budget stops them
        received.append(item[:4])

    pipeline = cv.Pipeline(source(items)).map(stage, name="pass", **kw).each(slow_sink)
    keys = backend.keys(pipeline, run_id)
    streams = streams_of(backend, pipeline, run_id)
    try:
        with Sampler(url, streams) as sampler:
            pipeline.run(backend=backend, max_bytes=max_bytes)
        lengths = [client.xlen(k) for k in streams]
        return SampledRun(received, sampler, streams, counted_bytes(client, keys), lengths)
    finally:
        backend.cancel(pipeline, run_id)


@pytest.mark.parametrize("runtime", ["thread", "process", "async"])
def test_the_streams_of_a_run_stay_within_its_byte_budget(
    redis_server: RedisServer, client: redis.Redis, runtime: str
) -> None:
    run = run_sampled(redis_server.url, client, ITEMS, BUDGET, stage_fn(runtime), runtime=runtime)
    assert sorted(run.received) == [i.to_bytes(4, "big") for i in range(ITEMS)]
    assert run.sampler.samples == ITEMS
    assert run.sampler.peak <= BUDGET + SLACK * len(run.streams)
    # The sink's input filled up to its share: the budget, not the input, bounded it.
    assert run.sampler.peak >= share_of(BUDGET, len(run.streams) - 1) // 2
    # Everything acknowledged was deleted, and its bytes uncounted.
    assert run.lengths == [0] * len(run.streams)
    assert set(run.counted.values()) == {0}


def grown(number: int) -> bytes:
    """A large item made from a small one: its number, then 30 KiB."""
    return number.to_bytes(4, "big") + bytes(30 * 1024)


async def grown_async(number: int) -> bytes:
    """`grown`, for the async runtime."""
    await asyncio.sleep(0)
    return grown(number)


@pytest.mark.parametrize("runtime", ["thread", "process", "async"])
def test_a_stage_whose_outputs_are_far_larger_than_its_inputs_stays_within_the_budget(
    redis_server: RedisServer, client: redis.Redis, runtime: str
) -> None:
    # The repro: map(int -> 50 KB) with max_bytes=2 MB (a share of 666 kB a stream): the
    # stage's batches were sized by their inputs' bytes (a few each), so one batch's
    # outputs, some 300 x 50 KB, went into the empty stream whole: 15 MB in it.
    run = run_sampled(
        redis_server.url,
        client,
        200,
        BUDGET,
        grown_async if runtime == "async" else grown,
        source=range,
        runtime=runtime,
        workers=1,
    )
    assert sorted(run.received) == [i.to_bytes(4, "big") for i in range(200)]
    assert run.sampler.peak <= BUDGET + SLACK * len(run.streams)
    assert set(run.counted.values()) == {0}


def test_an_item_larger_than_a_share_goes_through_alone(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    # A share: 333 bytes; an item: 64 KiB.
    run = run_sampled(redis_server.url, client, 20, 1000, passed_on)
    assert sorted(run.received) == [i.to_bytes(4, "big") for i in range(20)]
    # One item at a time in each stream.
    one = entry_cost({b"d": bytes(BIG + 8), b"q": b"[19]"})
    assert run.sampler.peak <= len(run.streams) * (one + SLACK)
    assert set(run.counted.values()) == {0}


def test_a_stop_ends_the_waits_of_a_run_its_budget_holds_and_the_run_resumes_whole(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    namespace, run_id = new_namespace(), "held"
    release = threading.Event()
    entered = threading.Event()

    def held(item: bytes) -> bytes:
        entered.set()
        assert release.wait(WAIT)
        return item[:4]

    pipeline = cv.Pipeline(large_items(ITEMS)).map(passed_on, name="pass").map(held)
    backend = RedisBackend(redis_server.url, namespace=namespace, run_id=run_id, local_workers=True)
    keys = backend.keys(pipeline, run_id)
    share = share_of(BUDGET, 2)
    one = entry_cost({b"d": bytes(BIG + 8), b"q": b"[59]"})
    handle = pipeline.start(backend=backend, max_bytes=BUDGET)
    try:
        assert entered.wait(WAIT)
        # The feeder and the first stage wait for room: their streams are full.
        wait_until(
            lambda: all(
                counted_bytes(client, keys).get(keys.stream(i), 0) > share - one for i in (0, 1)
            ),
            "the first two streams to fill up to their shares",
        )
        assert int(client.hget(keys.counters, "fed") or 0) < ITEMS
        handle.stop()
        assert handle.wait(10.0), "the stop did not end the run's waits"
    finally:
        release.set()
        handle.stop()
        handle.wait(WAIT)
    assert handle.join().stopped
    # Resumed, the run ends with every item: nothing was lost in the waits.
    again = RedisBackend(redis_server.url, namespace=namespace, run_id=run_id, local_workers=True)
    result = pipeline.run(backend=again, max_bytes=BUDGET, collect=True)
    assert sorted(set(result.outputs or [])) == [i.to_bytes(4, "big") for i in range(ITEMS)]


def test_a_worker_process_honours_the_budget_it_reads_from_the_run(
    redis_server: RedisServer, client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, namespace, run_id = redis_server.url, new_namespace(), "elsewhere"
    monkeypatch.setenv(GATE_ENV, f"{url} {namespace}-gate")
    _, entered, release = gate_keys(f"{namespace}-gate")
    pipeline = held_large(ITEMS)
    backend = RedisBackend(url, namespace=namespace, run_id=run_id)
    keys = backend.keys(pipeline, run_id)
    streams = streams_of(backend, pipeline, run_id)
    share = share_of(BUDGET, 2)
    one = entry_cost({b"d": bytes(BIG + 8), b"q": b"[59]"})
    with worker_processes("redis_helpers:held_large", url, namespace, 1, tmp_path):
        handle = pipeline.start(backend=backend, max_bytes=BUDGET, collect=True)
        try:
            # The gate holds its first item: the worker's first stage fills the gate's
            # input up to its share (and no further), the feeder the first stream.
            assert client.blpop([entered], timeout=WAIT), worker_logs(tmp_path)
            wait_until(
                lambda: all(
                    counted_bytes(client, keys).get(keys.stream(i), 0) > share - one for i in (0, 1)
                ),
                "the first two streams to fill up to their shares",
            )
            memory = sum(client.memory_usage(k, samples=0) or 0 for k in streams)
            assert memory <= BUDGET + SLACK * len(streams)
            assert int(client.hget(keys.counters, "fed") or 0) < ITEMS
        finally:
            client.rpush(release, 1)
        result = handle.join(WAIT)
    assert sorted(result.outputs or []) == large_items(ITEMS)


def test_the_budget_travels_in_the_run_settings() -> None:
    keys = Keys("ns", "p", "r")
    info = RunInfo(keys=keys, stages=("a", "b"), max_bytes=3000)
    back = RunInfo.from_meta(keys, {k.encode(): v.encode() for k, v in info.to_meta().items()})
    assert back.max_bytes == 3000
    assert back.share == 1000  # three streams: two stages' inputs and the final one
    none = RunInfo(keys=keys, stages=("a",))
    assert RunInfo.from_meta(keys, none.to_meta()).share is None


def test_a_batch_of_entries_is_cut_at_a_share_keeping_one_at_least() -> None:
    assert fitting([400, 400, 400], 1000) == 2
    assert fitting([5000, 10], 1000) == 1
    assert fitting([], 1000) == 0
    assert fitting([10, 10], 1000) == 2


@pytest.mark.parametrize("size", [10, 4000, BIG, 4 * 1024 * 1024 - 3, 4 * 1024 * 1024 + 1])
def test_a_hand_off_waits_for_at_least_what_its_entries_cost(size: int) -> None:
    value, seq = bytes(size), b"[12345, 0, 2]"
    # Two outputs: the compact record of one, and an 'a' record of two.
    one = ["O", b"1700000000000-0", value, seq]
    two = ["a", b"1700000000000-1", 1, 2, "o", 4, b"d", value, b"q", seq]
    two += ["o", 4, b"d", value, b"q", seq]
    entry = {b"d": value, b"q": seq}
    assert need_of(one) >= entry_cost(entry)
    assert need_of(two) >= 2 * entry_cost(entry)


def test_a_backend_that_does_not_bound_bytes_refuses_max_bytes() -> None:
    class Elsewhere(cv.Backend):
        def run(self, pipeline: Any, **options: Any) -> Any:
            raise AssertionError("never reached")

        def iterate(self, pipeline: Any, **options: Any) -> Iterator[Any]:
            raise AssertionError("never reached")

    with pytest.raises(cv.ConfigurationError, match=r"run\(\) 'max_bytes'.*Elsewhere"):
        cv.Pipeline(range(3)).map(abs).run(backend=Elsewhere(), max_bytes=1000)
