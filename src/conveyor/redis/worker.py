"""The worker side: consumers that serve a pipeline's stages, for every live run.

A `Worker` serves some (default: all) stages of one pipeline. For each stage
it starts the stage's ``workers`` consumers, each a thread with a consumer
name of its own (``host:pid:stage-n:random``); a stage with
``runtime="process"`` gets that many child processes of one consumer each
instead, and an async stage's coroutines run on one event loop of the worker
process, ``workers`` at a time. Each consumer loops:

1. every 0.1 s, list the pipeline's live runs (the ``runs`` set);
2. every so often, take over entries of its stage idle for longer than the
   run's visibility timeout (XAUTOCLAIM), and dead-letter those delivered
   more than ``max_deliveries`` times;
3. read a batch of new entries from the stage's stream of every run whose
   output is not over its limit (XREADGROUP ... BLOCK 500: redis-py's
   socket timeout stays well above the block);
4. run each item through `conveyor.stage.process_batch` (the stage's logic,
   the same as on one machine, with its retries, skips and timeouts);
5. hand the batch on with one Lua script: outputs added, inputs acknowledged
   and deleted, counters updated, failed entries made reclaimable at once.

Batch sizes adapt so that a batch takes about `TARGET_BATCH_SECONDS`: trivial
stages read 100 entries at a time, slow ones fewer, so a batch stays well
inside the visibility timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import threading
import traceback
from collections.abc import Callable, Sequence
from time import monotonic, perf_counter
from typing import Any

from ..errors import BackendError, ConfigurationError
from ..policy import add_note, process_batch
from ..stage import Stage, set_worker_state
from .codec import Codec, get_codec, key_check, secret_from
from .order import child_path, load_path
from .state import RunInfo
from .streams import (
    DRIVER_GROUP,
    MAX_POLL_SECONDS,
    WORKER_GROUP,
    Keys,
    Retrier,
    Scripts,
    connect,
    consumer_name,
    fields_to_dict,
    pipeline_id,
)

__all__ = ["TARGET_BATCH_SECONDS", "Worker"]

log = logging.getLogger("conveyor.redis")

TARGET_BATCH_SECONDS = 0.05
"""A consumer sizes its reads so that processing one batch takes about this long."""
REFRESH_SECONDS = 0.1
"""How often a consumer looks for new runs."""
BLOCK_MS = 500
"""How long one XREADGROUP waits for entries (under redis-py's socket timeout)."""
FORGET_CONSUMER_MS = 60_000
"""A consumer holding nothing and unseen this long (at least; 10 visibility
timeouts with long ones) is removed from its group: a worker that was killed."""
ERROR_TEXT_LIMIT = 4000
"""Characters of a traceback kept with an entry that failed."""

Entry = tuple[bytes, dict[bytes, bytes], int]
"""A stream entry as a consumer handles it: id, fields, times delivered."""


class RunContext:
    """One live run as a worker sees it: its settings and its codec."""

    def __init__(self, info: RunInfo, codec: Codec) -> None:
        self.info = info
        self.codec = codec
        self.reclaim_cursor: dict[int, bytes] = {}
        self.next_reclaim: dict[int, float] = {}
        self.blocked_until: dict[int, float] = {}
        self.block_delay: dict[int, float] = {}

    @property
    def reclaim_every(self) -> float:
        """Seconds between two reclaim passes of one consumer."""
        return max(0.05, min(1.0, self.info.visibility_ms / 2000))


class RunDirectory:
    """The pipeline's live runs, read from Redis at most every `REFRESH_SECONDS`."""

    def __init__(
        self, client: Any, namespace: str, pipeline: str, secret: bytes | None, retry: Retrier
    ) -> None:
        self._client = client
        self._keys = Keys(namespace, pipeline, "")
        self._namespace = namespace
        self._pipeline = pipeline
        self._secret = secret
        self._retry = retry
        self._lock = threading.Lock()
        self._runs: dict[str, RunContext] = {}
        self._refused: set[str] = set()
        self._fresh_until = 0.0

    def runs(self, force: bool = False) -> list[RunContext]:
        """The live runs (cached for a moment)."""
        with self._lock:
            if force or monotonic() >= self._fresh_until:
                self._refresh()
                self._fresh_until = monotonic() + REFRESH_SECONDS
            return list(self._runs.values())

    def _refresh(self) -> None:
        ids = {m.decode() for m in self._retry(self._client.smembers, self._keys.runs)}
        for gone in set(self._runs) - ids:
            del self._runs[gone]
        for run_id in sorted(ids - set(self._runs) - self._refused):
            keys = Keys(self._namespace, self._pipeline, run_id)
            meta = self._retry(self._client.hgetall, keys.meta)
            if not meta:
                continue  # registered but not written yet, or being deleted
            info = RunInfo.from_meta(keys, meta)
            codec = self._codec_for(info)
            if codec is not None:
                self._runs[run_id] = RunContext(info, codec)

    def _codec_for(self, info: RunInfo) -> Codec | None:
        if info.key_check != key_check(self._secret if info.codec == "pickle" else None):
            self._refused.add(info.run_id)
            log.error(
                "conveyor: run %s uses the %s codec with a secret key this worker does not "
                "have (set CONVEYOR_SECRET_KEY or pass secret_key): not serving it",
                info.run_id,
                info.codec,
            )
            return None
        return get_codec(info.codec, self._secret)


class Consumer:
    """One consumer of one stage: reads batches from every live run and hands them on."""

    def __init__(
        self,
        stage: Stage,
        index: int,
        client: Any,
        scripts: Scripts,
        directory: RunDirectory,
        stopped: threading.Event,
        retry: Retrier,
        label: str,
    ) -> None:
        self.stage = stage
        self.index = index
        self.client = client
        self.scripts = scripts
        self.directory = directory
        self.stopped = stopped
        self.retry = retry
        self.name = consumer_name(label)
        self._size = 1
        self._recover = False
        self._call: Callable[[Stage, Any], tuple[list[Any], bool]] | None = None

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Serve until stopped: on_start, the loop, on_stop."""
        stage = self.stage
        state = stage.on_start() if stage.on_start is not None else None
        set_worker_state(state)
        timed = None
        if stage.timeout is not None:
            from ..runtime.threads import TimedCaller

            timed = TimedCaller(f"conveyor-{stage.name}-timed", state)
            self._call = timed
        try:
            self._loop()
        finally:
            if timed is not None:
                timed.close()
            self._leave()
            if stage.on_stop is not None:
                stage.on_stop(state)
            set_worker_state(None)

    def _loop(self) -> None:
        import redis

        while not self.stopped.is_set():
            try:
                runs = self.directory.runs()
                if not runs:
                    self.stopped.wait(REFRESH_SECONDS)
                    continue
                worked = self._reclaim_due(runs)
                worked = self._read_and_handle(runs) or worked
            except redis.ResponseError as exc:
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                self.directory.runs(force=True)  # a run ended and its keys went away
            except redis.ConnectionError:
                if self.stopped.is_set():
                    return
                raise

    def _read_and_handle(self, runs: list[RunContext]) -> bool:
        now = monotonic()
        streams: dict[str, str] = {}
        by_key: dict[bytes, RunContext] = {}
        for ctx in runs:
            until = ctx.blocked_until.get(self.index)
            if until is not None and (until > now or not self._has_room(ctx)):
                continue
            key = ctx.info.keys.stream(self.index)
            streams[key] = ">"
            by_key[key.encode()] = ctx
        if not streams:
            self.stopped.wait(min(c.blocked_until.get(self.index, now) for c in runs) - now)
            return False
        if self.stage.kind == "batch":
            count = self.stage.batch_size  # one read makes one group
        else:
            count = min(self._size, max(c.info.batch for c in by_key.values()))
        if self._recover:
            # A connection loss may have cut the reply of a read that Redis
            # served: those entries are pending for this consumer; read them again.
            streams = dict.fromkeys(streams, "0")
        seen = self.retry.interruptions
        reply = self.retry(
            self.client.xreadgroup,
            WORKER_GROUP,
            self.name,
            streams,
            count=count,
            block=None if self._recover else BLOCK_MS,
        )
        # One pass is enough: a lost reply held at most one read's entries.
        self._recover = self.retry.interruptions != seen
        for key, entries in reply or ():
            ctx = by_key[key]
            self.handle(ctx, [(entry_id, fields, 1) for entry_id, fields in entries])
        return bool(reply)

    def _has_room(self, ctx: RunContext) -> bool:
        """Check again whether the output stream went under its limit; back off if not."""
        keys, i = ctx.info.keys, self.index
        final = i + 1 == len(ctx.info.stages)
        group, held = (DRIVER_GROUP, "0") if final else (WORKER_GROUP, "1")
        backlog = self.retry(self.scripts.backlog, keys=[keys.stream(i + 1)], args=[group, held])
        if backlog < ctx.info.limits[i + 1]:
            ctx.blocked_until.pop(i, None)
            ctx.block_delay.pop(i, None)
            return True
        self._block(ctx)
        return False

    def _block(self, ctx: RunContext) -> None:
        delay = min(MAX_POLL_SECONDS, ctx.block_delay.get(self.index, 0.0005) * 2)
        ctx.block_delay[self.index] = delay
        ctx.blocked_until[self.index] = monotonic() + delay

    def _reclaim_due(self, runs: list[RunContext]) -> bool:
        worked = False
        now = monotonic()
        for ctx in runs:
            if ctx.next_reclaim.get(self.index, 0.0) > now:
                continue
            ctx.next_reclaim[self.index] = now + ctx.reclaim_every
            worked = self._reclaim(ctx) or worked
        return worked

    def _reclaim(self, ctx: RunContext) -> bool:
        """Take over entries idle past the visibility timeout, and handle them."""
        cursor = ctx.reclaim_cursor.get(self.index, b"0-0")
        reply = self.retry(
            self.scripts.reclaim,
            keys=[ctx.info.keys.stream(self.index)],
            args=[
                WORKER_GROUP,
                self.name,
                ctx.info.visibility_ms,
                cursor,
                self._reclaim_count(),
                max(FORGET_CONSUMER_MS, 10 * ctx.info.visibility_ms),
            ],
        )
        ctx.reclaim_cursor[self.index] = reply[0]
        entries = [(e[0], fields_to_dict(e[1]), int(e[2])) for e in reply[1]]
        if entries:
            log.info(
                "conveyor: stage %r took over %d entries idle past the visibility timeout",
                self.stage.name,
                len(entries),
            )
            self.handle(ctx, entries)
        return bool(entries)

    def _reclaim_count(self) -> int:
        return self.stage.batch_size if self.stage.kind == "batch" else max(self._size, 10)

    def _leave(self) -> None:
        """Remove this consumer from every run's group, if it holds nothing."""
        import redis

        try:
            for ctx in self.directory.runs():
                key = ctx.info.keys.stream(self.index)
                info = self.client.xpending_range(key, WORKER_GROUP, "-", "+", 1, self.name)
                if not info:
                    self.client.xgroup_delconsumer(key, WORKER_GROUP, self.name)
        except redis.RedisError:
            pass  # best effort: a leftover consumer with nothing pending is harmless

    # ------------------------------------------------------------------ one batch

    def handle(self, ctx: RunContext, entries: list[Entry]) -> None:
        """Process a batch of entries of one run and hand it on atomically."""
        if not entries:
            return  # a re-read of pending entries found none in this stream
        t0 = perf_counter()
        if self.stage.kind == "batch":
            batch = _Batch(ctx, self.index, self.stage)
            for entry in entries:
                batch.add(entry)
            args = batch.finish()
        else:
            batch = _Batch(ctx, self.index, self.stage, self._call, self._sleep)
            for entry in entries:
                batch.add(entry)
            args = batch.args
        busy = perf_counter() - t0
        if batch.failures:
            self._record_failures(ctx, batch.failures)
        info = ctx.info
        keys, i = info.keys, self.index
        reply = self.retry(
            self.scripts.handoff,
            keys=[
                keys.stream(i),
                keys.stream(i + 1),
                keys.stream(len(info.stages)),
                keys.counters,
                keys.meta,
                keys.errors(i),
                keys.dead(i),
            ],
            args=[
                WORKER_GROUP,
                self.name,
                i,
                info.visibility_ms,
                batch.filtered,
                len(batch.failures),
                batch.retried,
                int(busy * 1e6),
                *_id_range(entries),
                # Room for entries it holds in that range besides the batch (failed ones).
                len(entries) + 1000,
                *args,
            ],
        )
        self._adapt(len(entries), busy)
        if reply == -1:
            return  # the run ended meanwhile (it was cancelled): nothing to hand on
        if reply[1]:
            log.warning(
                "conveyor: stage %r: %d entries were no longer pending for this worker when it "
                "handed them on: taken over by another (was it slower than the visibility "
                "timeout?), or handed on already by an attempt whose reply a connection loss "
                "cut; their outputs were not added twice",
                self.stage.name,
                reply[1],
            )
        if reply[2] >= info.limits[i + 1]:
            self._block(ctx)

    def _sleep(self, seconds: float) -> bool:
        return not self.stopped.wait(seconds)

    def _adapt(self, got: int, seconds: float) -> None:
        if seconds < TARGET_BATCH_SECONDS / 2 and got >= self._size:
            self._size = min(1000, self._size * 2)
        elif seconds > TARGET_BATCH_SECONDS * 2 and self._size > 1:
            self._size = max(1, self._size // 2)

    def _record_failures(self, ctx: RunContext, failures: list[tuple[str, str, int]]) -> None:
        def record() -> None:
            pipe = self.client.pipeline(transaction=False)
            for item, error, attempts in failures:
                pipe.xadd(
                    ctx.info.keys.failures,
                    {"stage": self.stage.name, "item": item, "error": error, "attempts": attempts},
                    maxlen=10_000,
                    approximate=True,
                )
            pipe.execute()

        self.retry(record)


class _Batch:
    """The hand-off script's arguments for one batch, built entry by entry."""

    def __init__(
        self,
        ctx: RunContext,
        index: int,
        stage: Stage,
        call: Callable[[Stage, Any], tuple[list[Any], bool]] | None = None,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self.ctx = ctx
        self.codec = ctx.codec
        self.ordered = ctx.info.ordered
        self.stage = stage
        self.last = index == len(ctx.info.stages) - 1
        self.call = call
        self.sleep = sleep
        self.args: list[Any] = []
        self.filtered = 0
        self.retried = 0
        self.failures: list[tuple[str, str, int]] = []
        self._group: list[tuple[bytes, int, Any, bytes | None]] = []

    def add(self, entry: Entry) -> None:
        """Process one entry (or, for a batch stage, keep it for `finish`)."""
        entry_id, fields, deliveries = entry
        if deliveries > self.ctx.info.max_deliveries:
            self._dead(entry_id, fields, deliveries, "")
            return
        try:
            item = self.codec.decode(fields)
        except Exception as exc:
            self._dead(entry_id, fields, deliveries, f"cannot decode the entry: {_describe(exc)}")
            return
        seq = fields.get(b"q")
        if self.stage.kind == "batch":
            self._group.append((entry_id, deliveries, item, seq))
            return
        outcome = process_batch(self.stage, [item], self.call, self.sleep)
        if outcome.error is not None:
            self.args += ["n", entry_id, _error_text(outcome.error)]
            return
        self.filtered += outcome.filtered
        self.retried += outcome.retried
        for f in outcome.failures:
            self.failures.append((repr(f.item)[:200], _describe(f.error), f.attempts))
        try:
            records = self._outputs(outcome.outputs, seq)
        except Exception as exc:
            self.args += ["n", entry_id, _error_text(exc)]
            return
        if deliveries == 1 and len(records) == 1 and records[0][0] == "o":
            record = records[0]
            if record[1] == 2:  # fields d
                self.args += ["o", entry_id, record[3]]
                return
            if record[1] == 4 and record[4] == b"q":  # fields d, q
                self.args += ["O", entry_id, record[3], record[5]]
                return
        self.args += ["a", entry_id, deliveries, len(records), *_flat(records)]

    def finish(self) -> list[Any]:
        """A batch stage's single output (a list of the items), and the arguments."""
        if self.ordered:
            # Within one group, keep source order; groups of different
            # workers may still interleave (documented).
            self._group.sort(key=lambda g: load_path(g[3] or b"\x90"))
        if self._group:
            first_id, deliveries, _, seq = self._group[0]
            items = [g[2] for g in self._group]
            records = self._outputs([items], seq)
            self.args += ["a", first_id, deliveries, len(records), *_flat(records)]
            for entry_id, more, _, more_seq in self._group[1:]:
                tomb = [self._tombstone(more_seq)] if self.ordered else []
                self.args += ["a", entry_id, more, len(tomb), *_flat(tomb)]
        return self.args

    def _outputs(self, outputs: list[Any], seq: bytes | None) -> list[list[Any]]:
        """The records of one entry's outputs: ``[dest, k, field, value, ...]`` each."""
        encode = self.codec.encode
        if not self.ordered or seq is None:
            return [["o", len(f), *f] for f in map(encode, outputs)]
        k = len(outputs)
        if k == 0:
            return [self._tombstone(seq)]
        if k == 1:
            fields = encode(outputs[0])
            return [["o", len(fields) + 2, *fields, b"q", seq]]
        records = []
        for j, value in enumerate(outputs):
            fields = encode(value)
            records.append(["o", len(fields) + 2, *fields, b"q", child_path(seq, j, k)])
        return records

    @staticmethod
    def _tombstone(seq: bytes | None) -> list[Any]:
        return ["f", 4, b"q", seq or b"", b"t", b"1"]

    def _dead(
        self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int, error: str
    ) -> None:
        kept = [x for k, v in fields.items() if k in (b"d", b"q", b"s") for x in (k, v)]
        self.args += ["x", entry_id, deliveries, error, len(kept), *kept]


def _id_range(entries: list[Entry]) -> tuple[bytes, bytes]:
    """The lowest and highest stream ids of a batch (ids compare as pairs of numbers)."""
    ids = [e[0] for e in entries]
    key = _id_key
    return min(ids, key=key), max(ids, key=key)


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _flat(records: list[list[Any]]) -> list[Any]:
    return [x for record in records for x in record]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _error_text(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text[-ERROR_TEXT_LIMIT:]


# ---------------------------------------------------------------------- the worker


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
        pipeline_ref: ``"module:attribute"`` of the pipeline, used by
            process-runtime stages to load it in their child processes
            (without it they get the stage by cloudpickle).
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
        pipeline_ref: str | None = None,
        redis_options: dict[str, Any] | None = None,
    ) -> None:
        all_stages: tuple[Stage, ...] = tuple(pipeline.stages)
        if not all_stages:
            raise ConfigurationError("Worker: the pipeline has no stage")
        names = [s.name for s in all_stages]
        chosen = list(stages) if stages else names
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise ConfigurationError(
                f"Worker: no stage named {', '.join(map(repr, unknown))}; "
                f"stages: {', '.join(map(repr, names))}"
            )
        self.url = url
        self.namespace = namespace
        self.pipeline_id = pipeline_id(all_stages)
        self.stages = all_stages
        self.served = [i for i, s in enumerate(all_stages) if s.name in chosen]
        self._counts = {i: _count_for(all_stages[i], workers) for i in self.served}
        self._secret = secret_from(secret_key)
        self._unavailable = unavailable_timeout
        self._ref = pipeline_ref
        self._options = dict(redis_options or {})
        self.stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: list[tuple[int, Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._client: Any = None

    def start(self) -> Worker:
        """Connect and start every consumer; return at once."""
        retry = Retrier("worker", self._unavailable, self.stopped)
        client = self._client = retry(connect, self.url, **self._options)
        directory = RunDirectory(client, self.namespace, self.pipeline_id, self._secret, retry)
        scripts = Scripts(client)
        for i in self.served:
            stage = self.stages[i]
            n = self._counts[i]
            if stage.runtime == "process":
                for k in range(n):
                    self._children.append((i, self._spawn(i, k)))
                continue
            if stage.runtime == "async":
                stage = self._bridged(stage)
            for k in range(n):
                consumer = Consumer(
                    stage, i, client, scripts, directory, self.stopped, retry, f"{stage.name}-{k}"
                )
                thread = threading.Thread(
                    target=self._serve,
                    args=(consumer,),
                    name=f"conveyor-redis-{stage.name}-{k}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
        return self

    def _serve(self, consumer: Consumer) -> None:
        try:
            consumer.run()
        except BaseException as exc:
            if not self.stopped.is_set():
                add_note(exc, f"conveyor: Redis worker of stage {consumer.stage.label} failed")
                log.exception("conveyor: a Redis worker thread failed; stopping this worker")
                self._errors.append(exc)
                self.stopped.set()

    def _bridged(self, stage: Stage) -> Stage:
        """The async stage as a sync one whose calls run on this worker's event loop."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="conveyor-redis-loop")
            thread.daemon = True
            thread.start()
            self._loop = loop
            self._loop_thread = thread
        loop = self._loop
        fn = stage.fn
        assert fn is not None

        def call(item: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(fn(item), loop).result()

        return dataclasses.replace(stage, fn=call, runtime="thread")

    def _spawn(self, index: int, k: int) -> Any:
        import cloudpickle

        ctx = multiprocessing.get_context("spawn")
        payload = cloudpickle.dumps(
            {
                "ref": self._ref,
                "stage": None if self._ref else self.stages[index],
                "stages": None if self._ref else self.stages,
                "index": index,
                "url": self.url,
                "namespace": self.namespace,
                "secret": self._secret,
                "unavailable": self._unavailable,
                "options": self._options,
            }
        )
        process = ctx.Process(
            target=_child_main,
            args=(payload,),
            name=f"conveyor-redis-{self.stages[index].name}-{k}",
            daemon=True,
        )
        process.start()
        return process

    def supervise(self) -> None:
        """Restart child processes that died (a process stage's crashed consumers)."""
        for n, (index, process) in enumerate(self._children):
            if not process.is_alive() and not self.stopped.is_set():
                log.warning(
                    "conveyor: a worker process of stage %r exited with code %s; restarting it",
                    self.stages[index].name,
                    process.exitcode,
                )
                self._children[n] = (index, self._spawn(index, n))

    def stop(self) -> None:
        """Ask every consumer to finish its batch and stop."""
        self.stopped.set()
        for _, process in self._children:
            if process.is_alive():
                process.terminate()

    def join(self, timeout: float | None = None) -> None:
        """Wait for every consumer to stop; re-raise the first error of a consumer."""
        deadline = None if timeout is None else monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - monotonic()))
        for _, process in self._children:
            process.join(None if deadline is None else max(0.0, deadline - monotonic()))
        if self._loop is not None and not any(t.is_alive() for t in self._threads):
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._loop_thread is not None
            self._loop_thread.join(5.0)
            if not self._loop_thread.is_alive():
                self._loop.close()
            self._loop = None
        if self._client is not None and not any(t.is_alive() for t in self._threads):
            self._client.close()
            self._client = None
        if self._errors:
            raise self._errors[0]

    def run_forever(self) -> None:
        """Start, and serve until `stop()` (or SIGTERM/SIGINT in the main thread)."""
        import signal

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        self.start()
        while not self.stopped.wait(1.0):
            self.supervise()
        self.stop()
        self.join(30.0)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
        self.join(30.0)


def _count_for(stage: Stage, workers: int | dict[str, int] | None) -> int:
    if workers is None:
        return stage.workers
    n = workers if isinstance(workers, int) else workers.get(stage.name, stage.workers)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigurationError(f"Worker: 'workers' for stage {stage.name!r} must be >= 1")
    return n


def _child_main(payload: bytes) -> None:
    """A process stage's consumer, in a child process of the worker."""
    import pickle
    import signal

    config = pickle.loads(payload)
    if config["ref"] is not None:
        from ..cli import load_pipeline

        stages = load_pipeline(config["ref"]).stages
    else:
        stages = config["stages"]
    index = config["index"]
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    retry = Retrier("worker process", config["unavailable"], stopped)
    client = retry(connect, config["url"], **config["options"])
    directory = RunDirectory(
        client, config["namespace"], pipeline_id(stages), config["secret"], retry
    )
    stage = dataclasses.replace(stages[index], runtime="thread")
    consumer = Consumer(
        stage, index, client, Scripts(client), directory, stopped, retry, f"{stage.name}-p"
    )
    try:
        consumer.run()
    except BackendError:
        if not stopped.is_set():
            raise
    finally:
        client.close()


def serve(pipeline: Any, url: str, **options: Any) -> None:
    """Serve ``pipeline`` from Redis until SIGTERM or Ctrl-C (what ``conveyor worker`` runs)."""
    Worker(pipeline, url, **options).run_forever()
