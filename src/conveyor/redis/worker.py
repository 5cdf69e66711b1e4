"""The worker side: a supervisor that serves a pipeline's stages from Redis.

A `Worker` serves some (default: all) stages of one pipeline, for every live
run of it. It is not an engine of its own: for each stage it opens one
`conveyor.redis.port.RedisPort` per worker (a consumer of the stage's group in
every run) and starts the stage's ordinary runtime on them, exactly as a run
on one machine starts it on channels::

    Worker.start()
      for each served stage: StageRun(stage, RedisIO(stage))
      runtime.base.Runtimes.start(stage runs):
        RedisIO --open(n)--> n RedisPorts (consumers), then the workers:
          thread:  n threads running runtime.base.worker_loop
          process: n worker processes, their lanes running worker_loop
          async:   n tasks on the runtime's event loop

So batch sizing, the policy (retries, backoff, skip, timeouts), async and
process stages, ``on_start``/``on_stop`` hooks (async ones awaited) and the
killing of a process stage's overrunning child are those of the one engine.
What a port does with an item that raised (``on_error="raise"``) differs
from a run's channel port: the item is kept with its error, delivered again
after the visibility timeout, and moved to the stage's dead letters after
``max_deliveries``; the worker itself goes on.

`Worker.stop` is graceful: ports stop taking (within one blocking read,
`conveyor.redis.port.BLOCK_MS`), every worker finishes and hands on the batch
in hand and runs its ``on_stop`` (process children too), and entries read
ahead are let go at once for other workers to take. What has not ended when
`Worker.join` times out is aborted: process children terminated, threads
stuck in user code left behind (named in a warning).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from time import perf_counter
from typing import Any

from ..channel import Channel
from ..errors import BackendError, ConfigurationError, ConfigurationTypeError
from ..metrics import StageMetrics, StageReading, StageStats
from ..runtime.base import RunControl, Runtimes, StageRun, left_behind
from ..stage import Stage
from ..validate import check_name, check_seconds
from .codec import check_secret_key, secret_from
from .port import ClientUse, RedisIO, RunDirectory, WorkerLink
from .state import find_runs, read_state
from .streams import (
    Keys,
    Retrier,
    check_redis_options,
    check_url,
    connect,
    pipeline_id,
    redact,
)

__all__ = ["Worker", "serve"]

log = logging.getLogger("conveyor.redis")

STOP_WAIT = 30.0
"""The least a stopping worker waits for its batches in hand and its ``on_stop``
(longer when a stage's ``stop_timeout`` asks for it: `Worker.stop_wait`), before it
aborts what is left."""
ABORT_GRACE = 5.0
"""After a stop that did not end in time, how long the abort waits for the workers."""
MAX_CONNECTIONS = 2**31
"""The connection pool's cap, unless ``redis_options`` sets one: in effect none, as
before redis-py 8 (the server's ``maxclients`` is the limit that counts)."""


class Worker:
    """Serves a pipeline's stages from Redis, for every run of that pipeline.

    Args:
        pipeline: the pipeline (the same definition the driver runs).
        url: ``redis://[user:password@]host:port/db`` or ``rediss://...`` (TLS).
        stages: names of the stages to serve (default: all).
        workers: consumers per stage: an int for every served stage, or
            ``{name: n}`` (default: each stage's own ``workers``).
        namespace: prefix of every key (the driver must use the same).
        secret_key: the pickle codec's key (default: ``CONVEYOR_SECRET_KEY``).
        unavailable_timeout: give up after Redis is unreachable this long
            (default: never; a worker waits for Redis to come back).
        redis_options: passed to `redis.Redis.from_url`.

    Example:
        >>> with Worker(pipeline, "redis://localhost:6379/0"):  # doctest: +SKIP
        ...     pipeline.run(backend=RedisBackend("redis://localhost:6379/0"))
    """

    def __init__(
        self,
        pipeline: Any,
        url: str,
        *,
        stages: Sequence[str] | None = None,
        workers: int | dict[str, int] | None = None,
        namespace: str = "conveyor",
        secret_key: bytes | str | None = None,
        unavailable_timeout: float | None = None,
        redis_options: dict[str, Any] | None = None,
    ) -> None:
        check_url(url, "Worker")
        check_name(namespace, "namespace", "Worker")
        check_seconds(unavailable_timeout, "unavailable_timeout", "Worker")
        check_redis_options(url, redis_options, "Worker")
        check_secret_key(secret_key, "Worker")
        all_stages: tuple[Stage, ...] = _stages_of(pipeline)
        names = [s.name for s in all_stages]
        if isinstance(stages, str) or not isinstance(stages, (Sequence, type(None))):
            raise ConfigurationTypeError(
                f"Worker 'stages' must be a list of stage names or None, got "
                f"{type(stages).__name__} {stages!r:.60}; stages: {', '.join(map(repr, names))}"
            )
        if stages is not None and not stages:
            # An empty list is a list computed wrong, not "every stage" (which is None).
            raise ConfigurationError(
                "Worker 'stages' is empty: give the names of the stages to serve, or None "
                f"for every stage ({', '.join(map(repr, names))})"
            )
        chosen = list(stages) if stages else names
        _check_names("stages", chosen, names, "stages")
        if isinstance(workers, dict):
            # A misspelt stage would otherwise keep its own count without a word.
            _check_names("workers", list(workers), chosen, "served stages")
        self.url = url
        self.namespace = namespace
        self.pipeline_id = pipeline_id(all_stages)
        self.stages = all_stages
        self.served = [i for i, s in enumerate(all_stages) if s.name in chosen]
        self._counts = {i: _count_for(all_stages[i], workers) for i in self.served}
        self._secret = secret_from(secret_key)
        self._unavailable = unavailable_timeout
        self._options = dict(redis_options or {})
        # Every consumer of every served stage shares this client, and each may hold a
        # connection in a blocking read at once: redis-py 8 caps a pool at 100
        # connections and fails the 101st user ("Too many connections"), which an
        # async stage of a few hundred workers reaches at once.
        self._options.setdefault("max_connections", MAX_CONNECTIONS)
        self.control = RunControl()
        self.stopped = threading.Event()
        """Set once the worker stops (`stop`, a signal, or a failure)."""
        self._stop_asked = False  # `stop` was called (a signal...), not only a failure
        self.control.on_abort(self.stopped.set)
        self.runtimes = Runtimes()
        self.stage_runs: list[StageRun] = []
        self._ios: list[RedisIO] = []  # one per stage run, for the dead letters it counted
        self._client: Any = None
        self._use: ClientUse | None = None  # who uses the client, once ports may be opened
        self._joined = False
        self.left_behind: list[str] = []
        """What `join` left running user code, said per stage (daemon threads)."""

    def start(self) -> Worker:
        """Connect, open every served stage's ports and start its runtime; return at once."""
        retry = Retrier("worker", self._unavailable, self.stopped, self.url)
        client = self._client = retry(connect, self.url, timeout=self._unavailable, **self._options)
        directory = RunDirectory(client, self.namespace, self.pipeline_id, self._secret, retry)
        self._use = ClientUse(client)
        link = WorkerLink(client, self._use, directory, self.control, self.stopped, retry)
        for i in self.served:
            stage = dataclasses.replace(self.stages[i], workers=self._counts[i])
            io = RedisIO(stage, i, link)
            # The metrics' channel only stands for the stream: its size is Redis's to tell.
            metrics = StageMetrics(stage, Channel(1))
            self.stage_runs.append(StageRun(stage, i, io, self.control, metrics))
            self._ios.append(io)
        try:
            self.runtimes.start(self.stage_runs)
        except BaseException:
            self.stop()
            self.join(5.0)
            raise
        return self

    def stats(self) -> list[StageStats]:
        """What this worker's consumers did so far, per served stage (all runs together)."""
        return [sr.metrics.snapshot() for sr in self.stage_runs]

    def readings(self) -> list[StageReading]:
        """Per served stage, for a metrics exporter (`conveyor.metrics.MetricsSource`):
        this worker's counters, the dead letters it made, and the backlog of the
        stage's streams over every live run (None when Redis cannot be read now)."""
        backlogs = self._backlogs()
        return [
            dataclasses.replace(
                sr.metrics.reading(),  # its channel only stands for the streams: replaced
                backlog=None if backlogs is None else backlogs[sr.index],
                dead_letters=io.dead_letters,
            )
            for sr, io in zip(self.stage_runs, self._ios, strict=True)
        ]

    def ended(self) -> bool:
        """True once the worker has been joined: its counters are final."""
        return self._joined

    def _backlogs(self) -> list[int] | None:
        """Entries left in each stage's streams, summed over the live runs.

        Read at a scrape, from the scrape's thread: one short retry, never the
        worker's wait for Redis to come back, so a scrape does not hang.
        """
        client = self._client
        if client is None:
            return None
        import redis

        retry = Retrier("metrics", 0.0, self.stopped)
        n = len(self.stages)
        totals = [0] * n
        try:
            for run_id in retry(find_runs, client, self.namespace, self.pipeline_id):
                keys = Keys(self.namespace, self.pipeline_id, run_id)
                state, exists = read_state(client, retry, keys, n)
                if exists:
                    for i in range(n):
                        totals[i] += state.backlog(i)
        except (BackendError, redis.RedisError) as exc:
            log.warning("conveyor: metrics: cannot read the backlog from Redis: %s", exc)
            return None
        return totals

    def stop(self) -> None:
        """Stop serving, gracefully: consumers take nothing more, finish and hand on the
        batch in hand, run their ``on_stop`` (process children too) and end. `join`
        ends what does not end in time."""
        self._stop_asked = True
        self.stopped.set()

    def join(self, timeout: float | None = None, grace: float = ABORT_GRACE) -> None:
        """Wait for every consumer to stop, ``timeout`` seconds at most (then abort them
        and wait ``grace`` seconds more: process children are terminated, threads stuck
        in user code are left behind, named in `left_behind`); re-raise the first error
        of the worker."""
        stuck = self._join_until_abort(None if timeout is None else perf_counter() + timeout)
        if stuck or self.control.stopped.is_set():
            self.control.abort()
            stuck = self.runtimes.join(perf_counter() + grace)
        self.left_behind = left_behind(self.stage_runs, stuck)
        self.runtimes.close()
        for sr in self.stage_runs:
            sr.io.close()
        if self.left_behind:
            log.warning("conveyor: Redis worker: %s", "; ".join(self.left_behind))
        if self._use is not None:
            # Closed once nothing uses it: threads left behind in user code hand their
            # batch on, and close their ports, when they return.
            self._use.end(ports_live=bool(stuck))
        elif self._client is not None:
            self._client.close()  # connected, and stopped before a port was opened
        self._client = None
        self._joined = True
        error = self.control.error
        if error is not None:
            self.control.error = None
            if self._stop_asked and _redis_lost(error):
                # Asked to stop while Redis was down: the batches in hand could not be
                # handed on, and stay pending in Redis for the next worker to take over.
                log.warning("conveyor: Redis worker stopped with Redis unreachable: %s", error)
                return
            raise error

    def _join_until_abort(self, deadline: float | None) -> list[str]:
        """`Runtimes.join` until ``deadline``, or until the worker aborts (a second
        signal, a failure): `join` then waits its grace only, also for a thread in
        user code, which nothing interrupts (it is left behind, a daemon thread).

        The runtimes are joined by a helper thread, so that the abort can end this
        wait (`RunControl.on_abort`) without polling; on an abort it returns [] (`join`
        then asks the runtimes again, within its grace) and leaves the helper to its
        join."""
        from ..engine import wait_interruptibly

        if self.control.stopped.is_set():
            return self.runtimes.join(deadline)
        ended = threading.Event()
        joined: list[list[str]] = []  # the helper's answer, once it has one

        def join_all() -> None:
            try:
                joined.append(self.runtimes.join(deadline))
            finally:
                ended.set()

        helper = threading.Thread(target=join_all, name="conveyor-worker-join", daemon=True)
        helper.start()
        self.control.on_abort(ended.set)
        wait_interruptibly(ended.wait, None)
        return joined[0] if joined else []

    def run_forever(self) -> None:
        """Start, and serve until `stop()` (or SIGTERM/SIGINT in the main thread).

        A signal stops the worker in any state: while it connects (or waits for
        Redis to come back) nothing was started and it returns at once; while
        it serves, consumers finish the batch in hand. A second signal aborts
        them (see `join`).
        """
        import signal

        from ..engine import wait_interruptibly

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's stays ignored
                    signal.signal(sig, self._on_signal)
        try:
            self.start()
        except Exception:
            if self.stopped.is_set() and self.control.error is None:
                return  # stopped while connecting: nothing was started
            raise
        # Said once ready: a worker is otherwise silent until something goes wrong.
        log.info("conveyor: %s", self.describe())
        wait_interruptibly(self.stopped.wait, None)
        self.join(self.stop_wait())

    def stop_wait(self) -> float:
        """How long a stop waits for the batches in hand and ``on_stop``: `STOP_WAIT`, or
        as long as a run's end waits for these stages (their longest ``stop_timeout``
        and a second), if that is longer."""
        from ..engine import join_timeout

        return max(STOP_WAIT, join_timeout(self.stage_runs))

    def describe(self) -> str:
        """What this worker serves, and where: one line."""
        served = ", ".join(f"{self.stages[i].name!r} x{self._counts[i]}" for i in self.served)
        return (
            f"worker serving {served} from {redact(self.url)} (namespace {self.namespace!r}); "
            "SIGTERM or Ctrl-C stops it"
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stopped.is_set():
            self.control.abort()  # a second signal: do not wait for the batches in hand
        elif self._client is not None:  # serving (not still connecting): say what comes
            log.info(
                "conveyor: stopping: finishing the batches in hand (%.0f s at most); "
                "a second SIGTERM or Ctrl-C stops at once",
                self.stop_wait(),
            )
        self.stop()

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
        self.join(self.stop_wait())


def _redis_lost(error: BaseException) -> bool:
    """Whether ``error`` is Redis unreachable (what a stopped retry re-raises)."""
    from redis.exceptions import ConnectionError, TimeoutError

    return isinstance(error, (ConnectionError, TimeoutError))


def _check_names(param: str, given: Sequence[str], names: Sequence[str], what: str) -> None:
    """Refuse names in ``given`` that are not in ``names`` (the ``what`` it may name)."""
    unknown = [n for n in given if n not in names]
    if unknown:
        raise ConfigurationError(
            f"Worker '{param}': no stage named {', '.join(map(repr, unknown))}; "
            f"{what}: {', '.join(map(repr, names))}"
        )


def _stages_of(pipeline: object) -> tuple[Stage, ...]:
    """The stages of ``pipeline``, or a clear error when it is none or has none."""
    from ..pipeline import Pipeline

    if not isinstance(pipeline, Pipeline):
        raise ConfigurationTypeError(
            f"Worker 'pipeline' must be a conveyor.Pipeline, got {type(pipeline).__name__}"
        )
    if not pipeline.stages:
        raise ConfigurationError("Worker: the pipeline has no stage")
    return pipeline.stages


def _count_for(stage: Stage, workers: int | dict[str, int] | None) -> int:
    if workers is None:
        return stage.workers
    if not isinstance(workers, (int, dict)):
        raise ConfigurationTypeError(
            f"Worker 'workers' must be an int >= 1, a dict {{stage name: int >= 1}} or None, "
            f"got {type(workers).__name__} {workers!r:.60}"
        )
    n = workers if isinstance(workers, int) else workers.get(stage.name, stage.workers)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigurationError(
            f"Worker 'workers' for stage {stage.name!r} must be an int >= 1, got {n!r:.60}"
        )
    return n


def serve(pipeline: Any, url: str, **options: Any) -> None:
    """Serve ``pipeline`` from Redis until SIGTERM or Ctrl-C (what ``conveyor worker`` runs)."""
    Worker(pipeline, url, **options).run_forever()
