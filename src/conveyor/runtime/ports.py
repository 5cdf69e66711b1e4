"""Ports: where a stage's workers take their items and hand their results.

A worker loop (threads, processes and asyncio each have one shell around
the same steps) knows neither channels nor Redis: it asks its `Port` for a
batch, runs it through the policy (`conveyor.policy`), and hands the
`BatchOutcome` back to the same port::

    port.take(n) --> batch --policy--> outcome --> port.deliver(outcome)

What "taking" and "done with an item" mean is the port's business:

- `ChannelPort` (one machine): take = ``get_many`` on the stage's input
  channel; deliver = ``put_many`` of the outputs on the next channel (or,
  for an ordered stage with several workers, a deposit in the `Sequencer`),
  failures recorded in the run; an error fails the run.
- ``conveyor.redis.port.RedisPort``: take = a consumer-group read (and the
  take-over of entries idle too long); deliver = one atomic hand-off that
  adds the outputs of each input entry and acknowledges exactly those
  entries; an error is recorded with its entry, which is delivered again.

A `StageIO` opens one port per worker (a process stage has two lanes per
worker, so twice as many), before any of them starts: the local one gives
each a producer handle on the output, so the output closes after the last.
The async runtime starts its worker tasks as work comes instead (up to
100,000 of them), so it takes a `PortSupply`: made before any worker starts
too, it stands for the ports not opened yet (it holds the output open as
they would), and opens each when its worker starts.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..channel import Channel, Producer
from ..errors import Empty, ShutDown
from ..policy import BatchOutcome

if TYPE_CHECKING:
    import asyncio

    from .base import RunControl

__all__ = ["ChannelIO", "ChannelPort", "Port", "PortSupply", "Sequencer", "StageIO"]


class Port(ABC):
    """One worker's end of a stage: where it takes batches and hands their outcomes.

    A port serves one worker (one thread, lane or task) and is never shared.
    Every `take` is followed by one `deliver` of what was taken, except in a
    ``batch`` stage, whose worker takes several times and then delivers the
    group made of everything taken since the last delivery.
    """

    tracks: bool = False
    """Whether `deliver` needs to know which input gave which outputs (run the
    policy with ``track=True``)."""

    @abstractmethod
    def take(self, n: int, timeout: float | None = None) -> list[Any]:
        """Between 1 and ``n`` items, waiting for them.

        Raises:
            ShutDown: no more items will come (the input ended, or the run
                or worker stopped).
            Empty: ``timeout`` seconds passed without an item, or (a batch
                stage's port) the input reached a point where a partial
                group must go out.
        """

    @abstractmethod
    async def atake(self, n: int) -> list[Any]:
        """`take`, for a coroutine worker: waits without blocking the event loop."""

    @abstractmethod
    def deliver(self, outcome: BatchOutcome) -> BaseException | None:
        """Hand on the outcome of what was taken since the last delivery.

        Returns the error that must fail the run, or None when there is none
        or the port dealt with it (recorded it with its item).
        """

    @abstractmethod
    async def adeliver(self, outcome: BatchOutcome) -> BaseException | None:
        """`deliver`, for a coroutine worker."""

    @abstractmethod
    def close(self) -> None:
        """This worker is done: it will take and deliver nothing more."""

    def direct(self) -> tuple[Channel[Any], Producer[Any]] | None:
        """The input channel and output handle a worker of single items may use itself.

        A worker whose items go straight from one channel to the next takes
        and puts on them without the port's layers: what a consumer waiting
        on the output sees is the put, so the shorter the way from the
        stage's return to it, the sooner that consumer runs. None (the
        default): everything goes through `take` and `deliver`.
        """
        return None


class StageIO(ABC):
    """Where one stage's workers take items and hand results, for one run or worker."""

    capacity: int
    """How many items the stage's input holds at most: the largest useful batch."""
    min_batch_seconds: float = 0.0
    """A floor under the time a batch should take (a port with a round trip per
    batch asks for longer batches)."""

    @abstractmethod
    def open(self, count: int) -> list[Port]:
        """Open the stage's ``count`` ports, once, before any worker starts."""

    def supply(self, count: int) -> PortSupply:
        """Instead of `open`: up to ``count`` ports, each opened when its worker starts.

        Made once, before any worker starts. By default the ports are opened
        now and handed out one by one (the ones never handed out are closed
        when the supply is sealed); a StageIO whose ports cost something
        each opens them on demand.
        """
        ports = self.open(count)
        ports.reverse()  # handed out from the end: in the order opened
        return PortSupply(count, ports.pop, lambda: _close_all(ports))

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release what the ports shared, once the stage's workers have ended."""


def _close_all(ports: list[Port]) -> None:
    for port in ports:
        port.close()


class PortSupply:
    """Up to ``count`` ports of one stage, each opened when a worker starts.

    Until `seal`, the supply stands for the ports it has not opened: it
    holds the stage's output open as they would (a producer handle of its
    own on one machine, a user of the shared consumer on Redis), so a port
    opened later never finds its output closed by the workers that ended
    before it. Sealed (no worker will start any more: the input ended or
    the run stopped), it lets go of that.
    """

    def __init__(self, count: int, new: Callable[[], Port], release: Callable[[], None]) -> None:
        self.count = count
        """The most ports it opens: the stage's ``workers``."""
        self.opened = 0
        """Ports opened so far."""
        self._new = new
        self._release = release
        self._sealed = False
        self._lock = threading.Lock()  # workers open from the loop, a join seals from its thread

    def open(self) -> Port | None:
        """Open the next port; None when ``count`` are open, the supply is sealed, or the
        output is shut (the run stopped)."""
        with self._lock:
            if self._sealed or self.opened >= self.count:
                return None
            try:
                port = self._new()
            except ShutDown:
                return None
            self.opened += 1
            return port

    def seal(self) -> None:
        """Open nothing more, and let go of the output held for ports not opened (once)."""
        with self._lock:
            if self._sealed:
                return
            self._sealed = True
        self._release()


class ChannelIO(StageIO):
    """A stage between two channels of a run on one machine."""

    def __init__(
        self,
        input: Channel[Any],
        output: Channel[Any],
        control: RunControl,
        ordered: bool,
    ) -> None:
        self.input = input
        self.output = output
        self.control = control
        self.ordered = ordered
        self.capacity = input.maxsize

    def _window(self, count: int) -> int:
        """Batches an ordered stage's ``count`` ports may hold between the take and the put.

        Under a byte budget one per port, as a worker of an unordered stage
        holds (docs/design.md): a wider window would keep outputs waiting
        for a slow batch beyond what the budget promises. Otherwise four per
        port, so that fast workers keep going past a slow item.
        """
        return count if self.input.max_bytes is not None else 4 * count

    def _sequencer(self, count: int) -> Sequencer | None:
        return (
            # The channel itself, not a worker's handle: the flusher is always a
            # live worker, whose own handle keeps the channel open meanwhile.
            Sequencer(self.output, window=self._window(count), control=self.control)
            if self.ordered and count > 1
            else None
        )

    def open(self, count: int) -> list[Port]:
        sequencer = self._sequencer(count)
        return [
            ChannelPort(self.input, self.output.producer(), sequencer, self.control)
            for _ in range(count)
        ]

    def supply(self, count: int) -> PortSupply:
        """Ports opened on demand: each a clone of a producer handle the supply holds
        (the output cannot close before it is sealed), all on one sequencer sized
        for ``count`` workers, as `open` would make it."""
        sequencer = self._sequencer(count)
        reserve = self.output.producer()

        def new() -> Port:
            return ChannelPort(self.input, reserve.clone(), sequencer, self.control)

        return PortSupply(count, new, reserve.close)


class ChannelPort(Port):
    """A worker's port on one machine: the input channel in, a producer handle out."""

    def __init__(
        self,
        input: Channel[Any],
        handle: Producer[Any],
        sequencer: Sequencer | None,
        control: RunControl,
    ) -> None:
        self.input = input
        self.handle = handle
        self.sequencer = sequencer
        self.control = control
        self._ticket = 0

    def take(self, n: int, timeout: float | None = None) -> list[Any]:
        if self.sequencer is not None:
            batch, self._ticket = self.sequencer.take(self.input, n)
            return batch
        return self.input.get_many(n, True, timeout)

    async def atake(self, n: int) -> list[Any]:
        if self.sequencer is not None:
            batch, self._ticket = await self.sequencer.atake(self.input, n)
            return batch
        return await self.input.aget_many(n)

    def deliver(self, outcome: BatchOutcome) -> BaseException | None:
        if outcome.failures:
            self.control.record_failures(outcome.failures)
        if outcome.error is not None:
            return outcome.error  # the run fails: what the batch produced goes nowhere
        if self.sequencer is not None:
            self.sequencer.deposit(self._ticket, outcome.outputs)
        elif outcome.outputs:
            self.handle.put_many(outcome.outputs)
        return None

    async def adeliver(self, outcome: BatchOutcome) -> BaseException | None:
        if outcome.failures:
            self.control.record_failures(outcome.failures)
        if outcome.error is not None:
            return outcome.error
        if self.sequencer is not None:
            await self.sequencer.adeposit(self._ticket, outcome.outputs)
        elif outcome.outputs:
            await self.handle.aput_many(outcome.outputs)
        return None

    def close(self) -> None:
        self.handle.close()

    def direct(self) -> tuple[Channel[Any], Producer[Any]] | None:
        # An ordered stage's workers go through the sequencer, which numbers their batches.
        return None if self.sequencer is not None else (self.input, self.handle)


class Sequencer:
    """Releases the outputs of an ordered stage's batches in ticket order.

    Workers deposit (ticket, outputs) as they finish; whoever deposits the
    next expected ticket becomes the flusher and puts every consecutive ready
    batch on the output, outside the lock, while later deposits queue up.
    ``window`` bounds how far ahead of the oldest batch not yet put a worker
    may take a new one: the batches being worked on, the reorder buffer and
    the flusher's chunk together hold at most ``window`` batches, since the
    oldest ticket moves on only once the flusher has put their outputs.

    `take`/`deposit` serve worker threads; `atake`/`adeposit` serve the
    worker coroutines of an async stage, on one event loop, without ever
    blocking it: they park on futures and flush with ``aput_many``. A
    sequencer serves one kind of worker (a stage has one runtime).

    A coroutine's take needs no lock: its batch and its ticket are taken
    with no pause in between, so no other coroutine of the loop can come
    between them. Coroutines waiting for items count in the window (each
    will hold a batch), so an async stage too holds at most ``window``.
    """

    def __init__(self, output: Channel[Any], window: int, control: RunControl) -> None:
        self._output = output
        self._window = window
        self._control = control
        self._lock = threading.Lock()
        self._moved = threading.Condition(self._lock)  # notified when _next advances or on abort
        self._sleepers = 0  # threads waiting on _moved: notifying nobody still costs
        self._pending: dict[int, list[Any]] = {}
        self._next = 0  # the oldest ticket whose outputs are not yet put
        self._flushing = False
        self._releasing = 0  # tickets of the chunk the flusher is putting (_next moves after)
        self._take_lock = threading.Lock()
        self._next_ticket = 0
        self._awaiting = 0  # coroutines past the window, waiting for items (atake)
        # Coroutines parked until _next moves, resolved when _moved is notified.
        self._moved_futures: list[asyncio.Future[None]] = []
        control.on_abort(self._wake_all)

    def _wake_all(self) -> None:
        with self._lock:
            self._notify_moved()

    def _notify_moved(self) -> None:
        """Wake every thread and coroutine waiting for _next to move (lock held)."""
        if self._sleepers:
            self._moved.notify_all()
        if self._moved_futures:
            for future in self._moved_futures:
                try:
                    future.get_loop().call_soon_threadsafe(_resolve, future)
                except RuntimeError:  # its loop is closed: nobody is left to wake
                    pass
            self._moved_futures.clear()

    def _window_full(self, ticket: int) -> bool:
        """True while ``ticket`` is too far ahead of _next (lock held); ShutDown once stopped."""
        if ticket - self._next < self._window:
            return False
        if self._control.stopped.is_set():
            raise ShutDown
        return True

    def take(self, channel: Channel[Any], n: int) -> tuple[list[Any], int]:
        """Take a batch of up to ``n`` items and its ticket, in input order.

        A worker of single items (a slow stage) waits for its item outside
        the ticket lock, in the channel (`Channel.wait_for_item`), then takes
        it with its ticket: items handed on together start as many idle
        workers at once, where waiting inside the lock started them one
        after another through it. A worker of batches waits inside: one
        wake-up in flight is what batches want (see `Channel.put_many`).
        """
        while True:
            with self._take_lock:
                ticket = self._next_ticket
                with self._lock:
                    while self._window_full(ticket):
                        self._sleepers += 1
                        try:
                            self._moved.wait()
                        finally:
                            self._sleepers -= 1
                try:
                    batch = channel.get_many(n, n > 1)
                except Empty:  # ShutDown goes through: the input ended
                    pass
                else:
                    self._next_ticket = ticket + 1
                    return batch, ticket
            channel.wait_for_item()

    async def atake(self, channel: Channel[Any], n: int) -> tuple[list[Any], int]:
        """`take` for a coroutine: waits for the window and the items without blocking the loop."""
        while True:
            with self._lock:
                if not self._window_full(self._next_ticket + self._awaiting):
                    self._awaiting += 1
                    break
                import asyncio  # loaded by then: a coroutine is running

                moved = asyncio.get_running_loop().create_future()
                self._moved_futures.append(moved)
            await moved
        try:
            batch = await channel.aget_many(n)
        finally:
            self._awaiting -= 1  # only this loop's coroutines touch it
        # aget_many returns the moment it has the items: nothing runs between them and the ticket.
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        return batch, ticket

    def deposit(self, ticket: int, outputs: list[Any]) -> None:
        """Hand in a batch's outputs; release every batch now in order."""
        if not self._enter(ticket, outputs):
            return
        try:
            while (chunk := self._release_ready()) is not None:
                self._output.put_many(chunk)
        except BaseException:
            self._leave()
            raise

    async def adeposit(self, ticket: int, outputs: list[Any]) -> None:
        """`deposit` for a coroutine: the flush waits for room without blocking the loop."""
        if not self._enter(ticket, outputs):
            return
        try:
            while (chunk := self._release_ready()) is not None:
                await self._output.aput_many(chunk)
        except BaseException:
            self._leave()
            raise

    def _enter(self, ticket: int, outputs: list[Any]) -> bool:
        """Store a batch's outputs; True when the caller must flush (it holds the oldest ticket)."""
        with self._lock:
            self._pending[ticket] = outputs
            if self._flushing or ticket != self._next:
                return False
            self._flushing = True
            return True

    def _release_ready(self) -> list[Any] | None:
        """The flusher's next chunk: every consecutive ready output; None when done flushing.

        The tickets of the chunk put before count as released only now, so
        that the window covers the outputs the flusher holds while it waits
        for room on the output.
        """
        with self._lock:
            self._next += self._releasing
            chunk: list[Any] = []
            pending = self._pending
            n = 0
            while self._next + n in pending:
                # Batches with no output (all filtered) take a ticket in the chunk too.
                chunk.extend(pending.pop(self._next + n))
                n += 1
            if chunk:
                self._releasing = n
            else:
                self._next += n  # nothing to put: released at once
                self._releasing = 0
                self._flushing = False
            self._notify_moved()
            return chunk or None

    def _leave(self) -> None:
        with self._lock:
            self._flushing = False
            self._releasing = 0


def _resolve(future: asyncio.Future[None]) -> None:
    # Runs in the future's own loop: only there is touching it safe.
    if not future.done():
        future.set_result(None)
