"""The Redis port: a worker's consumer of one stage's streams, for every live run.

A `RedisPort` is what a worker loop of any runtime (thread, process lane,
async task) takes its batches from and hands its outcomes to, when the stage
is served from Redis. It is one consumer of the stage's consumer group in
each live run of the pipeline::

    take(n):     runs listed (RunDirectory) -> reclaim entries idle past the
                 visibility timeout (XAUTOCLAIM, Lua) -> XREADGROUP COUNT n
                 over the streams of the runs whose output has room
                 -> decode; entries delivered too often or undecodable go
                 to the dead letters at once -> one run's entries, as items
    deliver(o):  one Lua hand-off for the run: each input entry acknowledged
                 with its own outputs (`BatchOutcome.counts`), ordered paths
                 extended, failures (skip) recorded, the entry that raised
                 kept with its error for redelivery; entries the batch did
                 not reach stay with this consumer for its next take

A batch stage's worker takes several times and delivers one group: the port
stays on one run until it delivers, and answers `Empty` when that run's
input has ended, so a partial group goes out as on one machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import monotonic
from typing import Any

from ..errors import Empty, ShutDown
from ..policy import BatchOutcome
from ..remote import capture
from ..runtime.base import RunControl
from ..runtime.ports import Port, StageIO
from ..stage import Stage
from .codec import Codec, encode_failure, get_codec, key_check
from .order import child_path, load_path
from .state import RunInfo, read_state
from .streams import (
    DRIVER_GROUP,
    MAX_POLL_SECONDS,
    WORKER_GROUP,
    Keys,
    Retrier,
    Scripts,
    consumer_name,
    fields_to_dict,
)

__all__ = ["BATCH_SECONDS", "RedisIO", "RedisPort", "RunContext", "RunDirectory", "WorkerLink"]

log = logging.getLogger("conveyor.redis")

BATCH_SECONDS = 0.05
"""A worker sizes its batches so that processing one takes about this long (each
batch costs a read and a hand-off: two round trips to Redis)."""
REFRESH_SECONDS = 0.1
"""How often a consumer looks for new runs."""
BLOCK_MS = 500
"""How long one XREADGROUP waits for entries (under redis-py's socket timeout)."""
FORGET_CONSUMER_MS = 60_000
"""A consumer holding nothing and unseen this long (at least; 10 visibility
timeouts with long ones) is removed from its group: a worker that was killed."""
ERROR_TEXT_LIMIT = 4000
"""Characters of a traceback kept with an entry that failed."""
READ_LIMIT = 1000
"""Most entries one read asks for, whatever the batch size asked."""

Entry = tuple[bytes, dict[bytes, bytes], int]
"""A stream entry as a consumer handles it: id, fields, times delivered."""


# ---------------------------------------------------------------------- live runs


class RunContext:
    """One live run as a worker sees it: its settings and its codec."""

    def __init__(self, info: RunInfo, codec: Codec) -> None:
        self.info = info
        self.codec = codec
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


# ---------------------------------------------------------------------- the stage's ports


@dataclass(frozen=True)
class WorkerLink:
    """What every port of one Redis worker shares: its connection, its view of the
    live runs, its stop signals and its retry policy."""

    client: Any
    directory: RunDirectory
    control: RunControl
    """Aborted when the worker fails, or is stopped without grace."""
    stopping: threading.Event
    """Set when the worker stops taking entries (and on abort): workers finish the
    batch in hand, hand it on, run their ``on_stop`` and end."""
    retry: Retrier


class RedisIO(StageIO):
    """One stage served from Redis by one worker process: its ports are its consumers."""

    min_batch_seconds = BATCH_SECONDS

    def __init__(self, stage: Stage, index: int, link: WorkerLink) -> None:
        self.stage = stage
        self.index = index
        self.client = link.client
        self.scripts = Scripts(link.client)
        self.directory = link.directory
        self.control = link.control
        self.stopping = link.stopping
        self.retry = link.retry
        # The port caps each read at the run's own batch size.
        self.capacity = 2 * READ_LIMIT
        self._executor: ThreadPoolExecutor | None = None
        self.dead_letters = 0
        """Entries this worker's consumers of the stage moved to dead letters."""
        self._dead_lock = threading.Lock()  # the stage's ports count from their own threads

    def count_dead(self, n: int) -> None:
        """Count ``n`` entries moved to dead letters (a rare path: a lock is fine)."""
        with self._dead_lock:
            self.dead_letters += n

    def open(self, count: int) -> list[Port]:
        if self.stage.runtime == "async":
            # Coroutine workers wait for Redis in threads: one each, so that a
            # blocking read never holds up another worker's.
            self._executor = ThreadPoolExecutor(count, f"conveyor-redis-{self.stage.name}")
        return [RedisPort(self, f"{self.stage.name}-{k}") for k in range(count)]

    def close(self) -> None:
        """After the stage's workers ended: release the threads of coroutine workers."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def run_blocking(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn`` in the stage's threads, for a coroutine worker to await."""
        assert self._executor is not None
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class RedisPort(Port):
    """One consumer of one stage, in every live run: see the module docstring."""

    tracks = True

    def __init__(self, io: RedisIO, label: str) -> None:
        self.io = io
        self.stage = io.stage
        self.index = io.index
        self.retry = io.retry
        self.client = io.client
        self.scripts = io.scripts
        self.name = consumer_name(label)
        self._stopped = io.stopping
        self._batch_stage = self.stage.kind == "batch"
        # Entries read and not handed out yet, per run; pending for this consumer.
        self._ready: dict[str, tuple[RunContext, list[tuple[Entry, Any]]]] = {}
        # What was handed out since the last delivery: one run's entries.
        self._run: RunContext | None = None
        self._taken: list[tuple[Entry, Any]] = []
        self._next_reclaim: dict[str, float] = {}
        self._reclaim_cursor: dict[str, bytes] = {}
        self._recover = False

    # ------------------------------------------------------------------ taking

    def take(self, n: int, timeout: float | None = None) -> list[Any]:
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            if self._stopped.is_set():
                raise ShutDown
            items = self._hand_out(n)
            if items:
                return items
            if self._run is not None and self._input_ended(self._run):
                raise Empty  # a batch stage's group goes out: nothing more will come
            left = None if deadline is None else deadline - monotonic()
            if left is not None and left <= 0:
                raise Empty
            self._fetch(n, left)

    async def atake(self, n: int) -> list[Any]:
        items: list[Any] = await self.io.run_blocking(self.take, n)
        return items

    def _hand_out(self, n: int) -> list[Any]:
        """Up to ``n`` items of one run from what was read (the run taken from, if any)."""
        if self._run is not None:
            key = self._run.info.run_id
        else:
            key = next((k for k, (_, got) in self._ready.items() if got), "")
        found = self._ready.get(key)
        if found is None or not found[1]:
            return []
        ctx, got = found
        chunk = got[:n]
        del got[:n]
        self._run = ctx
        self._taken += chunk
        return [item for _, item in chunk]

    def _fetch(self, n: int, timeout: float | None) -> None:
        """Read new entries (and take over idle ones) into ``_ready``."""
        import redis

        try:
            runs = self.io.directory.runs()
            if self._run is not None:
                runs = [c for c in runs if c is self._run]
            if not runs:
                self._stopped.wait(REFRESH_SECONDS if timeout is None else min(timeout, 0.1))
                return
            if not self._reclaim_due(runs, n):
                self._read(runs, n, timeout)
        except redis.ResponseError as exc:
            if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            self.io.directory.runs(force=True)  # a run ended and its keys went away
            self._forget_gone_runs()
        except redis.ConnectionError:
            if self._stopped.is_set():
                raise ShutDown from None
            raise

    def _forget_gone_runs(self) -> None:
        live = {c.info.run_id for c in self.io.directory.runs()}
        for run_id in list(self._ready):
            if run_id not in live:
                del self._ready[run_id]
        if self._run is not None and self._run.info.run_id not in live:
            self._run, self._taken = None, []

    def _read(self, runs: list[RunContext], n: int, timeout: float | None) -> None:
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
            wait = min(c.blocked_until.get(self.index, now) for c in runs) - now
            self._stopped.wait(max(0.0, min(wait, MAX_POLL_SECONDS)))
            return
        count = min(n, READ_LIMIT, max(c.info.batch for c in by_key.values()))
        if self._recover:
            # A connection loss may have cut the reply of a read that Redis
            # served: those entries are pending for this consumer; read them again.
            streams = dict.fromkeys(streams, "0")
        block = BLOCK_MS if timeout is None else max(1, min(BLOCK_MS, int(timeout * 1000)))
        seen = self.retry.interruptions
        reply = self.retry(
            self.client.xreadgroup,
            WORKER_GROUP,
            self.name,
            streams,
            count=count,
            block=None if self._recover else block,
        )
        # One pass is enough: a lost reply held at most one read's entries.
        self._recover = self.retry.interruptions != seen
        for key, entries in reply or ():
            ctx = by_key[key]
            self._accept(ctx, [(entry_id, fields, 1) for entry_id, fields in entries])

    def _accept(self, ctx: RunContext, entries: list[Entry]) -> None:
        """Decode entries into ``_ready``; dead-letter those that cannot be served."""
        good: list[tuple[Entry, Any]] = []
        dead: list[Entry] = []
        records: list[Any] = []
        held = {e[0] for e, _ in self._ready.get(ctx.info.run_id, (ctx, []))[1]}
        held.update(e[0] for e, _ in self._taken)
        for entry in entries:
            entry_id, fields, deliveries = entry
            if entry_id in held:
                continue  # read again after a connection loss: held already
            error = ""
            if ctx.info.paths and b"q" not in fields:
                error = "the entry has no sequence path: it was not made by this run"
            elif deliveries <= ctx.info.max_deliveries:
                try:
                    good.append((entry, ctx.codec.decode(fields)))
                    continue
                except Exception as exc:
                    error = f"cannot decode the entry: {_describe(exc)}"
            dead.append(entry)
            records += _dead_record(entry, error)
        if dead:
            self.io.count_dead(self._handoff(ctx, dead, records))
        if good:
            self._ready.setdefault(ctx.info.run_id, (ctx, []))[1].extend(good)

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

    def _reclaim_due(self, runs: list[RunContext], n: int) -> bool:
        """Take over entries idle past the visibility timeout, where due; True if any."""
        worked = False
        now = monotonic()
        for ctx in runs:
            run_id = ctx.info.run_id
            if self._next_reclaim.get(run_id, 0.0) > now:
                continue
            self._next_reclaim[run_id] = now + ctx.reclaim_every
            worked = self._reclaim(ctx, n) or worked
        return worked

    def _reclaim(self, ctx: RunContext, n: int) -> bool:
        run_id = ctx.info.run_id
        reply = self.retry(
            self.scripts.reclaim,
            keys=[ctx.info.keys.stream(self.index)],
            args=[
                WORKER_GROUP,
                self.name,
                ctx.info.visibility_ms,
                self._reclaim_cursor.get(run_id, b"0-0"),
                max(n, 10),
                max(FORGET_CONSUMER_MS, 10 * ctx.info.visibility_ms),
            ],
        )
        self._reclaim_cursor[run_id] = reply[0]
        entries = [(e[0], fields_to_dict(e[1]), int(e[2])) for e in reply[1]]
        if entries:
            log.info(
                "conveyor: stage %r took over %d entries idle past the visibility timeout",
                self.stage.name,
                len(entries),
            )
            self._accept(ctx, entries)
        return bool(entries)

    def _input_ended(self, ctx: RunContext) -> bool:
        """True when every entry of the run's stream for this stage has been read:
        the source is done and every stage before this one has handed everything on."""
        if self._ready.get(ctx.info.run_id, (ctx, []))[1]:
            return False
        state, present = read_state(self.client, self.retry, ctx.info.keys, len(ctx.info.stages))
        if not present:
            return True  # the run is gone: what is held goes nowhere
        # >=: an entry the run did not make, dead-lettered, counts beside the run's own.
        return state.source_done and all(
            state.stages[j].acked + state.stages[j].dead >= state.produced(j)
            for j in range(self.index)
        )

    # ------------------------------------------------------------------ delivering

    def deliver(self, outcome: BatchOutcome) -> BaseException | None:
        ctx, taken = self._run, self._taken
        self._run, self._taken = None, []
        if ctx is None or not taken:
            return None
        entries = [entry for entry, _ in taken]
        if self._batch_stage:
            self._handoff(ctx, entries, self._group_records(ctx, entries, outcome.outputs), outcome)
            return None
        handled = outcome.processed + (outcome.error is not None)
        self._handoff(ctx, entries[:handled], self._records(ctx, entries, outcome), outcome)
        if handled < len(taken):
            # Not reached (a stop cut the batch short, or an earlier item raised):
            # still pending for this consumer, they are the next take's.
            self._ready.setdefault(ctx.info.run_id, (ctx, []))[1][:0] = taken[handled:]
        return None

    async def adeliver(self, outcome: BatchOutcome) -> BaseException | None:
        error: BaseException | None = await self.io.run_blocking(self.deliver, outcome)
        return error

    def _records(self, ctx: RunContext, taken: list[Entry], outcome: BatchOutcome) -> list[Any]:
        """The hand-off's records: each input entry with its outputs, failures, the error."""
        args: list[Any] = []
        # A skipped item has no outputs: acknowledged with none (a tombstone, ordered).
        for index, outputs in enumerate(outcome.per_input()):
            entry_id, fields, deliveries = taken[index]
            try:
                records = self._outputs(ctx, outputs, fields.get(b"q"))
            except Exception as exc:  # an output the run's codec cannot carry
                args += ["n", entry_id, *_error_fields(exc)]
                continue
            if deliveries == 1 and len(records) == 1 and records[0][0] == "o":
                record = records[0]
                if record[1] == 2:  # fields d
                    args += ["o", entry_id, record[3]]
                    continue
                if record[1] == 4 and record[4] == b"q":  # fields d, q
                    args += ["O", entry_id, record[3], record[5]]
                    continue
            args += ["a", entry_id, deliveries, len(records), *_flat(records)]
        if outcome.error is not None:
            entry_id = taken[outcome.processed][0]
            args += ["n", entry_id, *_error_fields(outcome.error)]
        return args

    def _group_records(self, ctx: RunContext, taken: list[Entry], outputs: list[Any]) -> list[Any]:
        """A batch stage's group: the first entry carries it, the others nothing."""
        (group,) = outputs
        if ctx.info.ordered:
            # Within one group, keep source order (groups of an ordered run on Redis
            # are still made in the order entries arrive, not the source's).
            pairs = sorted(zip(taken, group, strict=True), key=lambda p: _path_of(p[0]))
            taken, group = [p[0] for p in pairs], [p[1] for p in pairs]
        first_id, _, deliveries = taken[0]
        records = self._outputs(ctx, [group], taken[0][1].get(b"q"))
        args: list[Any] = ["a", first_id, deliveries, len(records), *_flat(records)]
        for entry_id, fields, more in taken[1:]:
            # The other entries' places are done: the group carries their items.
            seq = fields.get(b"q")
            tomb = [] if seq is None else [_tombstone(seq)]
            args += ["a", entry_id, more, len(tomb), *_flat(tomb)]
        return args

    def _outputs(self, ctx: RunContext, outputs: list[Any], seq: bytes | None) -> list[list[Any]]:
        """The records of one entry's outputs: ``[dest, k, field, value, ...]`` each."""
        encode = ctx.codec.encode
        if seq is None:  # a long-lived run's entry: no identity to carry on
            return [["o", len(f), *f] for f in map(encode, outputs)]
        k = len(outputs)
        if k == 0:
            return [_tombstone(seq)]
        if k == 1:
            fields = encode(outputs[0])
            return [["o", len(fields) + 2, *fields, b"q", seq]]
        records = []
        for j, value in enumerate(outputs):
            fields = encode(value)
            records.append(["o", len(fields) + 2, *fields, b"q", child_path(seq, j, k)])
        return records

    def _handoff(
        self,
        ctx: RunContext,
        entries: list[Entry],
        records: list[Any],
        outcome: BatchOutcome | None = None,
    ) -> int:
        """Hand a batch on in one atomic script call (see streams.HANDOFF); return how
        many of ``entries`` were handed on (not taken over by another worker meanwhile)."""
        if not entries:
            return 0
        if outcome is not None and outcome.failures:
            self._record_failures(ctx, outcome)
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
                0 if outcome is None else outcome.filtered,
                0 if outcome is None else len(outcome.failures),
                0 if outcome is None else outcome.retried,
                0 if outcome is None else int((outcome.busy_seconds or 0.0) * 1e6),
                *_id_range(entries),
                # Room for entries it holds in that range besides the batch (failed ones).
                len(entries) + 1000,
                *records,
            ],
        )
        if reply == -1:
            return 0  # the run ended meanwhile (it was cancelled): nothing to hand on
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
        return len(entries) - int(reply[1])

    def _record_failures(self, ctx: RunContext, outcome: BatchOutcome) -> None:
        records = [encode_failure(ctx.codec, failure) for failure in outcome.failures]

        def record() -> None:
            pipe = self.client.pipeline(transaction=False)
            for fields in records:
                pipe.xadd(ctx.info.keys.failures, fields, maxlen=10_000, approximate=True)
            pipe.execute()

        self.retry(record)

    def close(self) -> None:
        """Let go of what this consumer read and did not hand on, then leave every run's
        group if it holds nothing there."""
        import redis

        try:
            self._let_go()
            for ctx in self.io.directory.runs():
                key = ctx.info.keys.stream(self.index)
                info = self.client.xpending_range(key, WORKER_GROUP, "-", "+", 1, self.name)
                if not info:
                    self.client.xgroup_delconsumer(key, WORKER_GROUP, self.name)
        except (redis.RedisError, ShutDown):
            pass  # best effort: a leftover consumer with nothing pending is harmless

    def _let_go(self) -> None:
        """Make the entries read and not handed on (a stopped worker's) idle past the
        visibility timeout now, so that other consumers take them over at once rather
        than after it. Their delivery count does not grow (JUSTID)."""
        held: dict[str, tuple[RunContext, list[bytes]]] = {}
        for ctx, got in self._ready.values():
            held.setdefault(ctx.info.run_id, (ctx, []))[1].extend(e[0] for e, _ in got)
        if self._run is not None:
            held.setdefault(self._run.info.run_id, (self._run, []))[1].extend(
                e[0] for e, _ in self._taken
            )
        self._ready.clear()
        self._run, self._taken = None, []
        for ctx, ids in held.values():
            if ids:
                key = ctx.info.keys.stream(self.index)
                self.client.xclaim(
                    key, WORKER_GROUP, self.name, 0, ids, idle=ctx.info.visibility_ms, justid=True
                )


# ---------------------------------------------------------------------- helpers


def _path_of(entry: Entry) -> list[int]:
    seq = entry[1].get(b"q")
    return [] if seq is None else load_path(seq)


def _tombstone(seq: bytes | None) -> list[Any]:
    return ["f", 4, b"q", seq or b"", b"t", b"1"]


def _dead_record(entry: Entry, error: str) -> list[Any]:
    entry_id, fields, deliveries = entry
    kept = [x for k, v in fields.items() if k in (b"d", b"q", b"s") for x in (k, v)]
    return ["x", entry_id, deliveries, error, len(kept), *kept]


def _id_range(entries: list[Entry]) -> tuple[bytes, bytes]:
    """The lowest and highest stream ids of a batch (ids compare as pairs of numbers)."""
    ids = [e[0] for e in entries]
    return min(ids, key=_id_key), max(ids, key=_id_key)


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _flat(records: list[list[Any]]) -> list[Any]:
    return [x for record in records for x in record]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _error_fields(exc: BaseException) -> tuple[str, str]:
    """An item's error as the hand-off keeps it: the traceback's text (the tail, for
    people and `conveyor dlq list`) and the exception's record as JSON (for the
    driver to rebuild it as itself)."""
    record = capture(exc, json.dumps)
    record.traceback = record.traceback[-ERROR_TEXT_LIMIT:]
    return record.traceback, json.dumps(record.as_dict())
