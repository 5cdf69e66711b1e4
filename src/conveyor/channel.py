"""Channel: a bounded multi-producer multi-consumer channel, for threads and asyncio.

One lock guards everything: the deque of items, the counters and the two
deques of parked waiters (consumers waiting for an item, producers waiting for
room). A parked thread sleeps on a private lock, a parked coroutine on a
future; both kinds sit in the same deques, so a thread and a coroutine are
woken in the order they arrived. The fast path of every operation is one
lock round-trip and no notification: a waiter is woken only when somebody is
known to be asleep, which is what makes a Channel several times cheaper than
``queue.Queue`` (which notifies on every call).

Closing needs no sentinel. ``close()`` (``shutdown()``) stops new puts; getters
drain what is left and then see ``ShutDown``; ``for item in channel`` simply
ends. Several producers share the closing through ``producer()`` handles: the
channel closes when the last handle is closed.

Items live in ``queue`` (a deque, as in ``queue.Queue``), which the code
reaches through ``_items``: the deque itself, or, in a subclass overriding
``queue.Queue``'s storage hooks (``_init``/``_qsize``/``_put``/``_get``), an
adapter that calls them. ``get_many`` pops a batch through the optional C
accelerator (``conveyor._speedups``) when it is built; see `ACCELERATED`.

Invariants, all under ``_lock``:

* ``len(queue) <= maxsize`` after any put when ``maxsize > 0`` (a shrunk
  ``maxsize`` is honoured by later puts, as in ``queue.Queue``);
* ``_getters`` / ``_putters`` hold exactly the waiters not yet woken: a waker
  pops the waiter it wakes, a waiter that times out removes itself;
* a woken waiter re-checks the state and uses it; one that gives up instead
  (cancelled, Ctrl-C) passes its wake-up on to the next waiter;
* if items are in the channel while consumers are parked, a woken consumer
  has yet to run (and the same for room and producers): every put() wakes a
  parked consumer, a batch put only if no woken thread has yet to run, and
  a consumer that was woken and leaves items behind wakes the next. So
  batches keep one wake-up in flight per side, not one per call: a woken
  thread that finds a batch's items gone costs a thread switch for nothing.
  The exception: while every woken consumer takes a single item (``get()``,
  ``get_many(1)``) and items are left over, a batch put wakes one more per item
  left over, so the consumers of slow workers start together.
"""

from __future__ import annotations

import os
import sys
import threading
from _thread import LockType, get_ident
from _thread import allocate_lock as _allocate_lock
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import repeat, starmap
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

from .errors import ConfigurationError, ConfigurationTypeError, Empty, Full, ShutDown
from .validate import check_byte_size, check_int, check_seconds

if TYPE_CHECKING:
    import asyncio

__all__ = ["ACCELERATED", "Channel", "ChannelStats", "Producer", "check_max_bytes", "size_of"]

T = TypeVar("T")
R = TypeVar("R")


def _take_python(q: deque[T], n: int) -> list[T]:
    """Pop the first ``n`` items of ``q`` (at most ``len(q)``) into a list.

    A C-level loop of popleft() calls (no Python frame per item); the C
    accelerator's take() does the same at about half the cost per item.
    """
    return list(starmap(q.popleft, repeat((), min(n, len(q)))))


PURE_PYTHON_ENV = "CONVEYOR_PURE_PYTHON"
_ON = ("1", "true", "yes")
_OFF = ("", "0", "false", "no")


def pure_python_wanted() -> bool:
    """Whether ``CONVEYOR_PURE_PYTHON`` asks for the pure-Python channel: 1, true or yes
    (any case) for on; unset, empty, 0, false or no for off.

    Raises:
        ConfigurationError: any other value (a typo would otherwise silently be one).
    """
    value = os.environ.get(PURE_PYTHON_ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ConfigurationError(
        f"the {PURE_PYTHON_ENV} environment variable must be 1, true or yes (on) or "
        f"0, false, no or empty (off), got {os.environ[PURE_PYTHON_ENV]!r}"
    )


def _pick_take() -> Callable[[deque[T], int], list[T]]:
    if pure_python_wanted():
        return _take_python
    try:
        from ._speedups import take
    except ImportError:  # not built (no compiler, CONVEYOR_NO_EXTENSIONS): same, slower
        return _take_python
    return take


_take = _pick_take()

ACCELERATED: bool = _take is not _take_python
"""True when the optional C accelerator is in use (see docs/design.md).

It speeds up ``get_many()`` from a channel holding more than the batch asked
for; every other operation is the same Python code either way. Set the
environment variable ``CONVEYOR_PURE_PYTHON=1`` before importing conveyor to
run without it.
"""


@dataclass(frozen=True)
class ChannelStats:
    """A snapshot of a channel's state, taken under its lock."""

    size: int
    """Items in the channel now."""
    capacity: int
    """``maxsize``; 0 means unbounded."""
    waiting_producers: int
    """Threads and coroutines parked until there is room."""
    waiting_consumers: int
    """Threads and coroutines parked until there is an item."""
    total_put: int
    """Items put since the channel was made."""
    total_got: int
    """Items taken since the channel was made (a shutdown(immediate=True) drain counts)."""
    closed: bool
    """True once ``close()``/``shutdown()`` was called (items may still be left)."""
    open_producers: int
    """Producer handles not yet closed."""
    max_bytes: int | None = None
    """The byte budget (``Channel(..., max_bytes=)``); None: none, and bytes are not measured."""
    bytes: int = 0
    """Bytes of the items in the channel now, as the budget measures them (see `size_of`)."""
    peak_bytes: int = 0
    """The most bytes the channel has held at once since it was made."""

    @property
    def fill(self) -> float:
        """Fraction of the capacity in use (0.0 for an unbounded channel)."""
        return self.size / self.capacity if self.capacity > 0 else 0.0


class _AsyncWaiter:
    """A coroutine parked on a channel: its loop, the future it awaits, the loop's thread."""

    __slots__ = ("future", "loop", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.thread = get_ident()  # created by a coroutine: the thread its loop runs in


_Waiter = LockType | _AsyncWaiter

# queue.Queue's storage hooks, which a subclass may override.
_HOOKS = ("_init", "_qsize", "_put", "_get")


class _HookedItems(Generic[T]):
    """A subclass's storage seen through its hooks, as the deque methods the channel uses."""

    __slots__ = ("_channel",)

    def __init__(self, channel: Channel[T]) -> None:
        self._channel = channel

    def __len__(self) -> int:
        return self._channel._qsize()

    def __bool__(self) -> bool:
        return self._channel._qsize() > 0

    def append(self, item: T) -> None:
        self._channel._put(item)

    def popleft(self) -> T:
        return self._channel._get()


class _Waiters(deque[_Waiter]):
    """Parked waiters, oldest first, and how many woken threads have yet to run.

    ``woken`` counts thread waiters released and not yet back under the lock.
    Coroutines woken are not counted: a stopped event loop may never run
    them, and nobody must depend on them to pass a wake-up on. ``singles``
    holds the parked threads that will take one item (``get()``,
    ``get_many(1)``), and ``woken_singles`` counts those among ``woken``.
    ``least`` (producers only): the free slots a get must leave before it
    wakes the parked producer; more than 1 only while the one parked is a
    `Channel.wait_for_room` asking for that much room (any other producer
    that parks sets it back to 1).
    """

    __slots__ = ("least", "singles", "woken", "woken_singles")

    def __init__(self) -> None:
        super().__init__()
        self.woken = 0
        self.singles: set[_Waiter] = set()
        self.woken_singles = 0
        self.least = 1


def _resolve(future: asyncio.Future[None]) -> None:
    # Runs in the waiter's own loop: only there is touching the future safe.
    if not future.done():
        future.set_result(None)


_TIMEOUT_MAX = threading.TIMEOUT_MAX


def size_of(item: object) -> int:
    """The bytes an item counts for in a byte budget (``max_bytes``).

    ``len()`` of `bytes` and `bytearray`; ``nbytes`` of anything that has an
    int one (`memoryview`, NumPy arrays and other buffer types, found by the
    attribute: NumPy is never imported for it); else ``sys.getsizeof``,
    which is shallow: a list or dict counts its own table, not the objects
    it refers to. Measured once, when the item is put.
    """
    if type(item) is bytes or type(item) is bytearray:
        return len(item)
    nbytes = getattr(item, "nbytes", None)
    if type(nbytes) is int:
        return nbytes
    return sys.getsizeof(item)


def check_max_bytes(max_bytes: object, where: str) -> int | None:
    """``max_bytes`` as a number of bytes (None stays None); else raise, naming ``where``.

    A size with a unit is accepted as well as an int: ``"256MiB"`` is 268435456
    (`conveyor.validate.check_byte_size`).

    Raises:
        ConfigurationTypeError: neither an int, a whole float nor a string (a bool is
            refused too).
        ConfigurationError: zero or negative, or a string that is no size.
    """
    if max_bytes is None:
        return None
    return check_byte_size(max_bytes, "max_bytes", where)


def _check_max_items(max_items: object, where: str) -> None:
    check_int(max_items, "max_items", where, 1)


def _batch(items: Iterable[T], where: str) -> list[T]:
    """``items`` as a list (itself when it is one), or a clear error naming them."""
    if isinstance(items, list):
        return items
    if not isinstance(items, Iterable):
        raise ConfigurationTypeError(
            f"{where} 'items' must be an iterable of items, got {type(items).__name__}"
        )
    return list(items)


def _check_timeout(timeout: object, where: str) -> None:
    # Any wait is clamped to threading.TIMEOUT_MAX, so a huge (even infinite)
    # timeout works, as in queue.Queue; a negative or NaN one does not.
    check_seconds(timeout, "timeout", where, zero=True, maximum=None)


class Channel(Generic[T]):
    """A bounded FIFO channel for many producers and many consumers.

    A drop-in replacement for `queue.Queue` (same methods, same exceptions,
    Python 3.13's ``shutdown()`` on every supported Python), plus closing
    without sentinels, batch operations, an asyncio side and statistics.

    Args:
        maxsize: the capacity. ``0`` (the default) means unbounded, as in
            `queue.Queue`. Must be a non-negative ``int``.
        max_bytes: a budget in bytes for the items held, besides the count
            (an int, or a size such as ``"64MiB"`` or ``"1.5GB"``): a put
            waits while the items in the channel and the new one would
            exceed it. Sizes are measured by `size_of` (``len`` of bytes,
            ``nbytes`` of buffers and arrays, shallow ``sys.getsizeof``
            otherwise). An item larger than the whole budget still goes in,
            alone (empty items aside), once the channel holds no bytes:
            never a deadlock. A ``get_many`` batch stays within the budget
            too (one item at least). None (the default): no budget, and no
            measuring.

    Raises:
        ConfigurationTypeError: ``maxsize`` is not an int, or ``max_bytes``
            neither an int nor a size.
        ConfigurationError: ``maxsize`` is negative, or ``max_bytes`` is not
            positive or not a size.

    Example:
        >>> ch = Channel(maxsize=2)
        >>> with ch.producer() as p:
        ...     p.put_many([1, None])
        >>> list(ch)
        [1, None]
    """

    max_bytes: int | None = None
    """The byte budget, or None (see the class docstring)."""
    _bytes = 0  # measured by a channel with a budget only (_BudgetChannel)
    _peak_bytes = 0

    def __new__(cls, maxsize: int = 0, max_bytes: int | str | None = None) -> Channel[T]:
        # A byte budget is a subclass of its own, so that the plain channel's
        # fast paths carry no test for it.
        if max_bytes is None or cls is not Channel:
            return object.__new__(cls)  # not super(): a Channel is made per stage and run
        return object.__new__(_BudgetChannel)

    def __init__(self, maxsize: int = 0, max_bytes: int | str | None = None) -> None:
        # queue.Queue takes a negative maxsize for unbounded too; here only 0 means it.
        check_int(maxsize, "maxsize", "Channel", 0, note=" (0 for unbounded)")
        if max_bytes is not None:
            max_bytes = check_max_bytes(max_bytes, "Channel")
            if type(self) is not _BudgetChannel:
                raise ConfigurationError(
                    f"Channel 'max_bytes' is not supported by a subclass "
                    f"({type(self).__name__}): use Channel itself"
                )
        self.maxsize = maxsize
        self.queue: Any
        self._init(maxsize)
        # Where the code below keeps items: the deque itself, or for a subclass
        # with queue.Queue's storage hooks, an adapter that calls them.
        self._items: deque[T] | _HookedItems[T] = _HookedItems(self) if self._hooked else self.queue
        # queue.Queue exposes its lock under this name; so do we.
        self.mutex = self._lock = threading.Lock()
        self.all_tasks_done = threading.Condition(self._lock)  # notified when unfinished -> 0
        # Counters: items leave only through gets (or an immediate shutdown's
        # drain), so "got" and "unfinished" are derived from these two and the
        # hot paths touch a single counter.
        self._total_put = 0
        self._tasks_done = 0
        self.is_shutdown = False
        # Parked consumers and producers, oldest first: a thread's private lock
        # (released to wake it) or a coroutine's _AsyncWaiter. A waiter is
        # removed from its deque by whoever wakes it, so the deques hold
        # exactly the waiters that still need a wake-up.
        self._getters = _Waiters()
        self._putters = _Waiters()
        self._open_producers = 0

    # ------------------------------------------------------------------ queue.Queue's storage hooks

    _hooked = False  # True in a subclass that overrides one of the four hooks below

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._hooked = any(getattr(cls, name) is not getattr(Channel, name) for name in _HOOKS)

    def _init(self, maxsize: int) -> None:
        """Create the storage (``self.queue``); override with ``_qsize``/``_put``/``_get``.

        As in `queue.Queue`, a subclass may keep items in another order
        (LIFO, priority) by overriding these four methods; the channel then
        calls them under its lock. The plain Channel inlines them on its
        fast paths instead, and its batch operations go item by item
        through them in such a subclass.
        """
        self.queue = deque()

    def _qsize(self) -> int:
        return len(self.queue)

    def _put(self, item: T) -> None:
        self.queue.append(item)

    def _get(self) -> T:
        item: T = self.queue.popleft()
        return item

    # ------------------------------------------------------------------ wake-ups and sleeping
    # Only called with the lock held.

    @staticmethod
    def _wake(waiters: _Waiters, n: int) -> None:
        """Wake up to ``n`` waiters of ``waiters``, oldest first."""
        while n > 0 and waiters:
            waiter = waiters.popleft()
            if type(waiter) is _AsyncWaiter:
                try:
                    if waiter.thread == get_ident():
                        # From its own loop's thread: resolve the future at once,
                        # as asyncio.Queue does; a turn of the loop less before the
                        # waiter runs. Cancelled before it runs, it passes the
                        # wake-up on (`_park`).
                        _resolve(waiter.future)
                    else:
                        waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
                except RuntimeError:  # its loop is closed: nobody is left to wake
                    continue
            else:
                waiter.release()  # type: ignore[union-attr]
                waiters.woken += 1
                if waiters.singles and waiter in waiters.singles:
                    waiters.singles.discard(waiter)
                    waiters.woken_singles += 1
            n -= 1

    @staticmethod
    def _wake_one(waiters: _Waiters) -> None:
        """Wake the oldest waiter, unless a woken thread has yet to run.

        A woken waiter that finds more than it takes passes the wake-up on
        (the relays below), so one wake-up in flight is enough: more would
        wake threads that mostly find the items (or the room) gone and park
        again, a thread switch each for nothing. Room made by one get wakes
        one producer, not one per free slot, for the same reason.
        """
        if not waiters.woken:
            Channel._wake(waiters, 1)

    def _wake_consumers(self) -> None:
        """Wake parked consumers for the items now in the channel (lock held, some parked).

        Called by a batch put. One, unless a woken thread has yet to run: a
        consumer of batches may take everything there is, and passes the
        wake-up on if it leaves items behind (the relays). But while every
        woken thread takes one item (``get()``, ``get_many(1)``: the workers
        of a slow stage) and items are left over, wake another: each must
        start at once, not one relay after another, which would delay the
        last by as many thread wake-ups.
        """
        getters = self._getters
        if not getters.woken:
            self._wake(getters, 1)
        while (
            getters
            and getters.woken == getters.woken_singles
            and 0 < getters.woken < len(self._items)
        ):
            self._wake(getters, 1)

    def _relay_items(self) -> None:
        """A woken consumer leaving items behind wakes the next parked one.

        One at most, even for consumers of one item: the put that brought the
        items woke one per item already (`_wake_consumers`); what a woken one
        finds left over is mostly being taken by consumers that never parked.
        """
        if self._getters and self._items:
            self._wake_one(self._getters)

    def _relay_room(self) -> None:
        """A woken producer leaving room behind wakes the next parked one."""
        if self._putters and not self._no_room() and self._room_for_putters():
            self._wake_one(self._putters)

    def _room_for_putters(self) -> bool:
        """Whether the free slots reach what the parked producers wait for (`_Waiters.least`)."""
        least = self._putters.least
        return least <= 1 or self.maxsize - len(self._items) >= least

    def _wake_everyone(self) -> None:
        self._wake(self._getters, len(self._getters))
        self._wake(self._putters, len(self._putters))

    def _sleep(
        self, waiters: _Waiters, timeout: float | None, single: bool = False, least: int = 1
    ) -> None:
        """Release the lock, sleep until woken or ``timeout``, take the lock back.

        ``single``: the caller will take one item (see `_Waiters.singles`).
        ``least``: a producer waiting for that many free slots, if alone (`_Waiters.least`).
        """
        waiter = _allocate_lock()
        waiter.acquire()
        waiters.least = 1 if waiters else least
        waiters.append(waiter)
        if single:
            waiters.singles.add(waiter)
        try:
            # Inside the try: a Ctrl-C that lands as release() returns (Python runs
            # signal handlers between calls) takes the lock back below. Outside it, the
            # caller's `finally: release()` failed with "release unlocked lock",
            # which hid the KeyboardInterrupt, and the waiter stayed on the deque.
            self._lock.release()
            # Clamp: a longer wait (or inf) overflows; the callers loop on their deadline.
            woken = waiter.acquire(True, -1 if timeout is None else min(timeout, _TIMEOUT_MAX))
        except BaseException:  # Ctrl-C while asleep
            self._lock.acquire()
            self._forget(waiters, waiter, single)
            raise
        self._lock.acquire()
        if woken:
            self._back(waiters, single)
        else:
            try:
                waiters.remove(waiter)
                waiters.singles.discard(waiter)
            except ValueError:
                # A waker took us off the deque as we timed out. The caller
                # re-checks the state and uses what it finds: nothing is lost.
                self._back(waiters, single)

    @staticmethod
    def _back(waiters: _Waiters, single: bool) -> None:
        """A woken thread is back under the lock: it no longer counts as woken."""
        waiters.woken -= 1
        if single:
            waiters.woken_singles -= 1

    def _forget(self, waiters: _Waiters, waiter: _Waiter, single: bool = False) -> None:
        """Take a waiter that gives up off its deque; if it was woken, wake another."""
        try:
            waiters.remove(waiter)
            waiters.singles.discard(waiter)
        except ValueError:
            if type(waiter) is not _AsyncWaiter:
                self._back(waiters, single)
            self._wake(waiters, 1)

    def _no_room(self, need: int = 1) -> bool:
        """True when an item of ``need`` bytes does not fit now (lock held; slow paths only:
        the fast paths of put() and put_many() test the capacity inline)."""
        return 0 < self.maxsize <= len(self._items)

    def _wait_for_room(self, block: bool, timeout: float | None, need: int = 1) -> None:
        """Park until an item of ``need`` bytes fits, or raise Full / ShutDown (lock held)."""
        if not block:
            raise Full
        deadline = None if timeout is None else monotonic() + timeout
        while self._no_room(need):
            if deadline is None:
                self._sleep(self._putters, None)
            else:
                remaining = deadline - monotonic()
                if remaining <= 0.0:
                    raise Full
                self._sleep(self._putters, remaining)
            if self.is_shutdown:
                raise ShutDown("the channel was closed while waiting for room")

    def _wait_for_item(self, block: bool, timeout: float | None, single: bool = False) -> None:
        """Park until there is an item, or raise Empty / ShutDown (lock held).

        ``single``: the caller will take one item (see `_Waiters.singles`).
        """
        if not block:
            raise Empty
        deadline = None if timeout is None else monotonic() + timeout
        while not self._items:
            if self.is_shutdown:
                raise ShutDown
            if deadline is None:
                self._sleep(self._getters, None, single)
            else:
                remaining = deadline - monotonic()
                if remaining <= 0.0:
                    raise Empty
                self._sleep(self._getters, remaining, single)

    # ------------------------------------------------------------------ queue.Queue API

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        """Put ``item``, waiting for room if the channel is full.

        Args:
            item: any value; ``None`` included (there is no sentinel).
            block: wait for room (True) or raise `Full` at once (False).
            timeout: with ``block``, the longest wait in seconds; then `Full`.

        Raises:
            Full: no room within ``timeout``, or at once with ``block=False``.
            ShutDown: the channel is closed.
            ConfigurationError: ``timeout`` is negative.
        """
        if timeout is not None:
            _check_timeout(timeout, "Channel.put()")
        # acquire()/release() rather than `with`: half the cost on the hot path.
        lock = self._lock
        lock.acquire()
        try:
            if self.is_shutdown:
                raise ShutDown("put() on a closed channel")
            if 0 < self.maxsize <= len(self._items):
                self._wait_for_room(block, timeout)
                try:
                    self._items.append(item)
                finally:
                    self._relay_room()  # we were woken: pass it on if room is left
            else:
                self._items.append(item)
            self._total_put += 1
            if self._getters:
                # Every time, even with a woken consumer yet to run (unlike a
                # batch): one item is all a woken get() needs, so it seldom
                # finds nothing, and waking early overlaps its start-up with
                # our work. Measured: about 8% faster with 4 x 4 threads.
                self._wake(self._getters, 1)
        finally:
            lock.release()

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """Remove and return the oldest item, waiting for one if the channel is empty.

        Raises:
            Empty: no item within ``timeout``, or at once with ``block=False``.
            ShutDown: the channel is closed and drained.
            ConfigurationError: ``timeout`` is negative.
        """
        if timeout is not None:
            _check_timeout(timeout, "Channel.get()")
        lock = self._lock
        lock.acquire()
        try:
            if self._items:
                item = self._items.popleft()
            else:
                if self.is_shutdown:
                    raise ShutDown
                self._wait_for_item(block, timeout, True)
                try:
                    item = self._items.popleft()
                finally:
                    self._relay_items()  # we were woken: pass it on if items are left
            putters = self._putters
            # Every time, as in put(), when the room is what they wait for (inlined
            # `_room_for_putters`: the hot path).
            if putters and (putters.least <= 1 or self.maxsize - len(self._items) >= putters.least):
                self._wake(putters, 1)
            return item
        finally:
            lock.release()

    def put_nowait(self, item: T) -> None:
        """Put ``item`` if there is room at once, else raise `Full`."""
        self.put(item, False)

    def get_nowait(self) -> T:
        """Return an item if one is there at once, else raise `Empty`."""
        return self.get(False)

    def qsize(self) -> int:
        """Return the number of items (approximate: it may change right after)."""
        return len(self._items)

    def consumers_waiting(self) -> int:
        """Return how many consumers are parked waiting for an item (approximate, as
        `qsize`): a put made now wakes one of them."""
        return len(self._getters)

    def empty(self) -> bool:
        """Return True if the channel holds no item now (approximate)."""
        return not self._items

    def full(self) -> bool:
        """Return True if the channel is at capacity now (approximate)."""
        return self._no_room()

    def task_done(self) -> None:
        """Mark one item taken with get() as processed, for `join()`.

        Raises:
            ValueError: called more times than items were put.
        """
        with self._lock:
            unfinished = self._total_put - self._tasks_done - 1
            if unfinished <= 0:
                if unfinished < 0:
                    raise ValueError("task_done() called too many times")
                self.all_tasks_done.notify_all()
            self._tasks_done += 1

    def join(self) -> None:
        """Block until every item put has been marked done with `task_done()`."""
        with self._lock:
            while self._total_put - self._tasks_done:
                self.all_tasks_done.wait()

    def shutdown(self, immediate: bool = False) -> None:
        """Close the channel, with Python 3.13's `queue.Queue.shutdown` semantics.

        Later puts raise `ShutDown`. Getters drain the items left, then raise
        `ShutDown`. Every parked producer raises `ShutDown`; parked consumers
        wake and drain. With ``immediate=True`` the items left are discarded
        (each counts as done for `join()`) and parked consumers raise at once.
        """
        with self._lock:
            self.is_shutdown = True
            try:
                if immediate:
                    while self._items:
                        self._items.popleft()
                        if self._total_put > self._tasks_done:
                            self._tasks_done += 1
                    self.all_tasks_done.notify_all()
            finally:  # even if a _get hook raises: nobody may stay parked
                self._wake_everyone()

    def close(self) -> None:
        """Close the channel for producers; consumers drain what is left.

        Same as ``shutdown(immediate=False)``; idempotent.
        """
        self.shutdown(False)

    @property
    def unfinished_tasks(self) -> int:
        """Items put and not yet marked done with `task_done()` (as in `queue.Queue`)."""
        return self._total_put - self._tasks_done

    @property
    def closed(self) -> bool:
        """True once the channel has been closed or shut down."""
        return self.is_shutdown

    # ------------------------------------------------------------------ batches

    def put_many(
        self, items: Iterable[T], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put every item of ``items``, in order, with one lock round-trip per run of room.

        A batch larger than the free room fills the room, wakes consumers and
        waits for more room: the capacity is never exceeded.

        Raises:
            Full: ``timeout`` expired (or no room with ``block=False``) before
                all items were put; those before were put, and the exception's
                ``items_put`` attribute says how many.
            ShutDown: the channel closed before all items were put (same
                ``items_put`` attribute).
        """
        pending = _batch(items, "Channel.put_many()")
        if timeout is not None:
            _check_timeout(timeout, "Channel.put_many()")
        if self._hooked:
            self._put_each(pending, block, timeout)
            return
        lock = self._lock
        lock.acquire()
        try:
            # An empty batch on a closed channel raises too, as put() would.
            if self.is_shutdown:
                raise self._partial(ShutDown("put_many() on a closed channel"), 0)
            q: deque[T] = self._items  # type: ignore[assignment]  # not hooked: the deque
            if self.maxsize <= 0 or len(q) + len(pending) <= self.maxsize:
                q.extend(pending)  # the common case: the whole batch fits
                self._total_put += len(pending)
                getters = self._getters
                if getters and pending:
                    self._wake_consumers()
            else:
                self._put_in_runs(pending, block, timeout)
        finally:
            lock.release()

    def _put_in_runs(self, pending: list[T], block: bool, timeout: float | None) -> None:
        """put_many() of a batch larger than the room: fill, wait for room, repeat (lock held)."""
        q: deque[T] = self._items  # type: ignore[assignment]  # not hooked: the deque
        total = len(pending)
        done = 0
        slept = False
        deadline = None if timeout is None or not block else monotonic() + timeout
        while done < total:
            room = self.maxsize - len(q) if self.maxsize > 0 else total - done
            if room <= 0:
                try:
                    left = None if deadline is None else max(0.0, deadline - monotonic())
                    # Raises ShutDown itself if the channel closes meanwhile.
                    self._wait_for_room(block, left)
                except (Full, ShutDown) as exc:
                    raise self._partial(exc, done) from None
                slept = True
                continue
            n = min(room, total - done)
            q.extend(pending[done : done + n])
            done += n
            self._total_put += n
            getters = self._getters
            if getters and not getters.woken:  # _wake_one(), inlined: the hot path
                self._wake(getters, 1)
        if slept:
            self._relay_room()

    def _put_each(self, pending: list[T], block: bool, timeout: float | None) -> None:
        """put_many() in a subclass with storage hooks: one put() per item."""
        if self.is_shutdown:  # an empty batch on a closed channel raises too
            raise self._partial(ShutDown("put_many() on a closed channel"), 0)
        deadline = None if timeout is None or not block else monotonic() + timeout
        for done, item in enumerate(pending):
            left = None if deadline is None else max(0.0, deadline - monotonic())
            try:
                self.put(item, block, left)
            except (Full, ShutDown) as exc:
                raise self._partial(exc, done) from None

    def _get_each(self, max_items: int, block: bool, timeout: float | None) -> list[T]:
        """get_many() in a subclass with storage hooks: one get() per item.

        If a ``_get`` hook raises after the first item, the items taken are
        returned, and the next call meets the failure again if it lasts:
        raising would lose them.
        """
        batch = [self.get(block, timeout)]
        while len(batch) < max_items:
            try:
                batch.append(self.get(False))
            except Exception:  # Empty, ShutDown, or a _get hook that failed
                break
        return batch

    @staticmethod
    def _partial(exc: BaseException, done: int) -> BaseException:
        exc.items_put = done  # type: ignore[attr-defined]
        return exc

    def get_many(
        self, max_items: int = 64, block: bool = True, timeout: float | None = None
    ) -> list[T]:
        """Take between 1 and ``max_items`` items at once, waiting for the first.

        Raises:
            Empty: no item within ``timeout`` (or at once with ``block=False``).
            ShutDown: the channel is closed and drained.
            ConfigurationError: ``max_items`` < 1 or ``timeout`` negative.
            ConfigurationTypeError: ``max_items`` is not an int.
        """
        if type(max_items) is not int or max_items < 1:  # one cheap test on the hot path
            _check_max_items(max_items, "Channel.get_many()")
        if timeout is not None:
            _check_timeout(timeout, "Channel.get_many()")
        if self._hooked:
            return self._get_each(max_items, block, timeout)
        lock = self._lock
        lock.acquire()
        try:
            q: deque[T] = self._items  # type: ignore[assignment]  # not hooked: the deque
            woken = not q
            if woken:
                if self.is_shutdown:
                    raise ShutDown
                self._wait_for_item(block, timeout, max_items == 1)
            if len(q) <= max_items:
                batch = list(q)
                q.clear()
            else:
                batch = _take(q, max_items)
            putters = self._putters
            # _wake_one() when the room is what they wait for, inlined: the hot path.
            if (
                putters
                and not putters.woken
                and (putters.least <= 1 or self.maxsize - len(q) >= putters.least)
            ):
                self._wake(putters, 1)
            if woken:
                self._relay_items()  # we were woken: pass it on if items are left
            return batch
        finally:
            lock.release()

    def wait_for_item(self, timeout: float | None = None) -> int:
        """Block until the channel has an item, without taking it; return how many it holds.

        For a consumer that must take its item together with something under
        a lock of its own (conveyor's ordered stages take an item and its
        ticket) and so cannot wait inside `get`: it waits here, outside its
        lock, as a `get` would (a put of several items wakes one such waiter
        per item), then takes with ``block=False`` and waits again if another
        consumer was first.

        Raises:
            Empty: no item within ``timeout``.
            ShutDown: the channel is closed and drained.
        """
        if timeout is not None:
            _check_timeout(timeout, "Channel.wait_for_item()")
        with self._lock:
            if not self._items:
                if self.is_shutdown:
                    raise ShutDown
                self._wait_for_item(True, timeout, True)
                # We were woken for an item we have not taken, and another
                # consumer may be parked with nobody left to wake it (one
                # waiting inside the caller's lock): pass the wake-up on.
                self._relay_items()
            return len(self._items)

    def wait_for_room(self, timeout: float | None = None, least: int = 1) -> int:
        """Block until the channel has room; return how many items fit now.

        For a producer that must not take an item from its own source before
        it can put it (conveyor's feeder uses it to never read ahead). An
        unbounded channel returns ``sys.maxsize``.

        Args:
            timeout: the longest wait in seconds; then `Full`.
            least: wait until this many items fit (the capacity at most). A
                producer that puts in chunks (conveyor's feeder of an
                in-memory source) is then woken once per chunk's room
                rather than by every get: a get that leaves less room wakes
                nobody, while this producer is the only one parked.

        Raises:
            Full: no room within ``timeout``.
            ShutDown: the channel is closed.
        """
        if timeout is not None:
            _check_timeout(timeout, "Channel.wait_for_room()")
        if type(least) is not int or least < 1:
            check_int(least, "least", "Channel.wait_for_room()", 1)
        with self._lock:
            if self.is_shutdown:
                raise ShutDown("wait_for_room() on a closed channel")
            want = min(least, self.maxsize) if self.maxsize > 0 else 1
            slept = self._short_of_room(want)
            if slept:
                self._wait_for_slots(want, timeout)
            if self.maxsize <= 0:
                return sys.maxsize
            room = self.maxsize - len(self._items)
            # A wake-up we took was meant for a put, and our caller may put
            # nothing (its source is exhausted): pass it on, or a putter parked
            # behind us could sleep on with room in the channel. A woken putter
            # that finds no room just parks again.
            if slept:
                self._relay_room()
            return room

    def _short_of_room(self, want: int) -> bool:
        """True while fewer than ``want`` items fit (lock held)."""
        return self._no_room() or (want > 1 and self.maxsize - len(self._items) < want)

    def _wait_for_slots(self, want: int, timeout: float | None) -> None:
        """Park until ``want`` items fit, or raise Full / ShutDown (lock held)."""
        deadline = None if timeout is None else monotonic() + timeout
        slept = False
        while self._short_of_room(want):
            if slept:
                # Woken with too little room for us (a get while others were
                # parked too, or a budget's get): the room may do for a
                # producer behind us.
                self._relay_room()
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0.0:
                raise Full
            self._sleep(self._putters, remaining, least=want)
            slept = True
            if self.is_shutdown:
                raise ShutDown("the channel was closed while waiting for room")

    async def await_room(self) -> int:
        """Wait from a coroutine until the channel has room; return how many items fit now.

        Raises:
            ShutDown: the channel is closed.
        """
        parked = False
        while True:
            with self._lock:
                if self.is_shutdown:
                    raise ShutDown("await_room() on a closed channel")
                if not self._no_room():
                    if parked:
                        self._relay_room()  # as in wait_for_room()
                    return self.maxsize - len(self._items) if self.maxsize > 0 else sys.maxsize
            if await self._park(self._putters, room_side=True):
                parked = True

    # ------------------------------------------------------------------ closing by producers

    def producer(self) -> Producer[T]:
        """Return a new producer handle; the channel closes when every handle is closed.

        Take the handles before the producers start (or clone an open one),
        so that an early finisher does not close the channel under the others.

        Raises:
            ShutDown: the channel is already closed.
        """
        with self._lock:
            if self.is_shutdown:
                raise ShutDown("producer() on a closed channel")
            self._open_producers += 1
        return Producer(self)

    def _release_producer(self) -> None:
        # Closing under the same lock hold: a producer() taken between the
        # count reaching 0 and the close would otherwise get a closed channel.
        with self._lock:
            self._open_producers -= 1
            if self._open_producers == 0 and not self.is_shutdown:
                self.is_shutdown = True
                self._wake_everyone()

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[T]:
        """Yield items until the channel is closed and drained."""
        get = self.get
        try:
            while True:
                yield get()
        except ShutDown:
            return

    # ------------------------------------------------------------------ asyncio side

    async def _until_done(self, attempt: Callable[[], R], room_side: bool, need: int = 1) -> R:
        """Park, then run the non-blocking ``attempt`` until it neither raises `Full`
        (room side) nor `Empty` (item side); after a wake-up, relay as threads do.

        The caller has tried once already (its fast path) and failed, or seen
        nothing to take: so park first, which re-checks the state under the
        lock and returns at once if it changed meanwhile, rather than try
        again and raise (an exception raised and caught costs more than the
        whole park). ``need``: the bytes the item put takes (a byte budget).
        """
        waiters, missing = (self._putters, Full) if room_side else (self._getters, Empty)
        parked = False
        while True:
            if await self._park(waiters, room_side, need):
                parked = True
            try:
                result = attempt()
            except missing:
                continue
            # After a wake-up, relay as threads do, when there is a waiter to relay to: one
            # that parks after our attempt saw, under the lock, what we left and did not park.
            if parked and waiters:
                with self._lock:
                    if room_side:
                        self._relay_room()
                    else:
                        self._relay_items()
            return result

    async def _park(self, waiters: _Waiters, room_side: bool, need: int = 1) -> bool:
        """Park the current coroutine on ``waiters`` until woken (called without the lock).

        Return False at once, without parking, if the state already allows
        what the caller waits for (or the channel is closed), True once woken.
        """
        import asyncio  # loaded by then: a coroutine is running

        waiter = _AsyncWaiter(asyncio.get_running_loop())
        with self._lock:
            # Re-check under the lock: the state may have changed since the caller looked.
            if self.is_shutdown or (not self._no_room(need) if room_side else bool(self._items)):
                return False
            waiters.least = 1
            waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:  # cancelled: give the wake-up, if we had one, to another
            with self._lock:
                self._forget(waiters, waiter)
            raise
        return True

    async def aput(self, item: T) -> None:
        """Put ``item`` from a coroutine, waiting without blocking the event loop.

        Use `asyncio.timeout` / `asyncio.wait_for` to bound the wait.

        Raises:
            ShutDown: the channel is closed.
        """
        try:  # the fast path, as in aget()
            self.put(item, False)
        except Full:
            await self._until_done(lambda: self.put(item, False), room_side=True)

    async def aget(self) -> T:
        """Take an item from a coroutine, waiting without blocking the event loop.

        Raises:
            ShutDown: the channel is closed and drained.
        """
        if self._items:  # the fast path, no closure nor coroutine: try at once (as trio does)
            try:
                return self.get(False)
            except Empty:  # another consumer was first: wait as usual
                pass
        return await self._until_done(partial(self.get, False), room_side=False)

    async def aput_many(self, items: Iterable[T]) -> None:
        """Put every item of ``items`` from a coroutine, waiting for room as needed.

        Raises:
            ShutDown: the channel closed before all items were put; its
                ``items_put`` attribute counts every item this call put.
            asyncio.CancelledError: the call was cancelled (by
                `asyncio.timeout`, ``task.cancel()``) before all items were
                put; its ``items_put`` attribute says how many went in (the
                first ones, in order). Under `asyncio.timeout` the
                `TimeoutError` raised has that CancelledError as ``__cause__``.
        """
        pending = _batch(items, "Channel.aput_many()")
        try:  # the fast path, as in aput(): no closure nor coroutine while there is room
            self.put_many(pending, False)
            return
        except Full as full:
            done: int = full.items_put  # type: ignore[attr-defined]
        pending = pending[done:]
        import asyncio  # loaded by then: a coroutine is running

        def attempt() -> None:
            """Put what fits now; on Full, keep what is left for the next attempt."""
            nonlocal pending, done
            try:
                self.put_many(pending, False)
            except Full as exc:
                n: int = exc.items_put  # type: ignore[attr-defined]
                done += n
                pending = pending[n:]
                raise
            except ShutDown as exc:
                exc.items_put += done  # type: ignore[attr-defined]
                raise

        try:
            await self._until_done(attempt, room_side=True)
        except asyncio.CancelledError as exc:
            exc.items_put = done  # type: ignore[attr-defined]
            raise

    async def aget_many(self, max_items: int = 64) -> list[T]:
        """Take between 1 and ``max_items`` items from a coroutine.

        Raises:
            ShutDown: the channel is closed and drained.
        """
        if type(max_items) is not int or max_items < 1:  # at once, naming this method
            _check_max_items(max_items, "Channel.aget_many()")
        if self._items:  # as in aget()
            try:
                return self.get_many(max_items, False)
            except Empty:
                pass
        # `_until_done`, written out: the way back from a wake-up to the caller is
        # the hand-off's latency for a consumer that waits (a pipeline's `async for`),
        # and a coroutine and a partial less on it measured about 1 us here.
        getters = self._getters
        parked = False
        while True:
            if await self._park(getters, room_side=False):
                parked = True
            try:
                batch = self.get_many(max_items, False)
            except Empty:  # another consumer was first
                continue
            if parked and getters:  # relay, as in `_until_done`
                with self._lock:
                    self._relay_items()
            return batch

    async def __aiter__(self) -> AsyncIterator[T]:
        """Yield items to ``async for`` until the channel is closed and drained."""
        while True:
            try:
                item = await self.aget()
            except ShutDown:
                return
            yield item

    # ------------------------------------------------------------------ statistics

    def stats(self) -> ChannelStats:
        """Return a consistent snapshot of sizes, waiters and totals."""
        with self._lock:
            return ChannelStats(
                size=len(self._items),
                capacity=self.maxsize,
                waiting_producers=len(self._putters),
                waiting_consumers=len(self._getters),
                total_put=self._total_put,
                total_got=self._total_put - len(self._items),
                closed=self.is_shutdown,
                open_producers=self._open_producers,
                max_bytes=self.max_bytes,
                bytes=self._bytes,
                peak_bytes=self._peak_bytes,
            )

    def __reduce__(self) -> NoReturn:
        # A channel is its lock, its waiters and its items, in this process: a copy
        # elsewhere would be another channel that nobody else puts to or takes from.
        raise TypeError(
            "a conveyor.Channel cannot be pickled or copied: it joins the threads and "
            "coroutines of one process; to move items between processes, run a stage "
            "with runtime='process' (or across machines, the Redis backend)"
        )

    def __repr__(self) -> str:
        state = "closed" if self.is_shutdown else "open"
        return f"<Channel {state} size={len(self._items)} maxsize={self.maxsize}>"


class _BudgetChannel(Channel[T]):
    """A `Channel` with a byte budget (``Channel(maxsize, max_bytes=...)`` makes one).

    Besides the count, ``_bytes`` (the sizes of the items held, by `size_of`,
    each measured once at its put and kept in ``_sizes``, in step with the
    items) stays within ``max_bytes``, except for a single item larger than
    the budget, which goes in alone. Puts and gets here are the item-by-item
    forms; ``get_many`` keeps the C accelerator (`_take`) for both deques.
    A get wakes every parked producer, since each waits for room for its own
    item's size: one woken whose item does not fit parks again, and the
    others are not left asleep with room for theirs.
    """

    def __init__(self, maxsize: int = 0, max_bytes: int | str | None = None) -> None:
        super().__init__(maxsize, max_bytes)
        budget = check_max_bytes(max_bytes, "Channel")  # checked: "64MiB" made a number
        assert budget is not None
        self.max_bytes = budget
        self._sizes: deque[int] = deque()  # the size of each item of _items, in order

    def _no_room(self, need: int = 1) -> bool:
        budget = self.max_bytes
        assert budget is not None
        return 0 < self.maxsize <= len(self._items) or (
            self._bytes > 0 and self._bytes + need > budget
        )

    def _add(self, item: T, size: int) -> None:
        self._items.append(item)
        self._sizes.append(size)
        self._bytes += size
        self._peak_bytes = max(self._peak_bytes, self._bytes)
        self._total_put += 1

    def _room_made(self, woken: bool) -> None:
        """After a get (lock held): wake every parked producer; relay if we were woken."""
        self._wake(self._putters, len(self._putters))
        if woken:
            self._relay_items()

    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        """`Channel.put`, waiting also for the bytes of ``item`` to fit in the budget."""
        size = size_of(item)
        if timeout is not None:
            _check_timeout(timeout, "Channel.put()")
        with self._lock:
            if self.is_shutdown:
                raise ShutDown("put() on a closed channel")
            if self._no_room(size):
                self._wait_for_room(block, timeout, size)
                try:
                    self._add(item, size)
                finally:
                    self._relay_room()
            else:
                self._add(item, size)
            if self._getters:
                self._wake(self._getters, 1)

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """`Channel.get`."""
        return self.get_many(1, block, timeout)[0]

    def put_many(
        self, items: Iterable[T], block: bool = True, timeout: float | None = None
    ) -> None:
        """`Channel.put_many`, one `put` per item."""
        self._put_each(_batch(items, "Channel.put_many()"), block, timeout)

    def get_many(
        self, max_items: int = 64, block: bool = True, timeout: float | None = None
    ) -> list[T]:
        """`Channel.get_many`; a batch holds at most ``max_bytes`` too (one item at least)."""
        if type(max_items) is not int or max_items < 1:
            _check_max_items(max_items, "Channel.get_many()")
        if timeout is not None:
            _check_timeout(timeout, "Channel.get_many()")
        with self._lock:
            woken = not self._items
            if woken:
                if self.is_shutdown:
                    raise ShutDown
                self._wait_for_item(block, timeout, max_items == 1)
            n = self._batch_length(max_items)
            batch = _take(self._items, n)  # type: ignore[arg-type]  # never hooked: the deque
            self._bytes -= sum(_take(self._sizes, n))
            self._room_made(woken)
            return batch

    def _batch_length(self, max_items: int) -> int:
        """How many of the oldest items, at most ``max_items``, fit in the budget (one at least)."""
        budget = self.max_bytes
        assert budget is not None
        if self._bytes <= budget:
            return min(max_items, len(self._sizes))
        total = n = 0
        for size in self._sizes:
            total += size
            if n == max_items or (n and total > budget):
                break
            n += 1
        return n

    async def aput(self, item: T) -> None:
        """`Channel.aput`, waiting also for the bytes of ``item`` to fit in the budget."""
        try:  # the fast path, as in Channel.aput(); `_until_done` parks first
            self.put(item, False)
        except Full:
            await self._until_done(lambda: self.put(item, False), True, size_of(item))

    async def aput_many(self, items: Iterable[T]) -> None:
        """`Channel.aput_many`, one `aput` per item (each waits for its own size)."""
        for done, item in enumerate(_batch(items, "Channel.aput_many()")):
            try:
                await self.aput(item)
            except ShutDown as exc:
                raise self._partial(exc, done) from None

    def shutdown(self, immediate: bool = False) -> None:
        """`Channel.shutdown`; an immediate one also forgets the sizes of the items dropped."""
        super().shutdown(immediate)
        if immediate:
            # The items are gone and no put can come (closed): only the sizes are left.
            with self._lock:
                self._sizes.clear()
                self._bytes = 0


def _refuse_put(*args: Any, **kwargs: Any) -> None:
    raise ShutDown("put through a closed producer handle")


async def _arefuse_put(*args: Any, **kwargs: Any) -> None:
    raise ShutDown("put through a closed producer handle")


class Producer(Generic[T]):
    """One producer's handle on a `Channel`: put through it, then close it.

    The channel closes when its last open handle closes. Used as a context
    manager, the handle closes on exit, also when the block raises.
    """

    __slots__ = ("_channel", "_closed", "_lock", "aput", "aput_many", "put", "put_many")

    def __init__(self, channel: Channel[T]) -> None:
        self._channel = channel
        self._closed = False
        self._lock = threading.Lock()
        # Bound methods of the channel, so a put through the handle costs no extra call.
        self.put = channel.put
        self.put_many = channel.put_many
        self.aput = channel.aput
        self.aput_many = channel.aput_many

    @property
    def channel(self) -> Channel[T]:
        """The channel this handle feeds."""
        return self._channel

    @property
    def closed(self) -> bool:
        """True once this handle was closed."""
        return self._closed

    def clone(self) -> Producer[T]:
        """Return another handle on the same channel (this one must still be open).

        Raises:
            ShutDown: this handle is already closed.
        """
        if self._closed:
            raise ShutDown("clone() of a closed producer handle")
        return self._channel.producer()

    def close(self) -> None:
        """Close this handle (idempotent); the last one to close closes the channel.

        Later puts through this handle raise `ShutDown`, even while other
        handles keep the channel open.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Swap the bound methods rather than test a flag on every put.
            self.put = self.put_many = _refuse_put
            self.aput = self.aput_many = _arefuse_put
        self._channel._release_producer()

    def __reduce__(self) -> NoReturn:
        # A copy would be a second handle the channel does not count: closing both
        # would close the channel while other producers still put to it.
        raise TypeError(
            "a conveyor producer handle cannot be pickled or copied: it is one of the "
            "handles its channel counts before it closes; take another with clone() "
            "(or channel.producer())"
        )

    def __enter__(self) -> Producer[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Producer[T]:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()
