"""What ``conveyor status`` shows, and the driver's live progress: a run's counters, read.

``conveyor status`` shows per run and stage the streams, consumers and
counters. A driver asked for progress (``run(progress=True)``) starts a
`ProgressWatcher`, which turns the same counters into `StageStats` every
tick and hands them to the displays of local runs (`conveyor.progress`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ..metrics import RecentRate, StageStats, Timeline, format_bytes
from ..progress import LIVE_REFRESH, Watcher
from .state import LEFT, RunInfo, RunState, stage_stats, text
from .streams import WORKER_GROUP, Scripts, connect

if TYPE_CHECKING:
    from ..progress import Display
    from ..stage import Stage

__all__ = [
    "RUN_STATES",
    "ConsumerStatus",
    "ProgressWatcher",
    "RunStatus",
    "StageStatus",
    "render",
    "run_status",
]

log = logging.getLogger("conveyor.redis")

WATCH_TIMEOUT = 1.0
"""Socket timeouts of the watcher's connection: how long a read may hold it up."""


@dataclass(frozen=True)
class ConsumerStatus:
    """One consumer of a stage's group."""

    name: str
    """host:pid:stage-n:random."""
    pending: int
    """Entries it holds, not yet handed on."""
    idle_seconds: float
    """Time since it last read or handed on (a large value: dead or stuck)."""


@dataclass(frozen=True)
class StageStatus:
    """One stage of a run."""

    name: str
    stream_length: int
    """Work left in its input stream: entries waiting, or held by a consumer."""
    pending: int
    """Entries held by consumers."""
    limit: int
    """Backlog limit of the stream."""
    acked: int
    """Inputs acknowledged so far."""
    out: int
    """Outputs handed to the next stream."""
    rate: float
    """Inputs acknowledged per second since the run started."""
    redelivered: int
    """Re-executions (deliveries beyond the first)."""
    dead_letters: int
    """Entries in its dead letters."""
    consumers: tuple[ConsumerStatus, ...]


RUN_STATES = {
    "running": "a driver feeds it and takes its outputs",
    "left": "no driver: run it again with its run_id to resume it, or cancel it",
    "complete": "every item went through",
    "open": "accepting items",
    "closed": "no more items; those submitted are still going through",
    "drained": "closed, every output taken; `conveyor cancel` deletes it",
}
"""What `RunStatus.state` says, by value."""


@dataclass(frozen=True)
class RunStatus:
    """One run of the pipeline."""

    run_id: str
    age_seconds: float
    fed: int
    """Items the source added (a long-lived run: the items submitted)."""
    source_done: bool
    """The source is exhausted (a long-lived run: closed)."""
    left: str
    """How its driver left the run in Redis ("stopped and left in Redis", ...): nothing
    feeds it until a driver resumes it; '' while a driver runs it (or a long-lived
    run's producers feed it)."""
    complete: bool
    """Every item went through and every output was taken (a long-lived run: drained)."""
    delivered: int
    """Final-stream entries the driver (a long-lived run: its readers) took."""
    stages: tuple[StageStatus, ...]
    kind: str = "driven"
    """``"driven"``: a driver runs it (``run``, ``iterate``, ``start``, ``arun``);
    ``"long-lived"``: producers submit to it (``RedisBackend.open``/``submit``)."""
    state: str = "running"
    """What the run is now, one of `RUN_STATES`: ``running``, ``left``, ``complete``
    (driven), ``open``, ``closed``, ``drained`` (long-lived)."""
    max_bytes: int | None = None
    """The run's byte budget (``max_bytes=``, split between its streams); None: none."""

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return asdict(self)


def run_status(client: Any, info: RunInfo) -> RunStatus:
    """Everything ``conveyor status`` shows about one run, read now."""
    keys, n = info.keys, len(info.stages)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.counters)
    pipe.hmget(keys.meta, "source_done", LEFT)
    pipe.exists(keys.driver)
    backlog = Scripts(client).backlog
    for i in range(n):
        backlog(keys=[keys.stream(i)], args=[WORKER_GROUP, "1"], client=pipe)
        pipe.xpending(keys.stream(i), WORKER_GROUP)
        pipe.xinfo_consumers(keys.stream(i), WORKER_GROUP)
    replies = pipe.execute(raise_on_error=False)
    done, left = replies[1] if isinstance(replies[1], list) else (None, None)
    driven = replies[2] == 1  # a driver holds the run's lease
    state = RunState.read(replies[0], done == b"1", n)
    age = max(1e-9, time.time() - info.created)
    stages = []
    for i, name in enumerate(info.stages):
        length, pending, consumers = replies[3 + 3 * i : 6 + 3 * i]
        counts = state.stages[i]
        stages.append(
            StageStatus(
                name=name,
                stream_length=length if isinstance(length, int) else 0,
                pending=pending["pending"] if isinstance(pending, dict) else 0,
                limit=info.limits[i],
                acked=counts.acked,
                out=counts.out,
                rate=counts.acked / age,
                redelivered=counts.redelivered,
                dead_letters=counts.dead,
                consumers=tuple(
                    ConsumerStatus(
                        name=text(c["name"]), pending=c["pending"], idle_seconds=c["idle"] / 1000
                    )
                    for c in (consumers if isinstance(consumers, list) else [])
                ),
            )
        )
    return RunStatus(
        run_id=info.run_id,
        age_seconds=age,
        fed=state.fed,
        source_done=state.source_done,
        left="" if left is None else text(left),
        complete=state.complete,
        delivered=state.delivered,
        stages=tuple(stages),
        kind="long-lived" if info.long_lived else "driven",
        state=_state_of(info, state, driven),
        max_bytes=info.max_bytes,
    )


def _state_of(info: RunInfo, state: RunState, driven: bool) -> str:
    """What a run is now (see `RUN_STATES`); ``driven``: a driver holds its lease."""
    if info.long_lived:
        if not state.source_done:
            return "open"
        return "drained" if state.complete else "closed"
    if state.complete:
        return "complete"
    return "running" if driven else "left"


def render(statuses: list[RunStatus]) -> str:
    """The runs as text tables (what a terminal shows)."""
    import io

    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    if not statuses:
        console.print("no live run of this pipeline")
    for status in statuses:
        table = Table(title=_title(status), title_justify="left")
        for column in ("stage", "stream", "pending", "limit", "in", "out", "in/s"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for column in ("re-run", "dead", "consumers (pending, idle)"):
            table.add_column(column, justify="left" if column.startswith("c") else "right")
        for s in status.stages:
            consumers = ", ".join(
                f"{c.name} ({c.pending}, {c.idle_seconds:.1f} s)" for c in s.consumers
            )
            table.add_row(
                s.name,
                f"{s.stream_length:,}",
                f"{s.pending:,}",
                f"{s.limit:,}",
                f"{s.acked:,}",
                f"{s.out:,}",
                f"{s.rate:,.0f}",
                f"{s.redelivered:,}",
                f"{s.dead_letters:,}",
                consumers or "none",
            )
        console.print(table)
    return out.getvalue()


def _title(status: RunStatus) -> str:
    """A run's line above its table: what it is now, and its counts."""
    age = f"{status.age_seconds:,.0f} s old"
    if status.max_bytes is not None:
        age += f", byte budget {format_bytes(status.max_bytes)}"
    taken = f"{status.delivered:,} outputs taken"
    if status.kind == "long-lived":
        return (
            f"run {status.run_id} (long-lived, {status.state}: {RUN_STATES[status.state]}): "
            f"{status.fed:,} items submitted, {taken}, {age}"
        )
    source = "done" if status.source_done else "stopped" if status.left else "feeding"
    # A run left by its driver says how ("stopped and left in Redis", ...).
    state = status.left if status.state == "left" and status.left else status.state
    return (
        f"run {status.run_id} ({state}): {status.fed:,} items fed (source {source}), {taken}, {age}"
    )


# ---------------------------------------------------------------------- live progress


class ProgressWatcher(Watcher):
    """Shows a driven run's progress from a thread of its own, as a local run's monitor does.

    Every tick it reads the run's counters and each stage's consumers through
    a connection of its own, and hands them, as `StageStats`, to a display of
    `conveyor.progress` (a live table on a terminal, log lines elsewhere).
    The driver never waits for it: a failed read is logged once and the next
    tick tries again.

    Args:
        url: the Redis URL.
        options: passed to `redis.Redis.from_url` (with short timeouts and
            no retries of its own: the next tick is the retry).
        info: the run's settings.
        stages: the pipeline's stages.
        display: where to draw; None to keep the timeline only (a report).
        started: the driver's start (a `time.perf_counter` value).
        tick: seconds between two reads.
    """

    def __init__(
        self,
        url: str,
        options: dict[str, Any],
        info: RunInfo,
        stages: Sequence[Stage],
        display: Display | None,
        started: float,
        tick: float = LIVE_REFRESH,
    ) -> None:
        names = [s.name for s in stages]
        super().__init__(Timeline(names, info.limits), display, tick, "conveyor-redis-progress")
        self._url = url
        self._options = options
        self._info = info
        self._stages = tuple(stages)
        self._started = started
        self._client: Any = None
        self._state = RunState.read({}, False, len(self._stages))
        self._consumers: list[int] | None = None
        self._recent = [RecentRate() for _ in self._stages]
        self._warned = False

    def start(self) -> ProgressWatcher:
        """Start the watcher's thread; return the watcher."""
        self._thread.start()
        return self

    def close(self, final: RunState | None, elapsed: float) -> list[StageStats]:
        """Stop the thread, draw the final state and return it.

        Args:
            final: the run's last counters, when the driver has them (a
                finished run's keys may be deleted already); None: read them
                once more, or keep the last ones read.
            elapsed: the run's wall time.
        """
        self._end_thread()
        stats: list[StageStats] = []
        try:
            if final is None:
                self._read()
            state = final if final is not None else self._state
            stats = stage_stats(self._stages, state, self._info.limits, elapsed, self._consumers)
            self.timeline.add(elapsed, stats, force=True)
            if self._display is not None:
                self._display.close(stats, elapsed)
        except Exception:  # the run's own outcome matters more than its last picture
            log.exception("conveyor: the final progress display failed")
        finally:
            if self._client is not None:
                self._client.close()
        return stats

    def _sample(self) -> tuple[list[StageStats], float] | None:
        now = perf_counter()
        if not self._read():
            return None
        elapsed = now - self._started
        limits, rates = self._info.limits, self._rates(now)
        stats = stage_stats(self._stages, self._state, limits, elapsed, self._consumers, rates)
        return stats, elapsed

    def _read(self) -> bool:
        """Read the counters and consumers now; False when they could not be read."""
        keys, n = self._info.keys, len(self._stages)
        try:
            if self._client is None:
                self._client = self._connect()
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(keys.meta)
            pipe.hgetall(keys.counters)
            for i in range(n):
                pipe.xinfo_consumers(keys.stream(i), WORKER_GROUP)
            replies = pipe.execute(raise_on_error=False)
            for reply in replies[:2]:
                if isinstance(reply, Exception):
                    raise reply
        except Exception as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "conveyor: progress of run %r: could not read Redis (%s: %s); "
                    "trying again every %.2g s, without saying so again",
                    keys.run,
                    type(exc).__name__,
                    exc,
                    self._tick,
                )
            return False
        if not replies[0]:  # finished and deleted, or cancelled: the last picture stays
            return False
        self._state = RunState.read(replies[1], False, n)
        self._consumers = [len(c) if isinstance(c, list) else 0 for c in replies[2:]]
        return True

    def _connect(self) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # Short timeouts and no retries: closing the watcher joins its thread,
        # so a read must never hold it up for long; the next tick retries.
        options = {
            **self._options,
            "socket_timeout": WATCH_TIMEOUT,
            "socket_connect_timeout": WATCH_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
        }
        return connect(self._url, **options)

    def _rates(self, now: float) -> list[float] | None:
        """Each stage's inputs per second over the last few seconds of reads (as local runs)."""
        rates = [
            recent.rate(now, s.acked)
            for recent, s in zip(self._recent, self._state.stages, strict=True)
        ]
        return None if None in rates else [r for r in rates if r is not None]
