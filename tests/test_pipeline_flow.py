"""What flows through a pipeline: every item exactly once, in order on request, lazily pulled.

The property tests build random pipelines of map, filter and flat_map stages
(random workers, capacities, ordering, fan-outs and injected failures) and
compare them with a plain single-threaded reference.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conveyor as cv
from conveyor.runtime.base import RunControl
from conveyor.runtime.ports import Sequencer
from test_pipeline_helpers import (  # noqa: F401 - no_thread_left is a fixture
    WAIT,
    CountingSource,
    conveyor_threads,
    identity,
    must_wait,
    no_thread_left,
    random_stage_outputs,
    reference_run,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("no_thread_left")

# ---------------------------------------------------------------------- any value is data


@pytest.mark.quick
def test_a_source_of_only_none_yields_only_none() -> None:
    result = cv.Pipeline([None] * 100).map(identity, workers=3).run(collect=True)
    assert result.outputs == [None] * 100
    assert result.stats[0].items_in == 100


@pytest.mark.quick
def test_an_empty_source_yields_nothing_and_ends() -> None:
    p = cv.Pipeline([]).map(identity, workers=3).batch(4).flat_map(identity)
    assert list(p) == []


def test_many_items_through_several_parallel_stages_arrive_once_each() -> None:
    n = 20_000
    p = (
        cv.Pipeline(range(n))
        .map(lambda x: x + 1, workers=4, capacity=16)
        .flat_map(lambda x: [x, -x], workers=3, capacity=5, ordered=False)
        .filter(lambda x: x > 0, workers=2)
    )
    assert sorted(p) == list(range(1, n + 1))


# ---------------------------------------------------------------------- random pipelines


class Injected(Exception):
    """The failure the property tests inject by item value."""


@dataclass(frozen=True)
class StageSpec:
    """One random stage: what it does, how it runs, and which items fail in it."""

    kind: str  # map, filter or flat_map
    param: int  # map: added constant; filter: modulus; flat_map: fan-out 0-3
    workers: int
    capacity: int
    ordered: bool
    fail_mod: int | None  # items with x % fail_mod == 1 raise Injected
    retries: int

    def fails(self, x: int) -> bool:
        return self.fail_mod is not None and x % self.fail_mod == 1

    def outputs(self, x: int) -> list[int]:
        """The stage's outputs for one item (the reference, no failure)."""
        return random_stage_outputs(self.kind, self.param, x)

    def function(self) -> Callable[[int], Any]:
        """The stage function the pipeline runs: the reference, plus the failures."""
        kind, param = self.kind, self.param

        def fn(x: int) -> Any:
            if self.fails(x):
                raise Injected(x)
            if kind == "map":
                return x * 3 + param
            if kind == "filter":
                return x % param != 0
            return (x * 4 + j for j in range(param))  # a generator: lazily iterable

        return fn


stage_specs = st.builds(
    StageSpec,
    kind=st.sampled_from(["map", "filter", "flat_map"]),
    param=st.integers(0, 3),
    workers=st.integers(1, 16),
    capacity=st.integers(1, 64),
    ordered=st.booleans(),
    fail_mod=st.one_of(st.none(), st.sampled_from([3, 5, 7, 13])),
    retries=st.integers(0, 1),
).map(lambda s: s if s.kind != "filter" or s.param >= 2 else StageSpec(**{**vars(s), "param": 2}))

ordered_stage_specs = stage_specs.map(lambda s: StageSpec(**{**vars(s), "ordered": True}))


def reference(
    items: list[int], specs: list[StageSpec]
) -> tuple[list[int], Counter[tuple[str, int]]]:
    """The single-threaded reference: outputs and the (stage, item) failures."""
    return reference_run(items, specs)


def build(items: list[int], specs: list[StageSpec]) -> cv.Pipeline[Any]:
    p: cv.Pipeline[Any] = cv.Pipeline(items)
    for index, spec in enumerate(specs):
        p = getattr(p, spec.kind)(
            spec.function(),
            workers=spec.workers,
            capacity=spec.capacity,
            ordered=spec.ordered,
            on_error="skip",
            retries=spec.retries,
            backoff=cv.Backoff(initial=0.0),
            name=f"s{index}",
        )
    return p


@settings(
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.lists(st.integers(-500, 500), max_size=200),
    specs=st.lists(stage_specs, min_size=1, max_size=5),
)
def test_a_random_pipeline_matches_the_single_threaded_reference(
    items: list[int], specs: list[StageSpec]
) -> None:
    expected, expected_failures = reference(items, specs)
    result = build(items, specs).run(collect=True)
    assert result.outputs is not None
    # Ordered stages keep order; one worker keeps it too, whatever `ordered` says.
    if all(s.ordered or s.workers == 1 for s in specs):
        assert result.outputs == expected
    else:
        assert Counter(result.outputs) == Counter(expected)
    failures = Counter((f.stage, f.item) for f in result.failures)
    assert failures == expected_failures
    for f in result.failures:
        assert isinstance(f.error, Injected)
        assert f.error.args == (f.item,)
        assert f.attempts == specs[int(f.stage[1:])].retries + 1
    assert result.items_out == len(expected)
    assert not conveyor_threads()


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.lists(st.integers(-500, 500), max_size=200),
    specs=st.lists(stage_specs, min_size=1, max_size=5),
)
def test_the_statistics_of_a_random_pipeline_add_up(
    items: list[int], specs: list[StageSpec]
) -> None:
    result = build(items, specs).run()
    stage_inputs = items
    for spec, stats in zip(specs, result.stats, strict=True):
        failed = [x for x in stage_inputs if spec.fails(x)]
        outputs = [y for x in stage_inputs if not spec.fails(x) for y in spec.outputs(x)]
        assert stats.items_in == len(stage_inputs)
        assert stats.failed == len(failed)
        assert stats.retried == len(failed) * spec.retries
        assert stats.items_out == len(outputs)
        if spec.kind == "filter":
            assert stats.filtered == len(stage_inputs) - len(failed) - len(outputs)
        else:
            assert stats.filtered == 0
        stage_inputs = outputs
    assert result.items_out == len(stage_inputs)


def build_raising(specs: list[StageSpec]) -> Callable[[list[int]], cv.Pipeline[Any]]:
    """Like `build`, with ``on_error="raise"`` and no retries."""

    def make(items: list[int]) -> cv.Pipeline[Any]:
        p: cv.Pipeline[Any] = cv.Pipeline(items)
        for index, spec in enumerate(specs):
            p = getattr(p, spec.kind)(
                spec.function(),
                workers=spec.workers,
                capacity=spec.capacity,
                ordered=spec.ordered,
                name=f"s{index}",
            )
        return p

    return make


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.lists(st.integers(-500, 500), max_size=200),
    specs=st.lists(stage_specs, min_size=1, max_size=5),
)
def test_a_random_pipeline_with_on_error_raise_fails_with_an_injected_item_or_matches(
    items: list[int], specs: list[StageSpec]
) -> None:
    """Nothing lost: either every output arrives, or the run raises one of the
    failures the reference predicts, naming its stage and item."""
    expected, expected_failures = reference(items, specs)
    p = build_raising(specs)(items)
    if not expected_failures:
        assert Counter(p.run(collect=True).outputs or []) == Counter(expected)
        return
    with pytest.raises(Injected) as info:
        p.run()
    (item,) = info.value.args
    notes = [n for n in getattr(info.value, "__notes__", []) if n.startswith("conveyor:")]
    assert len(notes) == 1
    stages = [stage for stage, x in expected_failures if x == item]
    assert any(f"'{stage}'" in notes[0] for stage in stages), (notes, stages)
    assert not conveyor_threads()


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.lists(st.integers(-500, 500), min_size=1, max_size=300),
    specs=st.lists(ordered_stage_specs, max_size=4),
    data=st.data(),
)
def test_breaking_out_of_an_ordered_random_pipeline_gives_a_prefix_of_the_reference(
    items: list[int], specs: list[StageSpec], data: st.DataObject
) -> None:
    specs = [*specs, StageSpec("map", 0, 2, 4, True, None, 0)]  # at least one stage
    expected, _ = reference(items, specs)
    if not expected:
        return
    stop_after = data.draw(st.integers(1, len(expected)), label="stop_after")
    p = build(items, specs)
    received = []
    for out in p:
        received.append(out)
        if len(received) == stop_after:
            break
    assert received == expected[:stop_after]
    assert not conveyor_threads()


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.integers(), max_size=100),
    size=st.integers(1, 12),
    workers=st.integers(1, 8),
    capacity=st.integers(1, 16),
)
def test_batch_after_a_random_parallel_stage_chunks_the_reference(
    items: list[int], size: int, workers: int, capacity: int
) -> None:
    p = cv.Pipeline(items).map(identity, workers=workers, capacity=capacity).batch(size)
    assert list(p) == [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------- order


def test_the_reorder_window_bounds_how_far_workers_run_ahead_of_a_slow_item() -> None:
    gate = threading.Event()
    done: list[int] = []
    source = CountingSource()  # never-ending

    def first_is_slow(x: int) -> int:
        if x == 0:
            must_wait(gate)
        done.append(x)
        return x

    workers, capacity = 4, 16
    handle = cv.Pipeline(source).map(first_is_slow, workers=workers, capacity=capacity).start()
    try:
        # White-box: the window is full when the next ticket is `window` ahead of item 0's.
        sequencer = handle._run.stage_runs[0].ports[0].sequencer  # type: ignore[attr-defined]
        assert sequencer is not None
        wait_until(lambda: sequencer._next_ticket - sequencer._next >= sequencer._window)
        # Workers take batches of at most capacity // 2 items, `window` batches ahead.
        assert len(done) <= sequencer._window * (capacity // 2)
        assert source.pulled <= len(done) + workers * (capacity // 2) + capacity
    finally:
        handle.stop()
        gate.set()
        handle.join(WAIT)


def test_outputs_waiting_for_room_keep_their_batch_in_the_reorder_window() -> None:
    # Regression: the flusher released its tickets before putting their outputs,
    # so workers took new batches while it waited for room, beyond the window
    # (and beyond a run's max_bytes, whose ordered stages have one batch per port).
    output: cv.Channel[Any] = cv.Channel(1)
    sequencer = Sequencer(output, window=2, control=RunControl())
    source: cv.Channel[Any] = cv.Channel()
    source.put_many(range(10))
    assert [sequencer.take(source, 1) for _ in range(2)] == [([0], 0), ([1], 1)]
    sequencer.deposit(1, ["b"])  # waits for ticket 0
    flusher = threading.Thread(target=sequencer.deposit, args=(0, ["a0", "a1"]))
    flusher.start()  # puts "a0", then waits for room for "a1" and "b"
    wait_until(lambda: output.stats().waiting_producers == 1)
    with sequencer._lock:
        assert sequencer._window_full(2)  # the outputs held are still tickets 0 and 1
    assert output.get_many(10, timeout=WAIT) == ["a0"]
    assert output.get(timeout=WAIT) == "a1"
    assert output.get(timeout=WAIT) == "b"
    flusher.join(WAIT)
    assert not flusher.is_alive()
    assert sequencer.take(source, 1) == ([2], 2)


def test_ordered_is_the_default() -> None:
    assert cv.Pipeline([1]).map(identity).stages[0].ordered is True


@pytest.mark.parametrize("kind", ["map", "filter", "flat_map"])
def test_unordered_output_is_yielded_as_it_completes(kind: str) -> None:
    """Item 0 blocks until the consumer has received a later item's output.

    With ordered output this would never end (item 0 must come first).
    """
    received = threading.Event()

    def blocks_first(x: int) -> Any:
        if x == 0:
            must_wait(received)
        if kind == "map":
            return x
        if kind == "filter":
            return True
        return [x]

    p = getattr(cv.Pipeline(range(20)), kind)(blocks_first, workers=2, ordered=False)
    outputs = []
    for out in p:
        outputs.append(out)
        received.set()
    assert outputs[0] != 0
    assert sorted(outputs) == list(range(20))


# ---------------------------------------------------------------------- lazy, bounded pulls


@pytest.mark.parametrize(("workers", "capacity"), [(1, 8), (3, 8), (2, 1)])
def test_the_source_is_never_pulled_more_than_capacity_ahead_of_the_first_stage(
    workers: int, capacity: int
) -> None:
    source = CountingSource()  # never-ending
    gate = threading.Event()
    inside = []
    lock = threading.Lock()

    def held(x: int) -> int:
        with lock:
            inside.append(x)
        must_wait(gate)
        return x

    p = cv.Pipeline(source).map(held, workers=workers, capacity=capacity)
    handle = p.start()
    try:
        wait_until(lambda: len(inside) == workers and handle.stats()[0].queue_size == capacity)
        # Every worker holds one item and the channel is full: the feeder must
        # now be waiting for room, not holding items it pulled ahead.
        assert source.pulled == capacity + len(inside)
    finally:
        handle.stop()
        gate.set()
        handle.join()
    assert source.pulled <= capacity + workers + 1


def test_a_huge_source_is_pulled_only_as_far_as_the_run_went() -> None:
    source = CountingSource(limit=10**9)
    p = cv.Pipeline(source).map(identity, capacity=4).map(identity, capacity=4)
    taken = []
    for out in p:
        taken.append(out)
        if len(taken) == 50:
            break
    assert taken == list(range(50))
    # 50 consumed, plus at most what the channels and workers hold in between.
    assert source.pulled < 50 + 4 + 4 + 1024 + 16


@pytest.mark.parametrize("lead", [0, 300])
def test_an_item_never_waits_in_the_feeder_while_the_source_blocks(lead: int) -> None:
    """Regression: a generator's items were pulled in chunks, so the last items
    before a blocking pull sat in the feeder until the chunk filled (forever here:
    this source waits for the answer to its last item, as a crawler does)."""
    answered = threading.Event()

    def source() -> Iterator[Any]:
        yield from range(lead)  # fast items first, so chunks would have grown
        yield "ping"
        must_wait(answered)
        yield "done"

    outputs = []
    for out in cv.Pipeline(source()).map(identity, workers=2):
        outputs.append(out)
        if out == "ping":
            answered.set()
    assert outputs == [*range(lead), "ping", "done"]


@pytest.mark.quick
def test_an_async_generator_is_a_source() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(200):
            if i % 10 == 0:
                await asyncio.sleep(0)
            yield i

    p = cv.Pipeline(numbers()).map(lambda x: x + 1, workers=3)
    assert list(p) == list(range(1, 201))


def test_an_async_source_is_pulled_lazily_too() -> None:
    pulled = 0
    gate = threading.Event()
    inside = threading.Event()

    async def endless() -> AsyncIterator[int]:
        nonlocal pulled
        i = 0
        while True:
            pulled += 1
            yield i
            i += 1

    def held(x: int) -> int:
        inside.set()
        must_wait(gate)
        return x

    handle = cv.Pipeline(endless()).map(held, capacity=5).start()
    try:
        must_wait(inside)
        wait_until(lambda: handle.stats()[0].queue_size == 5)
        assert pulled == 5 + 1
    finally:
        handle.stop()
        gate.set()
        handle.join()


@pytest.mark.quick
def test_an_async_iterable_object_is_a_source() -> None:
    class Numbers:
        def __aiter__(self) -> AsyncIterator[int]:
            return self._gen()

        async def _gen(self) -> AsyncIterator[int]:
            for i in range(5):
                yield i

    assert list(cv.Pipeline(Numbers()).map(str)) == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------------- batch


@pytest.mark.quick
@pytest.mark.parametrize(("n", "size"), [(0, 3), (1, 1), (6, 3), (7, 1), (5, 100)])
def test_batch_sizes_cover_every_item_once(n: int, size: int) -> None:
    batches = list(cv.Pipeline(range(n)).batch(size))
    assert [x for b in batches for x in b] == list(range(n))
    assert all(len(b) == size for b in batches[:-1])
    assert all(1 <= len(b) <= size for b in batches)


def test_batch_carries_none_and_feeds_a_later_stage() -> None:
    p = cv.Pipeline([None, "THE END", None]).batch(2).map(len)
    assert list(p) == [2, 1]


def test_batch_statistics_count_items_in_and_lists_out() -> None:
    result = cv.Pipeline(range(10)).batch(4, name="groups").run(collect=True)
    (stats,) = result.stats
    assert (stats.name, stats.kind, stats.items_in, stats.items_out) == ("groups", "batch", 10, 3)


def test_batch_without_interval_waits_for_a_full_list() -> None:
    feed: cv.Channel[int] = cv.Channel()
    producer = feed.producer()
    outputs: cv.Channel[list[int]] = cv.Channel()

    def consume() -> None:
        for b in cv.Pipeline(feed).batch(3):
            outputs.put(b)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        producer.put_many([1, 2])
        with pytest.raises(cv.Empty):
            outputs.get(timeout=0.1)  # no interval: nothing until 3 items (or the end)
        producer.put(3)
        assert outputs.get(timeout=WAIT) == [1, 2, 3]
        producer.put(4)
    finally:
        producer.close()
        consumer.join(WAIT)
    assert outputs.get_nowait() == [4]
