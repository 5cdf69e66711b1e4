"""Per-stage counters, their snapshots, the run's timeline, the bottleneck and the result.

Each worker owns a `WorkerCounters` and is the only one to write it, so
counting costs no lock: a few additions per *batch*, not per item. Readers
(``stats()``, the progress display, the final report) sum the counters of a
stage's workers into a frozen `StageStats`; a value read while a worker
writes may be one batch behind, never torn.

Per-item latency is kept as a small histogram per worker, in buckets about
19% wide: a batch of ``n`` items that took ``t`` seconds adds ``n`` items
of ``t / n`` seconds each. Median and p99 are read from the merged
histograms, so they are exact to a bucket, and averaged within a batch
(batches shrink to one item when items are slow, so slow stages are exact).
A worker of single items hands its items' times over as they are, and the
readers put them in buckets (`WorkerCounters.latency`), so that the worker
spends no time on it between a put and its next call (`WorkerCounters.add_items`).

While someone watches a run (``run(progress=True)``, ``report=`` or
``stall_timeout=``), a `Timeline` keeps periodic samples of every stage's
counts and queue size: what the HTML report charts, and the evidence of
how full the input queues were.

`find_bottleneck` names the stage that limits throughput: the one whose
workers are the busiest while its output is not blocked (a stage blocked on
its output waits for a slower stage downstream), with the evidence and a
hint that depends on its runtime.

`RunResult.report()` is the per-stage table as text, drawn at the end of
this module; `conveyor.report` (the HTML page) builds on it and depends on
this module, never the reverse.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from time import perf_counter
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, runtime_checkable

from .channel import Channel
from .stage import Failure, Stage, error_text, item_repr
from .validate import check_int

if TYPE_CHECKING:
    from rich.table import Table
    from typing_extensions import TypeVar

    # Any when not given (PEP 696), so that a bare `RunResult` or `RunHandle`, as
    # annotations said before they were generic, still passes mypy --strict.
    OutputT = TypeVar("OutputT", default=Any)
else:  # the default is for type checkers: typing's TypeVar takes it from Python 3.13
    from typing import TypeVar

    OutputT = TypeVar("OutputT")

__all__ = [
    "COUNTS",
    "LATENCY_BUCKETS",
    "MIN_REPORT_WIDTH",
    "TALLY_SECONDS",
    "Bottleneck",
    "HookCall",
    "MetricsExporter",
    "MetricsSource",
    "ProbeAnswer",
    "RunResult",
    "Sample",
    "StageMetrics",
    "StageReading",
    "StageStats",
    "Timeline",
    "WorkerCounters",
    "WorkerProbe",
    "bottleneck_line",
    "failed_line",
    "find_bottleneck",
    "fit_columns",
    "format_seconds",
    "latency_bound",
    "latency_bucket",
    "latency_quantile",
    "printable",
    "render_table",
    "report_table",
    "stage_rows",
]

# ---------------------------------------------------------------------- latency histogram

LATENCY_BUCKETS = 128
"""Buckets of a latency histogram: 100 ns up to about 7 minutes."""
_LATENCY_FLOOR = 1e-7  # the upper bound of bucket 0, in seconds
_STEPS_PER_DOUBLING = 4  # bucket i covers [floor * 2**((i-1)/4), floor * 2**(i/4))


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of a per-item time."""
    if seconds <= _LATENCY_FLOOR:
        return 0
    i = int(_STEPS_PER_DOUBLING * math.log2(seconds / _LATENCY_FLOOR)) + 1
    return i if i < LATENCY_BUCKETS else LATENCY_BUCKETS - 1


def latency_bound(i: int) -> float:
    """The upper bound of bucket ``i`` of a latency histogram, in seconds (the last: inf)."""
    if i >= LATENCY_BUCKETS - 1:
        return math.inf
    return _LATENCY_FLOOR * 2 ** (i / _STEPS_PER_DOUBLING)


def _bucket_value(i: int) -> float:
    """A representative time of bucket ``i``: its geometric middle."""
    if i == 0:
        return _LATENCY_FLOOR / 2
    return _LATENCY_FLOOR * 2 ** ((i - 0.5) / _STEPS_PER_DOUBLING)


def latency_quantile(histogram: Sequence[int], q: float) -> float:
    """The ``q`` quantile (0..1) of a latency histogram, in seconds; 0.0 when empty."""
    total = sum(histogram)
    if total == 0:
        return 0.0
    rank = q * (total - 1)
    seen = 0
    for i, count in enumerate(histogram):
        seen += count
        if seen > rank:
            return _bucket_value(i)
    return _bucket_value(len(histogram) - 1)


# ---------------------------------------------------------------------- per-worker counters

TALLY_SECONDS = 0.05
"""How often a worker of single items adds what it counted to its `WorkerCounters`."""

_FOLDING = threading.Lock()
"""Held by a reader putting a worker's handed-over item times in buckets (readers only:
the workers never take it)."""


class WorkerCounters:
    """Counters of one worker, written by that worker only.

    Created by `StageMetrics.new_worker` in the worker's own thread, which it
    remembers so that a stall report can show that thread's stack. ``group``
    names the worker a lane belongs to (the lanes of one process worker share
    it), so that the workers busy now are counted once each.
    """

    __slots__ = (
        "_folded",
        "_latency",
        "_unbucketed",
        "batches",
        "busy",
        "cpu_seconds",
        "current_item",
        "current_since",
        "failed",
        "filtered",
        "group",
        "items_in",
        "items_out",
        "native_id",
        "retried",
        "task",
        "thread_id",
        "thread_name",
        "wait_in",
        "wait_out",
    )

    def __init__(self, group: int | None = None) -> None:
        self.group = group
        self.items_in = 0
        self.items_out = 0
        self.filtered = 0
        self.failed = 0
        self.retried = 0
        self.batches = 0
        self.busy = 0.0
        self.wait_in = 0.0
        self.wait_out = 0.0
        # The histogram is in two parts: what the worker adds itself (batches), and what
        # readers add from the item times a worker of single items handed over.
        self._latency = [0] * LATENCY_BUCKETS
        self._folded = [0] * LATENCY_BUCKETS
        self._unbucketed: deque[list[float]] = deque()
        # What the worker holds now, for stall reports: first item of its batch.
        self.current_item: Any = None
        self.current_since: float | None = None
        thread = threading.current_thread()
        self.thread_id = thread.ident
        self.thread_name = thread.name
        # An async worker's task (they share one thread): its coroutine's stack is
        # what a stall report shows, under the task's name.
        self.task: Any = None
        self.native_id = threading.get_native_id()
        # CPU time of the worker's thread, recorded when the worker ends.
        self.cpu_seconds: float | None = None

    def add_busy(self, seconds: float, items: int) -> None:
        """Count a batch of ``items`` inputs that kept the worker busy ``seconds``."""
        self.busy += seconds
        if items:
            self._latency[latency_bucket(seconds / items)] += items

    def add_items(self, busy: list[float], outputs: int, filtered: int) -> None:
        """Count batches of one input each, handled without a failure: ``busy`` holds the
        seconds each took (the list is kept: the caller must not change it after); they
        gave ``outputs`` outputs and ``filtered`` were dropped.

        A worker of single items counts them in bulk, every `TALLY_SECONDS` or so
        (see `conveyor.runtime.base._single_items`): a reader may see its counts
        that much behind, and exact once it has ended. The times are put in
        buckets by the readers of `latency`, not here: this runs between a put
        and the worker's next call, while the consumer the put woke may wait
        for the GIL, and bucketing the 50 items of a stage of 1 ms per item
        (about 15 us) delayed that consumer's item: one item in 50, the
        hand-off's p99 (docs/benchmarks.md).
        """
        n = len(busy)
        self.items_in += n
        self.items_out += outputs
        self.filtered += filtered
        self.batches += n
        self.busy += sum(busy)
        self._unbucketed.append(busy)  # deque.append: atomic, no lock for the worker

    @property
    def latency(self) -> list[int]:
        """The worker's latency histogram so far: counts per bucket (`latency_bucket`)."""
        with _FOLDING:
            pending, folded = self._unbucketed, self._folded
            while pending:
                for seconds in pending.popleft():
                    folded[latency_bucket(seconds)] += 1
            return [a + b for a, b in zip(self._latency, folded, strict=True)]

    def finish(self) -> None:
        """Record the thread's CPU time; called by the worker as it ends."""
        self.cpu_seconds = time.thread_time()

    def cpu_now(self) -> float | None:
        """CPU time of the worker's thread so far (None where it cannot be read)."""
        if self.cpu_seconds is not None:
            return self.cpu_seconds
        try:  # Linux: the scheduler's count of nanoseconds on a CPU, readable from any thread
            with open(f"/proc/self/task/{self.native_id}/schedstat", "rb") as f:
                return int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            return None


# ---------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class StageStats:
    """A snapshot of one stage's counters (all workers summed)."""

    name: str
    """The stage's name."""
    kind: str
    """map, filter, flat_map, batch or each."""
    runtime: str
    """thread, process, async or interpreter."""
    workers: int
    """Workers the stage runs."""
    items_in: int
    """Input items taken by its workers."""
    items_out: int
    """Outputs handed to the next stage."""
    filtered: int
    """Inputs a filter dropped."""
    failed: int
    """Inputs given up on (``on_error="skip"``) or that stopped the run."""
    retried: int
    """Extra calls made by retries."""
    busy_seconds: float
    """Time its workers spent in the stage function, summed over workers."""
    wait_input_seconds: float | None
    """Time its workers waited for input, summed over workers (None where it is not
    measured: a Redis run's stages, whose workers wait inside Redis's blocking reads)."""
    wait_output_seconds: float | None
    """Time its workers were blocked on a full output channel, summed (None: as for
    ``wait_input_seconds``)."""
    elapsed_seconds: float
    """Wall time since the run started (or its total, at the end)."""
    queue_size: int
    """Items waiting in its input channel."""
    queue_capacity: int
    """Capacity of its input channel."""
    latency_p50: float | None = 0.0
    """Median time the stage function took per item, in seconds; None where it is not
    measured: a Redis run's stages (their workers count time per batch)."""
    latency_p99: float | None = 0.0
    """99th percentile of that time, in seconds (None: as for ``latency_p50``)."""
    rate_now: float = 0.0
    """Inputs per second over the last few seconds (the overall rate when
    there is too little history, or once the run has ended)."""
    cpu_seconds: float | None = None
    """CPU time of its worker threads, and of a process stage's worker processes
    as of their last answers (None where the platform cannot tell). For async
    stages, that of the event loop's thread."""
    batches: int = 0
    """Batches its workers took (one take each): ``items_in / batches`` is the
    mean batch size, 1.0 when every take returned one item (slow items)."""

    @property
    def utilisation(self) -> float:
        """Fraction of the workers' wall time spent busy (0..1)."""
        return self._share(self.busy_seconds)

    @property
    def waiting_input(self) -> float | None:
        """Fraction of the workers' wall time spent waiting for input (0..1; None where
        it is not measured)."""
        return None if self.wait_input_seconds is None else self._share(self.wait_input_seconds)

    @property
    def blocked_output(self) -> float | None:
        """Fraction of the workers' wall time spent blocked on a full output (0..1; None
        where it is not measured)."""
        waited = self.wait_output_seconds
        return None if waited is None else self._share(waited)

    @property
    def cpu_cores(self) -> float | None:
        """CPU cores its workers (threads, or processes) kept busy on average (None if unknown)."""
        if self.cpu_seconds is None or self.elapsed_seconds <= 0:
            return None
        return self.cpu_seconds / self.elapsed_seconds

    @property
    def throughput(self) -> float:
        """Inputs per second over the run so far."""
        return self.items_in / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def queue_fill(self) -> float:
        """Fill of the input channel now (0..1; 0 when unbounded)."""
        return self.queue_size / self.queue_capacity if self.queue_capacity > 0 else 0.0

    def _share(self, seconds: float) -> float:
        wall = self.elapsed_seconds * self.workers
        return min(1.0, seconds / wall) if wall > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain data, with the derived values, for JSON."""
        data = asdict(self)
        data.update(
            utilisation=self.utilisation,
            waiting_input=self.waiting_input,
            blocked_output=self.blocked_output,
            throughput=self.throughput,
            queue_fill=self.queue_fill,
        )
        return data


_RATE_WINDOW = 3.0  # seconds of history behind StageStats.rate_now
_RATE_MIN_SPAN = 0.5  # below this much history, rate_now is the overall rate
_RATE_STEP = 0.1  # at most one history point per this many seconds


class RecentRate:
    """How fast a growing count grew over the last few seconds of its readings.

    Shared by local runs (`StageStats.rate_now`) and runs read from Redis.
    """

    def __init__(self) -> None:
        self._points: deque[tuple[float, float]] = deque()  # (time, count), oldest first
        self._lock = threading.Lock()  # snapshots may be taken from several threads

    def rate(self, now: float, count: float) -> float | None:
        """Record ``count`` read at ``now``; return its growth per second over the
        last `_RATE_WINDOW` seconds, or None with less than `_RATE_MIN_SPAN` of history."""
        with self._lock:
            points = self._points
            if not points or now - points[-1][0] >= _RATE_STEP:
                points.append((now, count))
            while now - points[0][0] > _RATE_WINDOW:
                points.popleft()
            then, before = points[0]
        if now - then < _RATE_MIN_SPAN:
            return None
        return (count - before) / (now - then)


@dataclass(frozen=True)
class ProbeAnswer:
    """Where a worker process's main thread was when asked (`WorkerProbe`)."""

    worker: str
    """The worker process's name."""
    pid: int
    """Its process id."""
    item: str | None
    """A short repr of the item the stage function is on, None when it is on none."""
    stack: list[str]
    """That thread's innermost frames, formatted: from the stage function's own code on
    when it is inside it."""


class WorkerProbe(Protocol):
    """A worker whose code runs in another process, which a stall report can ask where
    it is: the questions to all go out first (`ask`), then the answers are awaited."""

    def ask(self) -> bool:
        """Ask where the worker is now; False when there is no one to ask."""

    def answer(self, deadline: float) -> ProbeAnswer | None:
        """The answer to the last question, waited for until ``deadline``
        (`time.monotonic`); None if none came (a thread holding the GIL, say)."""


@dataclass(frozen=True)
class HookCall:
    """A worker inside its stage's ``on_start`` or ``on_stop`` now, for stall reports."""

    hook: str
    """``"on_start"`` or ``"on_stop"``."""
    since: float
    """When the call began (`time.perf_counter`)."""
    thread_id: int | None
    """The thread that makes the call, or waits for it (a process stage's)."""
    worker: str
    """The worker's name, as its thread or task is named."""
    task: Any = None
    """An async worker's task (whose awaits a stall report shows), else None."""
    probe: WorkerProbe | None = None
    """A worker process, which runs the hook: asked where it is (`WorkerProbe`)."""


class StageMetrics:
    """The live counters of one stage: one `WorkerCounters` per worker."""

    def __init__(self, stage: Stage, channel: Channel[Any]) -> None:
        self.stage = stage
        self.channel = channel
        self.workers: list[WorkerCounters] = []
        # CPU time of a process stage's worker processes, as their answers report it.
        self.child_cpu = 0.0
        self._child_cpu_lock = threading.Lock()
        self.started = perf_counter()
        self.finished: float | None = None
        self._recent = RecentRate()  # fed by snapshots: the base of rate_now
        # Workers inside on_start/on_stop now: a hook that hangs holds no item,
        # yet is what a stall report must name. Set and deleted by their worker
        # only (a dict's item assignment is atomic), read by the stall detector.
        self.hook_calls: dict[object, HookCall] = {}
        # A process stage's workers, by group (`WorkerCounters.group`): what a stall
        # report asks where the code they run is (their lanes only wait for it).
        self.probes: dict[int, WorkerProbe] = {}

    @contextmanager
    def in_hook(
        self,
        hook: str,
        worker: str | None = None,
        task: Any = None,
        probe: WorkerProbe | None = None,
    ) -> Iterator[None]:
        """Record that the calling worker is inside ``hook`` until the block ends.

        Args:
            hook: ``"on_start"`` or ``"on_stop"``.
            worker: the worker's name; by default the current thread's (an
                async worker passes its task's).
            task: an async worker's task.
            probe: the worker process the hook runs in.
        """
        thread = threading.current_thread()
        key = object()
        call = HookCall(hook, perf_counter(), thread.ident, worker or thread.name, task, probe)
        self.hook_calls[key] = call
        try:
            yield
        finally:
            del self.hook_calls[key]

    def new_worker(self, group: int | None = None) -> WorkerCounters:
        """Register and return the counters of a new worker (call it from the worker);
        ``group``: the worker it is a lane of, if it is one of several lanes."""
        counters = WorkerCounters(group)
        self.workers.append(counters)
        return counters

    def add_child_cpu(self, seconds: float) -> None:
        """Count CPU time a worker process of the stage reported."""
        if seconds:
            with self._child_cpu_lock:
                self.child_cpu += seconds

    def snapshot(self, cpu: bool = True) -> StageStats:
        """Sum the workers' counters now.

        Args:
            cpu: read the CPU time of workers still running (a file read per
                worker on Linux); False leaves ``cpu_seconds`` None for them.
        """
        ws = list(self.workers)
        now = perf_counter()
        end = self.finished if self.finished is not None else now
        elapsed = end - self.started
        items_in = sum(w.items_in for w in ws)
        histogram = _merged_latency(ws)
        return StageStats(
            name=self.stage.name,
            kind=self.stage.kind,
            runtime=self.stage.runtime,
            workers=self.stage.workers,
            items_in=items_in,
            items_out=sum(w.items_out for w in ws),
            filtered=sum(w.filtered for w in ws),
            failed=sum(w.failed for w in ws),
            retried=sum(w.retried for w in ws),
            busy_seconds=sum(w.busy for w in ws),
            wait_input_seconds=sum(w.wait_in for w in ws),
            wait_output_seconds=sum(w.wait_out for w in ws),
            elapsed_seconds=elapsed,
            queue_size=self.channel.qsize(),
            queue_capacity=self.channel.maxsize,
            latency_p50=latency_quantile(histogram, 0.5),
            latency_p99=latency_quantile(histogram, 0.99),
            rate_now=self._rate_now(now, items_in, elapsed),
            cpu_seconds=_add(_thread_cpu(ws, cpu), self.child_cpu),
            batches=sum(w.batches for w in ws),
        )

    def reading(self) -> StageReading:
        """What a metrics exporter reads of the stage now (see `StageReading`); the
        backlog is its input channel's size (a Redis worker puts its streams' instead)."""
        ws = list(self.workers)
        stats = self.snapshot(cpu=False)
        return StageReading(
            stats=stats,
            latency=tuple(_merged_latency(ws)),
            busy_workers=_busy_workers(ws),
            backlog=stats.queue_size,
        )

    def _rate_now(self, now: float, items_in: int, elapsed: float) -> float:
        overall = items_in / elapsed if elapsed > 0 else 0.0
        if self.finished is not None:
            return overall
        recent = self._recent.rate(now, items_in)
        return overall if recent is None else recent


def _busy_workers(counters: Sequence[WorkerCounters]) -> int:
    """Workers holding a batch now: the lanes of one worker count once."""
    held = [c for c in counters if c.current_since is not None]
    return len({id(c) if c.group is None else c.group for c in held})


def _merged_latency(workers: Sequence[WorkerCounters]) -> list[int]:
    """The workers' latency histograms added up, bucket by bucket."""
    if not workers:
        return [0] * LATENCY_BUCKETS
    return [sum(column) for column in zip(*(w.latency for w in workers), strict=True)]


@dataclass(frozen=True)
class StageReading:
    """One stage as a metrics exporter reads it at a scrape: the snapshot, plus
    what only a live reader wants (the latency histogram, the workers busy now)."""

    stats: StageStats
    """The stage's snapshot (``cpu_seconds`` left unread)."""
    latency: tuple[int, ...]
    """Items per latency bucket (`LATENCY_BUCKETS` of them; bounds: `latency_bound`)."""
    busy_workers: int
    """Workers inside the stage function now."""
    backlog: int | None
    """Items waiting for the stage now (None: could not be read)."""
    dead_letters: int = 0
    """Entries its workers moved to dead letters (Redis workers; 0 on one machine)."""


@runtime_checkable
class MetricsSource(Protocol):
    """Something whose stages can be read at any time: a run, a Redis worker."""

    def readings(self) -> list[StageReading]:
        """One reading per stage, now."""

    def ended(self) -> bool:
        """True once the counters are final (a run that has ended)."""


@runtime_checkable
class MetricsExporter(Protocol):
    """What ``run(metrics=...)`` takes: e.g. `conveyor.prometheus.PrometheusExporter`.

    The run calls `watch` once, as it starts; the exporter reads the source
    whenever it wants (at a scrape, not on the workers' path) until the
    source says it has ended.
    """

    def watch(self, source: MetricsSource) -> None:
        """Read ``source``'s stages from now on."""


def _add(seconds: float | None, more: float) -> float | None:
    return None if seconds is None else seconds + more


def _thread_cpu(workers: Sequence[WorkerCounters], live: bool) -> float | None:
    """CPU time of the workers' threads, each thread once (async workers share one).

    None when unknown: no worker yet, or a worker still running and ``live`` False.
    """
    if not workers:
        return None
    total = 0.0
    by_thread = {w.native_id: w.cpu_now() if live else w.cpu_seconds for w in workers}
    for seconds in by_thread.values():
        if seconds is None:
            return None
        total += seconds
    return total


# ---------------------------------------------------------------------- the timeline


@dataclass(frozen=True)
class Sample:
    """Every stage's counters at one moment of a run."""

    seconds: float
    """Time since the run started."""
    items_in: tuple[int, ...]
    """Inputs taken so far, per stage."""
    items_out: tuple[int, ...]
    """Outputs handed on so far, per stage."""
    queue_size: tuple[int, ...]
    """Items waiting in each stage's input channel."""


class Timeline:
    """Periodic samples of a run's per-stage counters, kept to a bounded size.

    When ``max_samples`` is reached, every other sample is dropped and the
    minimum spacing doubles, so a long run keeps an even, coarser series.
    """

    def __init__(
        self, stages: Sequence[str], capacities: Sequence[int], max_samples: int = 600
    ) -> None:
        self.stages = tuple(stages)
        self.capacities = tuple(capacities)
        self.samples: list[Sample] = []
        self._max = max_samples
        self._spacing = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float, stats: Sequence[StageStats], force: bool = False) -> None:
        """Record ``stats`` taken ``seconds`` after the start (skipped if too soon)."""
        sample = Sample(
            seconds=seconds,
            items_in=tuple(s.items_in for s in stats),
            items_out=tuple(s.items_out for s in stats),
            queue_size=tuple(s.queue_size for s in stats),
        )
        with self._lock:
            samples = self.samples
            if samples and not force and seconds - samples[-1].seconds < self._spacing:
                return
            samples.append(sample)
            if len(samples) > self._max:
                kept = samples[::2]
                if kept[-1] is not sample:  # the latest state always stays
                    kept.append(sample)
                self.samples = kept
                self._spacing = 2 * max(self._spacing, seconds / self._max)

    def _snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def rates(self, stage: int) -> list[tuple[float, float]]:
        """(time, inputs per second) between consecutive samples of one stage."""
        samples = self._snapshot()
        return [
            (b.seconds, (b.items_in[stage] - a.items_in[stage]) / (b.seconds - a.seconds))
            for a, b in pairwise(samples)
            if b.seconds > a.seconds
        ]

    def fills(self, stage: int) -> list[tuple[float, float]]:
        """(time, fill 0..1) of one stage's input channel."""
        capacity = self.capacities[stage]
        if capacity <= 0:
            return [(s.seconds, 0.0) for s in self._snapshot()]
        return [(s.seconds, min(1.0, s.queue_size[stage] / capacity)) for s in self._snapshot()]

    def typical_fill(self, stage: int) -> float | None:
        """Median fill of one stage's input channel while the run flowed (None if unknown).

        The first and last samples are left out (taken before the first items
        arrive and after the last left), and the median ignores the filling
        and draining at both ends of the run.
        """
        fills = sorted(f for _, f in self.fills(stage)[1:-1])
        return fills[len(fills) // 2] if fills else None

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return {
            "stages": list(self.stages),
            "capacities": list(self.capacities),
            "samples": [asdict(s) for s in self._snapshot()],
        }


# ---------------------------------------------------------------------- the bottleneck

BUSY_THRESHOLD = 0.5
"""A stage whose workers are busy less than this is not called the bottleneck."""
BLOCKED_THRESHOLD = 0.25
"""A stage blocked on its output more than this waits for a slower stage after it."""
STARVED_THRESHOLD = 0.5
"""When the first stage waits for input more than this, the source is the limit."""
FULL_THRESHOLD = 0.9
"""An input queue whose median fill reaches this is called full."""
GIL_CORES = 0.6
"""A thread stage keeping this many cores busy is taken to be CPU-bound Python."""


@dataclass(frozen=True)
class Bottleneck:
    """What limits a run's throughput, with the evidence and a hint."""

    where: Literal["stage", "source", "consumer"]
    """A stage; the source (every stage waits for input); or whatever consumes
    the last stage's outputs (the last stage is blocked on its output)."""
    stage: str | None
    """The stage's name, when ``where`` is ``"stage"``."""
    evidence: str
    """The numbers behind the verdict, e.g. ``stage 'parse': 4 workers at 98%
    busy, input queue full (100% median fill), output blocked 0% of the time``."""
    hint: str
    """What would help, e.g. ``more workers would help``."""

    def __str__(self) -> str:
        return f"{self.evidence}: {self.hint}"

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return {**asdict(self), "text": str(self)}


def find_bottleneck(
    stats: Sequence[StageStats], timeline: Timeline | None = None
) -> Bottleneck | None:
    """Name what limits the run's throughput, or None when nothing clearly does.

    The rule: among the stages whose output is rarely blocked (a blocked
    stage is waiting for a slower one after it), the one whose workers are
    the busiest, if they are busy at least half the time. Its input queue's
    median fill (from the timeline, when there is one) or the share of time
    its workers waited for input is given as evidence that work was queuing
    up in front of it. When no stage qualifies, the source (every stage
    starved) or the consumer of the outputs (the last stage blocked) is named.

    Args:
        stats: one snapshot per stage, in pipeline order.
        timeline: the run's samples, for the input queues' median fill.
    """
    if not stats or not any(s.items_in for s in stats):
        return None
    # Where waits are not measured (Redis), a stage's output is not known to be blocked:
    # the busiest stage is named on its busy time alone, and no source or consumer is.
    candidates = [
        (i, s)
        for i, s in enumerate(stats)
        if s.utilisation >= BUSY_THRESHOLD and (s.blocked_output or 0.0) < BLOCKED_THRESHOLD
    ]
    if candidates:
        i, s = max(candidates, key=lambda c: c[1].utilisation)
        fill = timeline.typical_fill(i) if timeline is not None else None
        return Bottleneck("stage", s.name, _stage_evidence(s, fill), _stage_hint(s))
    first, last = stats[0], stats[-1]
    starved, blocked = first.waiting_input, last.blocked_output
    if starved is not None and starved >= STARVED_THRESHOLD:
        return Bottleneck(
            "source",
            None,
            f"the source: stage {first.name!r} waited for input {starved:.0%} of the time",
            "the source yields items more slowly than the stages take them",
        )
    if blocked is not None and blocked >= STARVED_THRESHOLD:
        return Bottleneck(
            "consumer",
            None,
            f"the consumer of the outputs: stage {last.name!r} was blocked on its output "
            f"{blocked:.0%} of the time",
            "whatever reads the pipeline's outputs takes them more slowly than they come",
        )
    return None


def _stage_evidence(s: StageStats, fill: float | None) -> str:
    workers = f"{s.workers} worker{'s' if s.workers != 1 else ''}"
    busy = f"stage {s.name!r}: {workers} at {s.utilisation:.0%} busy"
    if s.waiting_input is None or s.blocked_output is None:
        return f"{busy} (its waits are not measured)"
    if fill is None:
        queue = f"waiting for input {s.waiting_input:.0%} of the time"
    elif fill >= FULL_THRESHOLD:
        queue = f"input queue full ({fill:.0%} median fill)"
    else:
        queue = f"input queue {fill:.0%} full (median)"
    return f"{busy}, {queue}, output blocked {s.blocked_output:.0%} of the time"


def _stage_hint(s: StageStats) -> str:
    if s.kind == "batch":
        return "a batch stage only groups items: a larger capacity after it may help"
    if s.runtime in ("process", "interpreter"):
        cores = os.cpu_count() or 1
        workers = "processes" if s.runtime == "process" else "interpreters"
        if s.workers < cores:
            return f"more worker {workers} would help (this machine has {cores} cores)"
        return (
            f"its {s.workers} {workers} already cover the {cores} cores: "
            "make the work cheaper, or spread it over more machines"
        )
    if s.runtime == "async":
        return "more concurrency would help (raise workers), unless what it awaits is the limit"
    used = s.cpu_cores
    if used is not None and used >= GIL_CORES:
        return (
            f"its threads keep {used:.1f} CPU cores busy: the work is CPU-bound, and more "
            "threads only help code that releases the GIL; try runtime='process'"
        )
    return "more workers would help"


# ---------------------------------------------------------------------- the result


@dataclass
class RunResult(Generic[OutputT]):
    """What a finished run did: per-stage statistics, failures, outputs.

    Generic in the type of the outputs: ``Pipeline[T].run()`` returns a
    ``RunResult[T]``, whose ``outputs`` are a ``list[T]`` when collected.
    """

    stats: list[StageStats]
    """One snapshot per stage, in pipeline order."""
    failures: list[Failure] = field(default_factory=list)
    """Items given up on by stages with ``on_error="skip"``: the first
    `~conveyor.stage.FAILURES_KEPT` (10,000) of the run."""
    elapsed_seconds: float = 0.0
    """Wall time of the run."""
    items_out: int = 0
    """Outputs of the last stage."""
    outputs: list[OutputT] | None = None
    """The last stage's outputs, when the run was asked to collect them."""
    stopped: bool = False
    """True when the run was stopped before its source was exhausted."""
    timeline: Timeline | None = None
    """Periodic samples of the run, when it was watched (progress, report or
    stall detection); None otherwise."""
    error: BaseException | None = None
    """The error that ended the run, as the stage or the source raised it (what
    ``run()`` or ``join()`` raised), when the run failed; None otherwise. Set on
    the result a handle's ``result_so_far()`` gives after a failed ``join()``."""
    failures_not_kept: int = 0
    """Items given up on (``on_error="skip"``) past the first
    `~conveyor.stage.FAILURES_KEPT`: counted in the stages' ``failed``, not in
    ``failures``."""

    @property
    def bottleneck(self) -> Bottleneck | None:
        """What limited the run's throughput (see `find_bottleneck`)."""
        return find_bottleneck(self.stats, self.timeline)

    def failed_counts(self) -> dict[str, int]:
        """The inputs the stages failed on (the ``failed`` of `stats`, summed), by what
        became of them: ``"skipped"`` (``on_error="skip"``: recorded in ``failures``)
        and ``"ended the run"`` (an error with ``on_error="raise"``: the first is
        ``error``; several workers may meet one before the run stops). A Redis run's
        result counts ``"dead-lettered"`` entries instead of the latter."""
        total = sum(s.failed for s in self.stats)
        skipped = min(total, len(self.failures) + self.failures_not_kept)
        return {"skipped": skipped, "ended the run": total - skipped}

    def report(self, width: int = 130) -> str:
        """Return the per-stage table and the bottleneck as text, ``width`` columns wide.

        No number is cut to fit: a narrow report shortens headers, folds stage
        names and leaves the less telling columns out first.

        Raises:
            ConfigurationError: ``width`` is below `MIN_REPORT_WIDTH` (the table was
                empty, or one character a line).
        """
        check_int(width, "width", "RunResult.report()", MIN_REPORT_WIDTH)
        return render_table(self, width)

    def as_dict(self) -> dict[str, Any]:
        """The statistics, bottleneck, failures and timeline as plain data."""
        bottleneck = self.bottleneck
        return {
            "elapsed_seconds": self.elapsed_seconds,
            "items_out": self.items_out,
            "stopped": self.stopped,
            "stages": [s.as_dict() for s in self.stats],
            "bottleneck": bottleneck.as_dict() if bottleneck is not None else None,
            "failures": [
                {
                    "stage": f.stage,
                    "item": item_repr(f.item, _SHOWN_CHARACTERS),
                    "error": error_text(f.error, _SHOWN_CHARACTERS),
                    "attempts": f.attempts,
                }
                for f in self.failures
            ],
            "failures_not_kept": self.failures_not_kept,
            "timeline": self.timeline.as_dict() if self.timeline is not None else None,
        }

    def to_json(self) -> str:
        """The statistics, bottleneck, failures and timeline as a JSON document."""
        import json

        return json.dumps(self.as_dict(), indent=2)


# ---------------------------------------------------------------------- the text report

_SHOWN_CHARACTERS = 1000
"""How much of a failed item's repr and of its error's message the reports keep:
enough to recognise it, not so much that a run's report grows with its items."""

MIN_REPORT_WIDTH = 40
"""The narrowest text report: below it the table's columns are cut to nothing."""
# RunResult.report(), here with the result it renders: `conveyor.report` (the
# HTML page) builds on these, and re-exports them. rich is imported on first
# use, so that `import conveyor` does not pay for it.


def format_seconds(seconds: float) -> str:
    """A duration in the unit that reads best: ``350 ns``, ``1.2 ms``, ``42 s``, ``3m05s``."""
    if seconds <= 0:
        return "0"
    for unit, scale, limit in _UNITS:
        value = seconds / scale
        if value < limit:
            return f"{value:.1f} {unit}" if value < 9.95 else f"{value:.0f} {unit}"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_bytes(size: int) -> str:
    """A size in binary units, as ``max_bytes=`` takes them: ``512 B``, ``64 KiB``,
    ``1.5 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{size} B"
    return f"{value:.1f} {unit}".replace(".0 ", " ") if value < 9.95 else f"{value:.0f} {unit}"


# (unit, its length in seconds, the value from which the next unit reads better)
_UNITS = (("ns", 1e-9, 999.5), ("µs", 1e-6, 999.5), ("ms", 1e-3, 999.5), ("s", 1.0, 59.5))


def _kind(s: StageStats) -> str:
    return s.kind if s.runtime == "thread" else f"{s.kind} ({s.runtime})"


COUNTS = ("filtered", "failed", "retried")
"""The counts a report shows only when some stage has one (progress lines: when non-zero),
by these names: inputs a filter dropped, given up on (``on_error="skip"``, dead-lettered
on Redis) or that stopped the run, and extra calls made by retries."""


def _latency(seconds: float | None) -> str:
    """A latency cell: "-" where it is not measured (a Redis run)."""
    return "-" if seconds is None else format_seconds(seconds)


def _share_cell(share: float | None) -> str:
    """A share-of-time cell: "-" where it is not measured (a Redis run's waits)."""
    return "-" if share is None else f"{share:.0%}"


def stage_rows(stats: Sequence[StageStats]) -> tuple[list[str], list[list[str]]]:
    """The per-stage table as text cells: its headers and one row per stage.

    The filtered, failed and retried columns appear only when some stage has
    such items, which keeps the usual table within 80 columns.
    """
    counts = [c for c in COUNTS if any(getattr(s, c) for s in stats)]
    headers = ["stage", "kind", "workers", "in", "out", *counts]
    headers += ["busy", "starved", "blocked", "p50", "p99", "items/s"]
    rows = [
        [
            s.name,
            _kind(s),
            str(s.workers),
            f"{s.items_in:,}",
            f"{s.items_out:,}",
            *(f"{getattr(s, c):,}" for c in counts),
            f"{s.utilisation:.0%}",
            _share_cell(s.waiting_input),
            _share_cell(s.blocked_output),
            _latency(s.latency_p50),
            _latency(s.latency_p99),
            f"{s.throughput:,.0f}",
        ]
        for s in stats
    ]
    return headers, rows


# How a narrow text report keeps every number whole: first the headers wider than
# their numbers are shortened, then the stage and kind columns fold their text,
# then whole columns go, least telling first; the stage, in, out and failed
# columns stay. Below that, each value is a line of its own (`_stage_lines`).
_SHORT_HEADERS = {
    "workers": "wk",
    "filtered": "filt",
    "failed": "fail",
    "retried": "retr",
    "starved": "starv",
    "blocked": "block",
    "items/s": "it/s",
}
_DROP_ORDER = (
    "p99",
    "p50",
    "blocked",
    "starved",
    "retried",
    "kind",
    "items/s",
    "filtered",
    "busy",
    "workers",
)
_TEXT_COLUMNS = ("stage", "kind")
_FOLDED_WIDTH = 6  # the narrowest a folded stage or kind column is made
_GAP = 2  # between two columns: the padding (collapsed) and the box's blank divider


def fit_columns(
    headers: Sequence[str], rows: Sequence[Sequence[str]], width: int
) -> tuple[list[str], list[list[str]], bool] | None:
    """The table of `stage_rows` cut to ``width`` columns without cutting a number.

    Returns the headers and rows to show, and whether the stage and kind
    columns must fold their text (wrap it at any character); None when even
    the stage, in, out and failed columns with short headers do not fit.
    """
    keep = list(range(len(headers)))
    for short in (False, True):
        for fold in (False, True):
            shown = [_SHORT_HEADERS.get(h, h) if short else h for h in headers]
            if _table_width(shown, rows, keep, fold) <= width:
                return _pick(shown, rows, keep, fold)
    for name in _DROP_ORDER:
        if name in headers:
            keep.remove(headers.index(name))
            if _table_width(shown, rows, keep, True) <= width:
                return _pick(shown, rows, keep, True)
    return None


def _table_width(
    headers: Sequence[str], rows: Sequence[Sequence[str]], keep: Sequence[int], fold: bool
) -> int:
    total = _GAP * (len(keep) - 1)
    for j in keep:
        natural = max([len(headers[j]), *(len(row[j]) for row in rows)])
        total += min(natural, _FOLDED_WIDTH) if fold and j < len(_TEXT_COLUMNS) else natural
    return total


def _pick(
    headers: Sequence[str], rows: Sequence[Sequence[str]], keep: Sequence[int], fold: bool
) -> tuple[list[str], list[list[str]], bool]:
    return [headers[j] for j in keep], [[row[j] for j in keep] for row in rows], fold


def report_table(
    stats: Sequence[StageStats], title: str | None = None, width: int | None = None
) -> Table:
    """The after-run table: one row per stage, where its workers' time went.

    With ``width``, the table is cut to fit it as `fit_columns` says, the
    numbers never cut (but when even its fewest columns are too wide: then
    rich cuts them as it must).
    """
    headers, rows = stage_rows(stats)
    fold = False
    if width is not None:
        fitted = fit_columns(headers, rows, width)
        if fitted is None:
            fitted = _pick(headers, rows, [0, 3, 4], True)
        headers, rows, fold = fitted
    return _table(headers, rows, title, fold)


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], title: str | None, fold: bool
) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAVY,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    for j, header in enumerate(headers):
        if header in _TEXT_COLUMNS:
            table.add_column(header, justify="left", overflow="fold" if fold else "ellipsis")
        else:  # a number: exactly as wide as its widest cell, never wrapped or cut
            cells = max([len(header), *(len(row[j]) for row in rows)])
            table.add_column(header, justify="right", no_wrap=True, width=cells)
    for row in rows:
        table.add_row(
            *(Text(printable(cell)) for cell in row)
        )  # a stage name is text, never markup
    return table


def _stage_lines(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The table as lines, for a width where no table fits: per stage, ``parse (map)``
    and then a line per value, ``  in 1,234``."""
    lines: list[str] = []
    for row in rows:
        lines.append(f"{row[0]} ({row[1]})")
        lines += [f"  {header} {value}" for header, value in zip(headers[2:], row[2:], strict=True)]
    return lines


def bottleneck_line(bottleneck: Bottleneck | None) -> str:
    """One line naming the bottleneck, or saying there is none."""
    if bottleneck is None:
        return "bottleneck: none clear (no stage was busy half the time with its output free)"
    return f"bottleneck: {bottleneck}"


def _failure_line(error: BaseException) -> str:
    """One line on the error that ended a run, with conveyor's note naming where."""
    ours = [str(n) for n in getattr(error, "__notes__", ()) if str(n).startswith("conveyor:")]
    where = f" ({ours[0]})" if ours else ""
    return f"the run failed: {error_text(error)}{where}"


def render_table(result: RunResult, width: int = 130) -> str:
    """The run's table, totals, bottleneck and failures, as plain text ``width`` wide.

    No number is ever cut: a narrow report shortens headers, folds stage
    names and leaves out the less telling columns (`fit_columns`), and where
    no table fits, gives each value of each stage a line of its own.
    """
    import io

    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    headers, rows = stage_rows(result.stats)
    fitted = fit_columns(headers, rows, width)
    if fitted is not None:
        console.print(_table(*fitted[:2], "conveyor run", fitted[2]))
    else:
        console.print("conveyor run", markup=False, highlight=False)
        for line in _stage_lines(headers, rows):
            console.print(printable(line), markup=False, highlight=False)
    status = " (stopped before the end)" if result.stopped else ""
    console.print(
        f"{_count(result.items_out, 'output')} in {result.elapsed_seconds:.2f} s{status}; "
        f"{failed_line(result)}",
        markup=False,
        highlight=False,
    )
    if result.error is not None:
        console.print(_failure_line(result.error), markup=False, highlight=False)
    console.print(bottleneck_line(result.bottleneck), markup=False, highlight=False)
    for f in result.failures[:10]:
        console.print(
            f"  {f.stage}: {item_repr(f.item, 60)} -> {error_text(f.error, 200)}",
            markup=False,
            highlight=False,
        )
    more = more_failures_line(result, 10)
    if more:
        console.print(f"  {more}")
    return printable(console.export_text())


def more_failures_line(result: RunResult, shown: int) -> str:
    """After the first ``shown`` failures: how many more there were (and how many of
    them ``result.failures`` holds, when not all); '' when none."""
    recorded = len(result.failures)
    more = recorded + result.failures_not_kept - min(shown, recorded)
    if more <= 0:
        return ""
    if not result.failures_not_kept:
        return f"... and {more:,} more"
    return f"... and {more:,} more (result.failures holds the first {recorded:,})"


def _count(n: int, noun: str) -> str:
    """``1 item``, ``2 items``, ``1,000 items``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def failed_line(result: RunResult) -> str:
    """What the report says of the items the stages failed on: their number, as the
    tables' ``failed`` column counts them, and what became of them
    (`RunResult.failed_counts`): ``3 items failed (2 skipped, 1 ended the run)``."""
    counts = result.failed_counts()
    total = sum(counts.values())
    if not total:
        return "0 items failed"
    parts = ", ".join(f"{n:,} {what}" for what, n in counts.items() if n)
    return f"{_count(total, 'item')} failed ({parts})"


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode written as escapes (``\\udcff``).

    Stage names, items and messages may hold lone surrogates (what
    `os.fsdecode` makes of a file name that is not UTF-8): a report must still
    print and save.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
