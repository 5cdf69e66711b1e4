"""A run's byte budget on Redis (``max_bytes=``): what its streams may hold, in bytes.

::

    run(max_bytes=B, backend=RedisBackend(...))
      share = B // (N + 1): one per stream (the N stages' inputs and the final stream)
      counters hash:  budget = share,  bytes:<stream key> = bytes of its entries
                      added and not yet acknowledged (changed by the Lua scripts that
                      add and acknowledge entries, in the same atomic step; see
                      streams.LUA_BUDGET), acknowledged entries deleted (XDEL)

    feeder           waits for room for each part of a chunk (at most a share)
    stage workers    read no new input while their output has no room, take batches
                     of at most a share of input bytes, wait for room for a batch's
                     outputs before its hand-off
    driver           reads the final stream; its acknowledgements free the bytes

A stream has room for ``need`` bytes when it holds none (so one entry larger than a
share still goes, alone) or they fit in its share (see streams.ROOM). The waits poll,
as the stream-length limit's do (Redis cannot notify a counter going down), and end
at once when the run stops: nothing is handed on then, and the entries stay pending,
to be taken over.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

from .streams import ENTRY_OVERHEAD, MAX_POLL_SECONDS, SPLIT, Retrier, Scripts

__all__ = [
    "entry_cost",
    "fitting",
    "has_room",
    "need_of",
    "record_cost",
    "share_of",
    "wait_for_room",
]

FIRST_POLL_SECONDS = 0.0005
"""The first wait between two checks of a stream's room; it doubles to `MAX_POLL_SECONDS`."""


def share_of(max_bytes: int, stages: int) -> int:
    """Each stream's share of a run's budget: ``max_bytes // (stages + 1)``, one at least."""
    return max(1, max_bytes // (stages + 1))


def allocated(n: int) -> int:
    """What Redis costs for ``n`` bytes of entries: a stream node of its own (``SPLIT``
    bytes and more) is rounded up to jemalloc's size class (four per power of two),
    which is 25% more for a payload of just over a power of two."""
    if n < SPLIT:
        return n
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def entry_cost(fields: dict[bytes, bytes]) -> int:
    """The bytes an entry read back counts for, as the scripts count it (streams.LUA_BUDGET):
    its field names' and values' lengths, plus `ENTRY_OVERHEAD`, as `allocated`."""
    return allocated(ENTRY_OVERHEAD + sum(len(k) + len(v) for k, v in fields.items()))


def record_cost(fields: Iterable[Any]) -> int:
    """The bytes an entry about to be added counts for (``fields``: names and values
    as the scripts get them, ints and strs as text)."""
    return allocated(ENTRY_OVERHEAD + _text_bytes(fields))


def need_of(records: Sequence[Any]) -> int:
    """At most what a hand-off's records add to its output, whatever their format: as
    one entry of all their bytes (ids and record codes too), the allocator's rounding
    of each included (at most a quarter)."""
    return ENTRY_OVERHEAD + _text_bytes(records) * 5 // 4


def _text_bytes(args: Iterable[Any]) -> int:
    return sum(len(a) if isinstance(a, bytes) else len(str(a).encode()) for a in args)


def fitting(sizes: Sequence[int], share: int) -> int:
    """How many of ``sizes``, from the first, fit in ``share`` together (one at least)."""
    total = 0
    for n, size in enumerate(sizes):
        total += size
        if n and total > share:
            return n
    return len(sizes)


def wait_for_room(
    scripts: Scripts,
    retry: Retrier,
    stream: str,
    counters: str,
    reader: tuple[str, str],
    need: int,
    stopped: threading.Event,
) -> bool:
    """Wait until ``stream`` has room for ``need`` bytes; False if ``stopped`` was set first.

    ``reader`` is the stream's consumer group and whether the entries it has read
    count as held ('1'), or are held to be reordered ('0'): see streams.ROOM.
    """
    delay = FIRST_POLL_SECONDS
    while True:
        if has_room(scripts, retry, stream, counters, reader, need):
            return True
        if stopped.wait(delay):
            return False
        delay = min(MAX_POLL_SECONDS, delay * 2)


def has_room(
    scripts: Scripts,
    retry: Retrier,
    stream: str,
    counters: str,
    reader: tuple[str, str],
    need: int,
) -> bool:
    """Whether ``stream`` has room for ``need`` bytes now (see `wait_for_room`)."""
    return bool(retry(scripts.room, keys=[stream, counters], args=[*reader, need]))
