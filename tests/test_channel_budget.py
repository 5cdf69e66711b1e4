"""`Channel(maxsize, max_bytes=)`: a byte budget besides the count.

- how items are measured (`size_of`), and the validation of ``max_bytes``;
- the budget against a model (one thread, random non-blocking operations):
  what fits, what is refused, the bytes counted;
- threads and coroutines: the bytes held never exceed max(budget, largest
  item) and nothing is lost or duplicated; a larger-than-budget item passes
  alone; a get_many batch stays within the budget, on the C accelerator and
  on the pure-Python path alike.
"""

from __future__ import annotations

import array
import asyncio
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conveyor.channel as channel_module
from conveyor import Channel, ConfigurationError, ConfigurationTypeError, Empty, Full, ShutDown
from conveyor.channel import size_of

pytestmark = [pytest.mark.quick, pytest.mark.timeout(60)]

WAIT = 10.0

THREADED = settings(
    deadline=None,  # threads on a shared 2-core machine: bound the work instead
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)


@contextmanager
def take_path(pure: bool) -> Iterator[None]:
    """Run get_many on the pure-Python take (``pure``) or on the one in use (C when built)."""
    saved = channel_module._take
    if pure:
        channel_module._take = channel_module._take_python
    try:
        yield
    finally:
        channel_module._take = saved


# ---------------------------------------------------------------------- measuring, validating


class HasNbytes:
    """A buffer-like object, as NumPy arrays are seen: an int ``nbytes``."""

    nbytes = 12_345


def test_size_of_counts_bytes_buffers_and_plain_objects() -> None:
    assert size_of(b"abc") == 3
    assert size_of(bytearray(10)) == 10
    assert size_of(memoryview(array.array("d", [1.0, 2.0]))) == 16
    assert size_of(HasNbytes()) == 12_345
    items = [bytes(1000)] * 3
    assert size_of(items) == sys.getsizeof(items)  # shallow: the list, not what it holds
    assert size_of(42) == sys.getsizeof(42)


def test_size_of_does_not_import_numpy() -> None:
    import subprocess

    code = (
        "import sys; from conveyor.channel import size_of\n"
        "size_of(b'x'); size_of(memoryview(b'x')); size_of([1])\n"
        "assert 'numpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("bad", [True, [1024], b"1MiB"])
def test_max_bytes_of_another_type_is_a_type_error_naming_it(bad: object) -> None:
    with pytest.raises(ConfigurationTypeError, match="Channel 'max_bytes' must be an int"):
        Channel(4, max_bytes=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.5, 0.0, "0.4B", "1e6", "1 MiBs", "-1MiB", ""])
def test_max_bytes_not_positive_or_no_size_is_refused(bad: object) -> None:
    with pytest.raises(
        ConfigurationError, match="Channel 'max_bytes' must be an int >= 1, or a size such as"
    ):
        Channel(4, max_bytes=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("256MiB", 256 * 2**20),
        ("256mib", 256 * 2**20),
        (" 64 KiB ", 64 * 1024),
        ("1.5GB", 1_500_000_000),
        ("1.5 GiB", 3 * 2**29),
        ("512k", 512_000),
        ("512Ki", 512 * 1024),
        ("0.1TB", 10**11),
        (".5KiB", 512),
        ("10B", 10),
        ("1000", 1000),
        ("1.9B", 1),  # whole bytes, rounded down
        (2e9, 2_000_000_000),
        (4096, 4096),
    ],
)
def test_max_bytes_takes_a_size_with_a_unit(size: object, expected: int) -> None:
    ch: Channel[bytes] = Channel(4, max_bytes=size)  # type: ignore[arg-type]
    assert ch.max_bytes == expected
    assert ch.stats().max_bytes == expected


def test_a_subclass_cannot_take_a_budget() -> None:
    class Lifo(Channel[int]):
        pass

    with pytest.raises(ConfigurationError, match="not supported by a subclass"):
        Lifo(4, max_bytes=100)


def test_a_channel_without_budget_measures_nothing() -> None:
    ch: Channel[bytes] = Channel(4)
    ch.put(bytes(100))
    stats = ch.stats()
    assert (stats.max_bytes, stats.bytes, stats.peak_bytes) == (None, 0, 0)
    assert type(ch) is Channel


# ---------------------------------------------------------------------- against a model

Op = tuple[str, int]  # ("put", size) | ("put_many", size) | ("get", _) | ("get_many", n)


@given(
    capacity=st.integers(0, 6),
    budget=st.integers(1, 300),
    ops=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["put", "put_many"]), st.integers(0, 400)),
            st.tuples(st.sampled_from(["get", "get_many"]), st.integers(1, 5)),
        ),
        max_size=60,
    ),
    pure=st.booleans(),
)
def test_the_budget_follows_its_model(
    capacity: int, budget: int, ops: list[Op], pure: bool
) -> None:
    ch: Channel[bytes] = Channel(capacity, max_bytes=budget)
    model: deque[bytes] = deque()
    with take_path(pure):
        for op, arg in ops:
            held = sum(map(len, model))
            if op in ("put", "put_many"):
                item = bytes(arg)
                fits = (capacity == 0 or len(model) < capacity) and (
                    held == 0 or held + arg <= budget
                )
                try:
                    if op == "put":
                        ch.put(item, block=False)
                    else:
                        ch.put_many([item], block=False)
                except Full:
                    assert not fits
                else:
                    assert fits
                    model.append(item)
            else:
                try:
                    got = [ch.get(block=False)] if op == "get" else ch.get_many(arg, block=False)
                except Empty:
                    assert not model
                    continue
                expected = [model.popleft()]
                while model and len(expected) < (1 if op == "get" else arg):
                    if sum(map(len, expected)) + len(model[0]) > budget:
                        break
                    expected.append(model.popleft())
                assert got == expected
            stats = ch.stats()
            assert stats.bytes == sum(map(len, model))
            assert stats.size == len(model)
            assert stats.bytes <= max(budget, max(map(len, model), default=0))


# ---------------------------------------------------------------------- threads and coroutines


@THREADED
@given(
    budget=st.integers(1, 5_000),
    sizes=st.lists(st.integers(0, 8_000), min_size=1, max_size=120),
    producers=st.integers(1, 3),
    consumers=st.integers(1, 3),
    batch=st.integers(1, 8),
    pure=st.booleans(),
)
def test_threads_never_hold_more_than_the_budget_or_the_largest_item_and_lose_nothing(
    budget: int, sizes: list[int], producers: int, consumers: int, batch: int, pure: bool
) -> None:
    ch: Channel[bytes] = Channel(0, max_bytes=budget)
    handles = [ch.producer() for _ in range(producers)]
    # Each item is unique: its first bytes say which it is.
    items = [i.to_bytes(4, "big") + bytes(max(0, s - 4)) for i, s in enumerate(sizes)]
    received: list[list[bytes]] = [[] for _ in range(consumers)]

    def produce(k: int) -> None:
        with handles[k]:
            for item in items[k::producers]:
                handles[k].put(item, timeout=WAIT)

    def consume(k: int) -> None:
        while True:
            try:
                received[k].extend(ch.get_many(batch, timeout=WAIT))
            except ShutDown:
                return

    with take_path(pure):
        threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
        threads += [threading.Thread(target=consume, args=(k,)) for k in range(consumers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 2)
        assert not any(t.is_alive() for t in threads)
    got = sorted(x for r in received for x in r)
    assert got == sorted(items)
    stats = ch.stats()
    assert stats.peak_bytes <= max(budget, *map(len, items))
    assert stats.bytes == 0


def test_an_item_larger_than_the_budget_waits_for_an_empty_channel_then_passes_alone() -> None:
    ch: Channel[bytes] = Channel(0, max_bytes=100)
    ch.put(bytes(10))
    with pytest.raises(Full):
        ch.put(bytes(500), block=False)
    putter = threading.Thread(target=ch.put, args=(bytes(500),), kwargs={"timeout": WAIT})
    putter.start()
    assert ch.get(timeout=WAIT) == bytes(10)  # the channel empties: the big item goes in
    putter.join(WAIT)
    assert not putter.is_alive()
    assert ch.stats().bytes == 500
    with pytest.raises(Full):
        ch.put(b"x", block=False)  # nothing else while it is there
    assert ch.get_many(10) == [bytes(500)]


def test_get_many_stays_within_the_budget_but_takes_one_item_at_least() -> None:
    ch: Channel[bytes] = Channel(0, max_bytes=100)
    for size in (40, 40, 20):
        ch.put(bytes(size))
    assert [len(x) for x in ch.get_many(10)] == [40, 40, 20]
    ch.put(bytes(300))
    assert [len(x) for x in ch.get_many(10)] == [300]


def test_a_count_and_a_budget_together_both_hold() -> None:
    ch: Channel[bytes] = Channel(2, max_bytes=1_000)
    ch.put(b"a")
    ch.put(b"b")
    with pytest.raises(Full):
        ch.put(b"c", block=False)  # the count is reached, the bytes are not
    assert ch.full()


def test_an_immediate_shutdown_forgets_the_bytes_dropped() -> None:
    ch: Channel[bytes] = Channel(0, max_bytes=100)
    ch.put(bytes(60))
    ch.shutdown(immediate=True)
    assert ch.stats().bytes == 0


def test_coroutines_wait_for_room_for_their_own_item_and_lose_nothing() -> None:
    sizes = [30, 90, 5, 150, 60, 0, 100, 40] * 5

    async def main() -> tuple[list[bytes], int]:
        ch: Channel[bytes] = Channel(0, max_bytes=100)
        items = [i.to_bytes(1, "big") + bytes(max(0, s - 1)) for i, s in enumerate(sizes)]

        async def produce() -> None:
            async with ch.producer() as p:
                await p.aput_many(items[:20])
                for item in items[20:]:
                    await p.aput(item)

        task = asyncio.ensure_future(produce())
        got = [x async for x in ch]
        await task
        assert got == items
        return got, ch.stats().peak_bytes

    got, peak = asyncio.run(asyncio.wait_for(main(), WAIT))
    assert peak <= max(100, *map(len, got))


def test_a_thread_and_a_coroutine_share_a_budgeted_channel() -> None:
    ch: Channel[bytes] = Channel(0, max_bytes=64)
    items = [bytes([i]) * 40 for i in range(30)]

    def produce() -> None:
        with ch.producer() as p:
            p.put_many(items, timeout=WAIT)

    async def consume() -> list[Any]:
        return [x async for x in ch]

    putter = threading.Thread(target=produce)
    putter.start()
    got = asyncio.run(asyncio.wait_for(consume(), WAIT))
    putter.join(WAIT)
    assert got == items
    assert ch.stats().peak_bytes <= 64
