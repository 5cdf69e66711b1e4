"""The driver side: `RedisBackend` runs a pipeline through Redis Streams.

``pipeline.run(backend=RedisBackend(url))`` creates a run (its streams,
groups, settings and counters), registers it where the pipeline's workers
look, feeds the source into the first stream from a thread (waiting while
the stream is over its limit), reads the final stream, reorders it when the
last stage is ordered, and returns when the counters say every item went
through. Running again with the same ``run_id`` resumes a run that a driver
left (killed, or stopped on dead letters): the source is skipped past the
items already fed, and only the outputs not yet delivered come back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from time import monotonic, perf_counter, sleep
from typing import TYPE_CHECKING, Any, NamedTuple, Unpack

from ..backends import Backend, RunOptions, StopSignal, admit, check_run_options
from ..channel import check_max_bytes
from ..engine import ABORT_WAIT, join_timeout
from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    ConfigurationTypeError,
    DeadLettersError,
    RunStateLost,
    SerializationError,
    ShutDown,
)
from ..metrics import RunResult, StageStats, Timeline
from ..ordering import TOMBSTONE, Leaf, Tracker
from ..policy import add_note
from ..remote import ExceptionRecord, rebuild
from ..stage import Failure, Stage
from ..validate import check_bool, check_choice, check_int, check_name, check_seconds
from .budget import fitting, record_cost, wait_for_room
from .codec import (
    CODECS,
    Codec,
    check_secret_key,
    decode_failure,
    get_codec,
    key_check,
    load_path,
    secret_from,
)
from .packing import Packed, PackedItem, is_packed, pack_entries, stream_limit, stream_pack, unpack
from .state import (
    LEFT,
    RunInfo,
    RunState,
    clear_refusal,
    mark_left,
    read_state,
    stage_stats,
    text,
)
from .streams import (
    DRIVER_GROUP,
    MAX_POLL_SECONDS,
    WORKER_GROUP,
    Keys,
    Retrier,
    Scripts,
    check_redis_options,
    check_url,
    connect,
    consumer_name,
    pipeline_id,
    redact,
)

if TYPE_CHECKING:
    from pathlib import Path

    from ..engine import Run
    from .status import ProgressWatcher

__all__ = ["LiveRun", "RedisBackend", "RedisRunResult"]

log = logging.getLogger("conveyor.redis")

POLL_SECONDS = 0.2
"""How long the driver blocks on the final stream before it checks the counters."""
FEED_CHUNK = 100
"""Items added to the first stream per script call while the first stage's batch size
is unknown (its first hand-off records it), and whatever the first stream's limit."""
FEED_CHUNK_MAX = 256
"""Most items added to the first stream per script call, once packs are known: a
quarter of the first stream's limit at most (at least `FEED_CHUNK`). The feeder's
chunk sets how much the first stage's workers find in one read, and so how many items
every stage hands on per script call: with 100 items (a pack of 64 and one of 36) the
per-call work of every read and hand-off dominated redis-server's CPU per item; 256
(four full packs) cut it by about 40% (see docs/distributed.md)."""
FIRST_TAKE_SECONDS = 0.3
"""How long the feeder waits, at a run's start, for the first stage's first hand-off
to say how many items a pack may carry (workers find a new run within 0.1 s)."""
QUIET_SECONDS = 10.0
"""The driver logs a warning when its run's counters stay still this long."""
DRIVER_LEASE_SECONDS = 5.0
"""How long a driver's hold on its run lasts unless renewed (three times as often): a
killed driver's run can be resumed after that long."""
LOCAL_ABORT_GRACE = 0.2
"""After an aborted run's `ABORT_WAIT`, how long its local workers get once aborted (process
children terminated) before the threads stuck in user code are left behind."""


@dataclass
class RedisRunResult(RunResult):
    """A distributed run's result, with what only the Redis backend knows."""

    run_id: str = ""
    """The run's id."""
    redelivered: dict[str, int] = field(default_factory=dict)
    """Per stage: deliveries beyond the first of the entries acknowledged (re-executions)."""
    stale: dict[str, int] = field(default_factory=dict)
    """Per stage: results dropped because another worker had taken the entry over."""
    dead_letters: dict[str, int] = field(default_factory=dict)
    """Per stage: entries left in dead letters."""

    def as_dict(self) -> dict[str, Any]:
        """Plain data, as for any run, plus the run id and per-stage re-executions,
        stale results and dead letters (under ``"redis"``)."""
        data = super().as_dict()
        data["redis"] = {
            "run_id": self.run_id,
            "redelivered": self.redelivered,
            "stale": self.stale,
            "dead_letters": self.dead_letters,
        }
        return data

    def failed_counts(self) -> dict[str, int]:
        """As for any run, but an item's error does not end a run on Redis: the entries
        failed on are skipped (``on_error="skip"``) or dead-lettered."""
        total = sum(s.failed for s in self.stats)
        dead = min(total, sum(self.dead_letters.values()))
        return {"skipped": total - dead, "dead-lettered": dead}

    def report(self, width: int = 130) -> str:
        """The per-stage table, and a line on re-executions when there were any."""
        text = super().report(width)
        again = sum(self.redelivered.values())
        if again:
            where = ", ".join(f"{k}: {v}" for k, v in self.redelivered.items() if v)
            text = text.rstrip("\n") + f"\nre-executions after a worker died or failed: {where}\n"
        return text


class RedisBackend(Backend):
    """Runs pipelines on Redis Streams, with workers anywhere (``conveyor worker``).

    Args:
        url: ``redis://[[user]:password@]host:port/db``, or ``rediss://`` for
            TLS (``?ssl_ca_certs=/path/ca.pem`` to trust a private CA).
        run_id: the run's id (default: a new random one). Running again with
            the id of an unfinished run resumes it.
        namespace: prefix of every key (the workers must use the same).
        codec: ``"msgpack"`` (default) or ``"json"`` for plain data;
            ``"pickle"`` for any object, with ``secret_key``.
        secret_key: the pickle codec's HMAC key, shared with the workers
            (default: the ``CONVEYOR_SECRET_KEY`` environment variable).
        batch_size: most entries a worker reads at once (XREADGROUP COUNT).
        visibility_timeout: seconds an entry may stay with one worker before
            others take it over (a dead or stuck worker's entries).
        max_deliveries: deliveries after which an entry moves to its stage's
            dead letters, with its last error.
        limit: backlog limit of every stream, >= 1 (default: each stage's
            ``capacity``, and for a batch stage at least its size);
            producers and stages wait while their output is over it.
        reorder_window: for an ordered last stage, how many source items may
            be in flight past the oldest unfinished one (default: 8 times the
            first stage's capacity).
        on_dead_letters: ``"raise"`` (default): raise `DeadLettersError` when
            only dead letters are left; ``"wait"``: wait for a replay.
        keep: keep the run's keys after it finished (for inspection).
        unavailable_timeout: seconds Redis may stay unreachable (at the start, or
            lost during a run) before the run, `cancel` or `open` give up with
            `BackendUnavailable`, naming the URL and the cause (None: wait forever).
        local_workers: also serve the pipeline from threads of this process
            (a single-machine run through Redis; handy for trying it out).
        redis_options: passed to `redis.Redis.from_url`.

    Every argument is checked here, before anything connects: a value of the
    wrong type raises `ConfigurationTypeError`, one out of range (``limit=0``,
    ``batch_size=-1``, a NaN or infinite timeout) `ConfigurationError`,
    naming it. ``limit`` below the size of a ``batch()`` stage is refused
    when the pipeline is run (see `check`).

    Example:
        >>> result = pipeline.run(backend=RedisBackend("redis://localhost:6379/0"))
        ... # doctest: +SKIP
    """

    bounds_bytes = True
    drains = True

    def __init__(
        self,
        url: str,
        *,
        run_id: str | None = None,
        namespace: str = "conveyor",
        codec: str = "msgpack",
        secret_key: bytes | str | None = None,
        batch_size: int = 100,
        visibility_timeout: float = 30.0,
        max_deliveries: int = 5,
        limit: int | None = None,
        reorder_window: int | None = None,
        on_dead_letters: str = "raise",
        keep: bool = False,
        unavailable_timeout: float | None = 10.0,
        local_workers: bool = False,
        redis_options: dict[str, Any] | None = None,
    ) -> None:
        _check_options(locals())
        self.url = url
        self.run_id = run_id
        self.namespace = namespace
        self.secret_key = secret_from(secret_key)
        self.codec: Codec = get_codec(codec, self.secret_key)
        self.batch_size = batch_size
        self.visibility_timeout = visibility_timeout
        self.max_deliveries = max_deliveries
        self.limit = limit
        self.reorder_window = reorder_window
        self.on_dead_letters = on_dead_letters
        self.keep = keep
        self.unavailable_timeout = unavailable_timeout
        self.local_workers = local_workers
        self.redis_options = dict(redis_options or {})
        self._client: Any = None

    def __repr__(self) -> str:
        return f"<RedisBackend {redact(self.url)} namespace={self.namespace!r}>"

    def check(self, pipeline: Any) -> None:
        """Refuse a pipeline this backend's options cannot run, before connecting.

        Raises:
            ConfigurationError: ``limit`` is below the size of a ``batch()``
                stage without ``interval``: its input stream would fill up with
                the entries the stage holds while it waits for a full group,
                and the run would stop moving. Or a stage's ``timeout`` is
                longer than ``visibility_timeout``: its entries would be taken over
                while their calls still run, again on every delivery, until
                they are dead letters.
        """
        for stage in _stages(pipeline):
            if stage.timeout is not None and stage.timeout > self.visibility_timeout:
                raise ConfigurationError(
                    f"stage {stage.name!r} 'timeout' ({stage.timeout} s) is longer than "
                    f"RedisBackend 'visibility_timeout' ({self.visibility_timeout} s): an "
                    f"entry is taken over by another worker after the visibility timeout, "
                    f"while its call may still run. Give visibility_timeout >= timeout"
                )
        if self.limit is None:
            return
        for stage in _stages(pipeline):
            if stage.kind == "batch" and stage.interval is None and self.limit < stage.batch_size:
                raise ConfigurationError(
                    f"RedisBackend 'limit' ({self.limit}) is below the size of batch stage "
                    f"{stage.name!r} ({stage.batch_size}): the stage holds its input entries "
                    f"until a group is full, and a stream over its limit stops its producers. "
                    f"Give limit >= {stage.batch_size}, or the batch stage an interval"
                )

    # ------------------------------------------------------------------ plumbing

    def client(self) -> Any:
        """The redis-py client (connected on first use, with retries)."""
        if self._client is None:
            retry = Retrier("connecting", self.unavailable_timeout, url=self.url)
            self._client = retry(
                connect, self.url, timeout=self.unavailable_timeout, **self.redis_options
            )
        return self._client

    def close(self) -> None:
        """Close the connections to Redis (a later call reconnects)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> RedisBackend:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def keys(self, pipeline: Any, run_id: str) -> Keys:
        """The key names of ``pipeline``'s run ``run_id``."""
        return Keys(self.namespace, pipeline_id(_stages(pipeline)), run_id)

    def _info(
        self,
        keys: Keys,
        stages: tuple[Stage, ...],
        ordered: bool,
        paths: bool = True,
        max_bytes: int | None = None,
    ) -> RunInfo:
        # A batch stage holds its input entries until a group is full: a default
        # limit below its size would stop its producers for good (see `check`).
        limits = [self.limit or max(s.capacity, s.batch_size) for s in stages]
        limits.append(self.limit or max(limits[-1], self.batch_size))
        return RunInfo(
            keys=keys,
            stages=tuple(s.name for s in stages),
            codec=self.codec.name,
            key_check=key_check(self.secret_key if self.codec.name == "pickle" else None),
            ordered=ordered,
            paths=paths,
            visibility_ms=int(self.visibility_timeout * 1000),
            max_deliveries=self.max_deliveries,
            limits=tuple(limits),
            batch=self.batch_size,
            tombstones_to=_tombstone_streams(stages) if paths else (),
            max_bytes=max_bytes,
        )

    def _create_or_attach(self, keys: Keys, info: RunInfo, retry: Retrier) -> tuple[RunInfo, bool]:
        """Create the run's keys, or read back an existing run's settings; register it."""
        client = self.client()
        meta = retry(client.hgetall, keys.meta)
        if meta:
            attached = RunInfo.from_meta(keys, meta)
            if attached.stages != info.stages:
                raise ConfigurationError(
                    f"run {keys.run!r} exists with other stages {attached.stages}"
                )
            if attached.codec != self.codec.name:
                raise ConfigurationError(
                    f"run {keys.run!r} uses the {attached.codec} codec, not {self.codec.name}"
                )
            retry(client.sadd, keys.runs, keys.run)
            retry(client.hdel, keys.meta, LEFT)  # resumed: no longer left
            return attached, meta.get(b"source_done") == b"1"
        retry(_create, client, keys, info)
        return info, False

    # ------------------------------------------------------------------ running

    def run(
        self, pipeline: Any, *, stop: threading.Event | None = None, **options: Unpack[RunOptions]
    ) -> RunResult:
        """Run ``pipeline`` to completion through Redis (what ``pipeline.run(backend=...)`` does).

        The `RunOptions`, each optional: ``collect`` keeps the last stage's
        outputs in ``result.outputs``. ``progress`` shows each stage's
        progress while the run goes on, read from Redis by a thread of this
        process: a live table on stderr when it is a terminal; elsewhere, a
        line every few seconds on the ``conveyor`` logger (INFO), as for a run
        in one process (``failed`` counts dead letters too). ``report`` writes
        a self-contained HTML report of the run there at the end (also when it
        fails), as for a run in one process; its charts come from the same
        reads of the counters. ``max_bytes`` is a budget in bytes for what the
        run's streams hold: each of the N stages' input streams and the final
        stream gets ``max_bytes // (N + 1)`` of the entries' bytes (see
        docs/distributed.md); the workers read it from the run's settings, and
        a resumed run keeps the budget it was created with.

        Args:
            pipeline: the pipeline; its workers run ``conveyor worker``.
            stop: set from another thread to stop the run (it stays in Redis).
            **options: the `RunOptions` above.

        Returns:
            A `RedisRunResult`.

        Raises:
            DeadLettersError: only dead letters are left (``on_dead_letters="raise"``).
            BackendUnavailable: Redis stayed unreachable too long.
            BackendError: Redis refused the credentials.
        """
        from ..report import check_report_path

        check_run_options(options, "RedisBackend.run()")
        pipeline = admit(pipeline, "RedisBackend.run()", self)
        report = options.get("report")
        report_path = None if report is None else check_report_path(report, "run()")
        max_bytes = check_max_bytes(options.get("max_bytes"), "RedisBackend.run()")
        run = self._new_run(pipeline, max_bytes)
        run.halt = stop
        outputs: list[Any] | None = [] if options.get("collect", False) else None
        if isinstance(stop, StopSignal):  # a background run's handle: see BackgroundRun
            stop.publish(lambda: run.result(None if outputs is None else list(outputs), live=True))
            stop.on_drain(run.drain)
        watcher: ProgressWatcher | None = None
        result: RedisRunResult | None = None
        error: BaseException | None = None
        try:
            progress = options.get("progress", False)
            if progress or report_path is not None:
                watcher = self._watch(pipeline, run, progress)
            for chunk in run.outputs():
                if outputs is not None:
                    outputs.extend(chunk)
            result = run.result(outputs)
        except DeadLettersError as exc:
            # The outputs collected so far were acknowledged: a resumed run does not
            # yield them again, so they go to the caller with the error.
            error = exc
            try:
                exc.result = result = run.result(outputs)
            except Exception as lost:  # Redis gone since: the dead letters still say why
                add_note(exc, f"conveyor: the run's result could not be read: {lost}")
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finish(run, watcher, report_path, result, error)
        return result

    def _new_run(self, pipeline: Any, max_bytes: int | None = None) -> _DriverRun:
        """Create (or resume) the run of ``pipeline`` in Redis, as its driver; start the
        local workers, if any."""
        stages = _stages(pipeline)
        run_id = self.run_id or uuid.uuid4().hex[:12]
        keys = self.keys(pipeline, run_id)
        last = stages[-1]
        ordered = last.ordered and last.kind != "each"
        info = self._info(keys, stages, ordered, max_bytes=max_bytes)
        run = _DriverRun(self, pipeline, keys, info)
        try:
            run.local_worker = self._start_local_workers(pipeline)
        except BaseException:
            run.lease.release()
            raise
        return run

    def _finish(
        self,
        run: _DriverRun,
        watcher: ProgressWatcher | None,
        report: Path | None = None,
        result: RedisRunResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        """End what the driver started: the watching (its last picture, the report),
        local workers, the connections."""
        try:
            if watcher is not None:
                final = run.state if run.state is not None and run.state.complete else None
                elapsed = (run.finished or perf_counter()) - run.started
                stats = watcher.close(final, elapsed)
                if report is not None:
                    _write_report(report, result, stats, watcher.timeline, elapsed, error)
        finally:
            try:
                if run.local_worker is not None:
                    self._stop_local_workers(run, run.local_worker, error)
            finally:
                run.lease.release()  # a run left in Redis may be resumed at once
                self.close()

    def _stop_local_workers(
        self, run: _DriverRun, worker: Any, error: BaseException | None
    ) -> None:
        """Stop the local workers: gracefully after a complete run; within the bound of an
        aborted one otherwise (the run stays in Redis: entries in hand are taken over)."""
        worker.stop()
        try:
            # As long as a local run's end waits; then what is stuck is left, as there.
            timeout = (
                join_timeout(worker.stage_runs)
                if error is None and not run.halted
                else run.abort_left()
            )
            worker.join(timeout, grace=LOCAL_ABORT_GRACE)
        except BaseException as exc:
            if error is None or not isinstance(exc, Exception):
                raise
            if exc is not error:
                # The run ends with its own error (a Ctrl-C...): a local worker's, such as
                # Redis lost while it handed a batch on, must not take its place.
                add_note(error, f"conveyor: a local worker failed too: {type(exc).__name__}: {exc}")
        finally:
            if error is not None:
                for text in worker.left_behind:
                    add_note(error, f"conveyor: a local worker: {text}")

    def _watch(self, pipeline: Any, run: _DriverRun, progress: bool) -> ProgressWatcher:
        """Start watching ``run`` (read through a connection of its own): showing its
        progress if asked, sampling it for a report in any case."""
        from ..progress import new_display
        from .status import ProgressWatcher

        display = new_display(pipeline.source, outcomes=True) if progress else None
        return ProgressWatcher(
            self.url, self.redis_options, run.info, run.stages, display, run.started
        ).start()

    def _start_local_workers(self, pipeline: Any) -> Any:
        if not self.local_workers:
            return None
        from .worker import Worker

        return Worker(
            pipeline,
            self.url,
            namespace=self.namespace,
            secret_key=self.secret_key,
            unavailable_timeout=self.unavailable_timeout,
            redis_options=self.redis_options,
        ).start()

    def iterate(
        self, pipeline: Any, *, progress: bool = False, max_bytes: int | str | None = None
    ) -> Generator[Any, None, None]:
        """Run ``pipeline`` and yield the last stage's outputs as they come.

        Args:
            pipeline: the pipeline; its workers run ``conveyor worker`` (or
                threads of this process, with ``local_workers``).
            progress: as for `run`.
            max_bytes: as for `run`.

        Outputs reach the caller at least once: leaving the loop early (or
        dying) leaves the run in Redis, to be resumed with the same
        ``run_id`` or deleted with `cancel`; a resumed run yields again the
        outputs of the last chunk read, from the first one this loop had not
        come back after (at most 1000 outputs seen twice).

        Raises:
            ConfigurationError: at the call, not at the first output: as for `run`.
        """
        check_bool(progress, "progress", "RedisBackend.iterate()")
        max_bytes = check_max_bytes(max_bytes, "RedisBackend.iterate()")
        return self._iterate(admit(pipeline, "RedisBackend.iterate()", self), progress, max_bytes)

    def _iterate(
        self, pipeline: Any, progress: bool, max_bytes: int | None
    ) -> Generator[Any, None, None]:
        run = self._new_run(pipeline, max_bytes)
        watcher = self._watch(pipeline, run, True) if progress else None
        outputs = run.outputs()
        error: BaseException | None = None
        try:
            for chunk in outputs:
                yield from chunk
        except BaseException as exc:
            error = exc
            raise
        finally:
            # Stop the feeder before the workers and the connections go.
            outputs.close()
            self._finish(run, watcher, error=error)

    def cancel(self, pipeline: Any, run_id: str) -> bool:
        """Delete the run ``run_id`` of ``pipeline`` from Redis (its items, outputs and
        dead letters included); workers stop serving it. Returns whether it existed."""
        check_name(run_id, "run_id", "RedisBackend.cancel()")
        keys = self.keys(pipeline, run_id)
        retry = Retrier("cancel", self.unavailable_timeout, url=self.url)
        return bool(retry(_delete_run, self.client(), keys, len(_stages(pipeline))))

    # ------------------------------------------------------------------ long-lived runs

    def open(self, pipeline: Any, run_id: str = "live") -> LiveRun:
        """Create (or attach to) a long-lived run that items are submitted to.

        Workers serve it like any run; producers anywhere add items with
        `LiveRun.submit` (or `RedisBackend.submit`), and the outputs are read
        with `LiveRun.results`. Its outputs are not ordered. `LiveRun.close`
        closes the run for everyone; attaching to a closed run gives a handle
        that reads what is left (its ``submit`` raises `ShutDown`).

        Raises:
            ConfigurationError: the backend has ``local_workers``, which serve
                the runs it drives (run, iterate, start, arun), not these.
        """
        if self.local_workers:
            raise ConfigurationError(
                "RedisBackend 'local_workers' serves the runs this backend drives (run, "
                "iterate, start, arun); a long-lived run of open() or submit() is served by "
                "`conveyor worker` processes: start them, and use a backend without "
                "local_workers=True here"
            )
        check_name(run_id, "run_id", "RedisBackend.open()")
        stages = _stages(pipeline)
        keys = self.keys(pipeline, run_id)
        retry = Retrier("open", self.unavailable_timeout, url=self.url)
        info, _ = self._create_or_attach(keys, self._info(keys, stages, False, False), retry)
        return LiveRun(self, keys, info, retry)

    def submit(self, pipeline: Any, items: Iterable[Any], run_id: str = "live") -> int:
        """Add ``items`` to the long-lived run ``run_id`` (created if needed); return how many.

        Raises:
            ShutDown: the run is closed (`LiveRun.close`).
        """
        return self.open(pipeline, run_id).submit(items)


class LiveRun:
    """A handle on a long-lived run: submit items, read results, close the run when no
    more will come.

    The run lives in Redis, not in the handle: any number of handles, in any
    processes, submit to it and read from it. `close` closes the run itself, for
    every handle: after it, every `submit` raises `ShutDown`, while `results` gives
    what is still on its way; once every output is taken the run is drained
    (``conveyor status`` says open, closed or drained) and stays in Redis, with its
    counters and dead letters, until `RedisBackend.cancel` (``conveyor cancel``)
    deletes it.
    """

    def __init__(self, backend: RedisBackend, keys: Keys, info: RunInfo, retry: Retrier) -> None:
        self._backend = backend
        self.keys = keys
        self.info = info
        self._retry = retry
        self._scripts = Scripts(backend.client())
        self._codec = backend.codec
        self._closed = False

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.keys.run

    def submit(self, items: Iterable[Any]) -> int:
        """Add items to the first stream, waiting while it is over its limit; return the count.

        Raises:
            ShutDown: the run is closed (by this handle or any other, in any process);
                the items before the first refused chunk were added (``FEED_CHUNK``
                at a time).
        """
        if not isinstance(items, Iterable):
            raise ConfigurationTypeError(
                f"LiveRun.submit() 'items' must be an iterable of items, got {type(items).__name__}"
            )
        if self._closed:
            raise ShutDown(f"submit() to run {self.run_id!r}, which this handle closed")
        n = 0
        iterator = iter(items)
        while True:
            chunk = list(islice(iterator, FEED_CHUNK))
            if not chunk:
                return n
            _wait_for_room(self._scripts, self.keys.stream(0), self.info.limits[0])
            args: list[Any] = ["fed", "", ""]
            for value in chunk:
                fields = self._codec.encode(value)
                args += [1, len(fields), *fields]
            if self._feed(args) == -3:
                self._closed = True
                raise ShutDown(
                    f"submit() to run {self.run_id!r}, which is closed (close() was called "
                    f"on a handle of it): {n} items of this call were added before; a new "
                    f"run_id starts another run"
                )
            n += len(chunk)

    def results(self, count: int = 1000, timeout: float = 1.0) -> list[Any]:
        """Up to ``count`` outputs of the last stage, waiting up to ``timeout`` s for the first."""
        check_int(count, "count", "LiveRun.results()", 1)
        check_seconds(timeout, "timeout", "LiveRun.results()", optional=False, zero=True)
        client = self._backend.client()
        final = self.keys.stream(len(self.info.stages))
        reply = self._retry(
            client.xreadgroup,
            DRIVER_GROUP,
            "driver",
            {final: ">"},
            count=count,
            block=max(1, int(timeout * 1000)),
        )
        values: list[Any] = []
        ids: list[tuple[bytes, int]] = []
        for _, entries in reply or ():
            for entry_id, fields in entries:
                ids.append((entry_id, 1))
                if b"t" not in fields:
                    values.append(self._codec.decode(fields))
        if ids:
            _ack(self._scripts, self._retry, self.keys, final, _Taken([], ids, "", [], None, []))
        return values

    def close(self) -> None:
        """Close the run: no more items, from this handle or any other (their `submit`
        raises `ShutDown`). What was submitted still goes through and `results` gives
        it; the run is drained once every output is taken (`drained`). Closing a
        closed run does nothing. The run stays in Redis until cancelled."""
        self._closed = True
        self._feed(["", "", "1"])

    def drained(self) -> bool:
        """Whether the run is closed and every output of it was taken: nothing more will
        come (dead letters, if any, wait for a replay or purge: not drained)."""
        return self.state().complete

    def _feed(self, args: list[Any]) -> Any:
        """One call of the FEED script (see `streams.FEED`); its reply."""
        keys = self.keys
        reply = self._retry(
            self._scripts.feed, keys=[keys.stream(0), keys.counters, keys.meta], args=args
        )
        if reply == -1:
            raise BackendError(f"run {self.run_id!r} no longer exists")
        return reply

    def state(self) -> RunState:
        """The run's counters now."""
        client, n = self._backend.client(), len(self.info.stages)
        return read_state(client, self._retry, self.keys, n)[0]


# ---------------------------------------------------------------------- one driven run


class _Taken(NamedTuple):
    """One read of the final stream, as the driver hands it over."""

    values: list[Any]
    """Outputs released to the caller (in order, for an ordered run)."""
    ids: list[tuple[bytes, int]]
    """Entries to acknowledge once the caller has taken ``values``, with the items each
    carried (a pack is acknowledged once every item of it is the caller's)."""
    released: int | str
    """Ordered runs: the next root to release after these ('' if unordered)."""
    completed: list[int]
    """Unordered runs: the roots these entries completed (marked done with the ack)."""
    last: bytes | None
    """Id of the last entry read (None: the read returned none)."""
    leaves: list[bytes]
    """Ids of the leaves done with (the tracker forgets them once acknowledged)."""
    bitmap: tuple[int, bytes] = (0, b"")
    """Unordered runs: the ``done`` bitmap's bytes that hold ``completed``, and where."""


class _DriverLease:
    """This process's hold on a run as its one driver (`Keys.driver`).

    Two drivers of one run would both feed the source and share the final
    stream's consumer: each would lose outputs to the other. A driver takes
    the lease before it touches the run, and renews it from a thread of its
    own (a caller slow to come back for outputs keeps it); a killed driver's
    lease expires after `DRIVER_LEASE_SECONDS`, so a new driver waits up to
    that long for it before it says who holds it.
    """

    def __init__(self, client: Any, scripts: Scripts, retry: Retrier, keys: Keys) -> None:
        self._client = client
        self._script = scripts.lease
        self._retry = retry
        self._keys = keys
        self._holder = consumer_name("driver")
        self._ttl = str(int(DRIVER_LEASE_SECONDS * 1000))
        self._released = threading.Event()
        self._renewer: threading.Thread | None = None

    def _call(self, ttl: str) -> int:
        return int(self._script(keys=[self._keys.driver], args=[self._holder, ttl]))

    def take(self) -> None:
        """Take the lease, waiting out a dead driver's; `BackendError` if a live one holds it."""
        deadline = monotonic() + DRIVER_LEASE_SECONDS + 0.5
        while self._retry(self._call, self._ttl) == 0:
            if monotonic() >= deadline:
                other = self._retry(self._client.get, self._keys.driver)
                holder = other.decode() if isinstance(other, bytes) else other
                raise BackendError(
                    f"run {self._keys.run!r} has another driver ({holder}): one driver per "
                    f"run; wait for that one to end, or give this run another run_id"
                )
            sleep(0.1)  # bounded: the holder's lease renewals or expiry are what we wait for
        self._renewer = threading.Thread(
            target=self._renew, name="conveyor-redis-driver-lease", daemon=True
        )
        self._renewer.start()

    def _renew(self) -> None:
        while not self._released.wait(DRIVER_LEASE_SECONDS / 3):
            # Redis away: the driver's own calls retry and say so; the lease is renewed
            # at the next turn, well within its life.
            with contextlib.suppress(Exception):
                self._call(self._ttl)

    def release(self) -> None:
        """Let go of the lease (idempotent): the run may be driven again at once."""
        self._released.set()
        if self._renewer is not None:
            self._renewer.join(1.0)  # a renewal stuck on an unanswering Redis is left
        with contextlib.suppress(Exception):  # Redis away: the lease expires by itself
            self._call("0")


class _DriverRun:
    """One run driven from this process: the feeder thread and the final stream's reader."""

    def __init__(self, backend: RedisBackend, pipeline: Any, keys: Keys, info: RunInfo) -> None:
        self.backend = backend
        self.pipeline = pipeline
        self.stages = _stages(pipeline)
        self.keys = keys
        self.stopped = threading.Event()
        self.retry = Retrier("driver", backend.unavailable_timeout, self.stopped, backend.url)
        self.client = backend.client()
        self.scripts = Scripts(self.client)
        self.codec = backend.codec
        self.lease = _DriverLease(self.client, self.scripts, self.retry, keys)
        self.lease.take()  # before anything of the run is touched
        try:
            self.info, self.source_done = backend._create_or_attach(keys, info, self.retry)
        except BaseException:
            self.lease.release()
            raise
        self.n = len(self.stages)
        self.final = keys.stream(self.n)
        self.started = perf_counter()
        self.finished: float | None = None
        self.items_out = 0
        self.state: RunState | None = None
        """The counters of the run once complete; None while it goes on, or when it
        ended early (stopped, failed, left)."""
        self._seen: RunState | None = None  # the counters `_watch` read last
        self._last_read: RunState | None = None  # the counters read last (`_read_state`)
        self._failures: list[Failure] = []
        self._failures_read = False  # `_read_failures` has read the run's record
        self._consumers: list[int] | None = None  # each group's, at the end (`_read_consumers`)
        self._moved = perf_counter()
        self._warned = False
        self._feeder: threading.Thread | None = None
        self._puller: Run | None = None  # the feeder's local run: it pulls the source
        self._ending = perf_counter()  # when the run began to end, set by outputs()
        self._feed_error: BaseException | None = None
        self._released = threading.Condition()
        self.tracker: Tracker | None = None
        self._parts: dict[bytes, list[int]] = {}
        self._counted_at = 0.0  # when the counters were read last, and `fed` then
        self._fed_seen = 0
        """Packs read from the final stream: [items not the caller's yet, items]."""
        self.halt: threading.Event | None = None
        """Set from another thread to stop the run (it stays in Redis, resumable)."""
        self.halted = False
        self._drain_asked = False
        """`drain` was called: the source ends where the feeder is (the result says stopped)."""
        self.local_worker: Any = None
        """The backend's ``local_workers``, if any: their failure ends the run."""
        window = backend.reorder_window or 8 * self.stages[0].capacity
        self.window = max(window, 2 * self.info.batch)
        self.reordering = tuple(i for i in self.info.tombstones_to if i < self.n)
        """Batch stages: they reorder their input (see `_window_full`)."""

    # ------------------------------------------------------------------ feeding

    def _start_feeder(self, already_fed: int) -> None:
        if self.source_done:
            return
        from ..engine import Run

        # The caller's thread and the feeder each need a connection. Made now, before
        # the source is pulled: a Ctrl-C lands in the caller's thread wherever it is,
        # and one that lands while redis-py connects leaves that socket open for good.
        self.retry(_connect_ahead, self.client, 2)

        # Made here, not in the feeder thread, so that an abort always finds it; it waits
        # less than the driver waits for the feeder, which then sees what it left behind.
        # Resuming, it skips the items that reached Redis already.
        self._puller = Run(
            self.pipeline.source,
            [],
            output_capacity=_feed_chunk(self.info),
            abort_wait=ABORT_WAIT / 2,
            skip=already_fed,
            # Under a byte budget, what the feeder has pulled (and the chunk it encodes)
            # is half a stream's share at most: the driver holds about one share.
            max_bytes=None if self.info.share is None else max(1, self.info.share // 2),
        )
        if self._drain_asked:  # asked before the feeder started: it feeds nothing more
            self._puller.stop_source()
        self._feeder = threading.Thread(
            target=self._feed,
            args=(self._puller, already_fed),
            name="conveyor-redis-feeder",
            daemon=True,
        )
        self._feeder.start()

    def drain(self) -> None:
        """Stop pulling the source (as ``stop(drain=True)`` does on one machine): the
        feeder marks the source done at what it fed, and the run completes once what is
        inside has gone through."""
        self._drain_asked = True
        puller = self._puller
        if puller is not None:
            puller.stop_source()

    def _feed(self, pulled: Run, already_fed: int) -> None:
        """The feeder thread: the engine's own feeder pulls the source into a bounded
        channel (lazily: item by item from an iterator that may block between items, in
        growing chunks from a collection; async sources too), and this thread adds
        whatever is there to the first stream, at most `FEED_CHUNK` per script call: a
        slow source's items go in as they come, a fast one's in full chunks."""
        pulled.start()
        try:
            self._feed_from(pulled.outputs(_feed_chunk(self.info)), already_fed)
        except BaseException as exc:
            if not self.stopped.is_set():
                self._feed_error = exc
                self.stopped.set()
        finally:
            pulled.abort()
            pulled.join()

    def _feed_from(self, chunks: Iterator[list[Any]], fed: int) -> None:
        keys = self.keys
        stream = keys.stream(0)
        ordered = self.info.ordered
        most = 1  # the first stage's batch size, once its workers record it
        per_entry = 1  # items per entry in the last call
        length = 0
        rest: list[Any] = []  # what the last chunk pulled and did not add yet
        packs = stream_pack(self.info, 0) > 1  # the first stream's entries may be packs
        # How long to wait, at most, for the first stage's batch size (see below).
        first_take_by = monotonic() + FIRST_TAKE_SECONDS
        while not self.stopped.is_set():
            limit = stream_limit(self.info, 0, per_entry)
            if length >= limit:
                length = _wait_for_room(self.scripts, stream, limit, self.stopped, self.retry)
            if packs and most == 1 and length and monotonic() < first_take_by:
                # No batch size recorded yet (no hand-off of the first stage in this run:
                # its workers find a new run within REFRESH_SECONDS): rather than fill
                # the whole stream with one-item entries, which every stage would then
                # read and hand on one by one (over half of all the entries of a 50k-item
                # run were those), wait a little for the first hand-off to say how many
                # items a pack may carry.
                most = max(1, min(stream_pack(self.info, 0), self._first_take(first_take_by)))
            if ordered or self.reordering:
                self._wait_for_window(fed)
            chunk = rest or next(chunks, [])
            # While the first stage's batch size is unknown the items go one per entry:
            # no more of them than before chunks grew (the next reply may say it).
            size = FEED_CHUNK if most == 1 else len(chunk)
            chunk, rest = chunk[:size], chunk[size:]
            last = not chunk
            records = self._entries(chunk, fed, most)
            if records:
                per_entry = max(1, len(chunk) // len(records))
            del chunk  # the items encoded: only their encoded copies are held while waiting
            # After the last chunk, a call with no records marks the source done.
            while True:
                part = self._next_part(records)
                if part is None:
                    return  # stopped while the first stream had no room
                args: list[Any] = ["fed", fed, "" if part else "1"]
                for carried, _, fields in part:
                    args += [carried, len(fields), *fields]
                items = sum(entry.items for entry in part)
                reply = self.retry(
                    self.scripts.feed, keys=[stream, keys.counters, keys.meta], args=args
                )
                if reply == -1:
                    raise self._lost()
                if reply == -2:
                    self._check_fed(fed + items)
                    length = 0
                else:
                    length = reply[0]
                    most = max(1, min(stream_pack(self.info, 0), int(reply[1])))
                fed += items
                del records[: len(part)]
                if not records:
                    break
            if last:
                return

    def _first_take(self, deadline: float) -> int:
        """Wait until the first stage has recorded its batch size (return it); return 0
        (unknown still) once its workers have read every entry of the first stream, or
        at ``deadline``: no worker serves the run yet, or its first batch is slow, and
        then one item per entry is what the stage needs.

        Polls, backing off from 0.5 ms to `MAX_POLL_SECONDS`.
        """
        keys, delay = self.keys, 0.0005
        while True:
            take = int(self.retry(self.client.hget, keys.counters, "take:0") or 0)
            if take or self.stopped.is_set() or monotonic() >= deadline:
                return take
            args = [WORKER_GROUP, "0"]  # entries not read yet
            if not self.retry(self.scripts.backlog, keys=[keys.stream(0)], args=args):
                return 0
            self.stopped.wait(delay)
            delay = min(MAX_POLL_SECONDS, delay * 2)

    def _next_part(self, records: list[Packed]) -> list[Packed] | None:
        """The records to add next: all of them without a byte budget; under one, as
        many as the first stream has room for once it has room for the first (one at
        least: a larger one goes in alone into an empty stream). None if the run
        stopped while waiting."""
        if self.info.share is None or not records:
            return records
        costs = [record_cost(entry.fields) for entry in records]
        keys = self.keys
        room = wait_for_room(
            self.scripts, self.retry, keys.stream(0), keys.counters, self.info.room_reader(0),
            costs[0], self.stopped,
        )  # fmt: skip
        return None if room is None else records[: fitting(costs, room.left)]

    def _carries(self, value: Any) -> bool:
        """Whether the run's codec can encode ``value``."""
        try:
            self.codec.encode(value)
        except SerializationError:
            return False
        return True

    def _entries(self, chunk: list[Any], fed: int, most: int) -> list[Packed]:
        """A chunk of source items as first-stream entries."""
        try:
            encode = self.codec.encode
            if not self.info.paths:
                return [Packed(1, 0, encode(value)) for value in chunk]
            data = self.codec.item_bytes
            items: list[tuple[bytes | None, list[int]]] = [
                (data(v), [fed + j]) for j, v in enumerate(chunk)
            ]
        except SerializationError as exc:
            # Name the source and the item: the codec's own text names neither.
            index = next((j for j, v in enumerate(chunk) if not self._carries(v)), None)
            if index is None:  # pragma: no cover - the codec refused the chunk, not one item
                raise
            raise SerializationError(
                f"the source's item {fed + index} (counting from 0), of type "
                f"{type(chunk[index]).__name__}, cannot be sent to the run: {exc}"
            ) from exc
        return pack_entries(self.codec, items, most)

    def _check_fed(self, expected: int) -> None:
        """After a lost reply: the chunk went in (fine), or Redis lost acknowledged writes."""
        now = int(self.retry(self.client.hget, self.keys.counters, "fed") or 0)
        if now != expected:
            raise BackendError(
                f"Redis lost writes it had acknowledged: the run's fed counter is {now}, "
                f"expected {expected}. Run Redis with appendonly yes and appendfsync always "
                f"(see docs/distributed.md)"
            )

    def _wait_for_window(self, fed: int) -> None:
        delay = 0.0005
        while not self.stopped.is_set() and self._window_full(fed):
            with self._released:
                self._released.wait(delay if self.reordering else POLL_SECONDS)
            delay = min(POLL_SECONDS, delay * 2)

    def _window_full(self, fed: int) -> bool:
        """Whether feeding must wait: what is held to be put in order is at its bound.

        Without a batch stage: ``window`` source items in flight past the oldest
        one not released (ordered runs). With one, a group may span any number of
        source items (a filter before it), so the window counts what is held
        instead: the driver's outputs waiting for an earlier item (ordered runs),
        and each batch stage's entries read and not handed on (``window`` plus a
        group). Bounded memory either way, and an item that is late always gets
        through: only the feeder waits.
        """
        tracker = self.tracker
        assert tracker is not None
        if not self.reordering:
            return fed - tracker.next_root >= self.window
        if tracker.ordered and tracker.values_held >= self.window:
            return True
        return any(
            self.retry(self.client.xpending, self.keys.stream(i), WORKER_GROUP)["pending"]
            >= self.window + self.stages[i].batch_size
            for i in self.reordering
        )

    # ------------------------------------------------------------------ reading outputs

    def outputs(self) -> Generator[list[Any], None, None]:
        """Yield the outputs in chunks until the run is complete.

        A chunk's entries are acknowledged (and counted delivered) only when
        the caller comes back for the next chunk, or the run completes: the
        outputs reach the caller at least once. A caller that leaves early,
        or dies, leaves the chunk it held pending for the driver consumer,
        and a driver resumed with the same ``run_id`` reads it again first.
        """
        state = self._read_state()
        self.tracker = self._new_tracker(state)
        try:
            # Started in here: a Ctrl-C while the thread starts (Thread.start waits for
            # it) must stop it too, or it feeds on after the run has ended.
            self._start_feeder(state.fed)
            # Entries this consumer read before (a resumed driver) come back first.
            yield from self._read_pending()
            while True:
                seen = self.retry.interruptions
                taken = self._read(">")
                got = taken.last is not None
                yield from self._hand_over(taken)
                if self.retry.interruptions != seen:
                    # A reply cut by a connection loss: what it held is pending for us.
                    yield from self._read_pending()
                if self._feed_error is not None:
                    raise self._feed_error
                self._check_local_worker()
                if self.halt is not None and self.halt.is_set():
                    self.halted = True
                    break
                if got and not self._counters_due():
                    continue  # outputs are coming and the run cannot be complete yet
                state = self._read_state()
                if self._complete(state):
                    self.state = state
                    break
                if state.refused:
                    raise self._refused(state.refused)
                stalled = not got and state.stalled(self.reordering)
                if stalled and self.backend.on_dead_letters == "raise":
                    raise self._dead_letters_error(state)
                self._watch(state)
        except BaseException as exc:
            self.stopped.set()
            self._note_left_behind(exc)
            lost = self._lost_state(exc)
            if lost is not None:
                # Nothing to resume: say what happened rather than the Redis error it caused.
                if lost is exc:
                    raise
                raise lost from exc
            feed_error = self._feed_error
            if _gave_up_first(feed_error, exc):
                # The feeder gave up on Redis first and stopped the retries both share:
                # its error names the URL and the cause; the driver's is a bare one.
                assert feed_error is not None
                self._say_left(f"left in Redis ({type(feed_error).__name__})", feed_error)
                raise feed_error from exc
            if exc is self._feed_error and not _is_redis_error(exc):
                # As on one machine, a failing source ends the run: nothing stays behind.
                add_note(exc, f"conveyor: the source failed; run {self.keys.run!r} was deleted")
                self.retry(_delete_run, self.client, self.keys, self.n)
            else:
                self._say_left(f"left in Redis ({type(exc).__name__})", exc)
            raise
        finally:
            self.stopped.set()
            self._ending = perf_counter()
            if self.state is None:  # ended early: stop all at once, within ABORT_WAIT
                if self._puller is not None:
                    self._puller.abort()  # the feeder may wait for a source that is stuck
                if self.local_worker is not None:
                    self.local_worker.stop()
            with self._released:
                self._released.notify_all()
            if self._feeder is not None:
                self._feeder.join(10.0 if self.state is not None else self.abort_left())
            self.finished = perf_counter()
        self._read_failures()
        self._read_consumers()
        if self.halted:
            self._say_left("stopped and left in Redis")
            return
        self._finish()

    def _say_left(self, what: str, error: BaseException | None = None) -> None:
        run = self.keys.run
        if not _redis_out_of_reach(error):
            try:
                mark_left(self.client, self.keys, what)
            except Exception:  # the warning below says it all the same
                log.debug("conveyor: could not mark run %r as left", run, exc_info=True)
        log.warning(
            "conveyor: run %r %s: run again with run_id=%r to resume it, or "
            "`conveyor cancel ... --run %s` to delete it",
            run,
            what,
            run,
            run,
        )

    def abort_left(self) -> float:
        """Seconds left of the `ABORT_WAIT` an ended run's threads get to end."""
        return max(0.0, self._ending + ABORT_WAIT - perf_counter())

    def _note_left_behind(self, exc: BaseException) -> None:
        """Stop the feeder; once it had its time to end, say on ``exc`` if it is stuck."""
        feeder, fed_from = self._feeder, self._puller
        if feeder is None or fed_from is None:
            return
        self._ending = perf_counter()
        fed_from.abort()
        if self.local_worker is not None:
            self.local_worker.stop()
        feeder.join(self.abort_left())
        fed_from.note_left_behind(exc)

    def _check_local_worker(self) -> None:
        """End the run with the local workers' error when they stopped (nobody else may
        be serving the run: waiting would never end)."""
        worker = self.local_worker
        if worker is None or not worker.stopped.is_set():
            return
        error = worker.control.error
        if error is None:
            error = BackendError("the local workers of this run stopped")
        raise error

    def _counters_due(self) -> bool:
        """Whether to read the counters after a read that brought outputs: when the run
        may be complete (every item fed when last read is through), and at least every
        `POLL_SECONDS`. A read of the counters is a round trip, as costly to Redis as
        acknowledging a pack: not one per read of the final stream."""
        tracker, now = self.tracker, perf_counter()
        if tracker is None or now - self._counted_at >= POLL_SECONDS:
            return True
        return tracker.completed >= self._fed_seen

    def _new_tracker(self, state: RunState) -> Tracker | None:
        """What tells this driver which items are through (None: a run without paths,
        made by an older version: completion by its counters)."""
        if not self.info.paths:
            return None
        if self.info.ordered:
            return Tracker(True, state.released)
        done = self.retry(self.client.get, self.keys.done) or b""
        return Tracker(False, 0, done)

    def _complete(self, state: RunState) -> bool:
        """Every item the source gave is through: decided by the items' identities (their
        paths), not by counting entries, so an entry the run did not make changes nothing."""
        tracker = self.tracker
        if tracker is None:
            return state.complete
        return state.source_done and tracker.completed == state.fed

    def _read_state(self) -> RunState:
        """The run's counters now; `RunStateLost` if its settings are gone from Redis."""
        state, present = read_state(self.client, self.retry, self.keys, self.n)
        if not present:
            raise self._lost()
        self._counted_at, self._fed_seen = perf_counter(), state.fed
        self._last_read = state
        return state

    def _refused(self, why: str) -> BackendError:
        """The error of a run a worker cannot serve; the refusal is said once, so that
        the run, resumed after a fix, starts without it."""
        self.retry(clear_refusal, self.client, self.keys)
        return BackendError(f"run {self.keys.run!r} cannot be served: {why}")

    def _lost(self) -> RunStateLost:
        return RunStateLost(
            f"Redis at {redact(self.backend.url)} lost the state of run {self.keys.run!r}: "
            f"its keys are gone (Redis restarted without persistence, or they were "
            f"deleted), and with them the items in flight and the run's counters. The run "
            f"cannot go on; run the pipeline again from the start. For runs to survive a "
            f"Redis restart, run Redis with appendonly yes (see docs/distributed.md).",
            run_id=self.keys.run,
        )

    def _lost_state(self, exc: BaseException) -> RunStateLost | None:
        """`RunStateLost` if ``exc`` (or the feeder's error, which stopped this thread)
        comes from the run's keys being gone from Redis; else None."""
        if not isinstance(exc, Exception):
            return None  # the caller left (GeneratorExit), Ctrl-C: those stand
        if isinstance(exc, RunStateLost):
            return exc
        if isinstance(self._feed_error, RunStateLost):
            return self._feed_error
        if not _is_redis_error(exc) and not _is_redis_error(self._feed_error):
            return None
        try:
            # One look, no retries: if Redis cannot answer now, the error stands as it is.
            gone = not self.client.exists(self.keys.meta)
        except Exception:
            return None
        return self._lost() if gone else None

    def _watch(self, state: RunState) -> None:
        """Say so, once per quiet spell, when nothing moves: usually, no worker is running."""
        now = perf_counter()
        if state != self._seen:
            self._seen, self._moved, self._warned = state, now, False
            return
        if now - self._moved < QUIET_SECONDS or self._warned:
            return
        self._warned = True
        consumers = [
            len(self.retry(self.client.xinfo_consumers, self.keys.stream(i), WORKER_GROUP))
            for i in range(self.n)
        ]
        idle = [s.name for s, c in zip(self.stages, consumers, strict=True) if c == 0]
        log.warning(
            "conveyor: run %r: nothing moved for %.0f s%s",
            self.keys.run,
            now - self._moved,
            f"; no worker serves {', '.join(map(repr, idle))}: start "
            f"`{self.worker_command()}` with this version of the pipeline "
            f"(workers of a version whose stages differ serve other runs)"
            if idle
            else " (stages slower than that, or workers stuck)",
        )

    def worker_command(self) -> str:
        """The command that starts a worker for this run: the pipeline's ``MODULE:ATTR``
        when it was loaded by that name, the URL (password masked), the namespace."""
        target = getattr(self.pipeline, "target", None) or "MODULE:ATTR"
        command = f"conveyor worker {target} --redis {redact(self.backend.url)}"
        if self.backend.namespace != "conveyor":
            command += f" --namespace {self.backend.namespace}"
        return command

    def _read_pending(self) -> Iterator[list[Any]]:
        """Read again the entries delivered to this driver and not acknowledged yet."""
        start: str | bytes = "0"
        while True:
            taken = self._read(start)
            if taken.last is None:
                return
            yield from self._hand_over(taken)
            start = taken.last

    def _hand_over(self, taken: _Taken) -> Iterator[list[Any]]:
        """Yield what ``taken`` released, then acknowledge its entries: the caller has them."""
        if taken.values:
            yield taken.values
            self.items_out += len(taken.values)
        if taken.ids or taken.completed or (taken.leaves and taken.released != ""):
            _ack(self.scripts, self.retry, self.keys, self.final, taken)
        if taken.leaves and self.tracker is not None:
            self.tracker.acknowledged(taken.leaves)

    def _read(self, start: str | bytes) -> _Taken:
        """Read the final stream once (``start`` ">" for new entries, an id for our pending).

        Returns the outputs now released and their entries (acknowledged by
        `_hand_over`), with the id of the last entry read (None: none).
        """
        reply = self.retry(
            self.client.xreadgroup,
            DRIVER_GROUP,
            "driver",
            {self.final: start},
            count=1000,
            block=int(POLL_SECONDS * 1000) if start == ">" else None,
        )
        entries = reply[0][1] if reply else []
        if not entries:
            return _Taken([], [], "", [], None, [])
        tracker = self.tracker
        if tracker is None:  # a run without paths (an older version's): no identities
            values = [self.codec.decode(f) for _, f in entries if b"t" not in f]
            ids = [(e[0], 1) for e in entries]
            return _Taken(values, ids, "", [], entries[-1][0], [])
        for entry_id, fields in entries:
            for leaf in self._leaves(entry_id, fields):
                tracker.add(leaf)
        released = tracker.release()
        refused = released.refused
        if start != ">":
            # Items of a pack this driver read before it stopped: those released then are
            # the caller's already (their roots are done), the pack was not acknowledged
            # while some of its items waited. Not strays: acknowledged, not dead-lettered.
            refused = [leaf for leaf in refused if not (leaf.path and b"#" in leaf.entry_id)]
        if refused:
            self._refuse(refused)
        with self._released:
            # The feeder's window moves on: the released roots are the caller's now.
            self._released.notify_all()
        leaves = released.ids + [leaf.entry_id for leaf in released.refused]
        return _Taken(
            released.values,
            self._entries_done(leaves),
            tracker.next_root if tracker.ordered else "",
            released.completed,
            entries[-1][0],
            leaves,
            tracker.done_bytes(released.completed) if released.completed else (0, b""),
        )

    def _leaves(self, entry_id: bytes, fields: dict[bytes, bytes]) -> list[Leaf]:
        """A final-stream entry's leaves: one, or one per item of a pack (``id#j``)."""
        if not is_packed(fields):
            return [self._leaf(entry_id, fields)]
        if entry_id in self._parts:
            return []  # read again after a connection loss: its items are held already
        try:
            items = unpack(self.codec, fields)
        except Exception:  # not a pack this run made (a bad signature, say)
            return [Leaf([], fields, entry_id)]
        self._parts[entry_id] = [len(items), len(items)]
        return [self._packed_leaf(entry_id + b"#%d" % j, item) for j, item in enumerate(items)]

    def _packed_leaf(self, leaf_id: bytes, item: PackedItem) -> Leaf:
        data, path = item
        if data is None:
            return Leaf(path, TOMBSTONE, leaf_id)
        try:
            return Leaf(path, self.codec.loads(data), leaf_id)
        except Exception:  # an item that cannot be decoded here: refused alone
            return Leaf([], data, leaf_id)

    def _entries_done(self, leaves: list[bytes]) -> list[tuple[bytes, int]]:
        """The entries to acknowledge once ``leaves`` are the caller's, with the items
        each carried: a pack once its last item is."""
        done: list[tuple[bytes, int]] = []
        for leaf_id in leaves:
            entry_id, packed, _ = leaf_id.partition(b"#")
            if not packed:
                done.append((leaf_id, 1))
                continue
            part = self._parts[entry_id]
            part[0] -= 1
            if part[0] == 0:
                del self._parts[entry_id]
                done.append((entry_id, part[1]))
        return done

    def _leaf(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Leaf:
        """A final-stream entry as a leaf of its root; a malformed one gets no path."""
        try:
            path = load_path(fields[b"q"])
            value = TOMBSTONE if b"t" in fields else self.codec.decode(fields)
        except Exception:  # no path, or not one this run could have made
            return Leaf([], fields, entry_id)
        if not isinstance(path, list) or not all(isinstance(x, int) for x in path):
            return Leaf([], fields, entry_id)
        return Leaf(path, value, entry_id)

    def _refuse(self, leaves: list[Leaf]) -> None:
        """Dead-letter final-stream entries the run did not make, instead of yielding them."""

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for leaf in leaves:
                why = "not an entry of this run: " + (
                    f"its item {leaf.path[:1]} is through already" if leaf.path else "no path"
                )
                pipe.xadd(self.keys.dead(self.n), {"src": leaf.entry_id, "err": why})
            pipe.execute()

        self.retry(write)
        log.warning(
            "conveyor: run %r: %d entries of the final stream were not made by this run "
            "(added by another program, or a copy): refused, kept in %s",
            self.keys.run,
            len(leaves),
            self.keys.dead(self.n),
        )

    def _dead_letters_error(self, state: RunState) -> DeadLettersError:
        """The error of a run that only dead letters hold up; its ``__cause__`` is the
        first dead letter's own exception, rebuilt as itself (its class, attributes and
        notes naming the stage and the item) when this process has its class."""
        dead = {self.stages[i].name: s.dead for i, s in enumerate(state.stages) if s.dead}
        first = next(i for i, s in enumerate(state.stages) if s.dead)
        entries = self.retry(self.client.xrange, self.keys.dead(first), "-", "+", count=1)
        fields = entries[0][1] if entries else {}
        error = fields.get(b"err", b"").decode(errors="replace")
        record = fields.get(b"rec")
        parsed: ExceptionRecord | None = None
        if record:
            try:
                parsed = ExceptionRecord.from_dict(json.loads(record))
            except ValueError:
                pass  # not a record this version wrote: the text says it all
        # A line, "Type: message": the whole traceback is the __cause__'s (below)
        # and `conveyor dlq list`'s.
        if parsed is not None:
            name = parsed.type.rpartition(":")[2]  # "module:Class"
            last = f"{name}: {parsed.message}" if parsed.message else name
        else:
            last = next((ln for ln in reversed(error.splitlines()) if ln.strip()), "unknown")
        where = ", ".join(f"{name}: {n}" for name, n in dead.items())
        failure = DeadLettersError(
            f"run {self.keys.run!r} cannot finish: entries are in dead letters ({where}). "
            f"Last error of the first one: {last.strip()}. "
            f"Fix the stage, then `conveyor dlq replay ... --run {self.keys.run}` and run again "
            f"with run_id={self.keys.run!r} to finish it.",
            run_id=self.keys.run,
            dead=dead,
        )
        if parsed is not None:
            try:
                failure.__cause__ = rebuild(parsed)
            except ValueError:
                pass  # the line above says what it was
        return failure

    def _finish(self) -> None:
        if self.backend.keep:
            return

        self.retry(_delete_run, self.client, self.keys, self.n)

    # ------------------------------------------------------------------ result

    def result(self, outputs: list[Any] | None, live: bool = False) -> RedisRunResult:
        """The run's result: final once it is complete, else read from Redis now; with
        ``live`` (a handle's ``result_so_far``, maybe while the run goes on), from the
        counters the driver read last, without waiting for Redis."""
        state = self.state or (self._last_state() if live else None)
        if state is None:
            state = read_state(self.client, self.retry, self.keys, self.n)[0]
        elapsed = (self.finished or perf_counter()) - self.started
        consumers = None
        if self._consumers is not None:  # a group nobody is in any more: the stage's own
            consumers = [c or s.workers for c, s in zip(self._consumers, self.stages, strict=True)]
        stats = stage_stats(self.stages, state, self.info.limits, elapsed, consumers)
        names = [s.name for s in self.stages]
        result = RedisRunResult(
            stats=stats,
            failures=self._failures,
            elapsed_seconds=elapsed,
            items_out=self.items_out,
            outputs=outputs,
            run_id=self.keys.run,
            redelivered={n: s.redelivered for n, s in zip(names, state.stages, strict=True)},
            stale={n: s.stale for n, s in zip(names, state.stages, strict=True)},
            dead_letters={n: s.dead for n, s in zip(names, state.stages, strict=True) if s.dead},
            stopped=self.halted or self._drain_asked,
        )
        if self._failures_read:  # the record holds the first FAILURES_KEPT: the rest
            skipped = result.failed_counts()["skipped"]
            result.failures_not_kept = max(0, skipped - len(self._failures))
        return result

    def _last_state(self) -> RunState:
        """The counters the driver read last (nothing counted before its first read)."""
        return self._last_read or RunState.read({}, False, self.n)

    def _read_failures(self) -> None:
        """Items given up on by stages with ``on_error="skip"``, as the workers recorded
        them: the item and the exception as themselves where the codec carries them."""
        entries = self.retry(self.client.xrange, self.keys.failures, "-", "+")
        self._failures.extend(decode_failure(self.codec, fields) for _, fields in entries)
        self._failures_read = True

    def _read_consumers(self) -> None:
        """How many consumers each stage's group has at the end: the workers that served
        it, wherever they run, for the report (read before a finished run's keys go)."""

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for i in range(self.n):
                pipe.xinfo_consumers(self.keys.stream(i), WORKER_GROUP)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies

        try:
            replies = self.retry(read)
        except Exception:  # the report falls back to the stages' own settings
            return
        self._consumers = [
            _workers_served(stage, r if isinstance(r, list) else [])
            for stage, r in zip(self.stages, replies, strict=True)
        ]


# ---------------------------------------------------------------------- helpers


def _workers_served(stage: Stage, consumers: list[dict[Any, Any]]) -> int:
    """The workers that served ``stage``, from its group's consumers: a thread stage's
    workers are a consumer each; an async stage's tasks share one per worker process,
    and a process stage's lanes have one each, so there it is the stage's ``workers``
    for each worker process (a consumer's name begins with its host and pid)."""
    if stage.runtime == "thread":
        return len(consumers)
    processes = {tuple(text(c["name"]).split(":", 2)[:2]) for c in consumers}
    return len(processes) * stage.workers


def _write_report(
    path: Path,
    result: RedisRunResult | None,
    stats: list[StageStats],
    timeline: Timeline,
    elapsed: float,
    error: BaseException | None,
) -> None:
    """Write the run's HTML report; a failed run's shows the last counters and the error."""
    from ..report import write_report

    shown = result if result is not None else RedisRunResult(stats=stats, elapsed_seconds=elapsed)
    shown.timeline = timeline
    write_report(path, shown, error, error is not None)


def _tombstone_streams(stages: tuple[Stage, ...]) -> tuple[int, ...]:
    """Per stage, where its tombstones go: the input of the next batch stage (which must
    tell a place left empty from an item still on its way), else the final stream."""
    to, streams = len(stages), []
    for i in reversed(range(len(stages))):
        streams.append(to)
        if stages[i].kind == "batch":
            to = i
    return tuple(reversed(streams))


def _feed_chunk(info: RunInfo) -> int:
    """Most items the feeder adds per script call: `FEED_CHUNK_MAX`, or a quarter of
    the first stream's limit (not under `FEED_CHUNK`), so that a chunk in hand past the
    limit stays a fraction of it."""
    return max(FEED_CHUNK, min(FEED_CHUNK_MAX, info.limits[0] // 4))


def _stages(pipeline: Any) -> tuple[Stage, ...]:
    """The stages of ``pipeline``; a clear error when it is no pipeline, or has none."""
    found = getattr(pipeline, "stages", None)
    if not isinstance(found, tuple):
        raise ConfigurationTypeError(
            f"RedisBackend 'pipeline' must be a conveyor.Pipeline, got {type(pipeline).__name__}"
        )
    stages: tuple[Stage, ...] = found
    if not stages:
        raise ConfigurationError("the pipeline has no stage: add .map(), .each(), ...")
    return stages


def _connect_ahead(client: Any, n: int) -> None:
    """Have ``n`` connected connections in ``client``'s pool."""
    pool = client.connection_pool
    held = []
    try:
        for _ in range(n):
            held.append(pool.get_connection())
    finally:
        for connection in held:
            pool.release(connection)


def _gave_up_first(feed_error: BaseException | None, exc: BaseException) -> bool:
    """Whether ``exc``, a bare connection error of the driver, only follows the feeder's
    `BackendUnavailable` (which stopped the retries the two share)."""
    import redis

    return (
        isinstance(feed_error, BackendUnavailable)
        and exc is not feed_error
        and isinstance(exc, (redis.ConnectionError, redis.TimeoutError))
    )


def _redis_out_of_reach(exc: BaseException | None) -> bool:
    """Whether ``exc`` says Redis cannot be reached (or lost the run): then nothing is
    worth telling it, and trying could outlast the bound of an ending run."""
    import redis

    lost = (BackendUnavailable, RunStateLost, redis.ConnectionError, redis.TimeoutError)
    return isinstance(exc, lost)


def _is_redis_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` came from Redis (redis-py's errors, conveyor's backend errors)."""
    import redis

    return isinstance(exc, (redis.RedisError, BackendError))


def _delete_run(client: Any, keys: Keys, stages: int) -> int:
    """Unregister the run and delete its keys; return how many keys there were."""
    pipe = client.pipeline(transaction=True)
    pipe.srem(keys.runs, keys.run)
    pipe.delete(*keys.all(stages))
    deleted: int = pipe.execute()[1]
    return deleted


def _create(client: Any, keys: Keys, info: RunInfo) -> None:
    """Write the run's settings, streams and groups, and register it (once)."""
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.meta, mapping=info.to_meta())
    if info.share is not None:
        pipe.hset(keys.counters, "budget", info.share)  # read by the scripts (budget.py)
    for i in range(len(info.stages) + 1):
        group = WORKER_GROUP if i < len(info.stages) else DRIVER_GROUP
        pipe.xgroup_create(keys.stream(i), group, id="0", mkstream=True)
    pipe.sadd(keys.runs, keys.run)
    for reply in pipe.execute(raise_on_error=False):
        # BUSYGROUP: an earlier attempt whose reply was lost created it already.
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise reply


def _ack(scripts: Scripts, retry: Retrier, keys: Keys, final: str, taken: _Taken) -> None:
    """Acknowledge final-stream entries the caller has taken (trimming them), count
    them, and record how far the run is (an ordered run's next root to release, an
    unordered run's completed roots)."""
    retry(
        scripts.ack,
        keys=[final, keys.counters, keys.done],
        args=[
            DRIVER_GROUP,
            taken.released,
            *taken.bitmap,
            *(x for pair in taken.ids for x in pair),
        ],
    )


MAX_READ = 100_000
"""The largest ``batch_size`` (entries one XREADGROUP may return)."""


def _check_options(options: dict[str, Any]) -> None:
    """`RedisBackend`'s arguments, each checked before anything connects."""
    where = "RedisBackend"
    url = options["url"]
    check_url(url, where)
    check_name(options["run_id"], "run_id", where, optional=True)
    check_name(options["namespace"], "namespace", where)
    check_choice(options["codec"], "codec", where, CODECS)
    check_secret_key(options["secret_key"], where)
    check_int(options["batch_size"], "batch_size", where, 1, MAX_READ)
    check_seconds(options["visibility_timeout"], "visibility_timeout", where, optional=False)
    check_int(options["max_deliveries"], "max_deliveries", where, 1)
    for name in ("limit", "reorder_window"):  # None: the default; 0 is not a limit
        if options[name] is not None:
            check_int(options[name], name, where, 1)
    check_choice(options["on_dead_letters"], "on_dead_letters", where, ("raise", "wait"))
    for name in ("keep", "local_workers"):
        check_bool(options[name], name, where)
    check_seconds(options["unavailable_timeout"], "unavailable_timeout", where)
    check_redis_options(url, options["redis_options"], where)


def _wait_for_room(
    scripts: Scripts,
    stream: str,
    limit: int,
    stopped: threading.Event | None = None,
    retry: Retrier | None = None,
) -> int:
    """Wait while the first stream's backlog is ``limit`` entries or more; return it.

    Polls, backing off from 0.5 ms to `MAX_POLL_SECONDS`.
    """
    stopped = stopped or threading.Event()
    retry = retry or Retrier("waiting for room", None, stopped)
    delay = 0.0005
    while True:
        backlog: int = retry(scripts.backlog, keys=[stream], args=[WORKER_GROUP, "1"])
        if backlog < limit or stopped.wait(delay):
            return backlog
        delay = min(MAX_POLL_SECONDS, delay * 2)
