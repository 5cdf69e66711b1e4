"""The runtime interface, and the worker loop every thread-side worker runs.

A runtime knows how to start, feed, cancel and join a stage's workers; it
does not know what a pipeline is. What it is given is a `StageRun`: the
stage, its input channel, its output, the run's control and the stage's
counters. Each runtime module (``threads``, ``processes``, ``aio``) provides
one `Runtime` subclass, loaded by name on first use (see `get_runtime`).

The worker loop below is shared by the thread and process runtimes: a
process worker is a thread of the parent that ships each batch to its child
process instead of calling the function itself. The loop::

    input channel --get_many(n)--> batch --execute--> outcome --put_many--> output
         ^ n adapts so that a batch takes about TARGET_BATCH_SECONDS

In an ordered stage with several workers, batches take tickets in input
order and a `Sequencer` releases their outputs in ticket order.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from time import perf_counter
from typing import Any

from ..channel import Channel
from ..errors import ConfigurationError, Empty, ShutDown
from ..metrics import StageMetrics, WorkerCounters
from ..stage import BatchOutcome, Failure, Stage, add_stage_note

__all__ = [
    "MAX_BATCH",
    "TARGET_BATCH_SECONDS",
    "RunControl",
    "Runtime",
    "Sequencer",
    "StageRun",
    "account_batch",
    "batch_loop",
    "get_runtime",
    "worker_loop",
]

TARGET_BATCH_SECONDS = 0.002
"""A worker sizes its batches to take about this long: big enough to amortise
the channel's lock, small enough that slow items spread over all workers."""
MAX_BATCH = 512
"""Largest batch a worker takes at once."""


class RunControl:
    """What every worker of one run shares: the stop signal and the first error."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.failures: list[Failure] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        """The caller's event loop when the run is driven from async code
        (``await pipeline.arun()``, ``async for``): async stages run there.
        None: they run on an event loop of the async runtime's own thread."""
        self._lock = threading.Lock()
        self._on_abort: list[Callable[[], None]] = []

    def on_abort(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the run aborts (at once if it already has)."""
        with self._lock:
            if not self.stopped.is_set():
                self._on_abort.append(callback)
                return
        callback()

    def fail(self, error: BaseException) -> None:
        """Record ``error`` (the first one wins) and abort the run."""
        with self._lock:
            if self.error is None:
                self.error = error
        self.abort()

    def abort(self) -> None:
        """Stop every worker promptly: shut channels down, wake every waiter."""
        with self._lock:
            if self.stopped.is_set():
                return
            self.stopped.set()
            callbacks, self._on_abort = self._on_abort, []
        for callback in callbacks:
            callback()

    def record_failures(self, failures: list[Failure]) -> None:
        """Keep items given up on with ``on_error="skip"``."""
        with self._lock:
            self.failures.extend(failures)

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` unless the run stops first; True if it did not stop."""
        return not self.stopped.wait(seconds)


class Sequencer:
    """Releases the outputs of an ordered stage's batches in ticket order.

    Workers deposit (ticket, outputs) as they finish; whoever deposits the
    next expected ticket becomes the flusher and puts every consecutive ready
    batch on the output, outside the lock, while later deposits queue up.
    ``window`` bounds how far ahead of the oldest unfinished batch a worker
    may take a new one, which bounds the reorder buffer.

    `take`/`deposit` serve worker threads; `atake`/`adeposit` serve the
    worker coroutines of an async stage, on one event loop, without ever
    blocking it: they park on futures and flush with ``aput_many``. A
    sequencer serves one kind of worker (a stage has one runtime).

    A coroutine's take needs no lock: its batch and its ticket are taken
    with no pause in between, so no other coroutine of the loop can come
    between them. It checks the window before waiting for items, so the
    coroutines that wait for items together may each take one batch past
    the window: an async stage holds at most ``window + workers`` batches.
    """

    def __init__(self, output: Channel[Any], window: int, control: RunControl) -> None:
        self._output = output
        self._window = window
        self._control = control
        self._lock = threading.Lock()
        self._moved = threading.Condition(self._lock)  # notified when _next advances or on abort
        self._sleepers = 0  # threads waiting on _moved: notifying nobody still costs
        self._pending: dict[int, list[Any]] = {}
        self._next = 0  # the oldest ticket not yet released
        self._flushing = False
        self._take_lock = threading.Lock()
        self._next_ticket = 0
        # Coroutines parked until _next moves, resolved when _moved is notified.
        self._moved_futures: list[asyncio.Future[None]] = []
        control.on_abort(self._wake_all)

    def _wake_all(self) -> None:
        with self._lock:
            self._notify_moved()

    def _notify_moved(self) -> None:
        """Wake every thread and coroutine waiting for _next to move (lock held)."""
        if self._sleepers:
            self._moved.notify_all()
        if self._moved_futures:
            for future in self._moved_futures:
                try:
                    future.get_loop().call_soon_threadsafe(_resolve, future)
                except RuntimeError:  # its loop is closed: nobody is left to wake
                    pass
            self._moved_futures.clear()

    def _window_full(self, ticket: int) -> bool:
        """True while ``ticket`` is too far ahead of _next (lock held); ShutDown once stopped."""
        if ticket - self._next < self._window:
            return False
        if self._control.stopped.is_set():
            raise ShutDown
        return True

    def take(self, channel: Channel[Any], n: int) -> tuple[list[Any], int]:
        """Take a batch of up to ``n`` items and its ticket, in input order."""
        with self._take_lock:
            ticket = self._next_ticket
            with self._lock:
                while self._window_full(ticket):
                    self._sleepers += 1
                    try:
                        self._moved.wait()
                    finally:
                        self._sleepers -= 1
            batch = channel.get_many(n)
            self._next_ticket = ticket + 1
            return batch, ticket

    async def atake(self, channel: Channel[Any], n: int) -> tuple[list[Any], int]:
        """`take` for a coroutine: waits for the window and the items without blocking the loop."""
        while True:
            with self._lock:
                if not self._window_full(self._next_ticket):
                    break
                moved = asyncio.get_running_loop().create_future()
                self._moved_futures.append(moved)
            await moved
        # aget_many returns the moment it has the items: nothing runs between them and the ticket.
        return self._ticketed(await channel.aget_many(n))

    def _ticketed(self, batch: list[Any]) -> tuple[list[Any], int]:
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        return batch, ticket

    def deposit(self, ticket: int, outputs: list[Any]) -> None:
        """Hand in a batch's outputs; release every batch now in order."""
        if not self._enter(ticket, outputs):
            return
        try:
            while (chunk := self._release_ready()) is not None:
                self._output.put_many(chunk)
        except BaseException:
            self._leave()
            raise

    async def adeposit(self, ticket: int, outputs: list[Any]) -> None:
        """`deposit` for a coroutine: the flush waits for room without blocking the loop."""
        if not self._enter(ticket, outputs):
            return
        try:
            while (chunk := self._release_ready()) is not None:
                await self._output.aput_many(chunk)
        except BaseException:
            self._leave()
            raise

    def _enter(self, ticket: int, outputs: list[Any]) -> bool:
        """Store a batch's outputs; True when the caller must flush (it holds the oldest ticket)."""
        with self._lock:
            self._pending[ticket] = outputs
            if self._flushing or ticket != self._next:
                return False
            self._flushing = True
            return True

    def _release_ready(self) -> list[Any] | None:
        """The flusher's next chunk: every consecutive ready output; None when done flushing."""
        with self._lock:
            chunk: list[Any] = []
            pending = self._pending
            while self._next in pending:
                # Batches with no output (all filtered) still advance _next.
                chunk.extend(pending.pop(self._next))
                self._next += 1
            self._notify_moved()
            if not chunk:
                self._flushing = False
                return None
            return chunk

    def _leave(self) -> None:
        with self._lock:
            self._flushing = False


def _resolve(future: asyncio.Future[None]) -> None:
    # Runs in the future's own loop: only there is touching it safe.
    if not future.done():
        future.set_result(None)


class StageRun:
    """One stage inside one run: what its workers read, write and count."""

    def __init__(
        self,
        stage: Stage,
        index: int,
        input: Channel[Any],
        output: Channel[Any],
        control: RunControl,
        metrics: StageMetrics,
    ) -> None:
        self.stage = stage
        self.index = index
        self.input = input
        self.output = output
        self.control = control
        self.metrics = metrics
        # Every worker holds a producer handle: the output closes after the last.
        self.handles = [output.producer() for _ in range(stage.workers)]
        ordered = stage.ordered and stage.workers > 1 and stage.kind != "batch"
        self.sequencer = (
            # The channel itself, not a worker's handle: the flusher is always a
            # live worker, whose own handle keeps the channel open meanwhile.
            Sequencer(output, window=4 * stage.workers, control=control) if ordered else None
        )
        self.max_batch = max(1, min(MAX_BATCH, input.maxsize // 2 or MAX_BATCH))
        self.threads: list[threading.Thread] = []

    def thread_name(self, worker: int) -> str:
        """Name of a worker thread: conveyor-<stage>-<n>, so leftovers are easy to spot."""
        return f"conveyor-{self.stage.name}-{worker}"

    def start_thread(self, worker: int, target: Callable[[], None]) -> threading.Thread:
        """Start a daemon worker thread (daemon: a function stuck forever cannot block exit)."""
        thread = threading.Thread(target=target, name=self.thread_name(worker), daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread


def _adapt(
    size: int, got: int, seconds: float, limit: int, target: float = TARGET_BATCH_SECONDS
) -> int:
    """Next batch size: double while batches are quick and full, halve when slow."""
    if seconds < target / 2:
        return min(limit, size * 2) if got >= size else size
    if seconds > target * 2 and size > 1:
        return max(1, size // 2)
    return size


def worker_loop(
    sr: StageRun,
    worker: int,
    execute: Callable[[list[Any]], BatchOutcome],
    target: float = TARGET_BATCH_SECONDS,
) -> None:
    """Take batches from the input, execute them, hand outputs on; until input ends.

    Errors raised by ``execute`` itself (not by the stage function, which
    `process_batch` handles) fail the run. ``target`` is the time a batch
    should take: a runtime whose ``execute`` has a fixed cost per batch (a
    round trip to a worker process) asks for longer batches.
    """
    stage, control, inp = sr.stage, sr.control, sr.input
    handle = sr.handles[worker]
    counters: WorkerCounters = sr.metrics.new_worker()
    sequencer = sr.sequencer
    size, limit = 1, sr.max_batch
    try:
        while True:
            t0 = perf_counter()
            try:
                if sequencer is not None:
                    batch, ticket = sequencer.take(inp, size)
                else:
                    batch = inp.get_many(size)
            except ShutDown:
                break
            t1 = perf_counter()
            counters.wait_in += t1 - t0
            counters.current_item, counters.current_since = batch[0], t1
            outcome = execute(batch)
            t2 = perf_counter()
            counters.current_item = counters.current_since = None
            busy = t2 - t1 if outcome.busy_seconds is None else outcome.busy_seconds
            if account_batch(counters, control, outcome, len(batch), busy):
                break
            if sequencer is not None:
                sequencer.deposit(ticket, outcome.outputs)
            elif outcome.outputs:
                handle.put_many(outcome.outputs)
            counters.wait_out += perf_counter() - t2
            size = _adapt(size, len(batch), t2 - t1, limit, target)
            if outcome.size_limit is not None:
                size = min(size, outcome.size_limit)
    except ShutDown:
        pass  # the run was aborted while we were handing outputs on
    except BaseException as exc:  # a bug in conveyor, or Ctrl-C delivered here
        control.fail(add_stage_note(exc, stage, counters.current_item))
    finally:
        counters.finish()
        handle.close()


def account_batch(
    counters: WorkerCounters, control: RunControl, outcome: BatchOutcome, taken: int, busy: float
) -> bool:
    """Count a batch's outcome and hand its failures to the run; True when it failed the run."""
    _count(counters, outcome, taken, busy)
    if outcome.failures:
        control.record_failures(outcome.failures)
    if outcome.error is not None:
        control.fail(outcome.error)
        return True
    return False


def _count(counters: WorkerCounters, outcome: BatchOutcome, taken: int, busy: float) -> None:
    failed = len(outcome.failures) + (outcome.error is not None)
    counters.items_in += outcome.processed + (outcome.error is not None) if failed else taken
    counters.items_out += len(outcome.outputs)
    counters.filtered += outcome.filtered
    counters.failed += failed
    counters.retried += outcome.retried
    counters.batches += 1
    counters.add_busy(busy, taken)


def batch_loop(sr: StageRun) -> None:
    """The worker of a ``batch`` stage: group items into lists of ``batch_size``.

    A partial list is flushed ``interval`` seconds after its first item
    arrived, and at the end of the input.
    """
    stage, inp = sr.stage, sr.input
    handle = sr.handles[0]
    counters = sr.metrics.new_worker()
    size, interval = stage.batch_size, stage.interval
    buf: list[Any] = []
    deadline = 0.0
    try:
        while True:
            timeout = None if interval is None or not buf else max(0.0, deadline - perf_counter())
            t0 = perf_counter()
            try:
                items = inp.get_many(size - len(buf), True, timeout)
            except Empty:  # the interval expired: flush what we have
                items = []
            except ShutDown:
                break
            finally:
                counters.wait_in += perf_counter() - t0
            if items:
                if not buf and interval is not None:
                    deadline = perf_counter() + interval
                buf.extend(items)
                counters.items_in += len(items)
            if buf and (len(buf) >= size or not items):
                t1 = perf_counter()
                handle.put(buf)
                counters.wait_out += perf_counter() - t1
                counters.items_out += 1
                buf = []
        if buf:
            handle.put(buf)
            counters.items_out += 1
    except ShutDown:
        pass
    except BaseException as exc:
        sr.control.fail(add_stage_note(exc, stage, buf[:1]))
    finally:
        counters.finish()
        handle.close()


class Runtime(ABC):
    """How a stage's workers run. One instance serves one run."""

    name: str = ""

    @abstractmethod
    def start(self, sr: StageRun) -> None:
        """Start ``sr.stage.workers`` workers for the stage; return at once."""

    @abstractmethod
    def join(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` s for every worker started; return those still alive."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release what the runtime holds (processes, event loop) after the run."""


_RUNTIME_MODULES = {"thread": "threads", "process": "processes", "async": "aio"}


def get_runtime(name: str) -> type[Runtime]:
    """Return the `Runtime` class for ``name``, importing its module on first use."""
    try:
        module_name = _RUNTIME_MODULES[name]
    except KeyError:
        allowed = ", ".join(repr(n) for n in _RUNTIME_MODULES)
        raise ConfigurationError(f"'runtime' must be one of {allowed}; got {name!r}") from None
    module = importlib.import_module(f"conveyor.runtime.{module_name}")
    runtime: type[Runtime] = module.RUNTIME
    return runtime
