"""A run's byte budget on Redis (``max_bytes=``): what its streams may hold, in bytes.

::

    run(max_bytes=B, backend=RedisBackend(...))
      share = B // (N + 1): one per stream (the N stages' inputs and the final stream)
      counters hash:  budget = share,  bytes:<stream key> = bytes of its entries
                      added and not yet acknowledged (changed by the Lua scripts that
                      add and acknowledge entries, in the same atomic step; see
                      streams.LUA_BUDGET), acknowledged entries deleted (XDEL)

    feeder           adds as many records as the first stream has room for, once it
                     has room for the first
    stage workers    read no new input while their output has no room, take batches
                     of at most a share of input bytes (and of the room the output
                     had), wait for room for a batch's outputs before its hand-off
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
from dataclasses import dataclass
from typing import Any

from .streams import ENTRY_BOOKKEEPING, ENTRY_HEADER, MAX_POLL_SECONDS, SPLIT, Retrier, Scripts

__all__ = [
    "MAX_SHARE",
    "Room",
    "entry_cost",
    "fitting",
    "need_of",
    "record_cost",
    "room_of",
    "share_of",
    "wait_for_room",
]

Reader = tuple[str, str]
"""A stream's consumer group, and whether it holds entries to put them in order ('1')."""
FIRST_POLL_SECONDS = 0.0005
"""The first wait between two checks of a stream's room; it doubles to `MAX_POLL_SECONDS`."""


MAX_SHARE = 2**53
"""The largest share a stream is given (8 PiB, more than any Redis holds): the Lua
scripts count bytes in doubles, exact to 2**53; a larger share (``max_bytes=10**20``)
never had room, and the run waited for ever."""


def share_of(max_bytes: int, stages: int) -> int:
    """Each stream's share of a run's budget: ``max_bytes // (stages + 1)``, one at least,
    `MAX_SHARE` at most."""
    return min(MAX_SHARE, max(1, max_bytes // (stages + 1)))


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
    its field names' and values' lengths with `ENTRY_HEADER`, as `allocated`, plus
    `ENTRY_BOOKKEEPING`."""
    size = ENTRY_HEADER + sum(len(k) + len(v) for k, v in fields.items())
    return allocated(size) + ENTRY_BOOKKEEPING


def record_cost(fields: Iterable[Any]) -> int:
    """The bytes an entry about to be added counts for (``fields``: names and values
    as the scripts get them, ints and strs as text), as `entry_cost`."""
    return allocated(ENTRY_HEADER + _text_bytes(fields)) + ENTRY_BOOKKEEPING


BESIDE = 64
"""Bytes `need_of` allows for the field names and sequence path beside a large value."""


def need_of(records: Sequence[Any]) -> int:
    """What a hand-off's records add to its output, counted generously whatever their
    format: a value of half a stream node or more as an entry of its own (with
    `BESIDE` bytes of other fields), every other argument's bytes with a header and
    bookkeeping per three of them (a record has three at least)."""
    big = [a for a in records if isinstance(a, bytes) and len(a) >= SPLIT // 2]
    small = [a for a in records if not (isinstance(a, bytes) and len(a) >= SPLIT // 2)]
    need = sum(allocated(ENTRY_HEADER + BESIDE + len(a)) + ENTRY_BOOKKEEPING for a in big)
    return need + _text_bytes(small) + (ENTRY_HEADER + ENTRY_BOOKKEEPING) * (len(small) // 3)


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


@dataclass(frozen=True)
class Room:
    """A stream's room in the run's byte budget (streams.ROOM)."""

    used: int
    """The bytes its entries count for."""
    share: int
    """Its share of the budget (0: no budget)."""
    free: bool
    """Anything may go in: no budget, it holds no bytes (an entry larger than a share
    goes in alone), or its consumer holds what it read to put it in order."""

    def fits(self, need: int) -> bool:
        """Whether ``need`` more bytes may go in now."""
        return self.free or self.used + need <= self.share

    @property
    def left(self) -> int:
        """The bytes that may go in now (a share when `free`; with no budget, 0)."""
        return self.share if self.free else max(0, self.share - self.used)


def room_of(scripts: Scripts, retry: Retrier, stream: str, counters: str, reader: Reader) -> Room:
    """``stream``'s room now; ``reader`` is its consumer group and whether it holds
    entries to put them in order ('1'; `RunInfo.room_reader`)."""
    used, share, free = retry(scripts.room, keys=[stream, counters], args=list(reader))
    return Room(int(used), int(share), bool(free))


def wait_for_room(
    scripts: Scripts,
    retry: Retrier,
    stream: str,
    counters: str,
    reader: Reader,
    need: int,
    stopped: threading.Event,
) -> Room | None:
    """Wait until ``stream`` has room for ``need`` bytes and return it; None if
    ``stopped`` was set first (see `room_of`)."""
    delay = FIRST_POLL_SECONDS
    while True:
        room = room_of(scripts, retry, stream, counters, reader)
        if room.fits(need):
            return room
        if stopped.wait(delay):
            return None
        delay = min(MAX_POLL_SECONDS, delay * 2)
