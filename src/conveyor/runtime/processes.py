"""Process runtime: each worker of a stage is a child process, driven by threads of the parent.

For CPU-bound Python. How data flows, for one worker (a stage with ``workers=n``
has n of these)::

    parent process                                      | worker process
                                                        |
    input channel                                       |
      | get_many(n): n adapts to ~BATCH_SECONDS,        |
      |   and to one message's worth of big buffers     |
      v                                                 |
    lane 1, lane 2: threads running base.worker_loop    | _child_main:
      execute(batch):                                   |   cloudpickle.loads(stage), once
        pickle (protocol 5); big buffers copied into    |   on_start() -> worker_state()
        a request block ===== shared memory ============|=> arrays built on it (no copy)
        send one message ------------- pipe -----------+-> stage.process_batch(batch)
        wait on  - the pipe <---------------------------+--   (retries, backoff, skip, raise:
                 - the child's sentinel (it died)       |     written once, in policy.py;
                 - the run's abort pipe (stop, Ctrl-C)  |     new big arrays allocated in
                 - the item's deadline (timeout)        |     the answer block); pickle the
        arrays built on the answer <== shared memory ===|== outcome: other big buffers
          block, or on the request block                |   copied into the answer block
                                                        |   (arrays it got back: a pointer
                                                        |   into the request block)
      | put_many(outputs), or the ordered sequencer     |   ...until STOP: on_stop(), exit
      v                                                 |
    output channel                                      |

Two lanes per worker keep a batch waiting in the pipe while the child works
on another, so the child never waits for the parent; answers come back in
order and each goes to the lane that sent its message. A stage's logic lives
in `conveyor.stage.process_batch`, which the child runs; the lanes run the
same `worker_loop` as the thread runtime, with an ``execute`` that ships the
batch to the child and returns its `BatchOutcome`. Everything specific to
processes lives in these modules:

- ``_wire``: what both sides share, how a batch crosses: the messages,
  pickling with big buffers set aside, the shared-memory blocks;
- ``_child``: the worker process's side (`_child_main`, which serves
  batches, and how the stage is sent to it);
- ``_allocator``: in the worker, NumPy's allocator placing the arrays the
  stage creates in the answer's shared-memory block;
- ``_spare``: free blocks kept, faulted in, for the next workers;
- ``_cpus``: the lanes kept on CPUs apart from the workers', when there are
  enough (Linux);
- ``_forkserver_main``: the main module, imported once in the forkserver;
- this module: start methods, the parent's side (pipes, shared memory in
  flight, what happens when a child dies or overruns), the exceptions that
  come back from workers, and `ProcessRuntime`.

The interpreter runtime (`conveyor.runtime.interpreters`) is this runtime
with subinterpreters of the parent's process in place of worker processes.

Start methods and the ``__main__`` rule
---------------------------------------
Worker processes are started with the multiprocessing start method named by
`START_METHOD` (a module setting), else by the environment variable
``CONVEYOR_START_METHOD``, else ``forkserver`` on Linux and ``spawn``
elsewhere: both are safe while the parent runs threads (conveyor's own
feeder and worker threads, at least), which ``fork`` is not. This module
(and NumPy, when the parent has imported it) is added to the forkserver's
preload list, so that a worker starts without importing them again; it
imports ``_child`` and ``_wire``, where the worker's entry point and all it
needs live, so those are preloaded with it. So is the main module
(``_forkserver_main``: multiprocessing up to Python 3.13 leaves it out, and
every worker then ran the main script again, about 10 ms of its start for
a script of a few hundred lines; 3.14 imports it, but a failing import
ends the server).

The main module is imported again as ``__mp_main__``: once in the
forkserver, or in every worker process with spawn. A script that builds
and runs its pipeline at module level would then start the pipeline again
there: keep that code under ``if __name__ == "__main__":``. conveyor detects
the mistake (the forkserver then leaves the main module to the workers,
which run it again) and the main process raises
`conveyor.ConfigurationError` saying so.
A program read from stdin (``python -``, main module file ``'<stdin>'``) has
no file to run again: its workers start without it (`_PseudoMainFile`).
Stage functions, ``on_start`` and ``on_stop`` are sent to each worker with
cloudpickle, once, when it starts: lambdas, closures and local functions
work. Items and results are pickled with the standard pickler (cloudpickle
when that fails), so their classes must be importable in the workers.

Batches and shared memory
-------------------------
A batch crosses in one message each way (pickle protocol 5). Large buffers
inside items or results -- NumPy arrays (through pickle's out-of-band
buffers), and `bytes`, `bytearray` and `memoryview` of at least
`SHM_THRESHOLD` bytes (bytes and bytearray as items, or inside tuple, list or
dict items) -- do not go through the pipe: the sender copies them into a
shared-memory block, and the receiver builds NumPy arrays right on it (no
copy; bytes-likes are copied out into objects of their own). An array the
stage returns as it got it (or a slice of it, or changed in place) is not
copied back: the answer points into the request's block. An array the stage
creates is allocated in the answer's block in the first place (see
``_allocator``) and is not copied either. So an array crosses with one copy
each way (the parent's into the request's block, the stage's own making of
its result), or one in all for a stage working in place. A result the stage
also keeps alive (and might change later) crosses as a copy instead. A
batch made only of big plain arrays (C-contiguous, numbers or bools) is not
pickled at all: each array's dtype and shape describe it (`_wire._describe_arrays`).

Blocks are reused message after message: a fresh block costs a page fault
per page on first use, far more than the copy. A block is written again only
once no message in flight uses it and no array built on it is left, so
arrays a stage keeps, or results the caller keeps, stay intact; meanwhile
other blocks are used. Batches with big buffers are capped at about one
message's worth (`SHM_MESSAGE_LIMIT`), which bounds the shared memory in
flight to a few blocks besides the results not yet consumed.

When a worker ends (every run starts new ones), its free blocks are kept for
the next workers of any stage or run, up to `SPARE_BYTES` for the process
(``_spare``): they are faulted in already. A worker maps a page for writing
in one ``madvise`` per block rather than a fault per page (`_wire._Arena.populate`).
A ``bytes`` object the stage returns as it got it is not sent back at all:
the answer names it, and the parent hands back the object it sent (bytes
cannot change); a ``bytearray`` or ``memoryview`` crosses as a copy.

Blocks are POSIX shared memory named ``cv<parent pid>_<hex>``, created by the
parent only, so that it knows every name, and registered with
multiprocessing's resource tracker before they exist, so that the tracker
unlinks every one of a program killed at any moment. A name is unlinked as
soon as the worker has mapped it (when it answers the message that announced
it), or when the worker dies or is stopped, and when the run ends: no segment
outlives a run, whatever happened to it. A spare block, nameless by then,
reaches its next worker as a file descriptor sent over the pipe (a Unix
socket) right after the message that announces it. The memory itself is freed when the last
process unmaps it, that is when the last array built on it is gone (spare
blocks: when the process exits).

Keep the main module light: spawn workers run it again before they start
(its imports included), and that is part of every run's start-up; with
forkserver, the server imports it once, when the first run starts.

Failures
--------
- A worker that dies (killed, segfault, ``os._exit``) is seen at once: the
  thread waits on the child's sentinel together with its pipe. By default
  the run raises `conveyor.WorkerCrashed` naming the stage, the exit code or
  signal and the items the worker held. With ``retries`` (or with
  ``on_error="skip"``) the items go to a fresh worker instead, one per
  message so that the one that kills its worker is found; an item that
  kills ``retries + 1`` workers fails per ``on_error``.
- With a per-item ``timeout``, items go one per message; the child reports
  when each attempt starts, and the parent kills a child whose attempt
  overruns, counts a `TimeoutError` for the item (``retries`` and
  ``on_error`` apply) and starts a fresh worker.
- An item or result that cannot be pickled gives a `conveyor.SerializationError`
  naming the stage and the object's type (recorded with ``on_error="skip"``).
- An exception raised by the stage function reaches the caller with its own
  type and notes; the worker's traceback, as text, is its ``__cause__``.
  One that does not survive pickling (an ``__init__`` with other arguments
  than its ``args``) is rebuilt without calling ``__init__``, its attributes
  restored (those that can be pickled); only when its class is not imported
  in the parent does a `conveyor.RemoteError` carry its type name and message.
- Stop, abort and Ctrl-C terminate every worker process at once (``SIGTERM``,
  then ``SIGKILL`` after `KILL_GRACE` seconds) and join them; ``on_stop``
  then does not run. Worker processes ignore ``SIGINT`` (a Ctrl-C in the
  terminal reaches the whole process group: the parent handles it) and exit
  by themselves if the parent dies.
- A stall report cannot see a child's stack from the parent: each child has
  a second pipe on which a thread of its own says, when asked, which item the
  stage function is on and where the main thread's code is
  (`_child._answer_probes`; `conveyor.metrics.WorkerProbe`). Nothing runs
  there until a report asks.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pickle
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing import connection, current_process, get_all_start_methods, get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from time import monotonic
from typing import Any

from ..errors import (
    ConfigurationError,
    RemoteTraceback,
    SerializationError,
    ShutDown,
    WorkerCrashed,
)
from ..metrics import ProbeAnswer
from ..policy import (
    BatchOutcome,
    add_note,
    add_stage_note,
    give_up,
    item_repr,
    retry_delay,
    type_name,
)
from ..remote import rebuild, restore
from ..stage import Failure, Stage
from . import _cpus, _forkserver_main, _process_table
from ._background import BACKGROUND
from ._child import _child_main, _PackedError, _stage_blob, _standby_main
from ._spare import SPARES
from ._standby import STANDBYS, Standby, prepared
from ._standby import eligible as standby_eligible
from ._wire import (
    _BATCH,
    _BY_FD,
    _LOAD_FAILED,
    _READY,
    _SLEEPING,
    _STANDBY_BLOCKS,
    _STANDBY_STAGE,
    _STARTED,
    _STOP_MESSAGE,
    _STOPPED,
    SHM_THRESHOLD,
    _Arena,
    _BatchMessage,
    _Buffers,
    _Desc,
    _dump,
    _first_unpicklable,
    _load,
    _OutcomeMessage,
    _pack,
    shm_prefix,
)
from .base import Leftover, Runtime, StageRun, batch_loop, warn_stop_overran, worker_loop
from .threads import join_threads

__all__ = [
    "BATCH_SECONDS",
    "KILL_GRACE",
    "LANES",
    "MAX_BATCH",
    "POOL_SIZE",
    "RUNTIME",
    "SHM_MESSAGE_LIMIT",
    "SHM_THRESHOLD",
    "SPARE_BYTES",
    "STANDBY_PROCESSES",
    "START_METHOD",
    "ProcessRuntime",
    "RemoteTraceback",
    "settle",
    "shm_prefix",
    "start_method",
]

START_METHOD: str | None = None
"""Start method of worker processes ("forkserver", "spawn" or "fork"); None: the
``CONVEYOR_START_METHOD`` environment variable, else forkserver on Linux, spawn elsewhere.
"fork" is only safe when the parent runs no other thread than conveyor's own."""
SHM_MESSAGE_LIMIT = 4 * 1024 * 1024
"""A batch whose buffers add up to more is sent in several messages (one item at least);
also the smallest shared-memory block (only the pages written are ever allocated)."""
LANES = 2
"""Batches in flight per worker process (each sent by a thread of its own): with two, the
worker has the next batch waiting while it computes, and never waits for the parent."""
POOL_SIZE = 64
"""Shared-memory blocks a worker keeps each way, to reuse each once no message in flight
and no array built on it uses it (results in the output channel or in the caller's hands
hold several). Beyond that, free blocks are unmapped first, then the oldest are let go
(their arrays keep them mapped)."""
SPARE_BYTES = 64 * 1024 * 1024
"""Bytes of free shared-memory blocks the process keeps when workers end, for the next
workers (of any stage or run) to reuse instead of faulting fresh blocks in (see
``_spare``); 0 keeps none. The memory stays allocated meanwhile."""
STANDBY_PROCESSES = min(8, os.cpu_count() or 1)
"""Worker processes the process keeps started and waiting, for the next workers (of any
stage or run) to take instead of starting one (see ``_standby``; forkserver start method
only); one is started in the background whenever a worker ends at the end of its input,
from the program's second run of worker processes on. 0 keeps none."""
BATCH_SECONDS = 0.02
"""Target time of one batch. A round trip to a worker costs about 0.1 ms of the parent's
time, so batches ten times longer than the thread runtime's keep that cost small, while
still spreading slow items over the workers (two lanes hide the round trip's latency)."""
MAX_BATCH = 1024
"""Most items a process worker takes at once (at most the input channel's capacity)."""
KILL_GRACE = 0.25
"""Seconds a worker process gets to exit after SIGTERM before it is killed."""
EXIT_GRACE = 2.0
"""Seconds a worker process gets to exit by itself after on_stop (non-daemon
threads of user code are joined then) before it is terminated."""
LANES_APART = True
"""Whether the lanes (the parent's threads that feed worker processes) keep to CPUs of
their own, apart from the workers, when each worker and the lanes can have one
(Linux; see ``_cpus``). False: they run wherever the scheduler puts them."""

_ENV_START_METHOD = "CONVEYOR_START_METHOD"
_HELD_SHOWN = 10  # items a WorkerCrashed note lists
_EXIT_MAIN_GUARD = 78  # EX_CONFIG: a worker found the main module starting a pipeline

_MAIN_GUARD_HELP = (
    "a process stage was started while a worker process was importing the main module: "
    "the script runs its pipeline at import time. Worker processes (start method {method!r}) "
    "import the main module again; put the code that runs the pipeline under "
    '`if __name__ == "__main__":`.'
)


def start_method() -> str:
    """The start method worker processes use now (see `START_METHOD`).

    Raises:
        ConfigurationError: the method named is not available on this platform.
    """
    method = START_METHOD or os.environ.get(_ENV_START_METHOD) or _default_start_method()
    if method not in get_all_start_methods():
        allowed = ", ".join(repr(m) for m in get_all_start_methods())
        raise ConfigurationError(
            f"process start method {method!r} (from conveyor.runtime.processes.START_METHOD "
            f"or ${_ENV_START_METHOD}) is not available here; use one of {allowed}"
        )
    return method


def _default_start_method() -> str:
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


def _preload_in_forkserver() -> None:
    """Add this module, and NumPy when this process uses it, to the forkserver's preload
    list, and start the server: workers then start without importing them. Importing this
    module imports the worker's side (`_child`, `_wire`) too; what that side imports only
    when needed, a worker needs at once here (ctypes on Linux, `_allocator` with NumPy).
    The main module is imported there as well (`_forkserver_main`), rather than run again
    by every worker."""
    from multiprocessing import forkserver

    # The list lives in a private attribute; keep whatever the user set there, but import
    # the main module through _forkserver_main (last: what it imports is loaded by then).
    server = getattr(forkserver, "_forkserver", None)
    modules = list(getattr(server, "_preload_modules", None) or ["__main__"])
    wanted = [__name__]
    if "numpy" in sys.modules:  # and the module that places arrays in shared memory
        wanted[:0] = ["numpy", f"{__package__}._allocator"]
    if sys.platform.startswith("linux"):  # what each worker keeps of its heap is set through it
        wanted.insert(0, "ctypes")
    if "__main__" in modules:
        modules.remove("__main__")
        wanted.append(_forkserver_main.__name__)
    missing = [name for name in wanted if name not in modules]
    if missing:
        forkserver.set_forkserver_preload([*modules, *missing])
    with _sigint_held(get_context("forkserver")):  # its imports take a while: see there
        _forkserver_main.prepare()


# ---------------------------------------------------------------------- exceptions


def _unpack_error(packed: _PackedError) -> BaseException:
    """The exception a worker sent, as itself, with its traceback text as ``__cause__``.

    Made again from its class, ``args`` and attributes (`conveyor.remote.restore`,
    which does not call ``__init__``) when they survived a round trip in the worker;
    else rebuilt from its record the same way, or a `RemoteError` when its class is
    not loaded here.
    """
    blob, record = packed
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = restore(*pickle.loads(blob))
        except Exception:
            exc = None
    if exc is None:
        return rebuild(record)
    exc.__cause__ = RemoteTraceback(record.traceback)
    return exc


def _describe_exit(exitcode: int | None, orphaned: bool = False) -> str:
    if orphaned:
        return "was lost when the forkserver process, which reports its end, ended (killed?)"
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            return f"was killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# ---------------------------------------------------------------------- the parent's side


_POSIX = os.name == "posix"
_READ_SIZE = 1 << 16  # what one read() asks for: a whole batch message, usually
_READ_LIMIT = 1 << 22  # the most one read() asks for (os.read allocates what it asks)

# What a worker thread finds when it waits (see _Link.wait).
_MESSAGE, _ABORTED, _ENDED, _TIMED_OUT = range(4)


class _Link:
    """The parent's end of a worker's pipe, and everything a worker thread waits on.

    Per batch the thread sends a message and waits; each system call is also
    a chance for another thread to take the GIL, and a wait to get it back.
    So on POSIX one ``poll`` object, registered once, watches the pipe, the
    child's sentinel and the run's abort pipe, and messages are read whole
    (multiprocessing's framing: a 4-byte length, or -1 and 8 bytes) with one
    ``read`` when they fit. Elsewhere, `multiprocessing.connection.wait`.
    """

    def __init__(self, conn: Connection, sentinel: int, abort: Connection) -> None:
        self.conn = conn
        self._buffer = bytearray()
        self._missing = 0
        self._fd = conn.fileno()
        self._abort_fd = abort.fileno()
        self._waitables: list[Any] = [abort, conn, sentinel]
        if _POSIX:
            self._poller = select.poll()
            for fd in (self._abort_fd, self._fd, sentinel):
                self._poller.register(fd, select.POLLIN)

    def wait(self, timeout: float | None) -> int:
        """What happened first: _MESSAGE, _ABORTED, _ENDED (the child) or _TIMED_OUT."""
        if self._buffer and self._complete(peek=True) is not None:
            return _MESSAGE
        if _POSIX:
            events = self._poller.poll(None if timeout is None else 1000 * timeout)
            ready = {fd for fd, _ in events}
            if self._abort_fd in ready:
                return _ABORTED
            if self._fd in ready:
                return _MESSAGE  # or the end of the pipe: read() raises EOFError
            return _ENDED if ready else _TIMED_OUT
        found = connection.wait(self._waitables, timeout)
        if self._waitables[0] in found:
            return _ABORTED
        if self.conn in found:
            return _MESSAGE
        return _ENDED if found else _TIMED_OUT

    def read(self) -> bytes:
        """The next message (blocking until it is whole).

        Raises:
            EOFError: the child's end is closed.
        """
        if not _POSIX:
            return self.conn.recv_bytes()
        while True:
            message = self._complete(peek=False)
            if message is not None:
                return message
            chunk = os.read(self._fd, min(_READ_LIMIT, max(_READ_SIZE, self._missing)))
            if not chunk:
                raise EOFError
            self._buffer += chunk

    def _complete(self, peek: bool) -> bytes | None:
        """Take the first whole message out of the buffer (with peek: b"" if there is one)."""
        buffer = self._buffer
        start, size = 4, -1
        if len(buffer) >= 4:
            size = int.from_bytes(buffer[:4], "big", signed=True)
            if size == -1 and len(buffer) >= 12:
                start, size = 12, int.from_bytes(buffer[4:12], "big")
        end = start + size
        if size < 0 or len(buffer) < end:
            self._missing = max(1, end - len(buffer)) if size >= 0 else 12
            return None
        if peek:
            return b""
        with memoryview(buffer) as view:
            message = view[start:end].tobytes()
        del buffer[:end]
        return message


class _Flight:
    """What the parent keeps about a message until its answer: the blocks it uses."""

    __slots__ = ("fds", "inbox", "named", "outbox", "sent")

    def __init__(self) -> None:
        self.inbox: _Arena | None = None  # where its big buffers are
        self.outbox: _Arena | None = None  # where the answer's big buffers go
        self.named: list[_Arena] = []  # blocks it announced, named until the answer
        self.fds: list[int] = []  # descriptors of spare blocks it announced (`_BY_FD`)
        # Its big bytes objects by index, for the answer to name (see _wire._OutOfBand).
        self.sent: list[Any] | None = None


class _Child:
    """A worker process as the parent sees it: process, pipe, shared memory, messages in flight.

    Up to one message per lane is in flight (two lanes: the child always has
    the next batch waiting). Messages are answered in the order they were
    sent; whichever lane finds nobody reading reads for all, and hands each
    answer to the lane that waits for it. Shared-memory blocks are chosen
    and released under ``_send_lock`` (the order of messages is the order
    the child sees them in); a message's big buffers are copied into its
    block outside that lock (and outside the GIL: see `_wire._copy`), so that
    the other lane can settle an answer meanwhile; messages then go out in
    the order of their numbers (``_turn``).
    """

    def __init__(
        self,
        process: BaseProcess,
        conn: Connection,
        abort: Connection,
        probe: Connection | None = None,
    ) -> None:
        self.process = process
        self.conn = conn
        # The pipe the child's probe thread answers on (see `ask`), if it has one.
        self.probe = probe
        self._probe_lock = threading.Lock()
        self._question = 0
        self.link = _Link(conn, process.sentinel, abort)
        self.pid = process.pid
        self.items_done = 0
        self.busy = 0.0  # seconds its last answer says the stage took (see QUIET_BUSY)
        self.exitcode: int | None = None
        # Its forkserver ended before it (`_process_table.orphaned`): killed, blocks not reused.
        self.orphaned = False
        # CPU time the child has reported (its process_time() in its last answer).
        self._cpu_reported = 0.0
        self._cpu_lock = threading.Lock()
        # Shared memory: requests' big buffers go to inboxes, answers' to outboxes.
        self.inboxes: list[_Arena] = []
        self.outboxes: list[_Arena] = []
        # Blocks the child mapped before it had a stage (a standby's): used before new ones.
        self.premapped: list[_Arena] = []
        self.outbox_need = 0  # an answer did not fit: the next outbox must hold this much
        self._forget: list[int] = []  # blocks the child is to unmap with the next message
        self._reserved: set[int] = set()  # blocks a message in flight uses
        self._idents = itertools.count()
        # Messages in flight.
        self._send_lock = threading.Lock()
        # Notified when a message has gone out (_next_send) or a copy ended (_filling).
        self._turn = threading.Condition()
        self._next_send = 0
        self._filling = 0  # copies into blocks in progress (close waits for them)
        self._answered = threading.Condition()  # notified when an answer (or the end) is read
        self._sent = 0
        self._next_answer = 0
        self._answers: dict[int, tuple[Any, ...]] = {}
        self._flights: dict[int, _Flight] = {}
        self._reading = False
        self.dead = False
        self.aborted = False
        # One-lane timeout stages: the deadline of the attempt in progress.
        self.deadline: float | None = None
        self.attempts = 0  # attempts started on the current message
        self.timed_out = False
        self._lock = threading.Lock()  # guards the process handle against close()
        self._close_lock = threading.Lock()
        self._closed = False
        self._sock: socket.socket | None = None  # see _socket

    # ------------------------------------------------------------------ probes

    def ask(self) -> bool:
        """Ask the child where its main thread is (`_child._answer_probes`); False when
        it cannot be asked (no probe, or it has ended)."""
        with self._probe_lock:
            if self.probe is None or self._closed:
                return False
            self._question += 1
            try:
                self.probe.send_bytes(self._question.to_bytes(8, "little"))
            except OSError:
                return False
            return True

    def answer(self, deadline: float) -> ProbeAnswer | None:
        """The answer to the last question, waited for until ``deadline`` (`monotonic`)."""
        with self._probe_lock:
            probe = self.probe
            while probe is not None and not self._closed:
                left = deadline - monotonic()
                try:
                    if left <= 0 or not probe.poll(left):
                        return None
                    data = probe.recv_bytes()
                except (EOFError, OSError):
                    return None
                if int.from_bytes(data[:8], "little") == self._question:  # else a late one
                    item, stack = pickle.loads(data[8:])
                    return ProbeAnswer(self.process.name, self.pid or 0, item, stack)
            return None

    # ------------------------------------------------------------------ messages

    def cpu_since_last(self, total: float) -> float:
        """CPU seconds the child used since the last answer counted, given its ``total``.

        Two lanes merge answers concurrently, possibly out of order: the
        largest total seen wins, so nothing is counted twice.
        """
        with self._cpu_lock:
            if total <= self._cpu_reported:
                return 0.0
            used, self._cpu_reported = total - self._cpu_reported, total
            return used

    def send(self, payload: bytes, pids: bool, buffers: _Buffers, retries_left: int | None) -> int:
        """Place a batch's big buffers in shared memory and send it; return its number."""
        with self._send_lock:
            flight = _Flight()
            descs: list[_Desc] = []
            inbox = outbox = None
            copies: list[tuple[int, memoryview]] = []
            if not self._closed:  # else it ended meanwhile: no block for an unread message
                descs, inbox, copies = self._place(buffers, flight)
                outbox = self._choose_outbox(bool(buffers.views), flight)
            if pids:
                flight.sent = [
                    v.obj if persistent and type(v.obj) is bytes else None
                    for v, persistent in zip(buffers.views, buffers.persistent, strict=True)
                ]
            forget, self._forget = self._forget, []
            message = _BatchMessage(
                _BATCH, payload, pids, descs, inbox, outbox, forget, retries_left
            )
            data = _pack(message)
            seq = self._sent
            self._sent += 1
            self._flights[seq] = flight
            if copies:
                with self._turn:
                    self._filling += 1
        try:
            if copies:
                assert flight.inbox is not None  # reserved for this message: nobody else writes it
                flight.inbox.fill(copies)
        finally:
            with self._turn:
                self._filling -= bool(copies)
                while self._next_send != seq:
                    self._turn.wait()
                with contextlib.suppress(OSError):  # it died: whoever reads finds out
                    self.conn.send_bytes(data)
                    if flight.fds:  # right after the message, which says how many
                        socket.send_fds(self._socket(), [b"F"], flight.fds)
                self._next_send += 1
                self._turn.notify_all()
        return seq

    def _socket(self) -> socket.socket:
        """A handle of our own on the pipe's socket, to send descriptors (``_turn`` held)."""
        if self._sock is None:
            self._sock = socket.socket(fileno=os.dup(self.conn.fileno()))
        return self._sock

    def receive(
        self, seq: int, read: Callable[[], tuple[Any, ...] | None]
    ) -> tuple[Any, ...] | None:
        """The answer to message ``seq``, or None if the child ended first.

        ``read`` reads the next answer from the pipe (None: the child ended).

        Raises:
            ShutDown: the run was aborted.
        """
        answered = self._answered
        while True:
            with answered:
                while True:
                    if seq in self._answers:
                        return self._answers.pop(seq)
                    if self.aborted:
                        raise ShutDown
                    if self.dead:
                        return None
                    if not self._reading:
                        self._reading = True
                        break
                    answered.wait()
            message: tuple[Any, ...] | None = None
            try:
                message = read()
            except ShutDown:
                self.aborted = True
                raise
            finally:
                with answered:
                    self._reading = False
                    if message is None:
                        self.dead = True
                    else:
                        self._answers[self._next_answer] = message
                        self._next_answer += 1
                    answered.notify_all()

    def was_waiting(self, seq: int) -> bool:
        """After the child ended: True if message ``seq`` had not been started yet."""
        return seq > self._next_answer

    def blocks(self, seq: int) -> tuple[_Arena | None, _Arena | None, list[Any] | None]:
        """The answer block and the request block of message ``seq``, and the bytes objects
        its answer may name (see `_Flight`)."""
        flight = self._flights[seq]
        return flight.outbox, flight.inbox, flight.sent

    def settle(self, seq: int, kept_inbox: bool, need: int, kept_outbox: bool = False) -> None:
        """Message ``seq`` was answered (and its results built): release its blocks."""
        with self._send_lock:
            flight = self._flights.pop(seq)
            for arena in flight.named:  # the child has mapped them
                arena.unlink()
            outbox = flight.outbox
            if outbox is not None:
                self._reserved.discard(outbox.ident)  # in_use() guards it from now on
                if kept_outbox:  # arrays the stage created there live on in the child
                    self.outboxes.remove(outbox)
                    SPARES.dispose(outbox, False, SPARE_BYTES)
            inbox = flight.inbox
            if inbox is not None:
                self._reserved.discard(inbox.ident)
                if kept_inbox:  # arrays the child kept use it: it is theirs (the child let it go)
                    self.inboxes.remove(inbox)
                    SPARES.dispose(inbox, False, SPARE_BYTES)
            self.outbox_need = max(self.outbox_need, need)

    # ------------------------------------------------------------------ shared memory

    def _place(
        self, buffers: _Buffers, flight: _Flight
    ) -> tuple[list[_Desc], Any, list[tuple[int, memoryview]]]:
        """Choose a free inbox for a message's big buffers: their places, the inbox, and
        the copies to make (`_Arena.fill`)."""
        if not buffers.views:
            return [], None, []
        box, announce = self._pick(self.inboxes, buffers.total, flight)
        flight.inbox = box
        descs, copies = box.layout(buffers)
        return descs, announce, copies

    def _choose_outbox(self, sending: bool, flight: _Flight) -> tuple[int, str | None, int] | None:
        """The block the child is to write the answer's big buffers to (None until a
        message or an answer had big buffers)."""
        need = self.outbox_need
        if not (self.outboxes or need or sending):
            return None
        self.outbox_need = 0
        box, announce = self._pick(self.outboxes, need, flight)
        flight.outbox = box
        return announce

    def _pick(
        self, pool: list[_Arena], need: int, flight: _Flight
    ) -> tuple[_Arena, tuple[int, str | None, int]]:
        """A block of ``pool`` for a message in flight: free and big enough, or a new one.

        A block is free once no message in flight uses it and no array built
        on it is left; of the free ones, the last used is taken. While the
        caller still holds results, new blocks are made; beyond the pool's size
        the free ones are unmapped first, then the least recently used are let
        go (their arrays keep them mapped).
        """
        reserved = self._reserved
        # The pool is kept in the order of use, the last used last: that one's pages
        # are the likeliest to be still in the caches.
        box = next(
            (
                a
                for a in reversed(pool)
                if a.size >= need and a.ident not in reserved and not a.in_use()
            ),
            None,
        )
        excess = len(pool) + (box is None) - POOL_SIZE
        if excess > 0:  # only then is every block looked at
            free = [a for a in pool if a.ident not in reserved and not a.in_use()]
            busy = [a for a in pool if a not in free and a.ident not in reserved]
            for old in ([a for a in free if a is not box] + busy)[:excess]:
                self._drop(pool, old)
        announce = None
        if box is None:
            box, announce = self._new_arena(need, flight)
        else:
            pool.remove(box)
        pool.append(box)
        reserved.add(box.ident)
        return box, (box.ident, announce, box.size)

    def _drop(self, pool: list[_Arena], arena: _Arena) -> None:
        pool.remove(arena)
        # A free block can serve another worker; the child unmaps it with the next message.
        free = arena.ident not in self._reserved
        SPARES.dispose(arena, free, SPARE_BYTES)
        self._forget.append(arena.ident)

    def _new_arena(self, size: int, flight: _Flight) -> tuple[_Arena, str | None]:
        """A block for the child to use: one it mapped before its stage came (announced
        as known: None), a spare one (faulted in already: sent by its descriptor), or a
        new one (by its name); and how the message announces it."""
        size = max(size, SHM_MESSAGE_LIMIT)
        for arena in self.premapped:
            if arena.size >= size:
                self.premapped.remove(arena)
                return arena, None
        spare = SPARES.take(size)
        if spare is not None:
            spare.ident = next(self._idents)
            flight.fds.append(spare.fd)  # type: ignore[arg-type]  # spares keep theirs
            return spare, _BY_FD
        keep_fd = _POSIX and SPARES.reserve(size, SPARE_BYTES)
        arena = _Arena.create(next(self._idents), size, keep_fd)
        flight.named.append(arena)
        return arena, arena.name

    # ------------------------------------------------------------------ the process

    def signal(self, kill: bool) -> None:
        """Send SIGTERM (or SIGKILL) unless the process is closed; safe from any thread."""
        with self._lock:  # held briefly: the abort callback must never wait behind a join
            if self._closed:
                return
            with contextlib.suppress(Exception):
                if kill:
                    self.process.kill()
                else:
                    self.process.terminate()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, grace: float) -> int | None:
        """Let the process exit within ``grace`` s, else terminate then kill it; free it all.

        Idempotent, and safe from several threads: one closes, the others wait.
        Only the closer polls the process (two pollers could race for the
        exit status a forkserver child's sentinel carries).
        """
        with self._close_lock:
            if self._closed:
                return self.exitcode
            process = self.process
            _process_table.join(process, grace)
            if _process_table.exitcode(process) is None:
                self.signal(kill=False)
                _process_table.join(process, KILL_GRACE)
            if _process_table.exitcode(process) is None:
                self.signal(kill=True)
                _process_table.join(process)
            orphaned = _process_table.orphaned(process)
            with self._lock:
                self.exitcode = _process_table.exitcode(process)
                self.orphaned = orphaned
                self._closed = True
                with contextlib.suppress(ValueError):
                    _process_table.close(process)
            self.conn.close()
            with self._probe_lock:
                if self.probe is not None:
                    self.probe.close()
            with self._send_lock:  # held: no copy starts (see send); those started end first
                with self._turn:
                    while self._filling:
                        self._turn.wait()
                # Blocks the child has ended with, and no message in flight names, may serve
                # another worker; a block the child may still use (an interpreter given up
                # inside a call) or whose answer a lane has yet to read may not.
                ended = self.exitcode is not None and not orphaned
                flying: set[int] = set()
                for flight in self._flights.values():
                    for arena in flight.named:
                        arena.unlink()
                    flying.update(id(a) for a in (flight.inbox, flight.outbox) if a is not None)
                for arena in (*self.inboxes, *self.outboxes, *self.premapped):
                    SPARES.dispose(arena, ended and id(arena) not in flying, SPARE_BYTES)
                self.inboxes.clear()
                self.outboxes.clear()
                self.premapped.clear()
                if self._sock is not None:
                    self._sock.close()
            return self.exitcode


class _Job:
    """One batch on its way through worker processes, maybe in several messages."""

    def __init__(self, stage: Stage, batch: list[Any], track: bool) -> None:
        self.stage = stage
        self.batch = batch
        self.outcome = BatchOutcome([], counts=[] if track else None)
        self.start = 0  # the first item not done yet
        self.isolate_until = 0  # items before this one go one per message (after a crash)
        self.charged: dict[int, int] = {}  # item index -> workers it crashed or overran

    def give_up(self, index: int, error: BaseException, attempts: int) -> bool:
        """batch[index] failed for good: apply on_error; True when the batch goes on."""
        if give_up(self.stage, self.outcome, self.batch[index], error, attempts, index):
            return False
        self.start = index + 1
        return True

    def stop(self, error: BaseException, index: int) -> None:
        """End the batch with ``error`` (already noted) at batch[index]."""
        outcome = self.outcome
        outcome.error = error
        outcome.error_item = self.batch[index] if index < len(self.batch) else None
        outcome.processed = index


class _Worker:
    """One worker of a process stage: one child process at a time, driven by one or two lanes.

    A lane is a thread of the parent running the shared `worker_loop`. With
    two lanes, the child has the next batch waiting while it works on one,
    and the parent prepares and unpacks batches while the child computes
    (stages with a ``timeout`` or ``max_items_per_worker`` use one lane: their
    bookkeeping is per message).
    """

    def __init__(
        self,
        runtime: ProcessRuntime,
        sr: StageRun,
        index: int,
        blob: bytes,
        cpus: frozenset[int] | None,
    ) -> None:
        self.runtime = runtime
        self.sr = sr
        self.stage = stage = sr.stage
        self.index = index
        self.blob = blob
        self.child: _Child | None = None
        self._child_lock = threading.Lock()  # starting, replacing and retiring the child
        self.lanes = _lanes(stage)
        # The run's CPUs, out of which the lanes keep to their own (see `_cpus`); None:
        # the lanes run wherever the scheduler puts them.
        self.cpus = cpus
        self._bytes_likely = False  # the last message held big bytes (see _wire._dump)
        self._running = self.lanes
        sr.metrics.probes[index] = self  # stall reports ask where the child is (`ask`)

    # ------------------------------------------------------------------ lanes

    def run_lane(self, handle: int) -> None:
        """A lane's thread: the shared worker loop; the last lane to end stops the child."""
        sr = self.sr
        control = sr.control
        try:
            if handle == self.index:  # the first lane starts the child at once
                try:
                    self._live_child()
                except ShutDown:
                    sr.ports[handle].close()
                    return
                except BaseException as exc:
                    control.fail(exc)
                    sr.ports[handle].close()
                    return
            worker_loop(sr, handle, self.execute, BATCH_SECONDS, group=self.index)
        finally:
            # Back on all the run's CPUs: the background thread a lane may start
            # (`_retire`) would inherit the lanes'.
            _cpus.place_lane(self.cpus, apart=False)
            with self._child_lock:
                self._running -= 1
                last = self._running == 0
            if last:
                if self.cpus is not None:
                    _cpus.PLAN.remove(1)
                with self._child_lock:
                    self._retire(graceful=not control.stopped.is_set())

    def _retire(self, graceful: bool) -> None:
        """Stop the current child (lock held): gently at the end of the input, at once on abort."""
        child, self.child = self.child, None
        if child is None:
            return
        runtime = self.runtime
        stopped = graceful and not child.dead and self._stop_gently(child)
        if stopped and runtime.exits_in_background:
            # It said on_stop ran: what is left is its exit (unmapping its blocks, the
            # kernel freeing its memory: 3 ms of a 512 MiB run), which the run need not
            # wait for. The run forgets it at once; the background thread waits for it,
            # then starts a standby (once the blocks are spare again, for it to map).
            runtime.let_exit(child, partial(_replenish, runtime))
            return
        runtime.forget(child, EXIT_GRACE if graceful else 0.0)
        if graceful and standby_eligible(runtime.context):
            BACKGROUND.submit(partial(_replenish, runtime))

    def _stop_gently(self, child: _Child) -> bool:
        """Ask the child to run on_stop and exit; on_stop's error fails the run. A child
        whose on_stop has not returned within the stage's ``stop_timeout`` is killed.
        True when it said it stopped (on_stop done, well or not)."""
        child.timed_out = False
        try:
            child.conn.send_bytes(_STOP_MESSAGE)
            child.deadline = monotonic() + self.stage.stop_timeout  # `_read` kills it then
            with self.sr.metrics.in_hook("on_stop", probe=child):
                message = self._read(child)
        except (OSError, ShutDown):
            return False
        if message is None and child.timed_out:
            worker = f"{self.runtime.worker} {child.process.name} (pid {child.pid})"
            warn_stop_overran(self.stage, worker, self.runtime.stopped_overrun)
        if message is None or message[0] != _STOPPED:
            return False
        if message[1] is not None:
            error = _unpack_error(message[1])
            add_note(error, f"conveyor: on_stop of stage {self.stage.label} failed")
            self.sr.control.fail(error)
        return True

    # ------------------------------------------------------------------ probes

    def ask(self) -> bool:
        """`WorkerProbe.ask`: ask the current child, if any."""
        child = self.child
        return child is not None and child.ask()

    def answer(self, deadline: float) -> ProbeAnswer | None:
        """`WorkerProbe.answer`: the current child's, if it is the one asked."""
        child = self.child
        return None if child is None else child.answer(deadline)

    # ------------------------------------------------------------------ children

    def _live_child(self) -> _Child:
        """The child to send to: started if there is none (or it ended), replaced when its
        quota is used up (one lane then)."""
        with self._child_lock:
            if self.sr.control.stopped.is_set():
                # Aborted: start nothing, and keep the child for the last lane to close
                # (a read the abort cut short left it "dead" but open).
                raise ShutDown
            child = self.child
            if child is not None and child.dead:
                child = self.child = None  # the lane that read its end closed it
            quota = self.stage.max_items_per_worker
            if child is not None and quota is not None and child.items_done >= quota:
                self._retire(graceful=True)
                child = None
            if child is None:
                child = self.child = self._start_child()
            return child

    def _start_child(self) -> _Child:
        """Start a worker process (or take a standby) and wait until on_start has run in it."""
        name = f"conveyor-{self.stage.name}-{self.index}"
        standby = self._from_standby(name)
        if standby is not None:
            message = self._ready(standby)
            if message is not None or self.sr.control.stopped.is_set():
                return self._started(standby, message)
            # It ended without a word: killed while it waited, or by the stage's loading,
            # which a worker started as usual then shows as it always did.
        child = self._new_child(name)
        return self._started(child, self._ready(child))

    def _ready(self, child: _Child) -> tuple[Any, ...] | None:
        """Track ``child`` and wait for its first message (None: it ended first).

        Raises:
            ShutDown: the run was aborted meanwhile.
        """
        runtime = self.runtime
        runtime.adopt(child)  # raises ShutDown (after terminating it) if the run was aborted
        try:
            with self.sr.metrics.in_hook("on_start", probe=child):  # and the unpickling
                return self._read(child)
        except ShutDown:
            runtime.forget(child, 0.0)
            raise

    def _started(self, child: _Child, message: tuple[Any, ...] | None) -> _Child:
        """``child`` if its first message says ready, else the error that says why not."""
        runtime, stage = self.runtime, self.stage
        worker = runtime.worker
        if message is not None and message[0] == _READY:
            return child
        runtime.forget(child, 0.0)
        if message is None:
            if child.exitcode == _EXIT_MAIN_GUARD:
                raise _main_guard_error()
            ended = _describe_exit(child.exitcode, child.orphaned)
            raise WorkerCrashed(
                f"a {worker} of stage {stage.label} {ended} "
                f"before it was ready (if the main module starts a pipeline at import time, "
                f'put that code under `if __name__ == "__main__":`)',
                stage=stage.name,
                exitcode=child.exitcode,
            )
        error = _unpack_error(message[2])
        what = "on_start" if message[1] == "on_start" else "unpickling the stage function"
        raise add_note(error, f"conveyor: {what} of stage {stage.label} failed in a {worker}")

    def _new_child(self, name: str) -> _Child:
        """Start a worker process for this worker's stage."""
        runtime = self.runtime
        ours, theirs = runtime.context.Pipe()
        args: tuple[Any, ...] = (theirs, self.blob)
        probe = probe_end = None
        if runtime.probes:  # a second pipe, for stall reports to ask where the child is
            probe, probe_end = runtime.context.Pipe()
            args += (False, probe_end)
        process = runtime.context.Process(target=_child_main, args=args, name=name, daemon=True)
        try:
            with _pseudo_main_file.hidden(), _sigint_held(runtime.context):
                _process_table.start(process)
        except RuntimeError as exc:
            if probe is not None:
                probe.close()
            if "bootstrapping phase" in str(exc):
                raise _main_guard_error() from exc
            raise
        finally:
            theirs.close()
            if probe_end is not None:
                probe_end.close()
        return _Child(process, ours, runtime.abort_reader, probe)

    def _from_standby(self, name: str) -> _Child | None:
        """A standby process (see ``_standby``) given this worker's stage, or None."""
        runtime = self.runtime
        standby = STANDBYS.take(runtime.context)
        if standby is None:
            return None
        process, conn, probe = standby.process, standby.conn, standby.probe
        try:
            conn.send_bytes(pickle.dumps((_STANDBY_STAGE, name, self.blob), 5))
        except OSError:  # it ended meanwhile
            STANDBYS.let_go(standby)  # reaped, its blocks spare again
            return None
        process.name = name
        if not runtime.probes:
            probe.close()  # its probe thread sees the end and stops
        child = _Child(process, conn, runtime.abort_reader, probe if runtime.probes else None)
        child.premapped = list(standby.blocks)  # their ids are their places in the list
        child._idents = itertools.count(len(standby.blocks))
        return child

    def _read(self, child: _Child) -> tuple[Any, ...] | None:
        """The child's next answer from the pipe; None when it ended (or was killed for
        overrunning its timeout), after closing it. One reader at a time.

        Raises:
            ShutDown: the run was aborted meanwhile.
        """
        link = child.link
        timeout = self.stage.timeout
        while True:
            deadline = child.deadline
            left = None if deadline is None else max(0.0, deadline - monotonic())
            event = link.wait(left)
            if event == _ABORTED:
                raise ShutDown
            if event == _MESSAGE:
                try:
                    message: tuple[Any, ...] = pickle.loads(link.read())
                except (EOFError, OSError):
                    break
                tag = message[0]
                if tag == _STARTED:
                    assert timeout is not None
                    child.attempts += 1
                    child.deadline = monotonic() + timeout
                elif tag == _SLEEPING:
                    child.deadline = None
                else:
                    child.deadline = None
                    return message
            elif event == _ENDED:
                break
            elif deadline is not None and monotonic() >= deadline:
                child.timed_out = True
                child.signal(kill=True)
                break
        child.exitcode = self.runtime.forget(child, 1.0)
        return None

    # ------------------------------------------------------------------ batches

    def execute(self, batch: list[Any]) -> BatchOutcome:
        """Run ``batch`` through worker processes: the ``execute`` of the worker loop."""
        job = _Job(self.stage, batch, self.sr.tracks)
        while job.start < len(batch) and self._step(job):
            pass
        if job.outcome.error is None:
            job.outcome.processed = len(batch)
        return job.outcome

    def _step(self, job: _Job) -> bool:
        """Send the next part of the batch and handle the answer; False when the batch failed."""
        stage = self.stage
        try:
            child = self._live_child()
        except ShutDown:
            raise
        except Exception as exc:
            job.stop(exc, job.start)
            return False
        start = job.start
        one = stage.timeout is not None or start < job.isolate_until
        end = start + 1 if one else len(job.batch)
        if stage.max_items_per_worker is not None:
            end = min(end, start + stage.max_items_per_worker - child.items_done)
        encoded = self._encode(job, end)
        if encoded is None:
            return job.outcome.error is None
        payload, pids, buffers, end = encoded
        charged = job.charged.get(start, 0) if end - start == 1 else 0
        retries_left = max(0, stage.retries - charged) if charged else None
        child.attempts = 0
        child.timed_out = False
        # While this lane copies big buffers for a busy worker, it keeps to CPUs apart
        # from the workers' (see `_cpus`), and waits quietly (`_wake_without_preempting`);
        # otherwise the parent is the busier side, and it runs and wakes as usual.
        apart = bool(buffers.total) and child.busy >= QUIET_BUSY
        _cpus.place_lane(self.cpus, apart)
        seq = child.send(payload, pids, buffers, retries_left)
        child.items_done += end - start
        quiet = apart and _wake_without_preempting()
        try:
            answer = child.receive(seq, partial(self._read, child))
        finally:
            if quiet:
                _wake_as_usual()
        if answer is None:
            if child.was_waiting(seq):
                return True  # the child ended before it started on these: send them again
            return self._after_death(job, child, end)
        if answer[0] == _LOAD_FAILED:
            child.settle(seq, answer[-1], 0)
            where = f"in the {self.runtime.worker}"
            return self._unreadable(job, end, _unpack_error(answer[1]), where)
        return self._merge(job, child, seq, _OutcomeMessage._make(answer), end)

    def _encode(self, job: _Job, end: int) -> tuple[bytes, bool, _Buffers, int] | None:
        """Pickle batch[start:end] (end may shrink); None when batch[start] is unpicklable."""
        stage, batch, start = self.stage, job.batch, job.start
        while True:
            buffers = _Buffers()
            items = batch[start:end]
            try:
                payload, pids = _dump(items, buffers, self._bytes_likely)
            except Exception as exc:
                bad = _first_unpicklable(items) or (0, exc)
                if bad[0] > 0:
                    end = start + bad[0]
                    continue
                # Say where the item comes from: that is where to look.
                upstream = self.sr.upstream
                what = "a source item" if self.sr.index == 0 else "an item"
                if upstream is not None:
                    what = f"an output of stage {upstream}"
                error = SerializationError(
                    f"stage {stage.label}: {what} of type {type_name(batch[start])} cannot be "
                    f"sent to a {self.runtime.worker}: {bad[1]}"
                )
                error.__cause__ = bad[1]
                job.give_up(start, error, 0)
                return None
            self._bytes_likely = pids  # lanes may race on it: it is only a hint
            if buffers.total:
                # Big buffers hold shared memory until the results are consumed: batches
                # of about one message's worth, however quick, keep that memory small.
                fit = max(1, len(items) * SHM_MESSAGE_LIMIT // buffers.total)
                job.outcome.size_limit = min(fit, job.outcome.size_limit or fit)
            if buffers.total > SHM_MESSAGE_LIMIT and end - start > 1:
                end = start + (end - start) // 2
                continue
            return payload, pids, buffers, end

    def _merge(self, job: _Job, child: _Child, seq: int, answer: _OutcomeMessage, end: int) -> bool:
        """Add a child's outcome for batch[start:end] to the job's; False when the batch failed."""
        try:
            outputs = _load(answer.payload, answer.pids, answer.descs, *child.blocks(seq))
        except Exception as exc:
            return self._unreadable(job, end, exc, "in the parent process")
        finally:
            child.settle(seq, answer.inbox_kept, answer.need, answer.outbox_kept)
        stage, batch, start = self.stage, job.batch, job.start
        outcome = job.outcome
        outcome.outputs.extend(outputs)
        if outcome.counts is not None:
            outcome.counts.extend(answer.counts)
        outcome.filtered += answer.filtered
        outcome.retried += answer.retried
        outcome.busy_seconds = (outcome.busy_seconds or 0.0) + answer.busy
        child.busy = answer.busy
        self.sr.metrics.add_child_cpu(child.cpu_since_last(answer.cpu))
        earlier = job.charged.get(start, 0) if end - start == 1 else 0
        for index, packed, attempts in answer.failures:
            failure = Failure(
                stage.name, batch[start + index], _unpack_error(packed), attempts + earlier
            )
            outcome.failures.append(failure)
            outcome.failed_at.append(start + index)
        if answer.error is not None:
            error = _unpack_error(answer.error)
            if not isinstance(error, Exception):  # SystemExit, KeyboardInterrupt: see _child
                raise error
            job.stop(error, start + answer.processed)
            return False
        job.start = end
        return True

    def _unreadable(self, job: _Job, end: int, exc: BaseException, where: str) -> bool:
        """A message could not be unpickled: find the item, one per message, then give up on it."""
        start = job.start
        if end - start > 1:
            job.isolate_until = end
            return True
        error = SerializationError(
            f"stage {self.stage.label}: an item of type {type_name(job.batch[start])} or its "
            f"result could not be unpickled {where}: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return job.give_up(start, error, 1)

    def _after_death(self, job: _Job, child: _Child, end: int) -> bool:
        """The child died (or was killed for overrunning) holding batch[start:end]."""
        stage, start = self.stage, job.start
        held = job.batch[start:end]
        if child.timed_out:
            job.charged[start] = job.charged.get(start, 0) + max(1, child.attempts)
        else:
            if stage.retries == 0 and stage.on_error == "raise":
                crash = self._crash_error(child, held)
                job.stop(add_stage_note(crash, stage, held[0]) if len(held) == 1 else crash, start)
                return False
            # A crash is charged to an item only when it held no other: which item of
            # a batch did it is unknown, so each is sent again alone (uncharged), and
            # `Failure.attempts` counts the same calls however the items were batched.
            if end - start == 1:
                job.charged[start] = job.charged.get(start, 0) + 1
        if end - start > 1:  # which one did it? Send them again one by one.
            job.isolate_until = end  # no retry: a call in the batch that died is not counted
            return True
        charged = job.charged[start]
        delay = retry_delay(stage, charged)
        if delay is not None:
            job.outcome.retried += 1
            if not self.sr.control.sleep(delay):
                raise ShutDown
            return True
        if child.timed_out:
            error: BaseException = TimeoutError(
                f"stage {stage.label} took longer than its timeout of {stage.timeout} s on one "
                f"item; {self.runtime.overrun}"
            )
        else:
            error = self._crash_error(child, held)
        return job.give_up(start, error, charged)

    def _crash_error(self, child: _Child, held: list[Any]) -> WorkerCrashed:
        stage = self.stage
        error = WorkerCrashed(
            f"a {self.runtime.worker} (pid {child.pid}) of stage {stage.label} "
            f"{_describe_exit(child.exitcode, child.orphaned)} while it held {len(held)} item(s)",
            stage=stage.name,
            exitcode=child.exitcode,
        )
        shown = ", ".join(_short_repr(x) for x in held[:_HELD_SHOWN])
        more = f" and {len(held) - _HELD_SHOWN} more" if len(held) > _HELD_SHOWN else ""
        add_note(error, f"conveyor: the item(s) it held: {shown}{more}")
        return error


class _LanePolicy(threading.local):
    usual: bool | None = None  # whether this thread has the default policy (asked once)


_LANE_POLICY = _LanePolicy()
QUIET_WAKE_UPS = hasattr(os, "SCHED_BATCH")
"""Whether a lane waits for its answer under ``SCHED_BATCH`` (Linux): see
`_wake_without_preempting`."""
QUIET_BUSY = 1e-4
"""Seconds the stage took on the worker's last message from which a lane sending big
buffers waits quietly (`_wake_without_preempting`) and keeps apart from the workers
(``_cpus``): about a round trip's cost to the parent. A stage that takes less is about
to wait for its next message: the parent is the busier side, and the lane woken is
the one with work to give it."""


def _wake_without_preempting() -> bool:
    """Make the calling lane, about to wait for its answer, a thread whose wake-up does not
    preempt the running one; True if done (then `_wake_as_usual` after the wait).

    The answer wakes the lane while the worker process goes on to the next message
    (the other lane's), and the woken lane would take the CPU the worker runs on, then
    hold it for the copy of its next message's big buffers: the worker waits for a
    copy it does not need. Under ``SCHED_BATCH`` (the same priority, no preemption on
    wake-up) the lane waits for a free CPU instead. Used when the worker was busy on
    the lane's last message (`QUIET_BUSY`) and the message just sent has big buffers:
    1 MiB arrays multiplied by the stage gained a fifth of their throughput, copied a
    tenth (docs/benchmarks.md, "quiet-lanes"). Not for small items: with as many
    busy workers as CPUs, lanes that waited for a CPU slowed them by a few percent.
    Only for a thread of the default policy: one the user set (inherited from the
    thread that started the run) is left as it is.
    """
    local = _LANE_POLICY
    if local.usual is None:
        try:
            local.usual = QUIET_WAKE_UPS and os.sched_getscheduler(0) == os.SCHED_OTHER
        except OSError:
            local.usual = False
    if not local.usual:
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:  # refused here (a sandbox): never asked again on this thread
        local.usual = False
        return False
    return True


def _wake_as_usual() -> None:
    """Undo `_wake_without_preempting`: the lane now runs as any thread does."""
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def _replenish(runtime: ProcessRuntime) -> None:
    """Start a standby (in the background thread): the next worker, of this run or
    another, need not start a process."""
    context = runtime.context
    STANDBYS.replenish(context, partial(_start_standby, context), STANDBY_PROCESSES, runtime)


def _start_standby(context: Any) -> Standby:
    """Start a standby worker process of ``context`` (in a thread of ``_standby``'s)."""
    ours, theirs = context.Pipe()
    probe, probe_end = context.Pipe()
    data = prepared(context)
    process = context.Process(
        target=_standby_main, args=(theirs, probe_end), name="conveyor-standby", daemon=True
    )
    try:
        with _pseudo_main_file.hidden(), _sigint_held(context):
            _process_table.start(process)
    except BaseException:
        ours.close()
        probe.close()
        raise
    finally:
        theirs.close()
        probe_end.close()
    return Standby(process, ours, probe, data, _premap(ours))


def _premap(conn: Connection) -> list[_Arena]:
    """Give a standby the spare blocks free now, for it to map while it waits; return
    them (their ids: their places in the list)."""
    blocks: list[_Arena] = []
    if not _POSIX:
        return blocks
    while (arena := SPARES.take(SHM_MESSAGE_LIMIT)) is not None:
        arena.ident = len(blocks)
        blocks.append(arena)
    if not blocks:
        return blocks
    try:
        conn.send_bytes(pickle.dumps((_STANDBY_BLOCKS, [(a.ident, a.size) for a in blocks]), 5))
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            socket.send_fds(sock, [b"F"], [a.fd for a in blocks if a.fd is not None])
    except OSError:  # it ended: the blocks are spare again
        for arena in blocks:
            SPARES.dispose(arena, True, SPARE_BYTES)
        return []
    return blocks


def settle(timeout: float = 30.0) -> bool:
    """Wait (at most ``timeout`` seconds) for what the ends of runs left to the background
    thread (`_background`): worker processes finishing their exit, standbys starting.
    Whether it is all done. For tests and benchmarks; a program never needs it."""
    return BACKGROUND.wait(timeout)


def _at_exit() -> None:
    """At the interpreter's exit, before multiprocessing reaps the children it has left (an
    exit handler registered earlier runs later): the background thread's work done (no
    half-started standby, nobody else polling an exiting worker), the standbys let go."""
    BACKGROUND.wait(EXIT_GRACE + KILL_GRACE + 1.0)
    STANDBYS.clear()


atexit.register(_at_exit)


def _lanes(stage: Stage) -> int:
    """Lanes per worker: stages with a ``timeout`` or ``max_items_per_worker`` use one
    (their bookkeeping is per message)."""
    one = stage.timeout is not None or stage.max_items_per_worker is not None
    return 1 if one else LANES


def _worker_of_lane(thread_name: str) -> str:
    """The worker a lane's thread serves: its name without a ``-lane<n>`` suffix."""
    worker, _, lane = thread_name.rpartition("-lane")
    return worker if worker and lane.isdigit() else thread_name


def _short_repr(item: Any) -> str:
    return item_repr(item)  # as the stage notes show items


@contextlib.contextmanager
def _sigint_held(context: Any) -> Iterator[None]:
    """Block SIGINT in this thread while it starts a worker process or the forkserver.
    The process inherits the mask, so a Ctrl-C in the terminal, which reaches the whole
    process group, cannot interrupt its start-up before it ignores SIGINT: the
    forkserver printed a KeyboardInterrupt traceback from its imports. CPython's
    resource tracker is started the same way. A Ctrl-C meant for this process still
    arrives: on the main thread, when the start is done."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: spawn only, no process group
        yield
        return
    method = getattr(context, "get_start_method", None)  # None: interpreters
    if method is not None and method() in ("forkserver", "spawn"):
        # The tracker these starts need unblocks SIGINT after starting itself: start it
        # first, so that it finds itself running under the block.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    # A Ctrl-C that arrived just before the block runs its handler as soon as the call
    # returns: the block must be undone then too, or this thread (the main one, often)
    # would never see a Ctrl-C again. So read the mask first and block inside the try.
    was_blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        yield
    finally:
        if not was_blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class _PseudoMainFile:
    """While worker processes start: hide a main module's file name that names no
    file (``'<stdin>'``: a program read from ``python -``), which multiprocessing
    would have each worker (or the forkserver) run as a path, and fail. Workers
    need no main module: the stage travels by cloudpickle. Lanes start workers
    from threads of their own: the name is back once the last start is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starting = 0  # starts in progress, under _lock
        self._hidden: str | None = None  # the name taken away, under _lock

    @contextlib.contextmanager
    def hidden(self) -> Iterator[None]:
        """Hide the name (if it is one) for the duration of the block."""
        main = sys.modules.get("__main__")
        with self._lock:
            path = getattr(main, "__file__", None)
            if self._starting == 0 and isinstance(path, str) and path[:1] + path[-1:] == "<>":
                self._hidden = path
                del main.__file__  # type: ignore[union-attr]
            self._starting += 1
        try:
            yield
        finally:
            with self._lock:
                self._starting -= 1
                if self._starting == 0 and self._hidden is not None:
                    main.__file__ = self._hidden  # type: ignore[union-attr]
                    self._hidden = None


_pseudo_main_file = _PseudoMainFile()


def _main_guard_error() -> ConfigurationError:
    return ConfigurationError(_MAIN_GUARD_HELP.format(method=start_method()))


class ProcessRuntime(Runtime):
    """Runs each worker of a stage in a process of its own (see the module docstring)."""

    name = "process"
    worker = "worker process"
    """What errors call a worker."""
    overrun = "its worker process was killed"
    """What happened to a worker whose item overran its timeout, as errors say it."""
    stopped_overrun = "was killed"
    """What happened to a worker whose on_stop overran ``stop_timeout``, as warnings say it."""
    probes = True
    """Whether each worker gets a probe pipe, on which a stall report asks where its code
    is (`_child._answer_probes`)."""
    exits_in_background = True
    """Whether a worker that stopped at the end of its input may finish exiting after the
    run (`let_exit`)."""
    lanes_apart = True
    """Whether lanes keep to CPUs apart from the workers' (`LANES_APART`, ``_cpus``)."""

    def __init__(self, context: Any = None) -> None:
        """``context``: where workers start (its ``Process`` and ``Pipe``); None: the
        multiprocessing context of `start_method`."""
        if context is None:
            method = start_method()
            if method == "forkserver":
                _preload_in_forkserver()
            context = get_context(method)
        # Any: typeshed's BaseContext lacks the Process attribute every real context has.
        self.context: Any = context
        self.abort_reader, self._abort_writer = self.context.Pipe(duplex=False)
        self._lock = threading.Lock()
        self._children: set[_Child] = set()  # started and not yet closed
        self._threads: list[threading.Thread] = []
        self._aborted = False
        self._registered = False

    def start(self, sr: StageRun) -> None:
        if _forkserver_main.importing():  # the forkserver: it leaves the main module out
            raise _forkserver_main.MainStartsPipeline
        if getattr(current_process(), "_inheriting", False):
            # This is a worker process importing the main module, which starts a pipeline.
            print(f"conveyor.ConfigurationError: {_main_guard_error()}", file=sys.stderr)
            sys.exit(_EXIT_MAIN_GUARD)
        if not self._registered:
            self._registered = True
            sr.control.on_abort(self._abort)
        if sr.stage.kind == "batch":
            self._threads.append(sr.start_thread(0, partial(batch_loop, sr)))
            return
        # The CPUs of the thread starting the run: its workers' (see `_cpus`).
        cpus = _cpus.allowed() if self.lanes_apart and LANES_APART else None
        try:
            blob = _stage_blob(sr.stage, cpus)
        except Exception as exc:
            raise SerializationError(
                f"stage {sr.stage.label}: its function, on_start or on_stop cannot be pickled "
                f"for a {self.worker}: {exc}"
            ) from exc
        # A round trip to a worker costs more than a channel operation: let a
        # batch take the whole input rather than half of it.
        sr.max_batch = max(sr.max_batch, min(sr.io.capacity, MAX_BATCH))
        workers = [_Worker(self, sr, index, blob, cpus) for index in range(sr.stage.workers)]
        if cpus is not None:  # each worker's last lane takes it off the plan
            _cpus.PLAN.add(len(workers))
        lanes: list[tuple[_Worker, int]] = [(w, w.index) for w in workers]
        port = len(workers)
        for worker in workers:  # later lanes hand outputs on through ports of their own
            for _ in range(worker.lanes - 1):
                lanes.append((worker, port))
                port += 1
        started: set[int] = set()  # handles of the lanes running
        try:
            for worker, handle in lanes:
                suffix = "" if handle == worker.index else f"-lane{handle}"
                thread = threading.Thread(
                    target=worker.run_lane,
                    args=(handle,),
                    name=f"{sr.thread_name(worker.index)}{suffix}",
                    daemon=True,
                )
                sr.threads.append(thread)
                self._threads.append(thread)
                thread.start()
                started.add(handle)
        finally:
            if cpus is not None and len(started) < len(lanes):  # no thread left to start
                # A worker with a lane that never ran has no last lane to take it off.
                idle = {w.index for w, h in lanes if h not in started}
                _cpus.PLAN.remove(len(idle))

    def port_count(self, stage: Stage) -> int:
        # One port per lane; lanes finish out of order even with one worker, so an
        # ordered stage's ports keep the input's order as soon as there are two.
        return 1 if stage.kind == "batch" else stage.workers * _lanes(stage)

    def adopt(self, child: _Child) -> None:
        """Track a started child (to stop it on abort); ShutDown if the run is already aborted."""
        with self._lock:
            aborted = self._aborted
            self._children.add(child)
        if aborted:
            self.forget(child, 0.0)
            raise ShutDown

    def let_exit(self, child: _Child, then: Callable[[], None] | None) -> None:
        """Stop tracking a child that has stopped; the background thread closes it (see
        `_Child.close`), then calls ``then``."""
        with self._lock:
            self._children.discard(child)

        def close() -> None:
            child.close(EXIT_GRACE)
            if then is not None:
                then()

        BACKGROUND.submit(close)

    def forget(self, child: _Child, grace: float) -> int | None:
        """Close a child (see `_Child.close`) and stop tracking it; return its exit code."""
        exitcode = child.close(grace)
        with self._lock:
            self._children.discard(child)
        return exitcode

    def _abort(self) -> None:
        """On abort: wake every worker thread, terminate every worker process."""
        with self._lock:
            self._aborted = True
            children = list(self._children)
        with contextlib.suppress(OSError):
            self._abort_writer.send_bytes(b"")
        for child in children:
            child.signal(kill=False)

    def join(self, timeout: float) -> list[str]:
        stuck = join_threads(self._threads, timeout)
        with self._lock:
            children = [c for c in self._children if not c.closed]
        # A lane runs no user code: one still there waits for its child (in on_stop,
        # say), which `close` kills, and ends with it. The child is what is left.
        waiting = {c.process.name for c in children}
        stuck = [t for t in stuck if _worker_of_lane(t) not in waiting]
        return stuck + [Leftover(f"{c.process.name} (pid {c.pid})", self.worker) for c in children]

    def close(self) -> None:
        with self._lock:
            children = list(self._children)
        for child in children:
            child.signal(kill=True)
            self.forget(child, KILL_GRACE)
        self.abort_reader.close()
        self._abort_writer.close()


RUNTIME = ProcessRuntime

STANDBYS.spare_bytes = lambda: SPARE_BYTES  # the budget a let-go standby's blocks return under
