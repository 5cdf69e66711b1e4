"""What comes out: every stage kind against the plain-Python reference, order, batches.

Every test runs on every runtime x backend (the ``runner`` fixture, conftest.py).
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from runners import ASYNC_ONLY, Runner

import conveyor as cv

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# None and "THE END" are data: as items of the source, and as outputs of stages.
ITEMS: list[Any] = [*range(12), None, "THE END", *range(12, 24), "THE END", None]


def triple(x: Any) -> Any:
    return x * 3 if isinstance(x, int) else x


def keep(x: Any) -> bool:
    return not isinstance(x, int) or x % 2 == 0


def spread(x: Any) -> list[Any]:
    if not isinstance(x, int):
        return [x]
    return [x, None] if x % 4 == 0 else [x, "THE END"]


def reference(items: list[Any]) -> list[Any]:
    """The plain-Python loop the pipelines below must match."""
    out: list[Any] = []
    for x in items:
        y = triple(x)
        if keep(y):
            out.extend(spread(y))
    return out


def three_stages(runner: Runner, *, ordered: bool = True) -> cv.Pipeline[Any]:
    options: dict[str, Any] = {"workers": 3, "runtime": runner.runtime, "ordered": ordered}
    return (
        cv.Pipeline(ITEMS)
        .map(runner.fn(triple), **options)
        .filter(runner.fn(keep), **options)
        .flat_map(runner.fn(spread), **options)
    )


def test_map_filter_and_flat_map_give_the_plain_python_list_in_order(runner: Runner) -> None:
    result = runner.run(three_stages(runner), collect=True)
    assert result.outputs == reference(ITEMS)
    assert result.items_out == len(reference(ITEMS))


def test_unordered_stages_give_the_same_multiset(runner: Runner) -> None:
    result = runner.run(three_stages(runner, ordered=False), collect=True)
    assert Counter(result.outputs or []) == Counter(reference(ITEMS))


def identity(x: Any) -> Any:
    return x


def always(x: Any) -> bool:
    return True


def alone(x: Any) -> list[Any]:
    return [x]


def test_falsy_and_sentinel_like_values_are_data_as_themselves(runner: Runner) -> None:
    items: list[Any] = [None, "THE END", 0, "", False, [], (), b"", float("inf"), None, "THE END"]
    pipeline = (
        cv.Pipeline(items)
        .map(runner.fn(identity), workers=4, runtime=runner.runtime)
        .filter(runner.fn(always), runtime=runner.runtime)
        .flat_map(runner.fn(alone), workers=2, runtime=runner.runtime)
    )
    # Redis's default codec (msgpack) carries a tuple as a list (conveyor/redis/codec.py).
    expected = [[] if runner.on_redis and x == () else x for x in items]
    outputs = runner.run(pipeline, collect=True).outputs or []
    assert outputs == expected
    assert [type(x) for x in outputs] == [type(x) for x in expected]  # False is not 0


def test_a_dict_with_tuple_keys_arrives_as_itself(runner: Runner) -> None:
    # On Redis, msgpack made the keys lists, which cannot be keys: the entry could not
    # be decoded and went to the dead letters.
    items: list[Any] = [{(1, 2): "a", (3, (4, 5)): [6], "k": {(7,): None}}, {(): 0}]
    pipeline = cv.Pipeline(items).map(runner.fn(identity), runtime=runner.runtime)
    assert runner.run(pipeline, collect=True).outputs == items


def numpy_arrays() -> list[Any]:
    """Big arrays (through shared memory on process stages) of every plain dtype kind, in
    both byte orders and two dimensions, then kinds only pickle describes, and a small one."""
    numpy = pytest.importorskip("numpy")
    n = 40_000  # 40 kB and more: above the process runtime's shared-memory threshold
    plain = [
        numpy.arange(n) % 2 == 0,
        (numpy.arange(n) % 100).astype(numpy.int8),
        numpy.arange(n, dtype=numpy.uint16),
        numpy.arange(n, dtype=numpy.int64),
        numpy.linspace(0, 1, n, dtype=numpy.float16),
        numpy.linspace(0, 1, n, dtype=">f8"),
        (numpy.arange(n) + 1j).astype(numpy.complex64),
        numpy.arange(n, dtype=numpy.float64).reshape(200, n // 200),
    ]
    described_by_pickle = [
        numpy.asfortranarray(numpy.arange(n, dtype=numpy.float32).reshape(200, n // 200)),
        numpy.zeros(n, dtype=[("x", "f4"), ("y", "i2")]),
        numpy.arange(n).astype("datetime64[s]"),
        numpy.arange(n, dtype=numpy.dtype(numpy.float64, metadata={"unit": "m"})),
        numpy.arange(2 * n, dtype=numpy.int32)[::2],
        numpy.arange(10),
    ]
    return plain + described_by_pickle


def copy_of(a: Any) -> Any:
    return a.copy()


def test_numpy_arrays_arrive_as_themselves_whatever_their_dtype(runner: Runner) -> None:
    if runner.runtime == "interpreter":
        pytest.skip("NumPy does not load in a subinterpreter (it is not multi-phase init)")
    items = numpy_arrays()
    pipeline = (
        cv.Pipeline(items)
        .map(runner.fn(identity), workers=2, runtime=runner.runtime)
        .map(runner.fn(copy_of), runtime=runner.runtime)
    )
    # Redis's plain-data codecs cannot carry arrays: the pickle codec, signed, does.
    pickled = {"codec": "pickle", "secret_key": b"contract-suite-key"}
    outputs = runner.run(pipeline, collect=True, backend_options=pickled).outputs or []
    assert len(outputs) == len(items)
    for a, b in zip(items, outputs, strict=True):
        assert type(b) is type(a), a.dtype
        assert (b.dtype, b.shape, b.dtype.metadata) == (a.dtype, a.shape, a.dtype.metadata)
        assert (b == a).all(), a.dtype
        assert b.flags.writeable, a.dtype


def test_each_sees_every_item_once_and_outputs_nothing(runner: Runner, tmp_path: Path) -> None:
    folder = str(tmp_path)

    def record(x: Any) -> None:
        # One file per call, so that worker processes can report too.
        Path(folder, uuid.uuid4().hex).write_text(repr(x))

    pipeline = (
        cv.Pipeline(ITEMS)
        .map(runner.fn(triple), workers=3, runtime=runner.runtime)
        .each(runner.fn(record), workers=3, runtime=runner.runtime)
    )
    result = runner.run(pipeline, collect=True)
    seen = Counter(p.read_text() for p in tmp_path.iterdir())
    assert seen == Counter(repr(triple(x)) for x in ITEMS)
    assert result.outputs == []
    each = result.stats[-1]
    assert (each.items_in, each.items_out) == (len(ITEMS), 0)
    assert list(runner.iterate(pipeline)) == []  # iterated, too


def test_order_is_kept_across_several_workers_when_a_random_item_is_slow(runner: Runner) -> None:
    slow = random.randrange(40)
    # Every item takes a few random milliseconds too: they finish in a random order.
    work = [random.uniform(0.0, 0.005) for _ in range(40)]

    async def double(x: int) -> int:
        # Slow work for one item: the others overtake it.
        await asyncio.sleep(0.3 if x == slow else work[x])
        return 2 * x

    pipeline = (
        cv.Pipeline(range(40))
        .map(runner.fn(double), workers=4, runtime=runner.runtime)
        .map(runner.fn(triple), workers=3, runtime=runner.runtime)
    )
    assert list(runner.iterate(pipeline)) == [6 * x for x in range(40)], f"slow item {slow}"


def not_third(x: int) -> bool:
    return x % 3 != 0


def test_order_is_kept_over_many_items_through_many_workers_and_small_channels(
    runner: Runner,
) -> None:
    n = 5000
    pipeline = (
        cv.Pipeline(range(n))
        .map(runner.fn(identity), workers=8, capacity=7, runtime=runner.runtime)
        .filter(runner.fn(not_third), workers=5, runtime=runner.runtime)
    )
    assert runner.run(pipeline, collect=True).outputs == [x for x in range(n) if x % 3 != 0]


def copies(x: int) -> list[int]:
    return [x] * (x % 3)  # none, one, or two equal outputs


def test_unordered_stages_deliver_every_output_once_over_many_items(runner: Runner) -> None:
    n = 2000
    pipeline = (
        cv.Pipeline(range(n))
        .map(runner.fn(triple), workers=3, ordered=False, runtime=runner.runtime)
        .flat_map(runner.fn(copies), workers=2, ordered=False, runtime=runner.runtime)
    )
    outputs = runner.run(pipeline, collect=True).outputs or []
    assert Counter(outputs) == Counter(y for x in range(n) for y in copies(triple(x)))


def inc(x: int) -> int:
    return x + 1


def even(x: int) -> bool:
    return x % 2 == 0


def twice(x: int) -> list[int]:
    return [x, x]


async def twice_slow_on_2(x: int) -> list[int]:
    if x == 2:
        await asyncio.sleep(0.2)  # slow work: the other worker overtakes it
    return [x, x]


def members(group: list[int]) -> list[int]:
    return list(group)


def test_batch_by_size_gives_the_plain_python_groups(runner: Runner) -> None:
    # Batch stages run on threads; the runtime under test runs the others.
    options: dict[str, Any] = {"workers": 2, "runtime": runner.runtime}
    pipeline = (
        cv.Pipeline(range(40))
        .map(runner.fn(inc), **options)
        .filter(runner.fn(even), **options)
        .flat_map(runner.fn(twice_slow_on_2), **options)
        .batch(3)
        .map(runner.fn(members), runtime=runner.runtime)
    )
    flat = [y for x in range(40) if even(inc(x)) for y in twice(inc(x))]
    # Full groups of 3 in order, then a last partial one (40 outputs).
    groups = [flat[i : i + 3] for i in range(0, len(flat), 3)]
    assert runner.run(pipeline, collect=True).outputs == groups


def test_batch_by_interval_sends_a_partial_group_when_the_source_is_slow(runner: Runner) -> None:
    def every_300_ms() -> Iterator[int]:
        for i in range(6):
            if i:
                time.sleep(0.3)  # a slow source: one item every 0.3 s
            yield i

    # The batch comes first, so that its items arrive as the source yields them
    # (a worker process starting up would delay the first ones, which would
    # then rightly arrive together); the runtime under test gets the groups.
    pipeline = (
        cv.Pipeline(every_300_ms())
        .batch(100, interval=0.15)
        .map(runner.fn(members), runtime=runner.runtime)
    )
    assert runner.run(pipeline, collect=True).outputs == [[i] for i in range(6)]


class Unwanted(Exception):
    """Raised by `picky` for the items a skip test gives up on."""


def picky(x: int) -> int:
    if x % 7 == 3:
        raise Unwanted(x)
    return x


async def none_or_copies(x: int) -> list[int]:
    if x % 11 == 1:
        await asyncio.sleep(0.05)  # slow work: the other worker overtakes it
    return [] if x % 5 == 0 else [x] * (1 + 2 * (x % 2))


def test_batch_after_places_left_empty_gives_the_plain_python_groups(runner: Runner) -> None:
    # Items filtered out, skipped on error and flat-mapped to nothing, by parallel
    # workers: the groups still follow the source, as a plain loop makes them.
    options: dict[str, Any] = {"workers": 2, "runtime": runner.runtime}
    pipeline = (
        cv.Pipeline(range(60))
        .filter(runner.fn(not_third), **options)
        .map(runner.fn(picky), on_error="skip", **options)
        .flat_map(runner.fn(none_or_copies), **options)
        .batch(4)
        .map(runner.fn(members), runtime=runner.runtime)
    )
    kept = [x for x in range(60) if not_third(x)]
    flat = [y for x in kept if x % 7 != 3 for y in asyncio.run(none_or_copies(x))]
    result = runner.run(pipeline, collect=True)
    assert result.outputs == [flat[i : i + 4] for i in range(0, len(flat), 4)]
    assert sorted(f.item for f in result.failures) == [x for x in kept if x % 7 == 3]


def test_batch_in_an_unordered_run_gives_the_plain_python_groups(runner: Runner) -> None:
    # The last stage gives its outputs in any order; the groups are still the plain ones.
    options: dict[str, Any] = {"workers": 2, "runtime": runner.runtime}
    pipeline = (
        cv.Pipeline(range(40))
        .map(runner.fn(inc), **options)
        .flat_map(runner.fn(twice_slow_on_2), **options)
        .batch(3)
        .map(runner.fn(members), ordered=False, **options)
    )
    flat = [y for x in range(40) for y in twice(inc(x))]
    groups = [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]
    outputs = runner.run(pipeline, collect=True).outputs or []
    assert Counter(map(tuple, outputs)) == Counter(groups)


IN_FLIGHT = 300
"""Calls an async stage of as many workers has in flight at once, in the test below."""


def all_in_flight_at_once(n: int) -> tuple[Any, dict[str, int]]:
    """A coroutine stage function whose first ``n`` calls wait until all ``n`` are in
    flight (10 s at most), and what it saw: calls started, the most threads alive."""
    seen = {"calls": 0, "threads": 0}
    events: list[asyncio.Event] = []  # made on the stage's event loop, by the first call

    async def gather(x: int) -> int:
        if not events:
            events.append(asyncio.Event())
        seen["calls"] += 1
        seen["threads"] = max(seen["threads"], threading.active_count())
        if seen["calls"] >= n:
            events[0].set()
        await asyncio.wait_for(events[0].wait(), 10.0)
        return x

    return gather, seen


@pytest.mark.parametrize("runner", ASYNC_ONLY, indirect=True)
def test_an_async_stage_has_hundreds_of_calls_in_flight_on_a_few_threads(
    runner: Runner,
) -> None:
    before = threading.active_count()
    gather, seen = all_in_flight_at_once(IN_FLIGHT)
    pipeline = cv.Pipeline(range(2 * IN_FLIGHT)).map(
        gather, runtime="async", workers=IN_FLIGHT, name="gather"
    )
    assert sorted(runner.run(pipeline, collect=True).outputs) == list(range(2 * IN_FLIGHT))
    assert seen["calls"] == 2 * IN_FLIGHT
    assert seen["threads"] - before < 50, f"{seen['threads'] - before} threads more"


async def spread_slowly(x: Any) -> AsyncIterator[Any]:
    for y in spread(x):
        await asyncio.sleep(0)
        yield y


def test_a_flat_map_of_an_async_generator_function_sends_what_it_yields(runner: Runner) -> None:
    # The repro: flat_map(<async def with yield>, runtime="async") was refused as
    # "'runtime'='async' needs a coroutine function (async def)", which it is.
    if runner.runtime != "async":
        with pytest.raises(cv.ConfigurationError, match=r"flat_map\(\) stage 'spread_slowly'"):
            cv.Pipeline(ITEMS).flat_map(spread_slowly, runtime=runner.runtime)
        return
    pipeline = cv.Pipeline(ITEMS).flat_map(spread_slowly, runtime="async", workers=3)
    expected = [y for x in ITEMS for y in spread(x)]
    assert list(runner.iterate(pipeline)) == expected


def test_an_async_generator_function_in_a_map_filter_or_each_is_refused_saying_so(
    runner: Runner,
) -> None:
    for kind in ("map", "filter", "each"):
        with pytest.raises(cv.ConfigurationError, match=r"async generator function.*flat_map"):
            getattr(cv.Pipeline(ITEMS), kind)(spread_slowly, runtime=runner.runtime)
