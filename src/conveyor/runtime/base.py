"""The runtime interface, and the worker loop every thread-side worker runs.

A runtime knows how to start, feed, cancel and join a stage's workers; it
does not know what a pipeline is. What it is given is a `StageRun`: the
stage, its input channel, its output, the run's control and the stage's
counters. Each runtime module (``threads``, ``processes``, ``aio``,
``interpreters``) provides one `Runtime` subclass, loaded by name on first
use (see `get_runtime`).

The worker loop below is shared by the thread and process runtimes: a
process worker is a thread of the parent that ships each batch to its child
process instead of calling the function itself. The loop::

    port.take(n) --> batch --execute (the policy)--> outcome --> port.deliver(outcome)
           ^ n adapts so that a batch takes about TARGET_BATCH_SECONDS

Where the items come from and go to is the port's business (see `ports`):
the same loop serves a run's channels and a Redis worker's streams.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from time import perf_counter
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, Empty, ShutDown
from ..metrics import TALLY_SECONDS, StageMetrics, WorkerCounters
from ..policy import (
    BatchOutcome,
    add_stage_note,
    coroutine_returned,
    forget_locals,
    outputs_of,
    process_batch,
)
from ..stage import DEFAULT_STOP_TIMEOUT, FAILURES_KEPT, Failure, Stage
from .ports import Port, PortSupply, StageIO

if TYPE_CHECKING:
    import asyncio

    from ..channel import Channel, Producer

__all__ = [
    "MAX_BATCH",
    "STOP_GRACE",
    "TARGET_BATCH_SECONDS",
    "Leftover",
    "RunControl",
    "Runtime",
    "Runtimes",
    "SingleItemBooks",
    "StageRun",
    "batch_loop",
    "count_batch",
    "get_runtime",
    "left_behind",
    "warn_stop_overran",
    "worker_loop",
]

TARGET_BATCH_SECONDS = 0.002
"""A worker sizes its batches to take about this long: big enough to amortise
the channel's lock, small enough that slow items spread over all workers."""
MAX_BATCH = 512
"""Largest batch a worker takes at once."""
STOP_GRACE = DEFAULT_STOP_TIMEOUT
"""The default of a stage's ``stop_timeout``: the seconds a worker's ``on_stop`` may take
when the worker goes on, or is replaced, after it (``max_items_per_worker``; a worker
process at the end of its input too). Then the worker goes on without it: a worker
process is killed, a thread (which cannot be) is left to finish on its own while a fresh
thread takes its place, and a warning says so. The end of a run waits a little longer
for its workers (`conveyor.engine.join_timeout`)."""


class RunControl:
    """What every worker of one run shares: the stop signal and the first error."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.failures: list[Failure] = []
        self.failures_not_kept = 0  # failures past the first FAILURES_KEPT, counted only
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
        """Keep items given up on with ``on_error="skip"``: the first `FAILURES_KEPT`,
        their tracebacks' locals cleared (see `Failure`); count the others."""
        with self._lock:
            kept = failures[: max(0, FAILURES_KEPT - len(self.failures))]
            self.failures.extend(kept)
            self.failures_not_kept += len(failures) - len(kept)
        for failure in kept:
            forget_locals(failure.error)

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` unless the run stops first; True if it did not stop."""
        return not self.stopped.wait(seconds)


class StageRun:
    """One stage inside one run (or one Redis worker): its ports, its control, its counters."""

    def __init__(
        self, stage: Stage, index: int, io: StageIO, control: RunControl, metrics: StageMetrics
    ) -> None:
        self.stage = stage
        self.index = index
        self.upstream: str | None = None
        """The label of the stage whose outputs this one takes (None: it takes the source's)."""
        self.io = io
        self.control = control
        self.metrics = metrics
        self.ports: list[Port] = []
        """One per worker (or lane), opened by the runtime with `open_ports`."""
        self.supply: PortSupply | None = None
        """Instead of ``ports``, for a runtime that starts workers as work comes
        (`open_supply`)."""
        self.max_batch = max(1, min(MAX_BATCH, io.capacity // 2 or MAX_BATCH))
        self.threads: list[threading.Thread] = []
        self.given_up: list[threading.Thread] = []
        """Worker threads replaced while stuck in user code (an ``on_stop`` past
        `STOP_GRACE`): a join names them, without waiting for them again."""
        self.released: dict[threading.Thread, threading.Event] = {}
        """Set when a worker thread ends or is given up: what a join of a thread that
        may be given up meanwhile waits for (its ``join()`` would wait on)."""

    def open_ports(self, count: int) -> list[Port]:
        """Open the stage's ports, once, before its first worker starts."""
        assert not self.ports, "a stage's ports are opened once"
        self.ports = self.io.open(count)
        return self.ports

    def open_supply(self, count: int) -> PortSupply:
        """Instead of `open_ports`: ports for up to ``count`` workers, opened as they start."""
        assert self.supply is None and not self.ports, "a stage's ports are opened once"
        self.supply = self.io.supply(count)
        return self.supply

    @property
    def tracks(self) -> bool:
        """Whether the ports need to know which input gave which outputs."""
        return bool(self.ports) and self.ports[0].tracks

    def target(self, seconds: float) -> float:
        """How long a batch should take: the runtime's wish, or the port's floor."""
        return max(seconds, self.io.min_batch_seconds)

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
    direct: bool = False,
    group: int | None = None,
    retire: Callable[[], bool] | None = None,
) -> bool:
    """Take batches from the worker's port, execute them, deliver outcomes; until input ends.

    Errors raised by ``execute`` itself (not by the stage function, which
    the policy handles) fail the run. ``target`` is the time a batch
    should take: a runtime whose ``execute`` has a fixed cost per batch (a
    round trip to a worker process) asks for longer batches. ``direct``: the
    worker may call the stage function itself, as ``execute`` would (a thread
    worker without a per-item timeout nor recycling): while batches are of
    one item and the port allows it, `_single_items` runs them. ``group``: the
    worker this loop is a lane of, when a worker has several (process workers).
    ``retire``: called after each delivery (a thread worker with ``max_items_per_worker``
    ends a life there); False when another thread took the worker's port over.

    Returns True when the port was handed over (and is left open), else False (the
    input ended or the run stopped: the port is closed).
    """
    stage, control = sr.stage, sr.control
    port = sr.ports[worker]
    counters: WorkerCounters = sr.metrics.new_worker(group)
    size, limit = 1, sr.max_batch
    target = sr.target(target)
    ends = port.direct() if direct else None
    handed_over = False
    t0 = perf_counter()
    try:
        while True:
            if ends is not None and size == 1:
                books = SingleItemBooks(counters, t0, limit, target)
                if not _single_items(sr, port, ends, books):
                    break  # the input ended, or the run failed
                size, t0 = 2, books.t0  # items quick enough for batches
            try:
                batch = port.take(size)
            except ShutDown:
                break
            t1 = perf_counter()
            counters.wait_in += t1 - t0
            counters.current_item, counters.current_since = batch[0], t1
            outcome = execute(batch)
            t2 = perf_counter()
            # Everything the next take needs is done before the hand-off: a
            # consumer it wakes waits for the GIL until this worker blocks again.
            size = settle_batch(counters, outcome, len(batch), t2 - t1, size, limit, target)
            error = port.deliver(outcome)
            if error is not None:
                control.fail(error)
                break
            t0 = perf_counter()
            counters.wait_out += t0 - t2
            if retire is not None and not retire():
                handed_over = True
                break
    except ShutDown:
        pass  # the run was aborted while we were handing outputs on
    except BaseException as exc:  # a bug in conveyor, Redis lost, or Ctrl-C delivered here
        fail_worker(control, exc, stage, counters)
    finally:
        counters.finish()
        if not handed_over:
            port.close()
    return handed_over


def warn_stop_overran(stage: Stage, worker: str, fate: str) -> None:
    """Say that the ``on_stop`` of ``worker`` did not return within the stage's
    ``stop_timeout``, and what became of the worker (``fate``)."""
    import logging

    logging.getLogger("conveyor").warning(
        "conveyor: on_stop of stage %s did not return within %g s: %s %s",
        stage.label,
        stage.stop_timeout,
        worker,
        fate,
    )


def fail_worker(
    control: RunControl, exc: BaseException, stage: Stage, counters: WorkerCounters
) -> None:
    """Fail the run with what escaped a worker loop, noted with the stage and the item
    the worker held, if any."""
    holding = counters.current_since is not None
    control.fail(add_stage_note(exc, stage, counters.current_item, holding=holding))


def settle_batch(
    counters: WorkerCounters,
    outcome: BatchOutcome,
    n: int,
    seconds: float,
    size: int,
    limit: int,
    target: float,
) -> int:
    """Count a batch of ``n`` items that took ``seconds`` and return the size of the
    next one (what every runtime's worker loop does between a call and its hand-off)."""
    counters.current_item = counters.current_since = None
    if outcome.busy_seconds is None:
        outcome.busy_seconds = seconds
    count_batch(counters, outcome, n, outcome.busy_seconds)
    size = _adapt(size, n, seconds, limit, target)
    return size if outcome.size_limit is None else min(size, outcome.size_limit)


def _single_items(
    sr: StageRun, port: Port, ends: tuple[Channel[Any], Producer[Any]], books: SingleItemBooks
) -> bool:
    """`worker_loop` for batches of one item, taken and handed on by the worker itself.

    The common case of a slow stage (each item takes longer than half a
    batch's target): no per-item timeout, no recycling, a port straight
    between two channels. The put that wakes a consumer waiting for the
    item comes as soon as the function returns: nothing is taken before it
    (a take there, its objects cold after the stage's wait, cost 3 to 6 us
    before the wake-up), and the counting is done after it and in bulk
    (`SingleItemBooks`), so that what the worker does between the put and
    its next call, while the woken consumer may wait for the GIL, is short.
    Between the return and the put only the clock is read. The policy's
    outcome and the port's layers are left out. A consumer waiting on a
    stage of one item per ms got each item 1.85x later (p50) than from a
    bare `queue.Queue` producer before this path existed, 1.0x to 1.1x now
    (paired, docs/benchmarks.md). An item whose call raises goes through
    the policy (`process_batch`, which takes over from that first failure)
    and the port, as in `worker_loop`.

    Returns True when items turn out quick enough for batches (``books.t0``:
    when the next wait began); False when the input ended or the run failed.
    """
    stage, control = sr.stage, sr.control
    fn, kind = stage.fn, stage.kind
    assert fn is not None
    channel, handle = ends
    get = channel.get
    mapping = kind == "map"  # a map's output is its result: no list to build, one put
    outputs: list[Any] = []
    filtered = False
    # The counting is written out here, in local variables added to `books` every
    # `TALLY_SECONDS`, rather than through its methods: between the put and the
    # next call a consumer the put woke may be waiting for the GIL. 0.8 us from
    # the put to the next call instead of 1.3 (docs/benchmarks.md).
    counters, quick_below, busy = books.counters, books.quick_below, books.busy
    t0, due = books.t0, books.due
    wait_in = wait_out = 0.0
    handed = dropped = 0
    try:
        while True:
            try:
                item = get()
            except ShutDown:
                return False
            t1 = perf_counter()
            wait_in += t1 - t0
            counters.current_item, counters.current_since = item, t1
            try:
                result = fn(item)
                if type(result) is CoroutineType:
                    raise coroutine_returned(stage, result)
                if not mapping:
                    outputs, filtered = outputs_of(kind, item, result)
            except Exception as exc:
                outcome = process_batch(stage, [item], None, control.sleep, False, exc)
                books.t1 = t1
                error = port.deliver(books.failed(outcome))
                if error is not None:
                    control.fail(error)
                    return False
                books.waited()
                t0 = books.t0
                if books.quick():
                    return True
                continue
            except BaseException as exc:  # Ctrl-C, SystemExit: no policy applies, but name the item
                add_stage_note(exc, stage, item)
                raise
            t2 = perf_counter()  # the rest of the counting after the put
            try:  # first: it wakes a consumer waiting for the output
                if mapping:
                    handle.put(result)
                elif len(outputs) == 1:
                    handle.put(outputs[0])
                elif outputs:
                    handle.put_many(outputs)
            finally:  # counted even when the put meets a stopped run, as worker_loop counts
                t0 = perf_counter()
                counters.current_item = counters.current_since = None
                wait_out += t0 - t2
                busy.append(t2 - t1)
                handed += 1 if mapping else len(outputs)
                dropped += filtered
            if t0 >= due:
                books.tally(wait_in, wait_out, handed, dropped)
                wait_in = wait_out = 0.0
                handed = dropped = 0
                due = t0 + TALLY_SECONDS
            if t2 - t1 < quick_below:  # `books.quick`
                books.t0 = t0
                return True
    finally:
        books.tally(wait_in, wait_out, handed, dropped)


class SingleItemBooks:
    """The counting of a worker of single items (`_single_items`, and its async twin).

    Per item it keeps the worker's waits and what it holds (for stall
    reports) in its `WorkerCounters` as `worker_loop` does, but adds the
    items, their outputs and their latencies in bulk, every `TALLY_SECONDS`
    and when the worker leaves the single-item loop: less to do between
    the put that wakes a consumer and the next call of the stage. A reader
    may see the counts that much behind; they are exact once it has ended.
    """

    __slots__ = ("busy", "counters", "dropped", "due", "outputs", "quick_below", "t0", "t1", "t2")

    def __init__(self, counters: WorkerCounters, t0: float, limit: int, target: float) -> None:
        self.counters = counters
        self.t0 = self.t1 = self.t2 = t0  # the last wait's start, take, and stage's return
        # As `_adapt` decides for a batch of one: quicker items make batches worth it.
        self.quick_below = target / 2 if limit > 1 else 0.0
        self.busy: list[float] = []  # seconds per item not yet added
        self.outputs = self.dropped = 0
        self.due = t0 + TALLY_SECONDS

    def took(self, item: Any) -> None:
        """The worker took ``item`` and calls the stage now."""
        t1 = self.t1 = perf_counter()
        counters = self.counters
        counters.wait_in += t1 - self.t0
        counters.current_item, counters.current_since = item, t1

    def returned(self) -> None:
        """The stage returned: the worker no longer holds the item."""
        self.t2 = perf_counter()
        self.counters.current_item = self.counters.current_since = None

    def handed_on(self, t2: float, outputs: int, filtered: bool) -> bool:
        """Count the item just handed on, whose call returned at ``t2``: ``outputs``
        outputs, or ``filtered`` out (the worker held it until then, for stall reports);
        its next wait starts now. Returns `quick`.

        `waited` and `quick` written out: this runs between the put that may wake
        a consumer and the next call, while that consumer may wait for the GIL.
        """
        t0 = self.t0 = perf_counter()
        busy = t2 - self.t1
        self.t2 = t2
        counters = self.counters
        counters.current_item = counters.current_since = None
        counters.wait_out += t0 - t2
        self.busy.append(busy)
        self.outputs += outputs
        self.dropped += filtered
        if t0 >= self.due:
            self.flush()
            self.due = t0 + TALLY_SECONDS
        return busy < self.quick_below

    def failed(self, outcome: BatchOutcome) -> BatchOutcome:
        """Count an item the policy handled (its call raised); return ``outcome`` to deliver.

        Call `waited` once it is delivered."""
        self.returned()
        count_batch(self.counters, outcome, 1, self.t2 - self.t1)
        return outcome

    def waited(self) -> None:
        """The item is handed on: the worker's next wait starts now."""
        t0 = self.t0 = perf_counter()
        self.counters.wait_out += t0 - self.t2
        if t0 >= self.due:
            self.flush()
            self.due = t0 + TALLY_SECONDS

    def quick(self) -> bool:
        """Whether the last item was quick enough to go on in batches."""
        return self.t2 - self.t1 < self.quick_below

    def flush(self) -> None:
        """Add what was counted to the worker's counters."""
        if self.busy:
            # A copy is handed over: `_single_items` holds this list, emptied in place.
            self.counters.add_items(self.busy[:], self.outputs, self.dropped)
            self.busy.clear()
            self.outputs = self.dropped = 0

    def tally(self, wait_in: float, wait_out: float, outputs: int, dropped: int) -> None:
        """Add what `_single_items` counted in its own variables since the last tally
        (the items' busy times are in `busy` already), then `flush`."""
        counters = self.counters
        counters.wait_in += wait_in
        counters.wait_out += wait_out
        self.outputs += outputs
        self.dropped += dropped
        self.flush()


def count_batch(counters: WorkerCounters, outcome: BatchOutcome, taken: int, busy: float) -> None:
    """Count a batch's outcome in a worker's counters."""
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
    arrived, when the port says so (`Empty`), and at the end of the input.
    """
    stage = sr.stage
    (port,) = sr.ports  # opened by the runtime: one worker
    counters = sr.metrics.new_worker()
    size, interval = stage.batch_size, stage.interval
    buf: list[Any] = []
    deadline = 0.0
    try:
        while True:
            timeout = None if interval is None or not buf else max(0.0, deadline - perf_counter())
            t0 = perf_counter()
            try:
                items = port.take(size - len(buf), timeout)
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
                buf = _flush(port, counters, buf)
        if buf:
            _flush(port, counters, buf)
    except ShutDown:
        pass
    except BaseException as exc:
        sr.control.fail(add_stage_note(exc, stage, buf[0] if buf else None, holding=bool(buf)))
    finally:
        counters.finish()
        port.close()


def _flush(port: Port, counters: WorkerCounters, group: list[Any]) -> list[Any]:
    """Deliver one group of a batch stage; return a fresh buffer."""
    t1 = perf_counter()
    error = port.deliver(BatchOutcome([group], processed=len(group)))
    assert error is None, "a group carries no error"
    counters.wait_out += perf_counter() - t1
    counters.items_out += 1
    return []


class Leftover(str):
    """The name of something a join found still running, as runtimes return names, and
    what it is (``kind``): ``"thread"`` (a plain name means one), ``"task"`` (an
    asyncio task), or the worker a runtime runs (``"worker process"``...)."""

    kind: str

    def __new__(cls, name: str, kind: str) -> Leftover:
        """``name`` of a ``kind`` of thing."""
        leftover = super().__new__(cls, name)
        leftover.kind = kind
        return leftover


_LEFT_AS = {  # kind: what one is, what several are (the runtimes stop or kill the others)
    "thread": (
        "a daemon thread, which does not keep the interpreter from exiting",
        "daemon threads, which do not keep the interpreter from exiting",
    ),
    "task": (
        "an asyncio task, which runs on in the event loop's daemon thread",
        "asyncio tasks, which run on in the event loop's daemon thread",
    ),
    "worker process": ("a worker process, killed", "worker processes, killed"),
    "worker interpreter": ("a worker interpreter, given up", "worker interpreters, given up"),
}


def _say_left(names: list[str]) -> str:
    """``names`` grouped by kind, each group said with what it is and becomes."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(getattr(name, "kind", "thread"), []).append(name)
    parts = []
    for kind, group in groups.items():
        one, several = _LEFT_AS.get(kind, (kind, kind))
        parts.append(f"{', '.join(group)} ({one if len(group) == 1 else several})")
    return "; ".join(parts)


def left_behind(
    stage_runs: list[StageRun], stuck: list[str], source_thread: str | None = None
) -> list[str]:
    """Say, per stage (or for the source), which of the ``stuck`` threads, tasks or
    processes a join left running user code, and what each is (see `Leftover`).

    Worker threads and tasks are named after their stage (`StageRun.thread_name`);
    an async stage's stuck tasks name it, and the event loop's thread they block
    is listed with them.
    """
    from .aio import LOOP_THREAD_NAME

    runs = sorted(stage_runs, key=lambda sr: -len(sr.stage.name))  # longest name first
    found: dict[str, list[str]] = {}
    for name in stuck:
        if name == source_thread:
            found.setdefault("the source", []).append(name)
            continue
        owner = next((sr for sr in runs if name.startswith(f"conveyor-{sr.stage.name}-")), None)
        if owner is not None:
            found.setdefault(f"stage {owner.stage.label}", []).append(name)
    if LOOP_THREAD_NAME in stuck:
        owners = [f"stage {sr.stage.label}" for sr in stage_runs if sr.stage.runtime == "async"]
        found.setdefault(next((o for o in owners if o in found), "an async stage"), []).append(
            LOOP_THREAD_NAME
        )
    return [
        f"{owner} is stuck in user code: left behind: {_say_left(names)}"
        for owner, names in found.items()
    ]


class Runtime(ABC):
    """How a stage's workers run. One instance serves one run."""

    name: str = ""

    def port_count(self, stage: Stage) -> int:
        """How many ports the stage's workers use (one per worker; a batch stage has one)."""
        return 1 if stage.kind == "batch" else stage.workers

    def open(self, sr: StageRun) -> None:
        """Open the stage's ports (`port_count` of them), before any worker of the run
        starts; a runtime that starts workers as work comes opens a supply instead."""
        sr.open_ports(self.port_count(sr.stage))

    @abstractmethod
    def start(self, sr: StageRun) -> None:
        """Start the stage's workers on its ports (opened already); return at once."""

    @abstractmethod
    def join(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` s for every worker started; return those still alive."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release what the runtime holds (processes, event loop) after the run."""


class Runtimes:
    """The runtimes serving a set of stages (a local run's, or a Redis worker's): one
    instance per kind, made on first use; started, joined and closed together."""

    def __init__(self) -> None:
        self._by_name: dict[str, Runtime] = {}

    def __getitem__(self, name: str) -> Runtime:
        """The runtime called ``name``, once started (KeyError before)."""
        return self._by_name[name]

    def _get(self, name: str) -> Runtime:
        runtime = self._by_name.get(name)
        if runtime is None:
            runtime = self._by_name[name] = get_runtime(name)()
        return runtime

    def start(self, stage_runs: Sequence[StageRun]) -> None:
        """Open every stage's ports, then start every stage's workers on them.

        Every port before any worker: a channel closes when its last port does,
        so no worker may close one while another stage's port is still to open.
        """
        runtimes = [self._get(sr.stage.runtime) for sr in stage_runs]
        for sr, runtime in zip(stage_runs, runtimes, strict=True):
            runtime.open(sr)
        for sr, runtime in zip(stage_runs, runtimes, strict=True):
            runtime.start(sr)

    def join(self, deadline: float | None) -> list[str]:
        """Wait for every worker until ``deadline`` (a `time.perf_counter` value; None:
        no bound); return the names of those still alive."""
        stuck: list[str] = []
        # A copy: the driver may close (and clear) these while another thread joins.
        for runtime in list(self._by_name.values()):
            left = 3600.0 if deadline is None else max(0.0, deadline - perf_counter())
            stuck += runtime.join(left)
        return stuck

    def close(self) -> None:
        """Release every runtime (processes, event loops), once its workers are joined."""
        runtimes = list(self._by_name.values())
        self._by_name.clear()
        for runtime in runtimes:
            runtime.close()


_RUNTIME_MODULES = {
    "thread": "threads",
    "process": "processes",
    "async": "aio",
    "interpreter": "interpreters",
}


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
