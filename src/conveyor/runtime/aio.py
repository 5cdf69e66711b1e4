"""Async runtime: a coroutine stage runs as ``workers`` tasks on one event loop.

::

    port.atake --> worker task 0 --aprocess_batch--> port.adeliver
    port.atake --> worker task 1 ...   (one port per task; see `conveyor.runtime.ports`)
                   ... up to ``workers`` tasks: the stage's concurrency limit

Tasks start as work comes (`_Workers`): one with the run, another each time
a task takes a batch and leaves none waiting, each with a port of its own
from the stage's `conveyor.runtime.ports.PortSupply`.

Each worker task loops like a thread worker (`conveyor.runtime.base.worker_loop`):
take a batch, run it through `conveyor.stage.aprocess_batch` (the stage's
policies, awaited), hand the outputs on. Channels are shared with thread and
process stages and with the feeder; tasks use their asyncio side, so the
loop never blocks on them.

Where the loop is:

* ``run()``, ``for x in pipeline``, ``start()``: a loop of the runtime's
  own, in a thread named ``conveyor-async-loop``, shared by every async stage
  of the run and closed at its end;
* ``await pipeline.arun()``, ``async for x in pipeline``: the caller's loop
  (`RunControl.loop`); thread and process stages still run in their threads.

An abort (an error, ``stop()``, Ctrl-C) shuts the channels down, which wakes
parked tasks, and cancels every worker task, which interrupts the stage
calls in flight. `AsyncRuntime.join` waits until every task has ended, so
the ``finally`` blocks of the user's coroutines and ``on_stop`` have run,
before the loop is closed and its thread joined.
"""

from __future__ import annotations

import asyncio
import inspect
import select
import selectors
import sys
import threading
import weakref
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, Empty, Full, ShutDown
from ..policy import add_note, add_stage_note, aprocess_batch, cancels_this_task, outputs_of
from ..stage import set_worker_state
from .base import (
    TARGET_BATCH_SECONDS,
    Leftover,
    RunControl,
    Runtime,
    SingleItemBooks,
    StageRun,
    fail_worker,
    settle_batch,
)
from .ports import Port

if TYPE_CHECKING:
    from ..channel import Channel, Producer

__all__ = ["RUNTIME", "AsyncRuntime", "new_event_loop"]

LOOP_THREAD_NAME = "conveyor-async-loop"


FIRST_TASKS = 32
"""Worker tasks a stage starts with the run, at most: up to that many ``workers`` all
start at once, so that a slow ``on_start`` (a connection made) is paid once, in
parallel, as before tasks started on demand; beyond, tasks start as work comes
(`_Workers`), and 100,000 ``workers`` cost what the busy ones do."""


class AsyncRuntime(Runtime):
    """Runs each worker of a coroutine stage as a task; one event loop per run."""

    name = "async"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None  # None on the caller's loop
        self._control: RunControl | None = None
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # the live worker tasks, under _lock
        self._stages: list[_Workers] = []  # each stage's, under _lock
        self._live = 0  # worker tasks started and not ended, under _lock
        self._idle = threading.Event()  # set while _live is 0
        self._idle.set()
        self._closing = False  # join() was called: stop our loop once _live is 0 (under _lock)
        self._precise: selectors.BaseSelector | None = None  # a caller's selector made precise

    # ------------------------------------------------------------------ starting

    def open(self, sr: StageRun) -> None:
        """A supply of ports rather than ``workers`` ports: tasks start as work comes."""
        if sr.stage.kind == "batch":
            raise ConfigurationError(f"stage {sr.stage.label}: batch stages run on threads")
        sr.open_supply(sr.stage.workers)

    def start(self, sr: StageRun) -> None:
        loop = self._ensure_loop(sr.control)
        workers = _Workers(self, sr)
        with self._lock:
            self._live += 1  # stands for the first task until it is made, on the loop
            self._idle.clear()
            self._stages.append(workers)
        if _running_loop() is loop:
            self._start_first(workers)
        else:
            loop.call_soon_threadsafe(self._start_first, workers)

    def _ensure_loop(self, control: RunControl) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._control = control
            if control.loop is not None:
                self._loop = control.loop
                self._precise = _make_waits_precise(control.loop)
            else:
                self._loop = new_event_loop()
                self._thread = threading.Thread(
                    target=_serve, args=(self._loop,), name=LOOP_THREAD_NAME, daemon=True
                )
                self._thread.start()
            control.on_abort(self._on_abort)
        return self._loop

    def _start_first(self, workers: _Workers) -> None:
        """Start the stage's first worker tasks, up to `FIRST_TASKS` (in the loop's thread)."""
        try:
            if not workers.start_one():  # the run stopped before its stages started
                workers.seal()
                return
            for _ in range(min(workers.sr.stage.workers, FIRST_TASKS) - 1):
                if not workers.start_one():
                    break
        finally:
            self._ended()  # what stood for the first task

    def start_task(self, workers: _Workers, worker: int, port: Port) -> None:
        """Start worker task number ``worker`` of a stage on its ``port`` (loop thread)."""
        assert self._loop is not None
        sr = workers.sr
        task = self._loop.create_task(
            _run_worker(workers, worker, port), name=sr.thread_name(worker)
        )
        with self._lock:
            self._tasks.add(task)
            self._live += 1
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            # A worker reports its own errors; this is a bug, and must not pass unseen.
            assert self._control is not None
            self._control.fail(error)
        with self._lock:
            self._tasks.discard(task)
        self._ended()

    def _ended(self) -> None:
        """One task fewer; the last one sets `_idle`, and stops our loop once joined."""
        with self._lock:
            self._live -= 1
            if self._live:
                return
            self._idle.set()
            stop = self._closing and self._thread is not None
        if stop:
            assert self._loop is not None
            self._loop.stop()

    # ------------------------------------------------------------------ stopping

    def _on_abort(self) -> None:
        """Cancel every worker task (called from any thread when the run aborts)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._cancel_tasks)
        except RuntimeError:  # the loop is closed: no task is left
            pass

    def _cancel_tasks(self) -> None:
        with self._lock:
            tasks = list(self._tasks)
        for task in tasks:
            task.cancel()

    def join(self, timeout: float) -> list[str]:
        """Wait for every worker task to end, then stop the loop and join its thread.

        On the caller's loop, `Run.ajoin` calls it from a helper thread, so
        that the loop can run the tasks to their end meanwhile.
        """
        try:
            return self._join(timeout)
        finally:
            if self._precise is not None:
                _restore_waits(self._precise)
                self._precise = None

    def _join(self, timeout: float) -> list[str]:
        if self._loop is None:
            return []
        if _running_loop() is self._loop:
            # A start that failed on the caller's loop: waiting here would keep
            # the tasks from running; they were cancelled and end on their own.
            return []
        deadline = monotonic() + timeout
        stuck = [] if self._idle.wait(timeout) else self._stuck()
        with self._lock:
            stages = list(self._stages)
        for workers in stages:  # no task starts any more (one cancelled unstarted did not)
            workers.seal()
        if self._thread is None:
            return stuck
        with self._lock:
            # With tasks stuck in user code the loop keeps running them, in a
            # daemon thread, and stops when the last one ends.
            self._closing = True
            idle = self._live == 0
        if idle:
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:  # already closed
                pass
        self._thread.join(max(0.0, deadline - monotonic()))
        if self._thread.is_alive():
            stuck.append(self._thread.name)
        return stuck

    def _stuck(self) -> list[str]:
        with self._lock:
            return [Leftover(name, "task") for name in sorted(t.get_name() for t in self._tasks)]


# ---------------------------------------------------------------------- the workers


class _Workers:
    """A stage's worker tasks, started as work comes, up to its ``workers``.

    The first tasks start with the run (all of them, up to `FIRST_TASKS`);
    another starts whenever a task takes a batch and leaves none waiting for
    one (all are busy). So an item that
    arrives finds a task waiting for it while the stage is under its limit,
    and a stage whose items keep at most k tasks busy at once runs about
    k + 1 of them, whatever ``workers`` says: 100,000 coroutines of a trivial
    stage cost what a few do. A task still in ``on_start`` is not waiting
    for items, and up to four times as many may be starting as there are
    tasks through theirs: with a slow ``on_start`` (a connection made) the
    stage's tasks grow fivefold per ``on_start`` while all are busy, and the
    tasks of a quick stage are still few. Each task
    runs ``on_start`` before its first item and ``on_stop`` after its last;
    a worker that no work ever needed is never started, and runs neither.
    Used on the loop's thread only (but `seal`, which is thread-safe).
    """

    __slots__ = ("idle", "runtime", "sr", "started", "starting")

    def __init__(self, runtime: AsyncRuntime, sr: StageRun) -> None:
        self.runtime = runtime
        self.sr = sr
        self.idle = 0  # tasks started and not holding a batch: starting, or waiting for one
        self.starting = 0  # of those, the ones not yet through on_start
        self.started = 0

    def start_one(self) -> bool:
        """Start one more task, unless the stage has all its workers, or the run ended."""
        assert self.sr.supply is not None
        port = self.sr.supply.open()
        if port is None:
            return False
        self.idle += 1
        # Without on_start a task takes items at its first step: it counts as waiting.
        self.starting += self.sr.stage.on_start is not None
        self.started += 1
        self.runtime.start_task(self, self.started - 1, port)
        return True

    def ready(self) -> None:
        """A task is through its ``on_start``: it takes items from now on."""
        self.starting -= self.sr.stage.on_start is not None

    def took(self) -> None:
        """A task took a batch: if it was the last one waiting, start another (unless
        four times as many are in on_start as are through it)."""
        self.idle -= 1
        starting = self.starting
        if (
            self.idle == starting
            and starting <= 4 * (self.started - starting)
            and not self.sr.control.stopped.is_set()
        ):
            self.start_one()

    def back(self) -> None:
        """A task handed its batch on and waits for the next."""
        self.idle += 1

    def seal(self) -> None:
        """Start no task any more: the input ended, or the run stopped."""
        assert self.sr.supply is not None
        self.sr.supply.seal()


async def _run_worker(workers: _Workers, worker: int, port: Port) -> None:
    """A worker task: the per-worker hooks around the worker loop."""
    sr = workers.sr
    stage, control = sr.stage, sr.control
    try:
        state = await _call_hook(sr, worker, "on_start") if stage.on_start is not None else None
    except BaseException as exc:
        port.close()
        workers.seal()
        if cancels_this_task(exc):
            raise
        control.fail(add_note(exc, f"conveyor: on_start of stage {stage.label} failed"))
        return
    set_worker_state(state)  # a context variable: this task's own
    workers.ready()
    try:
        await _worker_loop(workers, worker, port)
    finally:
        # A worker ends when its input has ended or the run stopped: none is needed
        # any more. (A task the abort cancelled before it ran is sealed for by join.)
        workers.seal()
        if stage.on_stop is not None:
            try:
                await _call_hook(sr, worker, "on_stop", state)
            except BaseException as exc:
                if cancels_this_task(exc):
                    raise
                # Reported, not raised: a KeyboardInterrupt out of a task would stop the loop.
                control.fail(add_note(exc, f"conveyor: on_stop of stage {stage.label} failed"))


async def _call_hook(sr: StageRun, worker: int, name: str, *args: Any) -> Any:
    """Call the stage's hook ``name`` (a plain or coroutine function); return its
    (awaited) result. Stall reports see the worker inside it meanwhile."""
    with sr.metrics.in_hook(name, sr.thread_name(worker), asyncio.current_task()):
        result = getattr(sr.stage, name)(*args)
        if inspect.isawaitable(result):
            result = await result
        return result


async def _worker_loop(workers: _Workers, worker: int, port: Port) -> None:
    """`conveyor.runtime.base.worker_loop`, for a coroutine stage."""
    sr = workers.sr
    stage, control = sr.stage, sr.control
    counters = sr.metrics.new_worker()
    counters.task, counters.thread_name = asyncio.current_task(), sr.thread_name(worker)
    size, limit, track = 1, sr.max_batch, port.tracks
    target = sr.target(TARGET_BATCH_SECONDS)
    # With a timeout, a call goes through asyncio.wait_for (`aapply_one`).
    ends = port.direct() if stage.timeout is None else None
    t0 = perf_counter()
    try:
        while True:
            if ends is not None and size == 1:
                books = SingleItemBooks(counters, t0, limit, target)
                if not await _single_items(workers, port, ends, books):
                    break  # the input ended, or the run failed
                size, t0 = 2, books.t0  # items quick enough for batches
            try:
                batch = await port.atake(size)
            except ShutDown:
                break
            workers.took()
            t1 = perf_counter()
            counters.wait_in += t1 - t0
            counters.current_item, counters.current_since = batch[0], t1
            outcome = await aprocess_batch(stage, batch, track)
            t2 = perf_counter()
            size = settle_batch(counters, outcome, len(batch), t2 - t1, size, limit, target)
            error = await port.adeliver(outcome)
            if error is not None:
                control.fail(error)
                break
            workers.back()
            t0 = perf_counter()
            counters.wait_out += t0 - t2
    except ShutDown:
        pass  # the run was aborted while we were handing outputs on
    except BaseException as exc:  # Ctrl-C or SystemExit from the stage, or a bug in conveyor
        if cancels_this_task(exc):
            raise  # the run was aborted: its cause is reported by whoever aborted it
        fail_worker(control, exc, stage, counters)
    finally:
        counters.finish()
        port.close()


async def _single_items(
    workers: _Workers,
    port: Port,
    ends: tuple[Channel[Any], Producer[Any]],
    books: SingleItemBooks,
) -> bool:
    """`conveyor.runtime.base._single_items`, for a coroutine stage.

    Here what matters is the whole way from the stage's return to the
    worker's next wait: a consumer on the same loop runs only then. The
    direct take, call and put leave out the policy's and the port's
    coroutines and their outcome on the way, and a put that wakes a
    waiting consumer is followed by one turn of the loop, so that the
    consumer runs before the worker's counting and next take (which delays
    the worker's next call by the consumer's turn, only while a consumer
    waits, i.e. while this stage is the slower side).
    """
    sr = workers.sr
    stage, control = sr.stage, sr.control
    fn, kind = stage.fn, stage.kind
    assert fn is not None
    channel, handle = ends
    out = handle.channel
    try:
        while True:
            try:
                # Without a coroutine to build and run while the item is there already:
                # every step saved before the next wait brings a consumer on this loop sooner.
                try:
                    item = channel.get(False)
                except Empty:
                    item = await channel.aget()
            except ShutDown:
                return False
            books.took(item)
            workers.took()
            try:
                outputs, filtered = outputs_of(kind, item, await fn(item))
            except Exception as exc:
                outcome = await aprocess_batch(stage, [item], False, exc)
                error = await port.adeliver(books.failed(outcome))
                if error is not None:
                    control.fail(error)
                    return False
                books.waited()
                quick = books.quick()
            except BaseException as exc:  # as in aprocess_batch; a cancellation is the run's stop
                if not cancels_this_task(exc):
                    add_stage_note(exc, stage, item)
                raise
            else:
                t2 = perf_counter()  # the rest of the counting after the put
                woke = out.consumers_waiting()
                try:  # as the take: a coroutine only to wait for room
                    if len(outputs) == 1:  # a map's: less to do than a batch's put
                        try:
                            handle.put(outputs[0], False)
                        except Full:
                            await handle.aput(outputs[0])
                    elif outputs:
                        try:
                            handle.put_many(outputs, False)
                        except Full as full:
                            await handle.aput_many(outputs[full.items_put :])  # type: ignore[attr-defined]
                    if woke and outputs:
                        # A consumer was waiting for this output: let it run first, before
                        # our counting and our next take (a turn of the loop; without it
                        # the consumer waited for them, the item ~1.6x later than from an
                        # asyncio.Queue producer, about 1.1x with it: docs/benchmarks.md).
                        await asyncio.sleep(0)
                finally:  # counted even when the put meets a stopped run, as _worker_loop counts
                    quick = books.handed_on(t2, len(outputs), filtered)
            workers.back()
            if quick:
                return True
    finally:
        books.flush()


# ---------------------------------------------------------------------- the loop


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The loop thread: run until `AsyncRuntime.join` stops the loop, then close it cleanly."""
    try:
        loop.run_forever()
        _cancel_leftovers(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await the tasks user code left behind (as `asyncio.run` does)."""
    leftovers = asyncio.all_tasks(loop)
    if not leftovers:
        return
    for task in leftovers:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop whose timers end on time: the loop conveyor runs async stages on.

    ``run()``, plain iteration and ``start()`` run async stages on such a loop
    of their own. ``await pipeline.arun()`` and ``async for`` run them on the
    caller's loop instead; while they do, asyncio's default loop is made to
    wait as precisely (its selector is switched, then switched back when the
    run ends: see `_make_waits_precise`), and a loop made with this function
    is precise all along. On Linux it is a selector loop that waits to the
    microsecond (see `_PreciseEpollSelector`): asyncio's default loop rounds
    every wait up to a whole millisecond, which makes many coroutines waiting
    a few milliseconds each late by up to one (2,000 items through two stages
    of 32 coroutines waiting 5 ms: 0.84 to 0.90 of the ideal rate on asyncio's
    loop, 0.95 to 0.97 on this one, in bench/pipeline.py). Elsewhere it is
    asyncio's default loop.

    Example:
        >>> import asyncio, conveyor as cv
        >>> async def double(x: int) -> int:
        ...     await asyncio.sleep(0.001)
        ...     return 2 * x
        >>> async def main() -> list[int]:
        ...     pipeline = cv.Pipeline(range(3)).map(double, runtime="async")
        ...     return [x async for x in pipeline]
        >>> with asyncio.Runner(loop_factory=cv.new_event_loop) as runner:
        ...     runner.run(main())
        [0, 2, 4]

    (``asyncio.run(main(), loop_factory=cv.new_event_loop)`` on Python 3.12+.)
    """
    if sys.platform == "linux":
        return asyncio.SelectorEventLoop(_PreciseEpollSelector())
    else:  # noqa: RET505 - a platform check mypy reads as such
        return asyncio.new_event_loop()


# Stock epoll selectors of callers' loops made precise, and how many runs on each want it.
_precise_runs: weakref.WeakKeyDictionary[selectors.BaseSelector, int] = weakref.WeakKeyDictionary()
_precise_lock = threading.Lock()


def _make_waits_precise(loop: asyncio.AbstractEventLoop) -> selectors.BaseSelector | None:
    """Make a caller's asyncio loop wait to the microsecond while a run uses it.

    ``async for`` and ``arun()`` run async stages on the caller's loop, and
    asyncio's default loop on Linux rounds every wait up to a millisecond
    (see `_PreciseEpollSelector`): 2,000 items through two stages of 32
    coroutines waiting 5 ms reached 0.84 to 0.88 of the ideal rate there,
    against 0.95 to 0.98 on `new_event_loop`'s. So, only when the loop's
    selector is exactly the standard library's `selectors.EpollSelector`
    (asyncio's default), its class becomes `_PreciseEpollSelector` (the same
    object and state, a `select` that waits to the microsecond) until the
    last run on it ends, then goes back. Any other loop (uvloop, a
    selector of the user's own class, other platforms) is left alone.
    Returns the selector to hand to `_restore_waits`, or None.
    """
    selector = getattr(loop, "_selector", None)
    if sys.platform != "linux" or not isinstance(selector, selectors.EpollSelector):
        return None
    with _precise_lock:
        runs = _precise_runs.get(selector, 0)
        if not runs:
            if type(selector) is not selectors.EpollSelector:
                return None
            selector.__class__ = _PreciseEpollSelector
        _precise_runs[selector] = runs + 1
    return selector


def _restore_waits(selector: selectors.BaseSelector) -> None:
    """End one run's claim on `_make_waits_precise`; the last gives the loop its own waits back."""
    with _precise_lock:
        runs = _precise_runs.pop(selector) - 1
        if runs:
            _precise_runs[selector] = runs
        else:
            selector.__class__ = selectors.EpollSelector


if sys.platform == "linux":

    class _PreciseEpollSelector(selectors.EpollSelector):
        """An epoll selector whose waits end on time, to the microsecond.

        epoll_wait counts whole milliseconds and asyncio rounds a wait up,
        so a timer due in 3 µs costs a 1 ms wait. With many coroutines
        sleeping, their timers fall a few µs apart and nearly every wake-up
        is late by up to a millisecond: 5000 sleeps of 10 ms, 200 at a time,
        reach 0.89 of the ideal throughput on asyncio's default loop here,
        0.98 with this selector (bench/async_io.py). It waits with select(),
        which takes microseconds, on the epoll descriptor itself (readable
        as soon as any registered file is), then collects the events
        without waiting.
        """

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            # The base class named, not super(): `_restore_waits` may switch this
            # object's class back (from the run's joining thread) while the loop's
            # thread waits in here, and super() would then refuse the object.
            wait = selectors.EpollSelector.select
            if timeout is not None and timeout > 0:
                try:
                    select.select([self.fileno()], [], [], timeout)
                except ValueError:  # a descriptor above FD_SETSIZE: select() cannot watch it
                    return wait(self, timeout)
                timeout = 0
            return wait(self, timeout)


RUNTIME = AsyncRuntime
