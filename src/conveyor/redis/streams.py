"""Key naming, connections, retries and the Lua scripts every Redis operation goes through.

Every key of one run shares the hash tag ``{<pipeline id>.<run id>}``, so the
multi-key scripts below touch a single slot (a requirement of Redis Cluster,
and harmless on one server). The scripts are the only places where stream
entries change hands; each runs atomically on the server, and is replicated
and written to the append-only file as one transaction.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..errors import BackendError, BackendUnavailable, ConfigurationError, ConfigurationTypeError

__all__ = [
    "DRIVER_GROUP",
    "MAX_POLL_SECONDS",
    "WORKER_GROUP",
    "Keys",
    "Retrier",
    "Scripts",
    "check_redis_options",
    "check_url",
    "connect",
    "consumer_name",
    "fields_to_dict",
    "pipeline_id",
    "redact",
    "tombstone_counter",
]

log = logging.getLogger("conveyor.redis")
T = TypeVar("T")

WORKER_GROUP = "workers"
"""The consumer group of every stage's input stream."""
DRIVER_GROUP = "driver"
"""The consumer group of the final stream, read by the run's driver."""
MAX_POLL_SECONDS = 0.005
"""Longest wait between two checks of a full stream's length. Redis cannot
notify a length going down, so a producer over its limit polls (XLEN, a few
microseconds of server time); a short cap keeps a drained stream from
sitting idle while its producer sleeps."""


def pipeline_id(stages: Sequence[Any]) -> str:
    """A short, stable name for a pipeline's shape: its stages' kinds and names, and
    the settings that change what comes out of them.

    The driver and every worker compute it from the same pipeline definition,
    so they meet on the same keys without being told; a changed pipeline (a
    stage added or renamed, another batch size, ordering, ``retries``,
    ``timeout`` or ``on_error``) gets other keys, so a worker still running the
    old version never serves the new one's runs. Workers, capacity and runtime
    only change how fast it goes: each worker may set its own.
    """
    shape = "|".join(
        f"{s.kind}:{s.name}:{s.batch_size}:{s.interval}:{s.ordered}:{s.retries}:"
        f"{s.timeout}:{s.on_error}"
        for s in stages
    )
    return hashlib.sha1(shape.encode(), usedforsecurity=False).hexdigest()[:10]


@dataclass(frozen=True)
class Keys:
    """The names of a run's keys.

    ``stream(i)`` is stage ``i``'s input; ``stream(n)``, after the last
    stage, is the final stream that the driver reads.
    """

    namespace: str
    pipeline: str
    run: str

    @property
    def runs(self) -> str:
        """The set of the pipeline's live runs, which workers poll."""
        return f"{self.namespace}:{self.pipeline}:runs"

    @property
    def prefix(self) -> str:
        """Common start of the run's own keys (with the hash tag)."""
        return f"{self.namespace}:{{{self.pipeline}.{self.run}}}"

    @property
    def meta(self) -> str:
        """Hash: the run's settings and state (codec, limits, source done)."""
        return f"{self.prefix}:meta"

    @property
    def counters(self) -> str:
        """Hash: the run's counters, updated by every hand-off."""
        return f"{self.prefix}:counters"

    @property
    def failures(self) -> str:
        """Stream: items given up on by stages with ``on_error="skip"``."""
        return f"{self.prefix}:failures"

    def stream(self, index: int) -> str:
        """Stream: the input of stage ``index`` (the final stream after the last)."""
        return f"{self.prefix}:s{index}"

    def errors(self, index: int) -> str:
        """Hash: entry id -> last error, for entries of stage ``index`` awaiting redelivery."""
        return f"{self.prefix}:e{index}"

    def dead(self, index: int) -> str:
        """Stream: stage ``index``'s dead letters."""
        return f"{self.prefix}:dlq{index}"

    def lease(self, index: int) -> str:
        """String: the consumer that makes batch stage ``index``'s groups, while it lives."""
        return f"{self.prefix}:lease{index}"

    @property
    def driver(self) -> str:
        """String: the driver of the run, while it lives (one driver per run)."""
        return f"{self.prefix}:driver"

    @property
    def done(self) -> str:
        """Bitmap: bit ``r`` set when source item ``r`` is through (unordered runs)."""
        return f"{self.prefix}:done"

    def all(self, stages: int) -> list[str]:
        """Every key of the run (not the shared ``runs`` set)."""
        keys = [self.meta, self.counters, self.failures, self.done, self.driver]
        keys.append(self.stream(stages))
        keys.append(self.dead(stages))  # final-stream entries the run did not make
        for i in range(stages):
            keys += [self.stream(i), self.errors(i), self.dead(i), self.lease(i)]
        return keys


def consumer_name(label: str) -> str:
    """A consumer name unique to this host, process and worker: host:pid:label:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{label}:{random.getrandbits(24):06x}"


def tombstone_counter(stream: int, stages: int) -> str:
    """The counter of tombstones added to ``stream``: ``tomb`` for the final stream,
    ``tomb:<i>`` for batch stage ``i``'s input."""
    return "tomb" if stream == stages else f"tomb:{stream}"


def fields_to_dict(flat: list[Any]) -> dict[bytes, bytes]:
    """A Lua reply's flat [field, value, ...] list as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# ---------------------------------------------------------------------- connections

_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def check_url(url: object, where: str) -> None:
    """Refuse, before anything connects, a ``url`` that is no Redis URL (``where`` names
    the class or function it was given to)."""
    accepted = "a str starting with redis://, rediss:// or unix://"
    if not isinstance(url, str):
        raise ConfigurationTypeError(
            f"{where} 'url' must be {accepted}, got {type(url).__name__} {url!r:.60}"
        )
    if not url.startswith(_URL_SCHEMES):
        raise ConfigurationError(f"{where} 'url' must be {accepted}, got {redact(url)!r:.60}")


def check_redis_options(url: str, redis_options: object, where: str) -> None:
    """Refuse ``redis_options`` that are no dict, or hold an option redis-py does not take,
    now, not at the first connection: build (without connecting) the connection they make."""
    if redis_options is None:
        return
    if not isinstance(redis_options, dict):
        raise ConfigurationTypeError(
            f"{where} 'redis_options' must be a dict or None, got {type(redis_options).__name__}"
        )
    if not redis_options:
        return
    import redis

    try:
        pool = redis.ConnectionPool.from_url(url, **redis_options)
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        raise ConfigurationTypeError(
            f"{where} 'redis_options' must hold options of redis.Redis.from_url: {exc}"
        ) from exc


def connect(url: str, timeout: float | None = None, **options: Any) -> Any:
    """A redis-py client for ``url`` (``redis://`` or ``rediss://``), checked with PING.

    RESP2 is pinned so replies have the same shape under every redis-py
    version. One connection attempt waits ``timeout`` seconds at most (5 s
    at most in any case). ``options`` go to `redis.Redis.from_url` (e.g.
    ``ssl_ca_certs``).

    Raises:
        BackendError: Redis refused the credentials, the database number or
            the TLS certificate (not retried: a wrong password does not get
            better by waiting).
        redis.ConnectionError: Redis did not answer (a `Retrier` tries again).
    """
    import redis

    settings: dict[str, Any] = {
        "protocol": 2,
        "socket_connect_timeout": 5.0 if timeout is None else max(0.1, min(5.0, timeout)),
        "socket_timeout": 10.0,
        "health_check_interval": 0,
    }
    settings.update(options)
    client = redis.Redis.from_url(url, **settings)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        client.close()
        if "required" in str(exc).lower():
            raise BackendError(
                f"Redis at {redact(url)} requires a password: put it in the URL "
                f"(redis://:PASSWORD@host:port/0 or redis://USER:PASSWORD@host:port/0)"
            ) from exc
        raise BackendError(
            f"Redis at {redact(url)} refused the credentials: {exc} "
            f"Check the password (and user name) in the URL."
        ) from exc
    except redis.ConnectionError as exc:
        client.close()
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "WRONG_VERSION_NUMBER" in str(exc):
            # Waiting does not fix a certificate: fail now, saying what to change.
            raise BackendError(
                f"TLS with Redis at {redact(url)} failed: {exc} For a private CA or a "
                f"self-signed certificate, add ?ssl_ca_certs=/path/ca.pem to the URL."
            ) from exc
        raise
    except redis.ResponseError as exc:
        client.close()
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise BackendError(
                f"Redis at {redact(url)} requires a password: put it in the URL "
                f"(redis://:PASSWORD@host:port/0 or redis://USER:PASSWORD@host:port/0)"
            ) from exc
        # Any other refusal while connecting (SELECT of a database number the server
        # does not have): waiting does not change the answer.
        raise BackendError(f"Redis at {redact(url)} refused the connection: {exc}") from exc
    return client


class Retrier:
    """Runs Redis operations again, with backoff, while Redis is unreachable.

    Connection errors, timeouts and a server still loading its data are
    retried with exponential backoff (50 ms doubling to 2 s, with jitter)
    until ``timeout`` seconds pass without one success (None: forever), then
    `BackendUnavailable` names ``url`` (password masked) and the last cause;
    or until ``stopped`` is set, which re-raises the last connection error.
    Redis out of memory (``maxmemory`` reached) raises a `BackendError` saying
    so at once. Any other error is raised at once. A connection lost after a success is
    logged once as a warning; one that never worked is only said by the error.
    """

    def __init__(
        self,
        where: str,
        timeout: float | None,
        stopped: threading.Event | None = None,
        url: str | None = None,
    ) -> None:
        self._where = where
        self._timeout = timeout
        self._stopped = stopped or threading.Event()
        self._url = url
        self._worked = False  # one call succeeded: a failure now is a lost connection
        self.interruptions = 0
        """Connection failures seen so far: a reply may have been lost with each."""

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` until it succeeds or the budget is spent."""
        from redis.exceptions import (
            AuthenticationError,
            AuthorizationError,
            ConnectionError,
            OutOfMemoryError,
            TimeoutError,
        )

        first_failure: float | None = None
        delay = 0.05
        while True:
            try:
                result = fn(*args, **kwargs)
                self._worked = True
                return result
            except (AuthenticationError, AuthorizationError):
                raise
            except BackendError:
                raise
            except OutOfMemoryError as exc:
                raise self.out_of_memory(exc) from exc
            except (ConnectionError, TimeoutError) as exc:
                now = time.monotonic()
                self.interruptions += 1
                if first_failure is None:
                    first_failure = now
                    if self._worked:
                        log.warning(
                            "conveyor: Redis unavailable (%s): %s; retrying", self._where, exc
                        )
                left = None if self._timeout is None else first_failure + self._timeout - now
                if left is not None and left <= 0:
                    raise self.unavailable(exc) from exc
                wait = random.uniform(delay / 2, delay)
                if self._stopped.wait(wait if left is None else min(wait, left)):
                    raise
                delay = min(2.0, delay * 2)

    def out_of_memory(self, cause: BaseException) -> BackendError:
        """The error saying Redis refused a write: its ``maxmemory`` is reached."""
        return out_of_memory(self._url, self._where, cause)

    def unavailable(self, cause: BaseException) -> BackendUnavailable:
        """The error saying Redis could not be reached for the whole budget."""
        where = "Redis" if self._url is None else f"Redis at {redact(self._url)}"
        return BackendUnavailable(
            f"cannot reach {where} ({self._where}, for {self._timeout:g} s): {cause}"
        )


def out_of_memory(url: str | None, doing: str, cause: BaseException) -> BackendError:
    """The error saying Redis at ``url`` refused a write while ``doing`` something: its
    ``maxmemory`` is reached; what to change."""
    where = "Redis" if url is None else f"Redis at {redact(url)}"
    return BackendError(
        f"{where} is out of memory ({doing}): it refuses writes once its "
        "maxmemory is reached (maxmemory-policy noeviction). Raise Redis's "
        "maxmemory, give runs a byte budget (run(max_bytes=..., backend=...)), or "
        f"cancel runs left in Redis. Redis said: {cause}"
    )


# ---------------------------------------------------------------------- scripts

ENTRY_HEADER = 64
"""Bytes an entry takes in its stream node besides its fields' (lengths, ids, flags;
a node's own header when the entry has a node of its own)."""
ENTRY_BOOKKEEPING = 1024
"""Bytes an entry costs Redis outside its node, as ``MEMORY USAGE`` counts them: its
places in the radix trees (the stream's, its consumer group's and its consumer's
pending lists, about 1.1 KiB measured for an entry read and not acknowledged)."""
SPLIT = 4096
"""Redis's ``stream-node-max-bytes`` default: an entry this large gets a stream node of
its own, allocated to fit it (so rounded up to the allocator's size class)."""

# A run's byte budget (``max_bytes=``; see redis/budget.py and docs/design.md), kept
# in its counters hash: ``budget`` holds each stream's share (absent: no budget, and
# nothing below costs more than one HEXISTS), ``bytes:<stream key>`` the bytes of the
# stream's entries added and not yet acknowledged. An entry counts for what it costs
# Redis (see budget.entry_cost, which this mirrors): the lengths of its field names and
# values, whatever the entry format, plus ENTRY_HEADER, an entry of a stream node of
# its own (SPLIT bytes and more) rounded up to the allocator's size class, plus
# ENTRY_BOOKKEEPING.
# budget_on(c): whether the run has a budget (looked up once per script call, or
# told by budget_known_as(value of the 'budget' field) by a script that read it along
# with other fields: every redis.call from Lua costs a few microseconds of the server's
# single thread, more than most commands themselves).
# xadd(c, key, ...): XADD key * ... and count the entry's bytes.
# forget(c, key, ids): delete acknowledged entries, so that their memory goes (an
# XTRIM would keep those behind a pending one), and uncount their bytes.
LUA_BUDGET = """
local budget_known, budget_set = false, false
local function cost(fields)
  local n = ENTRY_HEADER
  for _, v in ipairs(fields) do n = n + #v end
  if n >= SPLIT then
    local p = 1
    while p <= n - 1 do p = p * 2 end
    local step = p / 8
    n = math.ceil(n / step) * step
  end
  return n + ENTRY_BOOKKEEPING
end
local function budget_known_as(share)
  -- A script that read the 'budget' field already (with others, in one HMGET).
  budget_set, budget_known = share ~= false and share ~= nil, true
end
local function budget_on(c)
  if not budget_known then
    budget_set = redis.call('HEXISTS', c, 'budget') == 1
    budget_known = true
  end
  return budget_set
end
local function xadd(c, key, ...)
  local id = redis.call('XADD', key, '*', ...)
  if budget_on(c) then
    redis.call('HINCRBY', c, 'bytes:' .. key, cost({...}))
  end
  return id
end
local function forget(c, key, ids)
  if not budget_on(c) then return end
  local n = 0
  for _, id in ipairs(ids) do
    local e = redis.call('XRANGE', key, id, id)[1]
    if e ~= nil then
      n = n + cost(e[2])
      redis.call('XDEL', key, id)
    end
  end
  if n > 0 and redis.call('HINCRBY', c, 'bytes:' .. key, -n) < 0 then
    -- Entries the run did not add (refused ones) were never counted.
    redis.call('HSET', c, 'bytes:' .. key, 0)
  end
end
"""
for _name, _value in (
    ("ENTRY_HEADER", ENTRY_HEADER),
    ("ENTRY_BOOKKEEPING", ENTRY_BOOKKEEPING),
    ("SPLIT", SPLIT),
):
    LUA_BUDGET = LUA_BUDGET.replace(_name, str(_value))

# Lua helpers shared by the scripts below.
#
# backlog(key, group, held): entries of the stream its group has not read yet
# (the group's lag), plus, with ``held``, those read but not acknowledged: the
# work left in the stream, whatever acknowledged entries still sit in it.
# trim(key, group): drop the acknowledged entries at the head of the stream,
# up to the oldest entry still pending (or the last one delivered, when none
# is): XTRIM MINID ~ removes whole nodes, far cheaper than deleting entries
# one by one, and never an entry that is pending or not delivered yet.
LUA_HELPERS = (
    """
local function group_info(key, group)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local f = {}
    for k = 1, #g, 2 do f[g[k]] = g[k + 1] end
    if f['name'] == group then return f end
  end
  return nil
end
local function backlog(key, group, held)
  local f = group_info(key, group)
  if f == nil then return redis.call('XLEN', key) end
  local lag = f['lag']
  if not lag then lag = redis.call('XLEN', key) - f['pending'] end
  if held then return lag + f['pending'] end
  return lag
end
local function trim(key, group)
  local floor = redis.call('XPENDING', key, group)[2]
  if not floor then
    local f = group_info(key, group)
    if f == nil then return end
    floor = f['last-delivered-id']
  end
  redis.call('XTRIM', key, 'MINID', '~', floor)
end
"""
    + LUA_BUDGET
)

# Hand a batch on: for each input entry still pending for this consumer,
# acknowledge it (and trim the stream's acknowledged head), and add its
# outputs; or record its error and make it reclaimable now ('n'); or move it
# to the dead letters ('x'). Entries no
# longer ours (reclaimed by another worker meanwhile) are skipped: their
# outputs would be duplicates. A batch stage's hand-off (a cursor given) is
# refused unless this consumer still holds the stage's lease, and records how
# far in source order the stage has gone. All in one atomic step.
#
# KEYS: input, output, tombstones' stream (final, or the next batch stage's
#       input), counters, meta, errors, dead, lease
# ARGV: group, consumer, stage, visibility ms, filtered, failed, retried,
#       busy us, lowest id, highest id, number of entries, tombstone counter,
#       output's group, count what it holds as backlog ('1'|'0'),
#       cursor ('' for no batch stage, '-' for one without paths), the stage's
#       batch size to record as 'take:<stage>' ('' if unchanged), trim the input
#       ('1'|'0': the consumer asks every TRIM_SECONDS, not at every hand-off), then
#       records:
#   'o' id data              (first delivery, one output: its field d)
#   'O' id data seq          (the same with field q)
#   'a' id deliveries n_out [dest('o'|'f': output|tombstones) k field value ...] * n_out
#   'n' id error record    (error: the traceback text; record: the exception as JSON,
#                           `conveyor.remote.ExceptionRecord`, kept beside it as id#r)
#   'x' id deliveries error k field value ...   (the dead letter gets both, err and rec)
#   'P' id deliveries items n [dest c t error record k field value ...] * n
#                          (a packed entry of `items` items, see packing.py: each record
#                           an entry carrying c items and t tombstones, to dest 'o' the
#                           output (tombstones too when it is their stream), 'f' the
#                           tombstones' stream, 'i' back to the input -- a failed or
#                           unreached item, its error kept with the new entry when
#                           not '' -- or 'x' the dead letters)
# Counters count items: an entry handed on counts its items, less those sent back
# to the input or to the dead letters.
# Returns {acked, stale, backlog of the output stream, the next stage's batch size
# ('take:<stage + 1>', 0 if unknown: producers pack entries no larger)}, -1 if the
# run is gone, -2 if the batch stage's lease is another consumer's.
HANDOFF = (
    LUA_HELPERS
    + """
if redis.call('EXISTS', KEYS[5]) == 0 then return -1 end
local group, consumer, st = ARGV[1], ARGV[2], ARGV[3]
if ARGV[15] ~= '' then
  if redis.call('GET', KEYS[8]) ~= consumer then return -2 end
  if ARGV[15] ~= '-' then redis.call('HSET', KEYS[5], 'cursor:' .. st, ARGV[15]) end
end
-- What this consumer holds, in one range query over the batch's ids; when the
-- reply is cut at its count (the consumer holds more in that range: a batch
-- stage reordering), an id not in it is looked up alone.
local held = {}
local pending = redis.call('XPENDING', KEYS[1], group, ARGV[9], ARGV[10], ARGV[11], consumer)
for _, p in ipairs(pending) do
  held[p[1]] = true
end
local cut = #pending >= tonumber(ARGV[11])
local function owned(id)
  if held[id] then return true end
  return cut and redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer)[1] ~= nil
end
local acked, stale, outs, tombs, redelivered, dead = 0, 0, 0, 0, 0, 0
local done = {}
if ARGV[16] ~= '' then redis.call('HSET', KEYS[4], 'take:' .. st, ARGV[16]) end
-- The run's budget and the next stage's batch size, read together.
local conf = redis.call('HMGET', KEYS[4], 'budget', 'take:' .. (tonumber(st) + 1))
budget_known_as(conf[1])
local i = 18
while i <= #ARGV do
  local op, id = ARGV[i], ARGV[i + 1]
  if op == 'o' or op == 'O' then
    -- The common case, compact: first delivery, exactly one output (d, and q with 'O').
    if owned(id) then
      acked = acked + 1
      outs = outs + 1
      done[#done + 1] = id
      if op == 'o' then
        xadd(KEYS[4], KEYS[2], 'd', ARGV[i + 2])
      else
        xadd(KEYS[4], KEYS[2], 'd', ARGV[i + 2], 'q', ARGV[i + 3])
      end
    else
      stale = stale + 1
    end
    if op == 'o' then i = i + 3 else i = i + 4 end
  elseif op == 'a' then
    local deliveries, n = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    i = i + 4
    local mine = owned(id)
    if mine then
      acked = acked + 1
      redelivered = redelivered + deliveries - 1
      done[#done + 1] = id
      -- Only an entry delivered before can have an error recorded.
      if deliveries > 1 then redis.call('HDEL', KEYS[6], id, id .. '#r') end
    else
      stale = stale + 1
    end
    for _ = 1, n do
      local dest, k = ARGV[i], tonumber(ARGV[i + 1])
      if mine then
        if dest == 'f' then
          xadd(KEYS[4], KEYS[3], unpack(ARGV, i + 2, i + 1 + k))
          tombs = tombs + 1
        else
          xadd(KEYS[4], KEYS[2], unpack(ARGV, i + 2, i + 1 + k))
          outs = outs + 1
        end
      end
      i = i + 2 + k
    end
  elseif op == 'n' then
    if owned(id) then
      redis.call('HSET', KEYS[6], id, ARGV[i + 2], id .. '#r', ARGV[i + 3])
      redis.call('XCLAIM', KEYS[1], group, consumer, 0, id, 'IDLE', ARGV[4], 'JUSTID')
    end
    i = i + 4
  elseif op == 'P' then
    local deliveries, items, n = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    i = i + 5
    if owned(id) then
      done[#done + 1] = id
      if deliveries > 1 then redis.call('HDEL', KEYS[6], id, id .. '#r') end
      local left = items
      for _ = 1, n do
        local dest, c, t = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
        local err, rec, k = ARGV[i + 3], ARGV[i + 4], tonumber(ARGV[i + 5])
        local first, last = i + 6, i + 5 + k
        if dest == 'o' then
          xadd(KEYS[4], KEYS[2], unpack(ARGV, first, last))
          outs = outs + c
          tombs = tombs + t
        elseif dest == 'f' then
          xadd(KEYS[4], KEYS[3], unpack(ARGV, first, last))
          tombs = tombs + t
        elseif dest == 'i' then
          local nid = xadd(KEYS[4], KEYS[1], unpack(ARGV, first, last))
          if err ~= '' then redis.call('HSET', KEYS[6], nid, err, nid .. '#r', rec) end
          left = left - c
        else
          redis.call('XADD', KEYS[7], '*', 'src', id, 'n', deliveries, 'err', err, 'rec', rec,
                     unpack(ARGV, first, last))
          dead = dead + c
          left = left - c
        end
        i = last + 1
      end
      acked = acked + left
      redelivered = redelivered + (deliveries - 1) * left
    else
      stale = stale + 1
      for _ = 1, n do i = i + 6 + tonumber(ARGV[i + 5]) end
    end
  else
    local deliveries, err, k = ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4])
    if owned(id) then
      local last = redis.call('HGET', KEYS[6], id)
      local rec = redis.call('HGET', KEYS[6], id .. '#r') or ''
      if err == '' then err = last or 'no error recorded (the worker died or timed out)' end
      redis.call('XADD', KEYS[7], '*', 'src', id, 'n', deliveries, 'err', err, 'rec', rec,
                 unpack(ARGV, i + 5, i + 4 + k))
      redis.call('HDEL', KEYS[6], id, id .. '#r')
      done[#done + 1] = id
      dead = dead + 1
    else
      stale = stale + 1
    end
    i = i + 5 + k
  end
end
if #done > 0 then
  redis.call('XACK', KEYS[1], group, unpack(done))
  forget(KEYS[4], KEYS[1], done)
  if ARGV[17] == '1' then trim(KEYS[1], group) end
end
local c = KEYS[4]
local function add(name, n)
  n = tonumber(n)
  if n ~= 0 then redis.call('HINCRBY', c, name, n) end
end
add('in:' .. st, acked)
add('out:' .. st, outs)
add(ARGV[12], tombs)
add('redelivered:' .. st, redelivered)
add('stale:' .. st, stale)
add('dead:' .. st, dead)
add('filtered:' .. st, ARGV[5])
add('failed:' .. st, ARGV[6])
add('retried:' .. st, ARGV[7])
add('busy_us:' .. st, ARGV[8])
-- The driver (final stream) and a batch stage hold entries while they reorder:
-- those are not backlog, or a missing item could never get past a full stream.
return {acked, stale, backlog(KEYS[2], ARGV[13], ARGV[14] == '1'), conf[2] or 0}
"""
)

# Add entries to a stream (the source's items, or submitted ones), and/or
# mark the source done. Nothing is written once the run's meta is gone: a
# Redis restarted without persistence must not get half a run back (a lone
# source_done would make an empty run look complete).
# KEYS: stream, counters, meta.  ARGV: counter, the counter's expected value
# ('' for none), done ('1': the source is done after these records), then
# records: c k field value ... (an entry carrying c items: see packing.py)
# Returns {the stream's backlog after, the first stage's batch size ('take:0', 0 if
# unknown)}, -1 if the run is gone, or -2 when the counter is past the expected
# value: an earlier attempt of this very call was applied (its reply lost with the
# connection), so nothing is added twice; -3 when records come without an expected
# value (a long-lived run's `submit`) and the run is closed (source_done).
FEED = (
    LUA_HELPERS
    + """
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
-- A long-lived run's producers (no expected count) add nothing once it is closed,
-- whichever handle or process closed it.
if ARGV[2] == '' and #ARGV >= 4 and redis.call('HGET', KEYS[3], 'source_done') == '1' then
  return -3
end
-- The run's budget, the first stage's batch size and the counter, read together.
local conf = redis.call('HMGET', KEYS[2], 'budget', 'take:0', ARGV[1])
if ARGV[2] ~= '' and tonumber(conf[3] or '0') ~= tonumber(ARGV[2]) then return -2 end
budget_known_as(conf[1])
local i, n = 4, 0
while i <= #ARGV do
  local k = tonumber(ARGV[i + 1])
  xadd(KEYS[2], KEYS[1], unpack(ARGV, i + 2, i + 1 + k))
  n = n + tonumber(ARGV[i])
  i = i + 2 + k
end
if ARGV[1] ~= '' and n > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], n) end
if ARGV[3] == '1' then redis.call('HSET', KEYS[3], 'source_done', '1') end
return {backlog(KEYS[1], 'workers', true), conf[2] or 0}
"""
)

# Take over entries idle for longer than the visibility timeout, with how
# many times each has now been delivered; forget consumers that hold nothing
# and were not seen for a long time (killed workers), so status stays readable
# (a live consumer that was removed comes back with its next read).
# KEYS: stream.  ARGV: group, consumer, min idle ms, cursor, count, forget ms.
# Returns {next cursor, {{id, {field, value, ...}, deliveries}, ...}}.
RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                     'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  if p[1] ~= nil then out[#out + 1] = {e[1], e[2], p[1][4]} end
end
if r[1] == '0-0' then
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local f = {}
    for k = 1, #c, 2 do f[c[k]] = c[k + 1] end
    if f['pending'] == 0 and f['idle'] > tonumber(ARGV[6]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    end
  end
end
return {r[1], out}
"""

# Move dead letters back to the stage's input (replay), or drop them (purge).
# A purged entry with a sequence path leaves a tombstone where the stage sends
# them (the final stream, or the next batch stage's input): its place is done.
# KEYS: dead, stream, counters, tombstones' stream.  ARGV: stage, mode
# ('replay'|'purge'), tombstone counter, ids...  Returns how many moved.
DEAD = (
    LUA_BUDGET
    + """
local st, mode, tomb = ARGV[1], ARGV[2], ARGV[3]
local moved = 0
for j = 4, #ARGV do
  local e = redis.call('XRANGE', KEYS[1], ARGV[j], ARGV[j])
  if e[1] ~= nil then
    local f = e[1][2]
    local keep = {}
    local seq = nil
    for k = 1, #f, 2 do
      if f[k] == 'd' or f[k] == 'q' or f[k] == 's' or f[k] == 'p' then
        keep[#keep + 1] = f[k]
        keep[#keep + 1] = f[k + 1]
      end
      if f[k] == 'q' then seq = f[k + 1] end
    end
    if mode == 'replay' then
      xadd(KEYS[3], KEYS[2], unpack(keep))
    else
      redis.call('HINCRBY', KEYS[3], 'in:' .. st, 1)
      redis.call('HINCRBY', KEYS[3], 'purged:' .. st, 1)
      if seq ~= nil then
        xadd(KEYS[3], KEYS[4], 'q', seq, 't', '1')
        redis.call('HINCRBY', KEYS[3], tomb, 1)
      end
    end
    redis.call('XDEL', KEYS[1], ARGV[j])
    redis.call('HINCRBY', KEYS[3], 'dead:' .. st, -1)
    moved = moved + 1
  end
end
return moved
"""
)


# The driver takes final-stream entries: acknowledge, trim, count the items they
# carried (by what XACK says, so a repeated call after a lost reply counts
# nothing twice). One XACK per entry: no unpack() of thousands of values, which
# overflows Lua's stack ("too many results to unpack") when an ordered run whose
# head item was slow releases thousands of entries at once.
# An unordered run's driver also writes the bytes of its ``done`` bitmap that hold
# the roots it completed (SETRANGE: one command, not a SETBIT per item), so that a
# resumed driver knows which items are through.
# KEYS: final, counters, done.  ARGV: group, released root ('' if unordered),
# the bitmap's offset in bytes and its bytes ('' for none), then (id, items
# carried) pairs.
ACK = (
    LUA_HELPERS
    + """
if ARGV[4] ~= '' then redis.call('SETRANGE', KEYS[3], ARGV[3], ARGV[4]) end
local n = 0
local ids = {}
for j = 5, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[j]) == 1 then n = n + tonumber(ARGV[j + 1]) end
  ids[#ids + 1] = ARGV[j]
end
forget(KEYS[2], KEYS[1], ids)
trim(KEYS[1], ARGV[1])
if n > 0 then redis.call('HINCRBY', KEYS[2], 'delivered', n) end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], 'released', ARGV[2]) end
return n
"""
)


# Take, keep or let go of a batch stage's lease: the one consumer that makes its
# groups (two could not make them consistently).
# KEYS: lease.  ARGV: consumer, time to live ms ('0': let go).
# Returns 2 when newly taken, 1 when kept, 0 when another consumer holds it.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
"""

# The work left in a stream.  KEYS: stream.  ARGV: group, held ('1'|'0').
# 0 when the stream is gone: its run ended as a worker polled it for room.
BACKLOG = (
    LUA_HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return backlog(KEYS[1], ARGV[1], ARGV[2] == '1')
"""
)


# How much room a stream has in the run's byte budget: {bytes used, its share, free},
# free 1 when anything may go in: no budget (share 0), the stream holds no bytes (so
# an entry larger than a share goes in alone), or its consumer holds entries to put
# them in order (reorders '1') and has read them all, or the entry it waits for could
# never come. The caller decides what fits (budget.Room).
# KEYS: stream, counters.  ARGV: group, reorders ('1'|'0').
ROOM = (
    LUA_HELPERS
    + """
local share = redis.call('HGET', KEYS[2], 'budget')
if not share then return {0, 0, 1} end
local used = tonumber(redis.call('HGET', KEYS[2], 'bytes:' .. KEYS[1]) or '0')
local free = used <= 0 or (ARGV[2] == '1' and backlog(KEYS[1], ARGV[1], false) == 0)
return {used, tonumber(share), free and 1 or 0}
"""
)


class Scripts:
    """The Lua scripts registered on one client (reloaded by redis-py after a restart)."""

    def __init__(self, client: Any) -> None:
        self.handoff = client.register_script(HANDOFF)
        self.feed = client.register_script(FEED)
        self.reclaim = client.register_script(RECLAIM)
        self.dead = client.register_script(DEAD)
        self.ack = client.register_script(ACK)
        self.backlog = client.register_script(BACKLOG)
        self.lease = client.register_script(LEASE)
        self.room = client.register_script(ROOM)
