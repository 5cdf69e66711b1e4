"""Property and stress tests of `conveyor.Channel`.

- a state machine drives one channel and a plain-Python model (a deque and
  two counters) through random non-blocking operations and compares them;
- random shapes of producer and consumer threads (and coroutines), random
  capacities and random mixes of operations, checked for the contract: no
  item lost, none duplicated, FIFO per producer, never above capacity;
- 8 producers and 8 consumers closing through producer handles, no sentinel.

Every blocking call in the workers is bounded (or unblocked by an immediate
shutdown when another worker fails), so a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from conveyor import Channel, Empty, Full, Producer, ShutDown

pytestmark = [pytest.mark.quick, pytest.mark.timeout(60)]

WAIT = 10.0  # seconds: the bound of every join
Item = tuple[int, int]  # (producer id, sequence number)

THREADED = settings(
    deadline=None,  # threads on a shared 2-core machine: bound the work instead
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------ model-based, one thread


class ChannelMachine(RuleBasedStateMachine):
    """Channel against a deque: every non-blocking operation, in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 0
        self.ch: Channel[int] = Channel()
        self.model: deque[int] = deque()
        self.put_count = 0
        self.done_count = 0
        self.closed = False
        self.next_item = 0

    @initialize(capacity=st.integers(0, 5))
    def make(self, capacity: int) -> None:
        self.capacity = capacity
        self.ch = Channel(capacity)

    def room(self) -> int:
        return self.capacity - len(self.model) if self.capacity else 1 << 30

    def fresh(self, n: int) -> list[int]:
        items = list(range(self.next_item, self.next_item + n))
        self.next_item += n
        return items

    @rule()
    def put_nowait(self) -> None:
        (item,) = self.fresh(1)
        if self.closed:
            with pytest.raises(ShutDown):
                self.ch.put_nowait(item)
        elif self.room() <= 0:
            with pytest.raises(Full):
                self.ch.put_nowait(item)
        else:
            self.ch.put_nowait(item)
            self.model.append(item)
            self.put_count += 1

    @rule(n=st.integers(0, 7))
    def put_many_nowait(self, n: int) -> None:
        items = self.fresh(n)
        fits = min(n, self.room())
        if self.closed:
            with pytest.raises(ShutDown) as info:
                self.ch.put_many(items, block=False)
            assert info.value.items_put == 0  # type: ignore[attr-defined]
            return
        if fits < n:
            with pytest.raises(Full) as info:
                self.ch.put_many(items, block=False)
            assert info.value.items_put == fits  # type: ignore[attr-defined]
        else:
            self.ch.put_many(items, block=False)
        self.model.extend(items[:fits])
        self.put_count += fits

    @rule()
    def get_nowait(self) -> None:
        if self.model:
            assert self.ch.get_nowait() == self.model.popleft()
        elif self.closed:
            with pytest.raises(ShutDown):
                self.ch.get_nowait()
        else:
            with pytest.raises(Empty):
                self.ch.get_nowait()

    @rule(k=st.integers(1, 6))
    def get_many_nowait(self, k: int) -> None:
        if self.model:
            expected = [self.model.popleft() for _ in range(min(k, len(self.model)))]
            assert self.ch.get_many(k, block=False) == expected
        elif self.closed:
            with pytest.raises(ShutDown):
                self.ch.get_many(k, block=False)
        else:
            with pytest.raises(Empty):
                self.ch.get_many(k, block=False)

    @precondition(lambda self: self.done_count < self.put_count)
    @rule()
    def task_done(self) -> None:
        self.ch.task_done()
        self.done_count += 1

    @precondition(lambda self: self.done_count == self.put_count)
    @rule()
    def task_done_too_many(self) -> None:
        with pytest.raises(ValueError):
            self.ch.task_done()

    @rule(immediate=st.booleans())
    def shutdown(self, immediate: bool) -> None:
        self.ch.shutdown(immediate=immediate)
        self.closed = True
        if immediate:
            # Discarded items count as done, as far as there are unfinished tasks.
            self.done_count = min(self.put_count, self.done_count + len(self.model))
            self.model.clear()

    @invariant()
    def same_state(self) -> None:
        stats = self.ch.stats()
        assert stats.size == self.ch.qsize() == len(self.model)
        assert stats.capacity == self.capacity
        assert stats.total_put == self.put_count
        assert stats.total_got == self.put_count - len(self.model)
        assert stats.closed == self.closed == self.ch.closed
        assert (stats.waiting_producers, stats.waiting_consumers) == (0, 0)
        assert self.ch.empty() == (not self.model)
        assert self.ch.full() == (self.capacity > 0 and len(self.model) >= self.capacity)
        assert self.ch.unfinished_tasks == self.put_count - self.done_count
        if self.capacity:
            assert len(self.model) <= self.capacity


TestChannelMachine = ChannelMachine.TestCase
TestChannelMachine.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


# ---------------------------------------------------------------------------- random threads


@dataclass(frozen=True)
class ProducerPlan:
    """One producer: its kind and its operations, each putting 1..n items."""

    kind: str  # "thread" or "async"
    ops: tuple[tuple[str, int], ...]  # (operation, how many items)


@dataclass(frozen=True)
class ConsumerPlan:
    """One consumer: its kind, how it takes items and its batch size."""

    kind: str  # "thread" or "async"
    op: str
    batch: int


THREAD_PUTS = ("put", "put_nowait_retry", "put_timeout", "put_many", "put_many_timeout")
THREAD_GETS = ("get", "get_timeout", "get_many", "get_many_timeout", "iterate")

producer_plans = st.builds(
    ProducerPlan,
    kind=st.sampled_from(["thread", "thread", "async"]),
    ops=st.lists(
        st.tuples(st.sampled_from(THREAD_PUTS), st.integers(1, 12)), min_size=0, max_size=12
    ).map(tuple),
)
consumer_plans = st.builds(
    ConsumerPlan,
    kind=st.sampled_from(["thread", "thread", "async"]),
    op=st.sampled_from(THREAD_GETS),
    batch=st.integers(1, 8),
)


class Run:
    """Shared state of one random run: the channel and what workers saw."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ch: Channel[Item] = Channel(capacity)
        self.too_full: list[int] = []  # sizes above the capacity, seen by anyone

    def check_size(self) -> None:
        size = self.ch.stats().size
        if self.capacity and size > self.capacity:
            self.too_full.append(size)

    def abort(self) -> None:
        # A worker failed: unblock every other one so the test fails, not hangs.
        self.ch.shutdown(immediate=True)


def produce_in_thread(run: Run, handle: Producer[Item], pid: int, plan: ProducerPlan) -> int:
    seq = 0
    with handle:
        for op, n in plan.ops:
            items = [(pid, seq + i) for i in range(n)]
            seq += n
            if op == "put_many":
                handle.put_many(items)
            elif op == "put_many_timeout":
                while items:  # resume after the items a timed-out call did put
                    try:
                        handle.put_many(items, timeout=0.002)
                        items = []
                    except Full as exc:
                        items = items[exc.items_put :]  # type: ignore[attr-defined]
            else:
                for item in items:
                    if op == "put":
                        handle.put(item)
                    elif op == "put_timeout":
                        while True:
                            try:
                                handle.put(item, timeout=0.002)
                                break
                            except Full:
                                pass
                    else:  # put_nowait_retry: try without blocking, then block
                        try:
                            handle.put(item, False)
                        except Full:
                            handle.put(item)
            run.check_size()
    return seq


async def produce_in_loop(run: Run, handle: Producer[Item], pid: int, plan: ProducerPlan) -> int:
    seq = 0
    async with handle:
        for op, n in plan.ops:
            items = [(pid, seq + i) for i in range(n)]
            seq += n
            if op.startswith("put_many"):
                await handle.aput_many(items)
            else:
                for item in items:
                    await handle.aput(item)
            run.check_size()
    return seq


def consume_in_thread(run: Run, plan: ConsumerPlan) -> list[Item]:
    ch, got = run.ch, []
    if plan.op == "iterate":
        for item in ch:
            got.append(item)
            run.check_size()
        return got
    while True:
        try:
            if plan.op == "get":
                got.append(ch.get())
            elif plan.op == "get_timeout":
                got.append(ch.get(timeout=0.002))
            elif plan.op == "get_many":
                batch = ch.get_many(plan.batch)
                assert 1 <= len(batch) <= plan.batch
                got += batch
            else:
                batch = ch.get_many(plan.batch, timeout=0.002)
                assert 1 <= len(batch) <= plan.batch
                got += batch
        except Empty:
            pass
        except ShutDown:
            return got
        run.check_size()


async def consume_in_loop(run: Run, plan: ConsumerPlan) -> list[Item]:
    got: list[Item] = []
    if plan.op in ("get_many", "get_many_timeout"):
        while True:
            try:
                batch = await run.ch.aget_many(plan.batch)
            except ShutDown:
                return got
            assert 1 <= len(batch) <= plan.batch
            got += batch
            run.check_size()
    async for item in run.ch:
        got.append(item)
        run.check_size()
    return got


class Guarded(threading.Thread):
    """A worker thread: keeps its result; on an exception, aborts the run."""

    def __init__(self, run: Run, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._run, self._fn = run, fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # reported by the test
            self.error = exc
            self._run.abort()

    def outcome(self) -> Any:
        self.join(WAIT)
        assert not self.is_alive(), "worker still running: the channel hangs"
        if self.error is not None:
            raise self.error
        return self.result


def check_delivery(sent: dict[int, int], received: list[list[Item]], ch: Channel[Item]) -> None:
    everything = [item for got in received for item in got]
    expected = Counter((pid, i) for pid, n in sent.items() for i in range(n))
    assert Counter(everything) == expected  # nothing lost, nothing duplicated
    for got in received:  # FIFO per producer, as each consumer sees it
        last: dict[int, int] = {}
        for pid, i in got:
            assert i > last.get(pid, -1), f"producer {pid}: {i} after {last[pid]}"
            last[pid] = i
    stats = ch.stats()
    assert stats.total_put == stats.total_got == sum(sent.values())
    assert (stats.size, stats.open_producers, stats.closed) == (0, 0, True)
    assert (stats.waiting_producers, stats.waiting_consumers) == (0, 0)


@settings(THREADED, max_examples=120)
@given(
    capacity=st.integers(0, 6),
    producers=st.lists(producer_plans, min_size=1, max_size=4),
    consumers=st.lists(consumer_plans, min_size=1, max_size=4),
)
def test_random_producers_and_consumers_lose_nothing_and_keep_order(
    capacity: int, producers: list[ProducerPlan], consumers: list[ConsumerPlan]
) -> None:
    run = Run(capacity)
    handles = [run.ch.producer() for _ in producers]  # before any producer starts
    workers: list[Guarded] = []
    for plan in consumers:
        if plan.kind == "thread":
            workers.append(Guarded(run, lambda plan=plan: consume_in_thread(run, plan)))
        else:
            workers.append(Guarded(run, lambda plan=plan: asyncio.run(consume_in_loop(run, plan))))
    producer_workers: list[Guarded] = []
    for pid, (plan, handle) in enumerate(zip(producers, handles, strict=True)):
        if plan.kind == "thread":
            fn = lambda pid=pid, plan=plan, h=handle: produce_in_thread(run, h, pid, plan)  # noqa: E731
        else:
            fn = lambda pid=pid, plan=plan, h=handle: asyncio.run(  # noqa: E731
                produce_in_loop(run, h, pid, plan)
            )
        producer_workers.append(Guarded(run, fn))
    for w in workers + producer_workers:
        w.start()
    sent = {pid: w.outcome() for pid, w in enumerate(producer_workers)}
    received = [w.outcome() for w in workers]
    assert not run.too_full, f"sizes above capacity {capacity}: {run.too_full}"
    check_delivery(sent, received, run.ch)


@THREADED
@given(
    capacity=st.integers(1, 5),
    batch=st.integers(1, 20),
    batches=st.integers(1, 6),
    take=st.integers(1, 7),
)
def test_put_many_beyond_capacity_never_overfills(
    capacity: int, batch: int, batches: int, take: int
) -> None:
    run = Run(capacity)
    handle = run.ch.producer()

    def produce() -> int:
        with handle:
            for b in range(batches):
                handle.put_many([(0, b * batch + i) for i in range(batch)])
        return batch * batches

    def consume() -> list[Item]:
        got: list[Item] = []
        while True:
            run.check_size()
            try:
                got += run.ch.get_many(take)
            except ShutDown:
                return got

    consumer = Guarded(run, consume)
    producer = Guarded(run, produce)
    consumer.start()
    producer.start()
    sent = {0: producer.outcome()}
    received = [consumer.outcome()]
    assert not run.too_full
    assert received[0] == [(0, i) for i in range(batch * batches)]
    check_delivery(sent, received, run.ch)


@THREADED
@given(
    capacity=st.integers(1, 4),
    n_items=st.integers(0, 30),
    immediate=st.booleans(),
    n_getters=st.integers(0, 3),
)
def test_shutdown_under_load_accounts_for_every_item(
    capacity: int, n_items: int, immediate: bool, n_getters: int
) -> None:
    # Whatever the moment of the shutdown: every item is either delivered,
    # discarded by an immediate shutdown, or was never put (the putter saw
    # ShutDown) -- and nobody stays blocked.
    run = Run(capacity)
    attempted = threading.Event()

    def produce() -> int:
        put = 0
        try:
            for i in range(n_items):
                run.ch.put((0, i))
                put += 1
                if put == capacity:
                    attempted.set()
        except ShutDown:
            pass
        attempted.set()
        return put

    def consume() -> list[Item]:
        return list(run.ch)

    producer = Guarded(run, produce)
    consumers = [Guarded(run, consume) for _ in range(n_getters)]
    for w in [producer, *consumers]:
        w.start()
    assert attempted.wait(WAIT)
    run.ch.shutdown(immediate=immediate)
    put = producer.outcome()
    received = [c.outcome() for c in consumers]
    left = [] if immediate else list(run.ch)  # a normal shutdown keeps the rest
    delivered = [item for got in received for item in got] + left
    assert sorted(delivered) == sorted(set(delivered))  # no duplicate
    assert set(delivered) <= {(0, i) for i in range(put)}
    if not immediate:
        assert sorted(delivered) == [(0, i) for i in range(put)]
    stats = run.ch.stats()
    assert stats.total_put == put
    assert (stats.waiting_producers, stats.waiting_consumers, stats.size) == (0, 0, 0)


# ---------------------------------------------------------------------------- stress


@pytest.mark.timeout(90)
@pytest.mark.parametrize("capacity", [1, 16])
def test_eight_producers_and_eight_consumers_with_handles_and_no_sentinel(capacity: int) -> None:
    n_producers, n_consumers, per_producer = 8, 8, 4000
    run = Run(capacity)
    handles = [run.ch.producer() for _ in range(n_producers)]
    start = threading.Barrier(n_producers + n_consumers)

    def produce(pid: int, handle: Producer[Item]) -> int:
        start.wait(WAIT)
        with handle:
            i = 0
            while i < per_producer:
                if pid % 2:  # half the producers in batches of up to 7
                    n = min(1 + i % 7, per_producer - i)
                    handle.put_many([(pid, i + k) for k in range(n)])
                    i += n
                else:
                    handle.put((pid, i))
                    i += 1
        return per_producer

    def consume(cid: int) -> list[Item]:
        start.wait(WAIT)
        if cid % 2:
            got: list[Item] = []
            while True:
                try:
                    got += run.ch.get_many(5)
                except ShutDown:
                    return got
                run.check_size()
        return list(run.ch)

    consumers = [Guarded(run, lambda cid=cid: consume(cid)) for cid in range(n_consumers)]
    producers = [
        Guarded(run, lambda pid=pid, h=h: produce(pid, h)) for pid, h in enumerate(handles)
    ]
    for w in consumers + producers:
        w.start()
    sent = {pid: w.outcome() for pid, w in enumerate(producers)}
    received = [w.outcome() for w in consumers]
    assert not run.too_full
    check_delivery(sent, received, run.ch)
