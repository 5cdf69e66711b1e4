"""A run of a pipeline on one machine: channels wired, workers started, lifecycle owned.

::

    source --feeder thread--> [ch 0] --stage 0 workers--> [ch 1] --stage 1--> ... [ch N]
                                                                                   |
                                                 caller: iterate / run() / start() <+

Channel ``i`` is stage ``i``'s input; its capacity is the stage's
``capacity``. The feeder pulls the source lazily, never more than there is
room for. Each stage's workers hold producer handles on the next channel, so
a channel closes when the last worker upstream of it is done: the end of the
stream travels down without any sentinel.

Any failure (an error with ``on_error="raise"``, `stop()`, Ctrl-C in the
caller) calls `RunControl.abort`, which shuts every channel down at once:
every blocked put and get in every worker raises `ShutDown`, every worker
returns, and the caller joins them all and re-raises the first error.

A thread cannot be interrupted while it runs user code (a stage function
stuck on a lock, a source blocked on a socket). An aborted run waits for
such a thread `ABORT_WAIT` seconds at most, then leaves it behind: worker
threads are daemons, so the interpreter can still exit, and the caller's
exception gets a note naming the stage (or the source) whose thread was
left (`Run.note_left_behind`).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from contextlib import contextmanager
from functools import partial
from itertools import islice
from time import perf_counter
from types import AsyncGeneratorType, GeneratorType
from typing import TYPE_CHECKING, Any

from .channel import Channel, Producer
from .errors import Empty, PipelineStopped, ShutDown
from .metrics import RunResult, StageMetrics, StageReading, StageStats, Timeline
from .policy import add_note, cancels_this_task
from .runtime.base import (
    MAX_BATCH,
    STOP_GRACE,
    TARGET_BATCH_SECONDS,
    RunControl,
    Runtimes,
    StageRun,
    left_behind,
)
from .runtime.ports import ChannelIO
from .runtime.threads import join_threads
from .stage import DEFAULT_CAPACITY, Stage

if TYPE_CHECKING:
    import asyncio

__all__ = ["ABORT_WAIT", "JOIN_TIMEOUT", "AsyncOutputs", "Run", "wait_interruptibly"]

log = logging.getLogger("conveyor")

JOIN_TIMEOUT = STOP_GRACE + 1.0
"""How long the end of a run waits for its workers before naming the stuck ones, when no
stage gives its ``on_stop`` longer than the default (`Run.join_timeout`): longer than a
worker's last ``on_stop`` may take, so that a worker process whose ``on_stop`` overran
is killed (and said so) rather than named as stuck."""
ABORT_WAIT = 0.5
"""How long an aborted run (an error, ``stop()``, Ctrl-C, a cancelled ``arun``) waits for
its workers before leaving those stuck in user code behind: well inside the one second
the contract gives Ctrl-C, and longer than a worker needs to see the abort."""
FEEDER_THREAD = "conveyor-source"
SIGNAL_CHECK = 0.1
"""Longest sleep of the main thread waiting for outputs: how late Ctrl-C may be seen."""
REFILL_SLICES = 16
"""The feeder of an in-memory source waits for a 1/16 of channel 0 to be free before it
refills it: the channel stays at least 15/16 full, and a get wakes the feeder once per
slice, not once per item (see `Channel.wait_for_room`'s ``least``)."""
EXIT_JOIN_TIMEOUT = 1.0
"""How long interpreter exit waits for the workers of a run left going."""

_live_runs: weakref.WeakSet[Run] = weakref.WeakSet()
"""Runs started and not joined: ended at interpreter exit (see `_end_live_runs`)."""


def _end_live_runs() -> None:
    """Abort and join the runs still going when the interpreter exits.

    A run left suspended (an iterator never finished, a background run never
    joined) would otherwise be ended by its generator's finalizer while the
    interpreter tears its modules down, where any import fails (``sys.meta_path
    is None``) and prints a traceback. Here, at exit, everything still works.
    """
    runs = list(_live_runs)
    for run in runs:
        run.abort()
    for run in runs:
        run.join(EXIT_JOIN_TIMEOUT)


atexit.register(_end_live_runs)


def join_timeout(stage_runs: Iterable[StageRun]) -> float:
    """How long the end of a run waits for the workers of ``stage_runs`` by default
    (a run's, or a Redis worker's): a second more than the longest ``stop_timeout``
    of their stages (`JOIN_TIMEOUT` with the default ``stop_timeout``). A shorter
    ``stop_timeout`` shortens it too: a hung ``on_stop`` holds the run that long, no
    longer."""
    longest = max((sr.stage.stop_timeout for sr in stage_runs), default=STOP_GRACE)
    return longest + 1.0


class Run:
    """One execution of a pipeline: start it, consume its outputs, finish or abort it."""

    def __init__(
        self,
        source: Iterable[Any] | AsyncIterable[Any],
        stages: list[Stage],
        loop: asyncio.AbstractEventLoop | None = None,
        output_capacity: int = DEFAULT_CAPACITY,
        abort_wait: float = ABORT_WAIT,
        max_bytes: int | None = None,
        skip: int = 0,
    ) -> None:
        """``skip``: how many items of ``source`` to pass over, unprocessed (a run that
        resumes where an earlier one left off)."""
        self.control = RunControl()
        self.abort_wait = abort_wait
        """How long the join of an aborted run waits for its threads (`ABORT_WAIT`)."""
        # Driven from async code (arun, async for): async stages and an async
        # source run on the caller's loop, which must never block.
        self.control.loop = loop
        self.stages = stages
        caps = [s.capacity for s in stages] + [output_capacity]
        # A run's byte budget is split evenly between its channels (see docs/design.md).
        share = None if max_bytes is None else max(1, max_bytes // len(caps))
        self.channels: list[Channel[Any]] = [Channel(c, max_bytes=share) for c in caps]
        self.metrics = [StageMetrics(s, self.channels[i]) for i, s in enumerate(stages)]
        self.stage_runs = [
            StageRun(s, i, self._io(i), self.control, self.metrics[i]) for i, s in enumerate(stages)
        ]
        for before, sr in zip(stages, self.stage_runs[1:], strict=False):
            sr.upstream = before.label
        self.runtimes = Runtimes()
        self._given = source  # the user's own, which `_close_source` closes (not _skip's)
        self._source = _skip(source, skip)
        self._feeder_handle = self.channels[0].producer()
        self._feeder: threading.Thread | None = None
        self._feeder_task: asyncio.Task[None] | None = None
        # stop(drain=True) and the feeder agree under this lock: an item pulled
        # from the source is always put, and nothing is pulled after the stop.
        self._source_lock = threading.Lock()
        self._source_stopped = False  # stop_source() was called
        self._pulling = False  # the feeder is inside the source, or putting what it pulled
        self._source_exhausted = False
        # An async source's feeder task, and whether it awaits the source's next
        # item (both touched on its loop only): a drain stop cancels that wait.
        self._async_feeder: asyncio.Task[None] | None = None
        self._awaiting_source = False
        self._source_wait_cancelled = False
        self.driver: threading.Thread | None = None
        """The thread consuming the outputs for a `RunHandle`, if any."""
        self.pulled = 0
        self.items_out = 0
        self.started = perf_counter()
        self.finished: float | None = None
        self.timeline: Timeline | None = None
        """Periodic samples of the stats, while a `conveyor.progress.Monitor` watches."""
        self._joined = False
        self.left_behind: list[str] = []
        """What the join left running in user code, said for people (see `note_left_behind`)."""
        self.control.on_abort(self._shut_channels)

    def _io(self, index: int) -> ChannelIO:
        """Stage ``index`` between its input channel and the next."""
        stage = self.stages[index]
        ordered = stage.ordered and stage.kind != "batch"
        return ChannelIO(self.channels[index], self.channels[index + 1], self.control, ordered)

    # ------------------------------------------------------------------ starting

    def start(self) -> None:
        """Start the feeder and every stage's workers.

        An in-memory source is fed first, so that the workers find their
        first items waiting rather than each being woken for them; any other
        source only once every stage has started, so that a stage that fails
        to start has pulled nothing from it.
        """
        self.started = perf_counter()
        _live_runs.add(self)
        early = isinstance(self._source, _IN_MEMORY)
        if early:
            self._start_feeder_thread()
        try:
            self.runtimes.start(self.stage_runs)
        except BaseException as exc:
            self.abort()
            self.join()
            self.note_left_behind(exc)
            raise
        if early:
            return
        loop = self.control.loop
        if loop is not None and isinstance(self._source, AsyncIterable):
            # The caller's async source belongs on the caller's loop (its
            # sessions and locks are bound to it): feed it there, as a task.
            self._feeder_task = loop.create_task(self._afeed(self._source), name=FEEDER_THREAD)
            self.control.on_abort(self._cancel_feeder_task)
            return
        self._start_feeder_thread()

    def _start_feeder_thread(self) -> None:
        self._feeder = threading.Thread(target=self._feed, name=FEEDER_THREAD, daemon=True)
        self._feeder.start()

    def _shut_channels(self) -> None:
        for channel in self.channels:
            channel.shutdown(immediate=True)

    def _feed(self) -> None:
        """The feeder thread: pull the source into channel 0, never ahead of the room."""
        if isinstance(self._source, AsyncIterable):
            import asyncio

            asyncio.run(self._afeed_in_thread(self._source))
            return
        with self._feeding() as handle:
            if isinstance(self._source, _IN_MEMORY):
                self._feed_chunks(iter(self._source), handle)
            else:
                try:
                    self._feed_items(iter(self._source), handle)
                finally:
                    self._close_source()

    def _close_source(self) -> None:
        """Close a generator source the run did not exhaust (failed, stopped, left),
        so that its ``finally:`` and ``with`` blocks run now, before the run returns
        or raises, rather than whenever it is collected, in whatever thread. Called
        by the feeder thread, the one that iterates it: a generator running in
        another thread cannot be closed (ValueError). A generator that ended is
        closed already: nothing happens."""
        if isinstance(self._given, GeneratorType):
            self._given.close()

    async def _afeed(self, source: AsyncIterable[Any]) -> None:
        """The feeder as a task on the caller's loop (a run driven from async code)."""
        with self._feeding() as handle:
            await self._feed_async(source, handle)

    async def _afeed_in_thread(self, source: AsyncIterable[Any]) -> None:
        """The feeder of an async source, on the feeder thread's own loop.

        An async source waits by awaiting: an abort cancels it there, as on the
        caller's loop, so its cleanup runs and the thread ends, instead of
        being left behind for as long as the source waits.
        """
        import asyncio

        task = asyncio.current_task()
        assert task is not None
        self.control.on_abort(partial(_cancel_task, task))
        await self._afeed(source)

    @contextmanager
    def _feeding(self) -> Iterator[Producer[Any]]:
        """Around a feeder: its errors fail the run; channel 0's handle closes at the end."""
        handle = self._feeder_handle
        try:
            yield handle
        except ShutDown:
            pass  # the run was aborted, or stopped with drain=True
        except BaseException as exc:
            if not cancels_this_task(exc):
                add_note(exc, f"conveyor: the source failed after {self.pulled} items")
                self.control.fail(exc)
            elif not (self.control.stopped.is_set() or self._source_wait_cancelled):
                raise  # neither our abort nor our drain stop: the caller's loop is shutting down
        finally:
            handle.close()

    def _cancel_feeder_task(self) -> None:
        """Interrupt the feeder task, which may be waiting on the source (any thread)."""
        assert self._feeder_task is not None
        _cancel_task(self._feeder_task)

    def _feed_items(self, source: Iterator[Any], handle: Producer[Any]) -> None:
        # Any iterator may block between two items (a socket, a queue, a crawler
        # that waits for its own results): each item goes in before the next
        # pull, so no item waits inside the feeder while the source blocks.
        channel = handle.channel
        put = handle.put
        while True:
            room = channel.wait_for_room()
            if not self._begin_pull():
                return
            n = 0
            try:
                for item in islice(source, room):
                    # Never waits for a slot: the feeder is channel 0's only producer and
                    # saw the room. Under a byte budget it waits for the item's bytes to
                    # fit: the one item pulled ahead that docs/design.md counts.
                    put(item)
                    n += 1
                    if self._source_stopped:  # read without the lock: _end_pull decides
                        break
                else:
                    if n < room:
                        self._source_exhausted = True
                        return
            finally:
                self.pulled += n
                going = self._end_pull()
            if not going:
                return

    def _feed_chunks(self, source: Iterator[Any], handle: Producer[Any]) -> None:
        # An in-memory collection never blocks: read it in chunks that grow
        # while pulling them is quick, one lock round-trip per chunk; a chunk
        # never exceeds the room left.
        channel = handle.channel
        # Refill once a slice of the channel is free rather than after every get: each
        # wake-up of this thread costs the get that makes it a system call, and the
        # GIL to a third thread, while a stage's worker hands an item on.
        least = max(1, channel.maxsize // REFILL_SLICES)
        size = 1
        while True:
            room = channel.wait_for_room(least=least)
            n = min(size, room)
            if not self._begin_pull():
                return
            try:
                t0 = perf_counter()
                chunk = list(islice(source, n))
                if chunk:
                    # Never waits for a slot: the feeder is channel 0's only producer and
                    # saw the room. Under a byte budget it waits for each item's bytes,
                    # which the in-memory source holds anyway: the chunk adds none.
                    handle.put_many(chunk)
                    self.pulled += len(chunk)
            finally:
                going = self._end_pull()
            if len(chunk) < n:
                self._source_exhausted = True
                return
            if not going:
                return
            size = _next_chunk_size(size, perf_counter() - t0)

    def _begin_pull(self) -> bool:
        """Mark the feeder as pulling; False when the source was stopped."""
        with self._source_lock:
            if self._source_stopped:
                return False
            self._pulling = True
            return True

    def _end_pull(self) -> bool:
        """Mark what was pulled as put; False when the source was stopped meanwhile."""
        with self._source_lock:
            self._pulling = False
            return not self._source_stopped

    async def _feed_async(self, source: AsyncIterable[Any], handle: Producer[Any]) -> None:
        # In the feeder thread on an event loop of its own, or on the caller's loop.
        import asyncio

        self._async_feeder = asyncio.current_task()
        channel = handle.channel
        iterator = source.__aiter__()
        try:
            while True:
                await channel.await_room()
                if not self._begin_pull():
                    return
                try:
                    self._awaiting_source = True
                    try:
                        item = await iterator.__anext__()
                    except StopAsyncIteration:
                        self._source_exhausted = True
                        return
                    finally:
                        self._awaiting_source = False
                    await handle.aput(item)
                    self.pulled += 1
                finally:
                    going = self._end_pull()
                if not going:
                    return
        finally:
            # As `_close_source`, on the loop that iterates it: its own iterator, and the
            # user's async generator beneath the one that skips a resumed run's items.
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if isinstance(self._given, AsyncGeneratorType) and self._given is not iterator:
                await self._given.aclose()

    # ------------------------------------------------------------------ consuming

    def outputs(self, most: int = MAX_BATCH) -> Iterator[list[Any]]:
        """Yield the last stage's outputs in chunks of at most ``most``, as they come;
        raise the run's error."""
        last = self.channels[-1]
        # In the main thread, wait in slices: a SIGINT that lands just before the
        # thread parks would otherwise wait for the next item to be seen (CPython runs
        # signal handlers when the main thread wakes up).
        check = SIGNAL_CHECK if threading.current_thread() is threading.main_thread() else None
        try:
            while True:
                try:
                    chunk = last.get_many(most, timeout=check)
                except Empty:
                    continue
                except ShutDown:
                    break
                self.items_out += len(chunk)
                yield chunk
        except BaseException:
            self.abort()
            raise
        finally:
            self.join()
        self.raise_error()

    async def aoutputs(self) -> AsyncGenerator[list[Any], None]:
        """`outputs` for a caller on the run's event loop: waits without blocking it."""
        last = self.channels[-1]
        try:
            while True:
                try:
                    chunk = await last.aget_many(MAX_BATCH)
                except ShutDown:
                    break
                self.items_out += len(chunk)
                yield chunk
        except BaseException:
            self.abort()
            raise
        finally:
            await self.ajoin()
        self.raise_error()

    def raise_error(self, stopped_ok: bool = False) -> None:
        """Re-raise the first error of the run, if any; a stopped run raises PipelineStopped."""
        error = self.control.error
        if isinstance(error, (StopIteration, StopAsyncIteration)):
            raise _loop_ender(error) from error
        if error is not None:
            raise error
        if self.control.stopped.is_set() and not stopped_ok:
            raise PipelineStopped("the run was stopped before it finished")

    # ------------------------------------------------------------------ stopping

    def abort(self) -> None:
        """Stop everything now (the caller then joins)."""
        self.control.abort()

    def stop_source(self) -> None:
        """Stop pulling the source; what is inside the pipeline drains normally.

        An item the feeder is pulling at that moment still goes in: the
        source gave it up, so it must not be lost.
        """
        with self._source_lock:
            self._source_stopped = True
            if self._pulling:
                # The feeder puts what it pulled, sees the flag and closes channel 0.
                self._cancel_source_wait()
                return
        # Wakes the feeder if it waits for room; it pulls nothing more.
        self.channels[0].close()

    @property
    def join_timeout(self) -> float:
        """How long the end of the run waits for its workers by default (`join_timeout`)."""
        return join_timeout(self.stage_runs)

    def _cancel_source_wait(self) -> None:
        """Cancel an async source's wait for its next item (from any thread).

        The source has given nothing up while it awaits, so nothing is lost,
        and the run need not wait for an item that may never come. A sync
        source's ``next()`` cannot be interrupted: its item goes in when it
        comes. An item the source gives once cancelled still goes in.
        """
        task = self._async_feeder
        if task is None:
            return

        def cancel_if_waiting() -> None:  # on the task's loop: no await can slip in between
            if self._awaiting_source and not task.done():
                self._source_wait_cancelled = True
                task.cancel()

        try:
            task.get_loop().call_soon_threadsafe(cancel_if_waiting)
        except RuntimeError:  # the loop is closed: the feeder is long gone
            pass

    def join(self, timeout: float | None = None) -> None:
        """Wait for the feeder and every worker (``timeout`` s, default `join_timeout`);
        log the ones stuck in user code.

        An aborted run waits ``abort_wait`` seconds at most: its channels are
        shut, so only a thread inside user code can still be running, and it
        is left behind (a daemon) rather than keeping the caller waiting.
        """
        if self._joined:
            return
        if timeout is None:
            timeout = self.join_timeout
        if self.control.stopped.is_set():
            timeout = min(timeout, self.abort_wait)
        deadline = perf_counter() + timeout
        # The workers first: once the channels are shut they end at once, unless
        # stuck in user code. A feeder stuck in the source waits for nothing of
        # theirs, so it waits last: joined first, it used up the time an async
        # runtime needs to stop its loop, which was then said to be stuck.
        stuck = self.runtimes.join(deadline)
        stuck += join_threads(
            [self._feeder] if self._feeder else [], max(0.0, deadline - perf_counter())
        )
        self.runtimes.close()
        if stuck:
            self.left_behind = left_behind(self.stage_runs, stuck, FEEDER_THREAD)
            log.warning("conveyor: %s", "; ".join(self.left_behind))
        self.finished = perf_counter()
        for m in self.metrics:
            m.finished = self.finished
        self._joined = True
        _live_runs.discard(self)

    async def ajoin(self, timeout: float | None = None) -> None:
        """`join` from the caller's event loop, which keeps running meanwhile.

        The feeder task is awaited on the loop; the threads and the worker
        tasks are waited for from a helper thread, since the tasks need the
        loop to end.
        """
        if self._joined:
            return
        if timeout is None:
            timeout = self.join_timeout
        if self.control.stopped.is_set():
            timeout = min(timeout, self.abort_wait)
        import asyncio

        deadline = perf_counter() + timeout
        task = self._feeder_task
        if task is not None:
            await asyncio.wait([task], timeout=timeout)
            if not task.done():
                task.cancel()  # stuck in the source: let it end on its own
        await asyncio.to_thread(self.join, max(0.0, deadline - perf_counter()))

    def note_left_behind(self, exc: BaseException) -> BaseException:
        """Add to ``exc`` a note naming what the run left behind in user code, if anything."""
        notes = getattr(exc, "__notes__", ())
        for text in self.left_behind:
            if f"conveyor: {text}" not in notes:  # several callers may note the same error
                add_note(exc, f"conveyor: {text}")
        return exc

    # ------------------------------------------------------------------ results

    def stats(self) -> list[StageStats]:
        """Per-stage snapshots, now."""
        return [m.snapshot() for m in self.metrics]

    def readings(self) -> list[StageReading]:
        """Per-stage readings for a metrics exporter (`conveyor.metrics.MetricsSource`)."""
        return [m.reading() for m in self.metrics]

    def ended(self) -> bool:
        """True once the run is joined: its counters are final."""
        return self._joined

    def result(self, outputs: list[Any] | None = None) -> RunResult:
        """The run's result (call after the outputs are consumed)."""
        end = self.finished if self.finished is not None else perf_counter()
        return RunResult(
            stats=self.stats(),
            failures=list(self.control.failures),
            elapsed_seconds=end - self.started,
            items_out=self.items_out,
            outputs=outputs,
            timeline=self.timeline,
            stopped=(self.control.stopped.is_set() and self.control.error is None)
            or (self._source_stopped and not self._source_exhausted),
            error=self.control.error,
            failures_not_kept=self.control.failures_not_kept,
        )


def _cancel_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` from any thread (nothing to do once its loop is closed)."""
    try:
        task.get_loop().call_soon_threadsafe(task.cancel)
    except RuntimeError:  # the loop is closed: the task is long gone
        pass


def wait_interruptibly(wait: Callable[[float | None], bool], timeout: float | None) -> bool:
    """``wait(timeout)`` (an `threading.Event.wait`, say), in `SIGNAL_CHECK` slices when
    in the main thread, so that Ctrl-C is seen at once however the SIGINT lands (CPython
    runs signal handlers in the main thread, and only once it wakes up)."""
    if threading.current_thread() is not threading.main_thread():
        return wait(timeout)
    deadline = None if timeout is None else perf_counter() + timeout
    while True:
        left = SIGNAL_CHECK if deadline is None else min(SIGNAL_CHECK, deadline - perf_counter())
        if wait(max(0.0, left)):
            return True
        if deadline is not None and perf_counter() >= deadline:
            return False


_IN_MEMORY = (list, tuple, range, dict, set, frozenset, str, bytes, bytearray, deque)
"""Sources the feeder may read in chunks: iterating them never blocks."""


def _skip(source: Iterable[Any] | AsyncIterable[Any], n: int) -> Any:
    """``source`` without its first ``n`` items."""
    if not n:
        return source
    if isinstance(source, AsyncIterable):
        return _askip(source, n)
    return islice(source, n, None)


class AsyncOutputs:
    """A run's outputs one by one, for ``async for`` on the run's loop (`Pipeline.__aiter__`).

    A class rather than an async generator over `Run.aoutputs`: a consumer
    waiting for an output comes back from the channel's wake-up through one
    coroutine (`__anext__`) instead of three (two async generators and their
    awaitables), which is most of an idle consumer's hand-off latency on
    asyncio (docs/benchmarks.md). As `aoutputs`, it takes the last channel's
    outputs a batch at a time; the batch waits in ``_buffer`` and is handed
    out without any await, so a cancellation, which can land only in the
    wait for the next batch (the buffer empty), never takes items with it.

    The run starts at the first `__anext__` (``start`` makes it) and ends
    when the last channel is drained: then it is joined and its error, if
    any, raised. An error or a cancellation in the wait, and `aclose`, stop
    the run and join it, as they would close a generator. ``_closer``, an
    async generator started with the run, carries the rest of a generator's
    life: the loop's hooks close it (stopping and joining the run) when this
    iterator is dropped unclosed or the loop shuts down, and its end takes
    the run off its pipeline's list (``forget``).
    """

    __slots__ = ("_buffer", "_closer", "_ended", "_forget", "_run", "_start", "_take")

    def __init__(self, start: Callable[[], Run], forget: Callable[[Run], None]) -> None:
        self._start = start
        self._forget = forget
        self._buffer: deque[Any] = deque()
        self._run: Run | None = None
        self._take: Callable[[int], Awaitable[list[Any]]] | None = None
        self._closer: AsyncGenerator[None, None] | None = None
        self._ended = False

    def __aiter__(self) -> AsyncOutputs:
        return self

    async def __anext__(self) -> Any:
        buffer = self._buffer
        if buffer:
            return buffer.popleft()
        take = self._take
        if take is None:
            take = await self._begin()
        try:
            batch = await take(MAX_BATCH)
        except ShutDown:  # drained: the run is over
            await self._end(None)
            raise StopAsyncIteration from None
        except BaseException as exc:  # cancelled, Ctrl-C: stop the run
            await self._end(exc)
            raise
        run: Run = self._run  # type: ignore[assignment]  # set by _begin
        run.items_out += len(batch)
        if len(batch) == 1:
            return batch[0]
        buffer.extend(batch)
        return buffer.popleft()

    async def _begin(self) -> Callable[[int], Awaitable[list[Any]]]:
        """Start the run at the first `__anext__`; StopAsyncIteration once it has ended."""
        if self._ended:
            raise StopAsyncIteration
        try:
            run = self._start()
        except BaseException:
            self._ended = True
            raise
        self._run = run
        self._closer = _close_when_dropped(run, self._forget)
        await self._closer.__anext__()  # runs to its yield: the loop now tracks it
        self._take = run.channels[-1].aget_many
        return self._take

    async def _end(self, exc: BaseException | None) -> None:
        """The run is over (``exc`` None) or must stop (``exc``): join it, raise its error."""
        run: Run = self._run  # type: ignore[assignment]  # set by _begin
        self._take, self._ended = None, True
        try:
            try:
                if exc is not None:
                    run.abort()
            finally:
                await run.ajoin()
            if exc is None:
                run.raise_error()
        except BaseException as error:
            run.note_left_behind(error)
            raise
        else:
            if exc is not None:
                run.note_left_behind(exc)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop the run if it is still going, and join it (``contextlib.aclosing``)."""
        self._take, self._ended = None, True
        self._buffer.clear()
        closer, self._closer = self._closer, None
        if closer is not None:
            await closer.aclose()


async def _close_when_dropped(
    run: Run, forget: Callable[[Run], None]
) -> AsyncGenerator[None, None]:
    """Wait at its yield for the whole iteration (see `AsyncOutputs`); closed, stop and join
    ``run`` unless it has ended, and forget it."""
    try:
        yield
    finally:
        try:
            if not run.ended():
                run.abort()
                await run.ajoin()
        finally:
            forget(run)


async def _askip(source: AsyncIterable[Any], n: int) -> AsyncIterator[Any]:
    async for item in source:
        if n:
            n -= 1
            continue
        yield item


def _loop_ender(error: StopIteration | StopAsyncIteration) -> RuntimeError:
    """The RuntimeError that stands for ``error`` (its ``__cause__``), with its notes.

    The one exception the caller cannot get as itself: raised through an iterator
    (``for out in pipeline``, ``async for``, and ``run()``, which drains one) it
    would end the caller's loop as if every output were there, so Python turns it
    into a RuntimeError without the note naming the stage and the item (PEP 479);
    this one keeps it."""
    name = type(error).__name__
    runtime_error = RuntimeError(
        f"{name} raised in the pipeline (by a stage or the source): it cannot end the "
        f"run as itself, which would look like the end of its outputs; it is this "
        f"error's __cause__"
    )
    for note in getattr(error, "__notes__", ()):
        add_note(runtime_error, note)
    return runtime_error


def _next_chunk_size(size: int, seconds: float) -> int:
    if seconds < TARGET_BATCH_SECONDS / 2:
        return min(MAX_BATCH, size * 2)
    if seconds > TARGET_BATCH_SECONDS * 2:
        return max(1, size // 2)
    return size
