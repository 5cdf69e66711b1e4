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

A batch stage's port (`BatchPort`) makes the same groups as on one machine:

    lease:       one consumer at a time makes a run's groups (SET NX PX, renewed
                 while it works, taken over when it dies); a new holder claims
                 every pending entry of the stage and starts at the cursor
    take(n):     entries and tombstones (the places the stages before it left
                 empty) -> ordering.Tracker -> source order -> up to n items;
                 tombstones on the way are handed on at once
    deliver(g):  one hand-off: the group with its first item's path, the other
                 items' places as tombstones, the cursor (the path of the last
                 entry taken) -- refused if the lease is another consumer's

It stays on one run until it delivers, and answers `Empty` when that run's
input has ended, so a partial group goes out as on one machine.

An async stage's coroutine workers share one consumer (`SharedPort`), each
through a `TaskPort`: hundreds of them must not wait for Redis in hundreds of
threads::

    atake(n):    lend n of what was read (on the loop); none: one coroutine at
                 a time reads for all those waiting, in a thread
    adeliver(o): post the outcome; the next flush (in a thread) hands on all
                 that was posted meanwhile, one hand-off per run
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from time import monotonic
from typing import Any

from ..errors import Empty, ShutDown
from ..ordering import TOMBSTONE, Leaf, Tracker
from ..policy import BatchOutcome, drop_unsendable
from ..remote import capture
from ..runtime.base import RunControl
from ..runtime.ports import Port, PortSupply, StageIO
from ..stage import FAILURES_KEPT, Stage
from .budget import entry_cost, fitting, need_of, room_of, wait_for_room
from .codec import Codec, child_path, encode_failure, get_codec, key_check, load_path
from .packing import (
    PackedItem,
    is_packed,
    pack_entries,
    single_fields,
    stream_limit,
    stream_pack,
    unpack,
)
from .state import RunInfo, find_runs, load_info, read_state, refuse_run
from .streams import (
    MAX_POLL_SECONDS,
    WORKER_GROUP,
    Keys,
    Retrier,
    Scripts,
    consumer_name,
    fields_to_dict,
    tombstone_counter,
)

__all__ = [
    "BATCH_SECONDS",
    "BatchPort",
    "ClientUse",
    "RedisIO",
    "RedisPort",
    "RunContext",
    "RunDirectory",
    "SharedPort",
    "TaskPort",
    "WorkerLink",
]

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
RECORDED = "failures_recorded"
"""The field of a run's counters hash that hands out places in its failure record
(`FAILURES_KEPT` of them: see `RedisStagePort._record_failures`)."""
TRIM_SECONDS = 0.1
"""How often a consumer's hand-off also trims the acknowledged head of its input
stream. Trimming at every hand-off cost two or three commands inside the script
(XPENDING for the oldest pending entry, XTRIM, and XINFO GROUPS when nothing is
pending), about a sixth of a hand-off's server time, while a stream node only
goes once all its entries are acknowledged; acknowledged entries wait at most this
long more (per consumer) and are never backlog, and under a byte budget they are
deleted at once whatever this says."""
READ_LIMIT = 1000
"""Most entries one read asks for, whatever the batch size asked."""
ASYNC_THREADS = 8
"""Threads in which an async stage's coroutine workers wait for Redis, however many
they are: one blocking read at a time, the others for hand-offs."""

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
        self.room_left: dict[int, int] = {}
        """Per stage, the bytes its output had room for when last seen (byte budget)."""
        self.out_per_item: dict[int, int] = {}
        """Per stage, the bytes its last hand-off added to its output per input item
        (byte budget): a stage whose outputs outweigh its inputs takes fewer at once."""
        self.per_entry: dict[int, int] = {}
        """Per stream, items per entry in what this worker added last: its limit in
        entries is its limit in items over that (see `packing.stream_limit`)."""
        self.takes: dict[int, int] = {}
        """Per stage, the batch size its workers last recorded: entries packed for it
        carry no more items (a slow stage's items are not held up in one pack)."""

    def pack(self, stream: int) -> int:
        """Most items per entry a producer adds to ``stream`` now (see packing.py)."""
        most = stream_pack(self.info, stream)
        if stream == len(self.info.stages):
            return most  # the driver takes the final stream whole
        return max(1, min(most, self.takes.get(stream, 1)))

    @property
    def reclaim_every(self) -> float:
        """Seconds between two reclaim passes of one consumer."""
        return max(0.05, min(1.0, self.info.visibility_ms / 2000))


@dataclass(eq=False)
class RunDirectory:
    """The pipeline's live runs, read from Redis at most every `REFRESH_SECONDS`."""

    _client: Any
    _namespace: str
    _pipeline: str
    _secret: bytes | None
    _retry: Retrier
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _runs: dict[str, RunContext] = field(default_factory=dict, init=False)
    _refused: set[str] = field(default_factory=set, init=False)
    _fresh_until: float = field(default=0.0, init=False)

    def runs(self, force: bool = False) -> list[RunContext]:
        """The live runs (cached for a moment)."""
        with self._lock:
            if force or monotonic() >= self._fresh_until:
                self._refresh()
                self._fresh_until = monotonic() + REFRESH_SECONDS
            return list(self._runs.values())

    def _refresh(self) -> None:
        ids = set(self._retry(find_runs, self._client, self._namespace, self._pipeline))
        for gone in set(self._runs) - ids:
            del self._runs[gone]
        for run_id in sorted(ids - set(self._runs) - self._refused):
            keys = Keys(self._namespace, self._pipeline, run_id)
            info = self._retry(load_info, self._client, keys)
            if info is None:
                continue  # registered but not written yet, or being deleted
            codec = self._codec_for(info)
            if codec is not None:
                self._runs[run_id] = RunContext(info, codec)

    def _codec_for(self, info: RunInfo) -> Codec | None:
        if info.key_check != key_check(self._secret if info.codec == "pickle" else None):
            self._refused.add(info.run_id)
            why = (
                f"the worker on {socket.gethostname()} (pid {os.getpid()}) does not have "
                f"the secret key of the run's {info.codec} codec (set CONVEYOR_SECRET_KEY "
                f"or pass secret_key, the driver's)"
            )
            log.error("conveyor: run %s: %s: not serving it", info.run_id, why)
            # The driver would wait for ever: tell it.
            self._retry(refuse_run, self._client, info.keys, why)
            return None
        return get_codec(info.codec, self._secret)


# ---------------------------------------------------------------------- the stage's ports


class ClientUse:
    """Who may still use a worker's Redis client: its open ports, and the Redis calls of
    coroutine workers under way in threads. `end` closes the client once nothing may:
    at once, or when the last user is done. A worker thread left behind in user code
    hands its batch on when it returns, and a call in a thread may outlive its
    coroutine: on a closed client, redis-py would connect again, and nobody would
    close that socket."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._lock = threading.Lock()
        # Under _lock: ports opened and not closed, calls under way in threads.
        self._users = {"ports": 0, "calls": 0}
        self._ending = False  # `end` was called (under _lock)
        self._ports_live = True  # whether open ports may still be used (under _lock)

    def open_port(self) -> None:
        """A port was opened."""
        self._count("ports", 1)

    def close_port(self) -> None:
        """A port is closed: it will not use the client again."""
        self._count("ports", -1)

    def call_started(self) -> None:
        """A call that uses the client was started in a thread."""
        self._count("calls", 1)

    def call_ended(self) -> None:
        """The call ended."""
        self._count("calls", -1)

    def end(self, ports_live: bool) -> None:
        """The worker is done: close the client as soon as nothing uses it.
        ``ports_live``: threads left behind may still use their ports (else ports
        still open belong to workers that never started)."""
        with self._lock:
            self._ending, self._ports_live = True, ports_live
        self._count("calls", 0)

    def _count(self, users: str, change: int) -> None:
        """Count users coming or going; close the client if it is done with."""
        with self._lock:
            self._users[users] += change
            ports, calls = self._users["ports"], self._users["calls"]
            unused = self._ending and not calls and not (ports and self._ports_live)
            client = self.client if unused else None
            if unused:
                self.client = None
        if client is not None:
            client.close()


@dataclass(frozen=True)
class WorkerLink:
    """What every port of one Redis worker shares: its connection (and who uses it),
    its view of the live runs, its stop signals and its retry policy."""

    client: Any
    use: ClientUse
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
        self.use = link.use
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

    def _coroutines(self) -> bool:
        return self.stage.runtime == "async" and self.stage.kind != "batch"

    def _shared_port(self, count: int, users: int) -> SharedPort:
        """The one consumer of a stage's ``count`` coroutine workers, with ``users``
        ports (or stand-ins for ports) to close before it closes."""
        # Coroutine workers wait for Redis in a few threads: one consumer reads
        # for all of them (one blocking read at a time), the others hand on.
        self._executor = ThreadPoolExecutor(
            min(count, ASYNC_THREADS), f"conveyor-redis-{self.stage.name}"
        )
        self.use.open_port()
        return SharedPort(self, f"{self.stage.name}-async", users)

    def supply(self, count: int) -> PortSupply:
        """A coroutine stage's ports as its workers start: the supply is a user of the
        shared consumer until sealed, and each port it opens one more."""
        if not self._coroutines():
            return super().supply(count)
        shared = self._shared_port(count, 1)

        def new() -> Port:
            shared.add_user()
            return TaskPort(shared)

        return PortSupply(count, new, shared.close)

    def open(self, count: int) -> list[Port]:
        if self._coroutines():
            shared = self._shared_port(count, count)
            return [TaskPort(shared) for _ in range(count)]
        port = BatchPort if self.stage.kind == "batch" else RedisPort
        for _ in range(count):
            self.use.open_port()
        return [port(self, f"{self.stage.name}-{k}") for k in range(count)]

    def close(self) -> None:
        """After the stage's workers ended: release the threads of coroutine workers."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def run_blocking(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn`` in the stage's threads, for a coroutine worker to await."""
        assert self._executor is not None
        self.use.call_started()
        try:
            return asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, *args)
        except BaseException:
            self.use.call_ended()
            raise

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        finally:
            self.use.call_ended()


class RedisPort(Port):
    """One consumer of one stage, in every live run: see the module docstring."""

    tracks = True
    max_deliveries = True
    """Whether an entry delivered more than the run's ``max_deliveries`` times goes to
    the dead letters (a poison item that keeps killing its workers)."""
    room = 1000
    """How many entries besides a batch's own the hand-off's ownership check reads at
    once in the batch's range of ids (more are looked up one by one)."""
    packs = True
    """Whether it takes packed entries apart (a batch stage's input is never packed)."""

    def __init__(self, io: RedisIO, label: str) -> None:
        self.io = io
        self.stage = io.stage
        self.index = io.index
        self.retry = io.retry
        self.client = io.client
        self.scripts = io.scripts
        self.name = consumer_name(label)
        self._stopped = io.stopping
        # Entries read and not handed out yet, per run; pending for this consumer.
        self._ready: dict[str, tuple[RunContext, list[tuple[Entry, Any]]]] = {}
        # What was handed out since the last delivery: one run's entries.
        self._run: RunContext | None = None
        self._taken: list[tuple[Entry, Any]] = []
        # The packed entries held (in _ready or _taken), by run and entry id.
        self._packs: dict[tuple[str, bytes], _Pack] = {}
        self._want = 1  # the batch size the worker asked for last
        self._made = [0, 0]  # items and entries the records being made add to the output
        self._told: dict[str, int] = {}  # the batch size recorded in each run, by run id
        self._per_entry = 1  # items per entry in the last read of packs
        self._next_trim: dict[str, float] = {}  # by run id: when to trim the input next
        self._next_reclaim: dict[str, float] = {}
        self._reclaim_cursor: dict[str, bytes] = {}
        self._recover = False

    # ------------------------------------------------------------------ taking

    def take(self, n: int, timeout: float | None = None) -> list[Any]:
        self._want = n
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

    def _next_ready(self) -> tuple[RunContext, list[tuple[Entry, Any]]] | None:
        """What was read of one run (the run taken from, if any); None if nothing."""
        if self._run is not None:
            key = self._run.info.run_id
        else:
            key = next((k for k, (_, got) in self._ready.items() if got), "")
        found = self._ready.get(key)
        return found if found is not None and found[1] else None

    def _hand_out(self, n: int) -> list[Any]:
        """Up to ``n`` items of one run from what was read (the run taken from, if any)."""
        found = self._next_ready()
        if found is None:
            return []
        ctx, got = found
        end = min(self._within_budget(ctx, got, n), len(got))
        while end < len(got) and got[end][0] is got[end - 1][0]:
            end += 1  # a pack's items go out together: it is handed on whole
        chunk = got[:end]
        del got[:end]
        self._run = ctx
        self._taken += chunk
        return [item for _, item in chunk]

    def _within_budget(self, ctx: RunContext, got: list[tuple[Entry, Any]], n: int) -> int:
        """How many of the first ``n`` of ``got`` one batch takes under the run's byte
        budget (``n`` without one): at most a share of input bytes, and of what the
        output had room for when last seen, for the inputs and for their outputs, as
        heavy per item as the last hand-off's (one item at least): the hand-off of the
        outputs need not wait, nor overfill the output. A pack costs once, with its
        first item."""
        share = ctx.info.share
        if share is None:
            return n
        room = min(share, ctx.room_left.get(self.index, share))
        costs, before = [], None
        for entry, _ in got[:n]:
            costs.append(0 if entry is before else entry_cost(entry[1]))
            before = entry
        n = fitting(costs, room)
        grown = ctx.out_per_item.get(self.index)
        return min(n, max(1, room // grown)) if grown else n

    def _fetch(self, n: int, timeout: float | None) -> None:
        """Read new entries (and take over idle ones) into ``_ready``."""
        import redis

        runs: list[RunContext] = []
        try:
            runs = self.io.directory.runs()
            if len(self._next_reclaim) > len(runs):
                self._forget_gone_runs()  # a long-lived worker serves run after run
            if self._run is not None:
                runs = [c for c in runs if c is self._run]
            runs = self._servable(runs)
            if not runs:
                self._stopped.wait(REFRESH_SECONDS if timeout is None else min(timeout, 0.1))
                return
            if not self._reclaim_due(runs, n):
                self._read(runs, n, timeout)
        except redis.ResponseError as exc:
            # A run ended (finished, or cancelled) and its keys went away while this
            # consumer read them or polled its output for room: Redis says NOGROUP, or
            # a script 'no such key'. Only an error about a live run is the worker's.
            live = {c.info.run_id for c in self.io.directory.runs(force=True)}
            gone = any(c.info.run_id not in live for c in runs)
            if not gone and not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            self._forget_gone_runs()
        except redis.ConnectionError:
            if self._stopped.is_set():
                raise ShutDown from None
            raise

    def _servable(self, runs: list[RunContext]) -> list[RunContext]:
        """The runs this consumer may read now (all; a batch stage's: see `BatchPort`)."""
        return runs

    def _forget_gone_runs(self) -> None:
        live = {c.info.run_id for c in self.io.directory.runs()}
        for run_id in list(self._ready):
            if run_id not in live:
                del self._ready[run_id]
        for key in [key for key in self._packs if key[0] not in live]:
            del self._packs[key]
        for by_run in (self._told, self._next_trim, self._next_reclaim, self._reclaim_cursor):
            for run_id in set(by_run) - live:
                del by_run[run_id]
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
        # Packs carry several items each: as many entries as make the batch asked for.
        wanted = max(1, -(-n // self._per_entry))
        count = min(wanted, READ_LIMIT, max(c.info.batch for c in by_key.values()))
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
        read = held = 0
        for key, entries in reply or ():
            ctx = by_key[key]
            ready = self._ready.get(ctx.info.run_id, (ctx, []))[1]
            before = len(ready)
            self._accept(ctx, [(entry_id, fields, 1) for entry_id, fields in entries])
            read += len(entries)
            held += len(self._ready.get(ctx.info.run_id, (ctx, []))[1]) - before
        if read:
            self._per_entry = max(1, held // read)

    def _accept(self, ctx: RunContext, entries: list[Entry]) -> None:
        """Decode entries into ``_ready``; dead-letter those that cannot be served."""
        good: list[tuple[Entry, Any]] = []
        dead: list[Entry] = []
        records: list[Any] = []
        split: list[Entry] = []
        held = {e[0] for e, _ in self._ready.get(ctx.info.run_id, (ctx, []))[1]}
        held.update(e[0] for e, _ in self._taken)
        for read in entries:
            entry = _counted(read)
            entry_id, fields, deliveries = entry
            if entry_id in held:
                continue  # read again after a connection loss: held already
            error = ""
            if self.packs and is_packed(fields):
                try:
                    pairs = self._unpack(ctx, entry)
                except Exception as exc:
                    error = f"cannot decode the pack: {_describe(exc)}"
                else:
                    if pairs:
                        good.extend(pairs)
                    else:  # delivered again, or not one item of it decodes: at once
                        split.append(entry)
                    continue
            elif ctx.info.paths and b"q" not in fields:
                error = "the entry has no sequence path: it was not made by this run"
            elif deliveries <= ctx.info.max_deliveries or not self.max_deliveries:
                try:
                    good.append((entry, self._decode(ctx, fields)))
                    continue
                except Exception as exc:
                    error = f"cannot decode the entry: {_describe(exc)}"
            dead.append(entry)
            records += _dead_record(entry, error)
        if dead:
            self.io.count_dead(self._handoff(ctx, dead, records))
        if split:
            packs = [self._packs.pop((ctx.info.run_id, e[0])) for e in split]
            records = [
                x for e, p in zip(split, packs, strict=True) for x in self._pack_record(ctx, e, p)
            ]
            if self._handoff(ctx, split, records) > 0:
                self.io.count_dead(sum(len(p.bad) for p in packs))
        if good:
            self._keep(ctx, good)

    def _unpack(self, ctx: RunContext, entry: Entry) -> list[tuple[Entry, Any]]:
        """A packed entry's items that decode, each paired with the entry; the others
        are kept aside to be dead-lettered alone. A pack delivered before (its worker
        died, or was slower than the visibility timeout) gives none: it is split, each
        item on its own, so that an item that kills its workers goes on alone."""
        entry_id, fields, deliveries = entry
        items = unpack(ctx.codec, fields)
        pack = _Pack(len(items), [], [])
        self._packs[(ctx.info.run_id, entry_id)] = pack
        if deliveries > 1:
            pack.items = items
            return []
        pairs = []
        loads = ctx.codec.loads
        for item in items:
            data, _ = item
            try:
                if data is None:
                    raise ValueError("a tombstone in a stage's input")
                pairs.append((entry, loads(data)))
            except Exception as exc:
                pack.bad.append((item, f"cannot decode the item: {_describe(exc)}"))
                continue
            pack.items.append(item)
        return pairs

    def _decode(self, ctx: RunContext, fields: dict[bytes, bytes]) -> Any:
        return ctx.codec.decode(fields)

    def _keep(self, ctx: RunContext, good: list[tuple[Entry, Any]]) -> None:
        """Hold decoded entries for the next takes."""
        self._ready.setdefault(ctx.info.run_id, (ctx, []))[1].extend(good)

    def _has_room(self, ctx: RunContext) -> bool:
        """Check again whether the output stream went under its limit; back off if not."""
        keys, i = ctx.info.keys, self.index
        backlog = self.retry(
            self.scripts.backlog, keys=[keys.stream(i + 1)], args=_output_backlog(ctx.info, i)
        )
        limit = stream_limit(ctx.info, i + 1, ctx.per_entry.get(i + 1, 1))
        if backlog < limit and self._bytes_room(ctx):
            ctx.blocked_until.pop(i, None)
            ctx.block_delay.pop(i, None)
            return True
        self._block(ctx)
        return False

    def _bytes_room(self, ctx: RunContext) -> bool:
        """Whether the output stream has room in the run's byte budget (always without
        one); what it has room for sizes the next batch (`_hand_out`)."""
        if ctx.info.max_bytes is None:
            return True
        keys, out = ctx.info.keys, self.index + 1
        reader = ctx.info.room_reader(out)
        room = room_of(self.scripts, self.retry, keys.stream(out), keys.counters, reader)
        ctx.room_left[self.index] = room.left
        return room.left > 0  # (free: a share)

    def _wait_for_room(self, ctx: RunContext, records: list[Any], items: int = 0) -> bool:
        """Before a hand-off: wait until the output stream has room for what ``records``
        add, in the run's byte budget; False if the worker stopped first. Reads stop
        while the output has no room (`_has_room`), so this waits only for what other
        workers handed on meanwhile. ``items``: the input items the records hand on,
        whose outputs' weight sizes the next batches (`_hand_out`)."""
        if ctx.info.max_bytes is None:
            return True
        keys, out = ctx.info.keys, self.index + 1
        need = need_of(records)
        if items:
            ctx.out_per_item[self.index] = need // items
        room = wait_for_room(
            self.scripts, self.retry, keys.stream(out), keys.counters, ctx.info.room_reader(out),
            need, self._stopped,
        )  # fmt: skip
        return room is not None

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
        entries = _claimed(reply)
        if entries:
            log.info(
                "conveyor: stage %r took over %d entries idle past the visibility timeout",
                self.stage.name,
                len(entries),
            )
            self._accept(ctx, entries)
        return bool(entries)

    def _input_ended(self, ctx: RunContext) -> bool:
        """Whether a partial group must go out (only a batch stage's port has groups)."""
        return False

    # ------------------------------------------------------------------ delivering

    def deliver(self, outcome: BatchOutcome) -> BaseException | None:
        ctx, taken = self._run, self._taken
        self._run, self._taken = None, []
        if ctx is None or not taken:
            return None
        self._hand_on_batch(ctx, taken, outcome)
        return None

    def _hand_on_batch(
        self, ctx: RunContext, taken: list[tuple[Entry, Any]], outcome: BatchOutcome
    ) -> None:
        """Hand on the outcome of the entries ``taken``; those it did not reach are the
        next take's."""
        cut, records, outcome = self._prepare(ctx, taken, outcome)
        if not self._wait_for_room(ctx, records, cut):
            cut = 0  # stopped while the output was full: all is let go (close)
        else:
            self._handoff(ctx, _distinct([entry for entry, _ in taken[:cut]]), records, outcome)
        if cut < len(taken):
            # Not reached (a stop cut the batch short, or an earlier item raised):
            # still pending for this consumer, they are the next take's.
            self._put_back(ctx, taken[cut:])

    def _prepare(
        self, ctx: RunContext, taken: list[tuple[Entry, Any]], outcome: BatchOutcome
    ) -> tuple[int, list[Any], BatchOutcome]:
        """How many of ``taken`` the outcome hands on (a pack whole), the hand-off's
        records, and the outcome (an output the run's codec cannot carry made its
        input's error)."""
        try:
            return self._cut(ctx, taken, outcome)
        except Exception:  # an output the run's codec cannot carry (the slow path)
            outcome = drop_unsendable(
                self.stage,
                [item for _, item in taken],
                outcome,
                partial(_first_unencodable, ctx.codec),
                f"be carried by the run's {ctx.codec.name} codec",
            )
            return self._cut(ctx, taken, outcome)

    def _cut(
        self, ctx: RunContext, taken: list[tuple[Entry, Any]], outcome: BatchOutcome
    ) -> tuple[int, list[Any], BatchOutcome]:
        cut = outcome.processed + (outcome.error is not None)
        while 0 < cut < len(taken) and taken[cut][0] is taken[cut - 1][0]:
            cut += 1  # a pack is handed on whole: its items not reached go back to the input
        return cut, self._records(ctx, taken[:cut], outcome), outcome

    def _put_back(self, ctx: RunContext, pairs: list[tuple[Entry, Any]]) -> None:
        """Make entries taken and not handed on the first of the next take."""
        self._ready.setdefault(ctx.info.run_id, (ctx, []))[1][:0] = pairs

    async def adeliver(self, outcome: BatchOutcome) -> BaseException | None:
        error: BaseException | None = await self.io.run_blocking(self.deliver, outcome)
        return error

    def _records(
        self, ctx: RunContext, taken: list[tuple[Entry, Any]], outcome: BatchOutcome
    ) -> list[Any]:
        """The hand-off's records: each input entry with its outputs, failures, the error.

        An output the run's codec cannot carry raises, and then nothing has changed:
        `_prepare` makes it its input's failure and asks again.
        """
        made = list(self._made)
        packs: list[tuple[tuple[str, bytes], _Pack]] = []
        try:
            results = outcome.per_input()
            args = self._pack_records(ctx, taken, outcome, results, packs)
            args += self._single_records(ctx, taken, outcome, results)
        except Exception:
            self._made[:] = made
            raise
        for key, pack in packs:  # handed on: the packs are done with
            del self._packs[key]
            self.io.count_dead(len(pack.bad))
        return args

    def _pack_records(
        self,
        ctx: RunContext,
        taken: list[tuple[Entry, Any]],
        outcome: BatchOutcome,
        results: list[list[Any]],
        packs: list[tuple[tuple[str, bytes], _Pack]],
    ) -> list[Any]:
        """The records of the packed entries among ``taken`` (added to ``packs``);
        ``results`` are the outcome's outputs per input."""
        args: list[Any] = []
        error = None if outcome.error is None else _error_fields(outcome.error)
        index = 0
        while index < len(taken):
            entry = taken[index][0]
            end = index + 1
            while end < len(taken) and taken[end][0] is entry:
                end += 1
            key = (ctx.info.run_id, entry[0])
            pack = self._packs.get(key)
            if pack is not None:
                # A pack: its items' outputs, the error of the one that raised (if in it).
                raised = error if index <= outcome.processed < end else None
                args += self._pack_record(ctx, entry, pack, results[index:end], raised)
                packs.append((key, pack))
            index = end
        return args

    def _single_records(
        self,
        ctx: RunContext,
        taken: list[tuple[Entry, Any]],
        outcome: BatchOutcome,
        results: list[list[Any]],
    ) -> list[Any]:
        """The records of the entries of one item among ``taken``."""
        args: list[Any] = []
        # A skipped item has no outputs: acknowledged with none (a tombstone, ordered).
        for index, outputs in enumerate(results):
            entry_id, fields, deliveries = taken[index][0]
            if is_packed(fields):
                continue
            records = self._outputs(ctx, outputs, fields.get(b"q"))
            if deliveries == 1 and len(records) == 1 and records[0][0] == "o":
                record = records[0]
                if record[1] == 2:  # fields d
                    args += ["o", entry_id, record[3]]
                    continue
                if record[1] == 4 and record[4] == b"q":  # fields d, q
                    args += ["O", entry_id, record[3], record[5]]
                    continue
            args += ["a", entry_id, deliveries, len(records), *_flat(records)]
        if outcome.error is not None and not is_packed(taken[outcome.processed][0][1]):
            args += ["n", taken[outcome.processed][0][0], *_error_fields(outcome.error)]
        return args

    def _pack_record(
        self,
        ctx: RunContext,
        entry: Entry,
        pack: _Pack,
        results: list[list[Any]] | None = None,
        error: tuple[str, str] | None = None,
    ) -> list[Any]:
        """The hand-off's ``P`` record of a packed entry (see streams.HANDOFF).

        ``results`` are the outputs of its first items; the next one raised
        ``error`` (if not None) and goes back to the input alone with it; the
        items after were not reached (a stop) and go back too, packed again,
        their delivery not counted. Outputs go on packed, and so do the
        tombstones of the items that gave none (filtered, skipped).
        """
        codec, info, i = ctx.codec, ctx.info, self.index
        _, _, deliveries = entry
        done = results or []
        outs: list[PackedItem] = []
        tombs: list[PackedItem] = []
        rest: list[PackedItem] = []
        records: list[list[Any]] = []
        for j, item in enumerate(pack.items):
            path = item[1]
            if j == len(done) and error is not None:
                records.append(_back(codec, item, deliveries, error))
                continue
            if j >= len(done):
                rest.append(item)
                continue
            # An output the run's codec cannot carry raises (see _records).
            encoded = [codec.item_bytes(value) for value in done[j]]
            k = len(encoded)
            if k == 0:
                tombs.append((None, path))
            elif k == 1:
                outs.append((encoded[0], path))
            else:
                outs += [(data, [*path, m, k]) for m, data in enumerate(encoded)]
        for item, why in pack.bad:
            fields = single_fields(codec, item)
            records.append(["x", 1, 0, why, "", len(fields), *fields])
        tombstones = info.tombstone_stream(i)
        if tombstones == i + 1:
            outs, tombs = outs + tombs, []  # one stream: one pack
        if rest and deliveries > 1:
            # Delivered before (see _unpack): each item goes on alone, its deliveries kept.
            records += [_back(codec, item, deliveries - 1, None) for item in rest]
            rest = []
        places = (("o", outs, i + 1), ("f", tombs, tombstones), ("i", rest, i))
        for dest, items, stream in places:
            for carried, gaps, fields in pack_entries(codec, items, ctx.pack(stream)):
                if dest == "o":
                    self._made[0] += carried
                    self._made[1] += 1
                records.append([dest, carried - gaps, gaps, "", "", len(fields), *fields])
        return ["P", entry[0], deliveries, pack.size, len(records), *_flat(records)]

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
        cursor: str = "",
    ) -> int:
        """Hand a batch on in one atomic script call (see streams.HANDOFF); return how
        many of ``entries`` were handed on (not taken over by another worker meanwhile),
        or -1 when a batch stage's lease (``cursor`` given) is another consumer's."""
        if not entries:
            return 0
        if outcome is not None and outcome.failures:
            self._record_failures(ctx, outcome)
        info = ctx.info
        keys, i = info.keys, self.index
        tombstones = info.tombstone_stream(i)
        reply = self.retry(
            self.scripts.handoff,
            keys=[
                keys.stream(i),
                keys.stream(i + 1),
                keys.stream(tombstones),
                keys.counters,
                keys.meta,
                keys.errors(i),
                keys.dead(i),
                keys.lease(i),
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
                len(entries) + self.room,
                tombstone_counter(tombstones, len(info.stages)),
                *_output_backlog(info, i),
                cursor,
                self._tell(info.run_id),
                self._trim_due(info.run_id),
                *records,
            ],
        )
        if reply == -1:
            return 0  # the run ended meanwhile (it was cancelled): nothing to hand on
        if reply == -2:
            return -1
        if reply[1]:
            log.warning(
                "conveyor: stage %r: %d entries were no longer pending for this worker when it "
                "handed them on: taken over by another (was it slower than the visibility "
                "timeout?), or handed on already by an attempt whose reply a connection loss "
                "cut; their outputs were not added twice",
                self.stage.name,
                reply[1],
            )
        ctx.takes[i + 1] = int(reply[3])
        made, self._made = self._made, [0, 0]
        if made[1]:
            ctx.per_entry[i + 1] = max(1, made[0] // made[1])
        if reply[2] >= stream_limit(info, i + 1, ctx.per_entry.get(i + 1, 1)):
            self._block(ctx)
        elif info.max_bytes is not None:
            ctx.blocked_until[i] = 0.0  # under a byte budget, the next read checks the room
        return len(entries) - int(reply[1])

    def _trim_due(self, run_id: str) -> str:
        """Whether this hand-off also trims the input stream ('1'|'0'): every
        `TRIM_SECONDS`, and at a run's first hand-off."""
        now = monotonic()
        if now < self._next_trim.get(run_id, 0.0):
            return "0"
        self._next_trim[run_id] = now + TRIM_SECONDS
        return "1"

    def _tell(self, run_id: str) -> int | str:
        """The batch size to record for the stage in the run ('' if recorded already)."""
        if self._told.get(run_id) == self._want:
            return ""
        self._told[run_id] = self._want
        return self._want

    def _record_failures(self, ctx: RunContext, outcome: BatchOutcome) -> None:
        """Add the batch's failures to the run's record, up to the first `FAILURES_KEPT`
        of the run (the stage's counters count every one). A counter taken first gives
        each batch its places, so workers adding at once never pass the mark."""
        keys, failures = ctx.info.keys, outcome.failures
        taken = int(self.retry(self.client.hincrby, keys.counters, RECORDED, len(failures)))
        room = FAILURES_KEPT - (taken - len(failures))
        if room <= 0:
            return
        records = [encode_failure(ctx.codec, failure) for failure in failures[:room]]

        def record() -> None:
            pipe = self.client.pipeline(transaction=False)
            for fields in records:
                pipe.xadd(keys.failures, fields)
            pipe.execute()

        self.retry(record)

    def close(self) -> None:
        try:
            self._leave()
        finally:
            self.io.use.close_port()

    def _leave(self) -> None:
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
        self._packs.clear()
        self._run, self._taken = None, []
        for ctx, ids in held.values():
            if ids:
                key = ctx.info.keys.stream(self.index)
                self.client.xclaim(
                    key,
                    WORKER_GROUP,
                    self.name,
                    0,
                    list(dict.fromkeys(ids)),  # a pack's items share its id
                    idle=ctx.info.visibility_ms,
                    justid=True,
                )


class _Order:
    """One run's input of a batch stage, while this consumer holds its lease."""

    def __init__(self, ctx: RunContext, cursor: list[int] | None) -> None:
        self.ctx = ctx
        # Arrival order without paths (a long-lived run), or without tombstones sent
        # to the stage (a run an older version began): no way to tell a gap.
        ordered = ctx.info.paths and bool(ctx.info.tombstones_to)
        self.tracker = Tracker(True) if ordered else None
        if self.tracker is not None and cursor is not None:
            self.tracker.resume_after(cursor)
        self.cursor = cursor
        """Path of the last entry taken in source order: everything up to it is handed
        on, or an item of the group in the making (not acknowledged yet)."""
        self.renew_at = 0.0

    def cursor_arg(self) -> str:
        """The cursor as the hand-off records it in the run's ``meta`` (JSON, text like
        every field there; '-': none to record, the lease checked all the same)."""
        return "-" if self.cursor is None else json.dumps(self.cursor)


class BatchPort(RedisPort):
    """A batch stage's consumer: groups in source order, made by one consumer at a time
    under a lease (see the module docstring; why these pieces: docs/design.md).

    A new holder claims every pending entry of the stage and starts at the
    persisted cursor: the items of the group a dead holder was making (pending,
    at or before the cursor) come first, so it makes the groups the holder would
    have made.
    """

    max_deliveries = False  # a take-over counts as a delivery: making groups cannot fail
    packs = False  # its input is never packed (a pack there is a stray: no path)
    room = 0  # it holds thousands of entries while it reorders: check a group's own ids

    def __init__(self, io: RedisIO, label: str) -> None:
        super().__init__(io, label)
        self._orders: dict[str, _Order] = {}
        self._next_try: dict[str, float] = {}
        self._void = False  # the group in the worker's hands was lost with the lease

    # ------------------------------------------------------------------ the lease

    def _fetch(self, n: int, timeout: float | None) -> None:
        # Read ahead (the order may need more than n), and never block past a third of
        # the lease's time to live: the lease is renewed between reads.
        runs = self.io.directory.runs()
        renew = min((c.info.visibility_ms for c in runs), default=3 * BLOCK_MS) / 3000
        super()._fetch(READ_LIMIT, renew if timeout is None else min(timeout, renew))

    def _servable(self, runs: list[RunContext]) -> list[RunContext]:
        """The runs whose lease this consumer holds (taking or renewing it when due)."""
        now = monotonic()
        held = []
        for ctx in runs:
            run_id, ttl = ctx.info.run_id, ctx.info.visibility_ms
            order = self._orders.get(run_id)
            if order is not None and now < order.renew_at:
                held.append(ctx)
                continue
            if order is None and now < self._next_try.get(run_id, 0.0):
                continue
            lease = ctx.info.keys.lease(self.index)
            got = self.retry(self.scripts.lease, keys=[lease], args=[self.name, ttl])
            if got != 1 and order is not None:
                self._lose(ctx)  # another consumer made groups meanwhile: start over
            if got == 0:
                self._next_try[run_id] = now + min(0.5, ttl / 4000)
                continue
            if got == 2:
                self._begin(ctx)
            else:
                self._claim_strays(ctx)
            self._orders[run_id].renew_at = now + ttl / 3000
            held.append(ctx)
        return held

    def _begin(self, ctx: RunContext) -> None:
        """A new tenure: start at the persisted cursor, with every entry still pending."""
        run_id = ctx.info.run_id
        field = f"cursor:{self.index}"
        saved = self.retry(self.client.hget, ctx.info.keys.meta, field)
        self._orders[run_id] = _Order(ctx, None if saved is None else json.loads(saved))
        self._ready.pop(run_id, None)
        self._claim(ctx)

    def _claim_strays(self, ctx: RunContext) -> None:
        """Claim what other consumers hold: a former holder's entries, read after this
        consumer's take-over claimed the rest."""
        key = ctx.info.keys.stream(self.index)
        summary = self.retry(self.client.xpending, key, WORKER_GROUP)
        if any(c["name"].decode() != self.name for c in summary["consumers"]):
            self._claim(ctx)

    def _claim(self, ctx: RunContext) -> None:
        """Claim every pending entry of the stage (own ones too, recognised when held)."""
        start = b"0-0"
        while True:
            reply = self.retry(
                self.scripts.reclaim,
                keys=[ctx.info.keys.stream(self.index)],
                args=[WORKER_GROUP, self.name, 0, start, READ_LIMIT, FORGET_CONSUMER_MS],
            )
            entries = _claimed(reply)
            if entries:
                self._accept(ctx, entries)
            start = reply[0]
            if start in (b"0-0", "0-0"):
                return

    def _reclaim_due(self, runs: list[RunContext], n: int) -> bool:
        return False  # the lease holder claims what others hold (_claim_strays)

    def _lose(self, ctx: RunContext) -> None:
        """The lease went to another consumer: drop this run's order and group."""
        run_id = ctx.info.run_id
        self._orders.pop(run_id, None)
        self._ready.pop(run_id, None)
        if self._run is not None and self._run.info.run_id == run_id:
            self._void = bool(self._taken)
            self._run, self._taken = None, []
        log.warning(
            "conveyor: stage %r: another worker took over making the groups of run %s "
            "(this one was slower than the visibility timeout); it makes them again",
            self.stage.name,
            run_id,
        )

    def _forget_gone_runs(self) -> None:
        holding = self._run is not None and bool(self._taken)
        super()._forget_gone_runs()
        if holding and self._run is None:
            # The group in the worker's hands belongs to a run that is gone (cancelled,
            # or lost by Redis): it goes out to be dropped, never completed with items
            # of the next run.
            self._void = True
        live = {c.info.run_id for c in self.io.directory.runs()}
        for run_id in set(self._orders) - live:
            del self._orders[run_id]

    # ------------------------------------------------------------------ source order

    def _decode(self, ctx: RunContext, fields: dict[bytes, bytes]) -> Any:
        """(path, item), or (path, TOMBSTONE) for a place a stage before left empty."""
        seq = fields.get(b"q")
        path = None if seq is None else load_path(seq)
        if path is not None and not (
            isinstance(path, list) and path and all(type(x) is int for x in path)
        ):
            raise ValueError(f"not a sequence path: {path!r}")
        return path, TOMBSTONE if b"t" in fields else ctx.codec.decode(fields)

    def _keep(self, ctx: RunContext, good: list[tuple[Entry, Any]]) -> None:
        """Put entries in source order: released by the tracker once every place before
        them is known; those at or before the cursor (a former holder's group in the
        making) go first."""
        order = self._orders.get(ctx.info.run_id)
        if order is None:
            return  # read as the lease was lost: the holder claims them
        ready = self._ready.setdefault(ctx.info.run_id, (ctx, []))[1]
        tracker = order.tracker
        if tracker is None:
            ready.extend(good)
            return
        early = []
        for pair in good:
            path = pair[1][0]
            if order.cursor is not None and path <= order.cursor:
                early.append(pair)
            else:
                tracker.add(Leaf(path, pair, pair[0][0]))
        released = tracker.release()
        ready[:0] = sorted(early, key=lambda pair: pair[1][0])
        ready.extend(released.values)
        if released.refused:
            refused = [leaf.entry_id for leaf in released.refused]
            dead = [leaf.value[0] for leaf in released.refused]
            records = [x for e in dead for x in _dead_record(e, "a copy, or not of this run")]
            self.io.count_dead(self._handoff(ctx, dead, records))
            tracker.acknowledged(refused)

    def _hand_out(self, n: int) -> list[Any]:
        """Up to ``n`` items in source order; the tombstones before them are handed on."""
        if self._void:
            self._void = False
            raise Empty  # the worker's group goes out, to be dropped (see deliver)
        found = self._next_ready()
        if found is None:
            return []
        ctx, got = found
        order = self._orders[ctx.info.run_id]
        items: list[tuple[Entry, Any]] = []
        gaps: list[tuple[Entry, Any]] = []
        i = 0
        while i < len(got) and len(items) < n:
            (gaps if got[i][1][1] is TOMBSTONE else items).append(got[i])
            i += 1
        order.cursor = got[i - 1][1][0]  # None without paths
        del got[:i]
        if gaps and not self._hand_on(ctx, [e for e, _ in gaps], _gap_records(gaps)):
            return []
        if not items:
            return []
        self._run = ctx
        self._taken += items
        return [item for _, (_, item) in items]

    def _input_ended(self, ctx: RunContext) -> bool:
        """True when the group must go out: the source is done, every stage before has
        handed everything on, and this consumer has taken every entry of its input
        (not so while it holds entries behind a missing place: a dead letter, which a
        replay will fill)."""
        order = self._orders.get(ctx.info.run_id)
        if order is None or self._ready.get(ctx.info.run_id, (ctx, []))[1]:
            return False
        if order.tracker is not None and len(order.tracker):
            return False
        state, present = read_state(self.client, self.retry, ctx.info.keys, len(ctx.info.stages))
        if not present:
            return True  # the run is gone: what is held goes nowhere
        i = self.index
        counts = state.stages[i]
        left = state.produced(i) - counts.acked - counts.dead  # not handed on yet
        return (
            state.source_done
            and all(state.through(j) for j in range(i))
            and left <= len(self._taken)
        )

    # ------------------------------------------------------------------ delivering

    def deliver(self, outcome: BatchOutcome) -> BaseException | None:
        if self._stopped.is_set():
            # The worker stops with a group in the making: not a group of the run's (a
            # plain loop would not cut it here). Its items stay pending, let go by
            # `close`, and the next holder makes the group again from the cursor.
            return None
        ctx, taken = self._run, self._taken
        if ctx is None or not taken:
            self._run, self._taken = None, []
            return None  # nothing, or a group lost with the lease: the holder makes it
        (group,) = outcome.outputs
        first, _, deliveries = taken[0][0]
        records = self._outputs(ctx, [group], taken[0][0][1].get(b"q"))
        args: list[Any] = ["a", first, deliveries, len(records), *_flat(records)]
        # The other items' places are done: the group carries their items.
        args += _gap_records(taken[1:])
        if not self._wait_for_room(ctx, args):
            return None  # stopped while the output was full: as a stop above
        self._run, self._taken = None, []
        self._hand_on(ctx, [e for e, _ in taken], args, outcome)
        return None

    def _hand_on(
        self,
        ctx: RunContext,
        entries: list[Entry],
        records: list[Any],
        outcome: BatchOutcome | None = None,
    ) -> bool:
        """Hand on in source order, with the cursor; False if the lease was lost."""
        order = self._orders[ctx.info.run_id]
        if self._handoff(ctx, entries, records, outcome, order.cursor_arg()) < 0:
            self._lose(ctx)
            return False
        if order.tracker is not None:
            order.tracker.acknowledged([e[0] for e in entries])
        return True

    def _leave(self) -> None:
        """As every consumer; and give the leases up, so that another worker takes over
        at once rather than after the visibility timeout."""
        import redis

        orders = list(self._orders.values())
        super()._leave()
        for order in orders:
            try:
                lease = order.ctx.info.keys.lease(self.index)
                self.scripts.lease(keys=[lease], args=[self.name, 0])
            except redis.RedisError:
                pass  # best effort: the lease expires after the visibility timeout


# ---------------------------------------------------------------------- async stages


class SharedPort(RedisPort):
    """The one consumer of an async stage, shared by its coroutine workers (`TaskPort`).

    Hundreds of coroutines each waiting for Redis in a thread of its own would
    need hundreds of threads. Here one blocking read at a time fetches entries
    for every coroutine waiting (as many items as they asked for together), and
    coroutines take their batches from what was read, on the event loop; their
    deliveries are gathered into one hand-off per run, in the stage's few
    threads. Entries lent to a coroutine stay pending for this consumer until
    it hands them on.
    """

    def __init__(self, io: RedisIO, label: str, users: int) -> None:
        super().__init__(io, label)
        # Guards _ready and _lent: the loop's thread lends, a thread reads or hands on.
        self._lock = threading.RLock()
        self._lent: dict[bytes, tuple[RunContext, tuple[Entry, Any]]] = {}
        # Deliveries waiting for the next hand-off (under _lock), and the hand-off's turn.
        self._posted: list[tuple[RunContext, list[tuple[Entry, Any]], BatchOutcome]] = []
        self._handing = threading.Lock()
        self._flush_due = False  # a flush was started and has not taken the posted yet
        self._next_flush: asyncio.Future[None] | None = None  # that flush (loop thread only)
        self._reading = threading.Lock()  # one read at a time (sync takes)
        self._areading: asyncio.Lock | None = None  # the same, for coroutines (made on the loop)
        self._wanted = 0  # items the coroutines waiting for a read asked for, together
        self._users = users  # ports not closed yet: the last one closes the consumer

    def lend(self, n: int) -> tuple[RunContext, list[tuple[Entry, Any]]] | None:
        """Up to ``n`` items of one run from what was read, a pack whole (no waiting);
        None if none."""
        with self._lock:
            self._want = n  # what the hand-offs record: packs made for this stage fit it
            found = self._next_ready()
            if found is None:
                return None
            ctx, got = found
            end = min(self._within_budget(ctx, got, n), len(got))
            while end < len(got) and got[end][0] is got[end - 1][0]:
                end += 1  # a pack's items go to one coroutine: it is handed on whole
            chunk = got[:end]
            del got[:end]
            for pair in chunk:
                self._lent[pair[0][0]] = (ctx, pair)
        return ctx, chunk

    def has_ready(self) -> bool:
        """Whether entries read are waiting to be lent."""
        with self._lock:
            return self._next_ready() is not None

    def read_for(self, n: int, deadline: float | None) -> None:
        """Read entries for a taker of ``n`` items, unless another one did meanwhile
        (one read at a time).

        Raises:
            Empty: ``deadline`` (a `monotonic` time) passed.
        """
        left = None if deadline is None else deadline - monotonic()
        if left is not None and left <= 0:
            raise Empty
        with self._reading:
            if not self.has_ready():
                self._fetch(min(n, READ_LIMIT), left)

    async def aread_for(self, n: int) -> None:
        """`read_for`, for a coroutine: one read (in a thread) for every coroutine
        waiting, of as many items as they asked for together."""
        if self._areading is None:
            self._areading = asyncio.Lock()
        self._wanted += n
        try:
            async with self._areading:
                if not self.has_ready():
                    await self.io.run_blocking(self._fetch, min(self._wanted, READ_LIMIT), None)
        finally:
            self._wanted -= n

    def post(self, ctx: RunContext, taken: list[tuple[Entry, Any]], outcome: BatchOutcome) -> bool:
        """A coroutine's delivery of what it was lent, for the next `flush`; True when
        no flush that will take it was started yet (the caller starts one)."""
        with self._lock:
            self._posted.append((ctx, taken, outcome))
            first, self._flush_due = not self._flush_due, True
            return first

    def aflush(self, first: bool) -> asyncio.Future[None]:
        """The flush that will hand on what was just posted, for a coroutine to await:
        ``first``, a new one; else the one started and not begun yet, which it shares
        with the coroutines that posted before it."""
        if first:
            self._next_flush = self.io.run_blocking(self.flush)
        assert self._next_flush is not None
        return self._next_flush

    def flush(self) -> None:
        """Hand on every delivery posted so far, in one hand-off per run: a delivery
        posted before the call is handed on (or failed) when it returns. Hand-offs take
        turns, and each takes everything posted while the one before it ran."""
        with self._handing:
            with self._lock:
                posted, self._posted = self._posted, []
                self._flush_due = False
            back: list[tuple[RunContext, list[tuple[Entry, Any]]]] = []
            runs: dict[str, _Merged] = {}
            try:
                for ctx, taken, given in posted:
                    cut, records, outcome = self._prepare(ctx, taken, given)
                    run = runs.setdefault(ctx.info.run_id, _Merged(ctx))
                    run.taken += taken[:cut]
                    run.records += records
                    run.outcomes.append(outcome)
                    if cut < len(taken):
                        back.append((ctx, taken[cut:]))
                for run in runs.values():
                    if not self._wait_for_room(run.ctx, run.records, len(run.taken)):
                        back.append((run.ctx, run.taken))  # stopped while the output was full
                        continue
                    entries = _distinct([entry for entry, _ in run.taken])
                    self._handoff(run.ctx, entries, run.records, _merged(run.outcomes))
            finally:
                with self._lock:
                    for _, taken, _ in posted:
                        for entry, _ in taken:
                            self._lent.pop(entry[0], None)
                    for ctx, pairs in back:
                        super()._put_back(ctx, pairs)

    def _put_back(self, ctx: RunContext, pairs: list[tuple[Entry, Any]]) -> None:
        with self._lock:
            super()._put_back(ctx, pairs)

    def _keep(self, ctx: RunContext, good: list[tuple[Entry, Any]]) -> None:
        with self._lock:
            super()._keep(ctx, good)

    def _accept(self, ctx: RunContext, entries: list[Entry]) -> None:
        with self._lock:  # read again after a connection loss: lent already
            super()._accept(ctx, [e for e in entries if e[0] not in self._lent])

    def _forget_gone_runs(self) -> None:
        with self._lock:
            super()._forget_gone_runs()

    def add_user(self) -> None:
        """One more port to close before this consumer closes (opened while another
        user still holds it open: a `PortSupply`)."""
        with self._lock:
            self._users += 1

    def close(self) -> None:
        """Once every coroutine's port is closed: let go of what was read and not handed
        on (lent to a coroutine cancelled by an abort, too) and leave the groups."""
        with self._lock:  # a read of a cancelled coroutine may still be under way
            self._users -= 1
            if self._users:
                return
            for ctx, pair in self._lent.values():
                self._ready.setdefault(ctx.info.run_id, (ctx, []))[1].append(pair)
            self._lent.clear()
            super().close()


@dataclass
class _Merged:
    """The deliveries of one run that one flush hands on together."""

    ctx: RunContext
    taken: list[tuple[Entry, Any]] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    outcomes: list[BatchOutcome] = field(default_factory=list)


class TaskPort(Port):
    """One coroutine worker's port of an async stage: it takes its batches from the
    stage's `SharedPort` and hands them on through it."""

    tracks = True

    def __init__(self, shared: SharedPort) -> None:
        self.shared = shared
        self._run: RunContext | None = None
        self._taken: list[tuple[Entry, Any]] = []

    def _borrow(self, n: int) -> list[Any]:
        """Up to ``n`` items of what the shared consumer read; [] if none is there."""
        if self.shared.io.stopping.is_set():
            raise ShutDown  # stopping: take nothing more (what was read is let go)
        got = self.shared.lend(n)
        if got is None:
            return []
        self._run, self._taken = got
        return [item for _, item in self._taken]

    def take(self, n: int, timeout: float | None = None) -> list[Any]:
        deadline = None if timeout is None else monotonic() + timeout
        while not (items := self._borrow(n)):
            self.shared.read_for(n, deadline)
        return items

    async def atake(self, n: int) -> list[Any]:
        while not (items := self._borrow(n)):
            await self.shared.aread_for(n)
        return items

    def _post(self, outcome: BatchOutcome) -> bool | None:
        """Post the delivery of what was taken (see `SharedPort.post`); None if there is
        nothing to deliver."""
        ctx, taken = self._run, self._taken
        self._run, self._taken = None, []
        if ctx is None or not taken:
            return None
        return self.shared.post(ctx, taken, outcome)

    def deliver(self, outcome: BatchOutcome) -> BaseException | None:
        if self._post(outcome) is not None:
            self.shared.flush()
        return None

    async def adeliver(self, outcome: BatchOutcome) -> BaseException | None:
        first = self._post(outcome)
        if first is not None:
            # Shielded: the flush is shared, and a cancelled coroutine must not cancel it.
            await asyncio.shield(self.shared.aflush(first))
        return None

    def close(self) -> None:
        self.shared.close()


# ---------------------------------------------------------------------- helpers


@dataclass
class _Pack:
    """A packed entry a consumer holds: how many items it carries, those handed out
    (in order), and those that could not be decoded, with why (dead-lettered alone)."""

    size: int
    items: list[PackedItem]
    bad: list[tuple[PackedItem, str]]


def _back(
    codec: Codec, item: PackedItem, deliveries: int, error: tuple[str, str] | None
) -> list[Any]:
    """A ``P`` record sending one item of a pack back to the stage's input, alone, with
    the deliveries it had (field ``r``) and the error it raised (if any)."""
    fields = single_fields(codec, item)
    if deliveries > 0:
        fields += [b"r", str(deliveries).encode()]
    err, rec = error or ("", "")
    return ["i", 1, 0, err, rec, len(fields), *fields]


def _counted(entry: Entry) -> Entry:
    """An entry with the deliveries of the pack it left (field ``r``) counted in."""
    entry_id, fields, deliveries = entry
    before = fields.get(b"r")
    return entry if before is None else (entry_id, fields, deliveries + int(before))


def _distinct(entries: list[Entry]) -> list[Entry]:
    """Entries without the repeats of a pack's items (which share their entry)."""
    out: list[Entry] = []
    for entry in entries:
        if not out or out[-1] is not entry:
            out.append(entry)
    return out


def _output_backlog(info: RunInfo, index: int) -> tuple[str, str]:
    """The group of stage ``index``'s output stream, and whether the entries read and
    not acknowledged count as backlog (`RunInfo.reader`)."""
    return info.reader(index + 1)


def _tombstone(seq: bytes | None) -> list[Any]:
    return ["f", 4, b"q", seq or b"", b"t", b"1"]


def _gap_records(taken: list[tuple[Entry, Any]]) -> list[Any]:
    """Hand-off records acknowledging entries whose places are done: a tombstone each,
    on to where the stage's tombstones go (nothing without a path)."""
    args: list[Any] = []
    for (entry_id, fields, deliveries), _ in taken:
        seq = fields.get(b"q")
        tomb = [] if seq is None else [_tombstone(seq)]
        args += ["a", entry_id, deliveries, len(tomb), *_flat(tomb)]
    return args


def _dead_record(entry: Entry, error: str) -> list[Any]:
    entry_id, fields, deliveries = entry
    kept = [x for k, v in fields.items() if k in (b"d", b"q", b"s", b"p") for x in (k, v)]
    return ["x", entry_id, deliveries, error, len(kept), *kept]


def _claimed(reply: list[Any]) -> list[Entry]:
    """The entries of a RECLAIM script's reply (after its cursor)."""
    return [(e[0], fields_to_dict(e[1]), int(e[2])) for e in reply[1]]


def _id_range(entries: list[Entry]) -> tuple[bytes, bytes]:
    """The lowest and highest stream ids of a batch (ids compare as pairs of numbers)."""
    ids = [e[0] for e in entries]
    return min(ids, key=_id_key), max(ids, key=_id_key)


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _merged(outcomes: list[BatchOutcome]) -> BatchOutcome:
    """What a hand-off counts of several outcomes (their records carry the outputs)."""
    return BatchOutcome(
        [],
        filtered=sum(o.filtered for o in outcomes),
        retried=sum(o.retried for o in outcomes),
        failures=[f for o in outcomes for f in o.failures],
        busy_seconds=sum(o.busy_seconds or 0.0 for o in outcomes),
    )


def _first_unencodable(codec: Codec, outputs: list[Any]) -> tuple[int, Exception] | None:
    """Index and error of the first of ``outputs`` that ``codec`` cannot encode."""
    for index, value in enumerate(outputs):
        try:
            codec.encode(value)
        except Exception as exc:
            return index, exc
    return None


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
