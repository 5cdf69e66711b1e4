"""The worker process's side of the process runtime (and of the interpreter runtime).

`_child_main` is the body of each worker process: it loads the stage the
parent sent (`_stage_blob`), runs ``on_start``, then `_Server` answers batch
messages with `conveyor.stage.process_batch` until the parent says stop.
Messages, pickling and shared memory are in `conveyor.runtime._wire`; the
parent's side, and the data flow as a whole, in `conveyor.runtime.processes`.

The interpreter runtime runs the same `_child_main` in a subinterpreter of
the parent's process (`interpreter_main`), over the same kind of pipe: see
`conveyor.runtime.interpreters`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import replace
from multiprocessing import connection, current_process
from multiprocessing import parent_process as _parent_process
from multiprocessing.connection import Connection
from time import perf_counter, process_time, thread_time
from time import sleep as _sleep
from types import CodeType, FrameType, FunctionType
from typing import TYPE_CHECKING, Any

import cloudpickle

from ..policy import ITEM_LOOPS, BatchOutcome, apply_one, drop_unsendable, process_batch
from ..remote import ExceptionRecord, capture, parts, restore
from ..stage import Stage, item_repr, set_worker_state
from . import _cpus
from ._wire import (
    _BY_FD,
    _ECHO,
    _FAILED,
    _LOAD_FAILED,
    _OOB,
    _OUTCOME,
    _READY,
    _SLEEPING_MESSAGE,
    _STANDBY_STAGE,
    _STARTED_MESSAGE,
    _STOP,
    _STOPPED,
    _align,
    _Arena,
    _BatchMessage,
    _Block,
    _Buffers,
    _Desc,
    _dump,
    _first_unpicklable,
    _load,
    _OutcomeMessage,
    _pack,
)

if TYPE_CHECKING:
    from ._allocator import Placer

_PackedError = tuple[bytes | None, ExceptionRecord]
"""An exception on its way to the parent: its class, ``args`` and attributes pickled
(`restore` makes it again there) when they survive a round trip, and its record (see
`conveyor.remote`), from which the parent rebuilds it otherwise."""


def _pack_error(exc: BaseException) -> _PackedError:
    """An exception ready to cross (see `_PackedError`)."""
    blob: bytes | None
    try:
        # Not the exception itself: unpickling it would call its __init__ with its args.
        blob = cloudpickle.dumps(parts(exc), 5)
        restore(*pickle.loads(blob))
    except Exception:
        blob = None
    return blob, capture(exc, _round_trip)


def _round_trip(value: Any) -> None:
    """Raise unless ``value`` can be pickled and unpickled (args and attributes kept).

    With plain pickle, as the record travels in the answer (`_wire._pack`): an
    object of a class cloudpickle sent by value (one of the main script's) passes a
    cloudpickle round trip, and then made that answer, and the worker, fail.
    """
    pickle.loads(pickle.dumps(value, 5))


class _Server:
    """The worker process's side: applies the stage to each batch the parent sends."""

    def __init__(
        self,
        conn: Connection,
        stage: Stage,
        cpu_time: Callable[[], float] = process_time,
        premapped: dict[int, _Arena] | None = None,
    ) -> None:
        self.conn = conn
        self.stage = stage
        # Blocks mapped before the stage came (a standby's): each becomes an inbox or an
        # outbox when a message first names it.
        self.premapped = premapped or {}
        self.cpu_time = cpu_time  # the CPU this worker used so far (its process's, or thread's)
        self.inboxes: dict[int, _Arena] = {}  # the parent writes batches' big buffers there
        self.outboxes: dict[int, _Arena] = {}  # this side writes results' big buffers there
        # Whether to place the arrays the stage creates in the outbox (see handle).
        self.place_arrays = True
        self.bytes_likely = False  # the last answer held big bytes (see _wire._dump)
        self.sock: socket.socket | None = None  # see _receive_fds
        timed = stage.timeout is not None
        self.call = self._timed_call if timed else None
        self.sleep = self._timed_sleep if timed else _plain_sleep

    def serve(self) -> bool:
        """Answer batches until STOP (True) or until the parent is gone (False)."""
        while True:
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return False
            if message[0] == _STOP:
                return True
            self.conn.send_bytes(self.handle(_BatchMessage._make(message)))

    def close(self) -> None:
        """Unmap the blocks (each 4 MiB is a quarter of a millisecond here): after the
        parent was told the worker stopped, which it need not wait for."""
        if self.sock is not None:
            self.sock.close()
        for arena in (*self.inboxes.values(), *self.premapped.values()):
            arena.close()
        for arena in self.outboxes.values():
            self._close_outbox(arena)

    def _close_outbox(self, arena: _Arena) -> None:
        """Unmap an outbox, unless arrays the stage created in it are still alive."""
        found = _placer(make=False)
        if found is None:
            arena.close()
        else:
            found.close(arena)

    def handle(self, message: _BatchMessage) -> bytes:
        """Run one batch message; return the answer."""
        for ident in message.forget:
            block = self.inboxes.pop(ident, None)
            if block is not None:
                block.close()
            else:
                self._close_outbox(self.outboxes.pop(ident))
        inbox, outbox = message.inbox, message.outbox
        fds = self._receive_fds(_by_fd(inbox) + _by_fd(outbox))
        source = None if inbox is None else self._block(self.inboxes, inbox, fds)
        box = None if outbox is None else self._block(self.outboxes, outbox, fds)
        received: list[Any] = []  # bytes made from the request's buffers (see _wire._OutOfBand)
        try:
            batch = _load(message.payload, message.pids, message.descs, source, received=received)
        except Exception as exc:
            return pickle.dumps((_LOAD_FAILED, _pack_error(exc), self._let_go(source)), 5)
        retries_left = message.retries_left
        stage = self.stage if retries_left is None else replace(self.stage, retries=retries_left)
        started = perf_counter()
        # Big arrays the stage creates go right into the outbox (see _allocator): for
        # as long as it returns arrays of its own (placing slows small allocations).
        place = None if box is None or not self.place_arrays else _placer()
        # Always tracked: the parent's port may need it, and a result that cannot be
        # pickled is charged to the input that gave it.
        with contextlib.nullcontext() if place is None else place.placing(box):
            try:
                outcome = process_batch(stage, batch, self.call, self.sleep, track=True)
            except BaseException as exc:
                if isinstance(exc, Exception):
                    raise
                # The stage's own SystemExit or KeyboardInterrupt: no policy applies (see
                # policy.py), and rather than this process dying of it, the parent raises
                # it in its worker loop, as a thread worker would.
                outcome = BatchOutcome([], counts=[], error=exc)
        busy = perf_counter() - started
        answer = self.reply(stage, batch, outcome, box, source, busy, place, received)
        del batch, outcome  # the arrays built on the inbox go (unless the stage kept some)
        if _shares_kept_memory(answer, source, box, place):
            answer = _in_band(answer, source, box, received)
        del received
        kept = box is not None and place is not None and place.kept(box)
        if kept:
            assert box is not None
            del self.outboxes[box.ident]  # the placer unmaps it after its last array
        return _pack(answer._replace(inbox_kept=self._let_go(source), outbox_kept=kept))

    def _block(self, blocks: dict[int, _Arena], info: _Block, fds: list[int]) -> _Arena:
        ident, name, size = info
        if name == _BY_FD:  # a block another worker used: its descriptor came with the message
            blocks[ident] = _Arena.adopt(ident, fds.pop(0), size)
        elif name is not None:  # a new one: map it
            blocks[ident] = _Arena.attach(ident, name, size)
        elif ident not in blocks:  # mapped while this process waited for its stage
            blocks[ident] = self.premapped.pop(ident)
        return blocks[ident]

    def _receive_fds(self, count: int) -> list[int]:
        """The ``count`` file descriptors the parent sent right after the message."""
        if not count:
            return []
        if self.sock is None:  # a handle of our own on the pipe's socket, for its fds
            self.sock = socket.socket(fileno=os.dup(self.conn.fileno()))
        _, fds, _, _ = socket.recv_fds(self.sock, 1, count)
        if len(fds) != count:
            raise OSError(f"expected {count} file descriptor(s) with the message, got {len(fds)}")
        return fds

    def _let_go(self, inbox: _Arena | None) -> bool:
        """Whether arrays built on the inbox outlive their batch: then it is left to them."""
        if inbox is None or not inbox.in_use():
            return False
        del self.inboxes[inbox.ident]
        inbox.close()
        return True

    def _timed_call(self, stage: Stage, item: Any) -> tuple[list[Any], bool]:
        self.conn.send_bytes(_STARTED_MESSAGE)  # the parent's clock for this attempt starts
        return apply_one(stage, item)

    def _timed_sleep(self, seconds: float) -> bool:
        self.conn.send_bytes(_SLEEPING_MESSAGE)  # no deadline while backing off
        _sleep(seconds)
        return True

    def reply(
        self,
        stage: Stage,
        batch: list[Any],
        outcome: BatchOutcome,
        box: _Arena | None,
        source: _Arena | None,
        busy: float,
        place: Placer | None = None,
        received: list[Any] | None = None,
    ) -> _OutcomeMessage:
        """The outcome, ready to pickle; results that cannot be pickled become failures.

        It carries the time the batch took here (``busy``) and this
        process's CPU time so far, for the stage's metrics in the parent.
        Bytes objects of the request returned as they came (``received``) are
        named, not sent back (see `conveyor.runtime._wire._OutOfBand`).
        """
        buffers = _Buffers()
        try:
            payload, pids = _dump(outcome.outputs, buffers, self.bytes_likely, received)
        except Exception:
            outcome = drop_unsendable(
                stage, batch, outcome, _first_unpicklable, "be sent back from the worker process"
            )
            buffers.clear()
            payload, pids = _dump(outcome.outputs, buffers, received=received)
        self.bytes_likely = pids
        need = 0
        descs: list[_Desc] = []
        self.place_arrays = False  # until the stage returns arrays of its own again
        if buffers.views:
            placed = _already_placed(buffers, source, box, place)
            self.place_arrays = any(
                p is None or p[1] == _OOB
                for p, persistent in zip(placed, buffers.persistent, strict=True)
                if not persistent
            )
            fresh = sum(
                _align(v.nbytes) for v, p in zip(buffers.views, placed, strict=True) if p is None
            )
            start = 0 if place is None else place.high(box)
            # All in place already: nothing to write, the descriptors say where they are.
            target = box or source
            if target is not None and (fresh == 0 or (target is box and start + fresh <= box.size)):
                descs = target.write(buffers, placed, start)
            else:  # no room: in band this time; the parent provides a bigger outbox
                need = start + fresh
                payload, pids = _dump(outcome.outputs, _Buffers(None), received=received)
        failures = [
            (index, _pack_error(f.error), f.attempts)
            for index, f in zip(outcome.failed_at, outcome.failures, strict=True)
        ]
        assert outcome.counts is not None
        return _OutcomeMessage(
            tag=_OUTCOME,
            payload=payload,
            pids=pids,
            descs=descs,
            need=need,
            filtered=outcome.filtered,
            retried=outcome.retried,
            processed=outcome.processed,
            busy=busy,
            cpu=self.cpu_time(),
            counts=outcome.counts,
            failures=failures,
            error=None if outcome.error is None else _pack_error(outcome.error),
            inbox_kept=False,
        )


def _by_fd(block: _Block | None) -> int:
    """1 if ``block`` comes as a file descriptor after the message, else 0."""
    return int(block is not None and block[1] == _BY_FD)


def _shares_kept_memory(
    answer: _OutcomeMessage, source: _Arena | None, box: _Arena | None, place: Placer | None
) -> bool:
    """Whether the answer points at an array the stage kept (a cache, an accumulator):
    the caller's result would then change with it. Echoes count when any array built
    on the request's block is still alive; placed arrays, when theirs is."""
    if source is not None and any(d[2] == _ECHO for d in answer.descs) and source.in_use():
        return True
    return place is not None and place.alive(box, [d[0] for d in answer.descs if d[2] == _OOB])


def _in_band(
    answer: _OutcomeMessage, source: _Arena | None, box: _Arena | None, received: list[Any]
) -> _OutcomeMessage:
    """The answer with its results pickled in band: copies of what they are now."""
    outputs = _load(answer.payload, answer.pids, answer.descs, box, source, sent=received)
    payload, pids = _dump(outputs, _Buffers(None), received=received)
    del outputs
    for arena in (source, box):
        if arena is not None:
            arena.in_use()  # forget the slices the copies were made from
    return answer._replace(payload=payload, pids=pids, descs=[])


def _already_placed(
    buffers: _Buffers, source: _Arena | None, box: _Arena | None, place: Placer | None
) -> list[tuple[int, int] | None]:
    """Per big buffer of an answer, where it already is in shared memory, if it is:
    in the request's block (an array the stage got), or placed in the outbox."""
    echoes = [None] * len(buffers.views) if source is None else source.echoes(buffers)
    ours = [None] * len(buffers.views) if place is None else place.offsets(box, buffers)
    return [
        (echo, _ECHO) if echo is not None else None if mine is None else (mine, _OOB)
        for echo, mine in zip(echoes, ours, strict=True)
    ]


def _plain_sleep(seconds: float) -> bool:
    _sleep(seconds)
    return True


def _child_main(
    conn: Connection, blob: bytes, interpreter: bool = False, probe: Connection | None = None
) -> None:
    """The body of a worker process (or, with ``interpreter``, of a worker subinterpreter).

    ``probe``: a second pipe, on which a thread of this process says where the
    main thread is whenever the parent asks (`_answer_probes`).
    """
    if not interpreter:  # a subinterpreter shares its parent's process, signals and life
        _settle_in_process()
    _serve_stage(conn, blob, interpreter, probe)


def _placer(make: bool = True) -> Placer | None:
    """This process's `conveyor.runtime._allocator.Placer`, or None; its module (ctypes'
    callbacks, 10 ms to import) is imported only once NumPy is, as nothing is placed
    without NumPy: a worker interpreter (no NumPy there) never makes ctypes function
    types, which crashed Python 3.14 once when several interpreters started at once.
    Asked for every message with an outbox: once found, kept here (an ``import``
    statement per message cost 2-5 us of a worker's 100 us per message)."""
    if _FOUND_PLACER:
        return _FOUND_PLACER[0]
    if "numpy" not in sys.modules:
        return None
    from ._allocator import placer

    found = placer(make)
    if make:  # the final word: a placer, or None for good (no handler API in this NumPy)
        _FOUND_PLACER.append(found)
    return found


_FOUND_PLACER: list[Placer | None] = []


def _standby_main(conn: Connection, probe: Connection) -> None:
    """The body of a standby worker process (`conveyor.runtime._standby`): started ahead
    of need, it waits for a stage (its worker's name and blob, in one message), then
    is a worker process like any other. It ends quietly when the parent lets it go."""
    _settle_in_process()
    # What a worker does first, done while waiting: a thread started, NumPy's allocator of
    # arrays in shared memory made (if NumPy is loaded: 0.7 ms), spare blocks mapped.
    _start_answering_probes(probe)
    _placer()
    premapped: dict[int, _Arena] = {}
    try:
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message[0] == _STANDBY_STAGE:
                break
            _premap(conn, message[1], premapped)
    except (EOFError, OSError):
        return
    _, name, blob = message
    current_process().name = name
    _serve_stage(conn, blob, False, None, premapped)


def _premap(conn: Connection, blocks: list[tuple[int, int]], into: dict[int, _Arena]) -> None:
    """Map the spare blocks the parent sent a standby (their descriptors follow the
    message), each for writing in one go: the faults a worker would take on its first
    messages, taken while it waits."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        _, fds, _, _ = socket.recv_fds(sock, 1, len(blocks))
    for (ident, size), fd in zip(blocks, fds, strict=True):
        arena = into[ident] = _Arena.adopt(ident, fd, size)
        arena.populate(size)


def _start_answering_probes(probe: Connection) -> None:
    """Start the thread that tells the parent where this (the main) thread is."""
    threading.Thread(
        target=_answer_probes,
        args=(probe, threading.get_ident()),
        name="conveyor-probe",
        daemon=True,
    ).start()


def _settle_in_process() -> None:
    """What a worker process does first: leave Ctrl-C to the parent, end with it, keep
    the memory it frees for its next batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if hasattr(signal, "pthread_sigmask"):  # blocked while it started (_sigint_held)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _exit_with_parent()
    _keep_freed_memory()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters
KEPT_HEAP = 64 << 20
"""Free memory at the top of a worker process's heap that glibc keeps rather than gives
back (`_keep_freed_memory`)."""
HEAP_ALLOCATIONS = 32 << 20
"""Allocations up to this size come from a worker's heap, not a mapping of their own."""


def _keep_freed_memory() -> None:
    """Have glibc's malloc serve a worker's big allocations from its heap and keep what
    is freed (Linux): `bytes(...)` of 1 MiB, made for each such item a message brings,
    was a fresh mapping each time, faulted in page by page (about 0.5 ms per MiB) and
    unmapped when the batch was done. Bytes returned as they came went through a process
    stage at 1,750 MiB/s, and at 8,300 with the memory kept. Only in worker processes:
    the caller's process keeps its own settings. A worker keeps at most what it held at
    once (and `KEPT_HEAP` free at the top), until it ends with its run."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to ask, or not one with mallopt
        return
    # Both or neither: the trim threshold set alone also fixes the mapping threshold at
    # its default (128 KiB), and the mapping threshold alone leaves the heap trimmed.
    if mallopt(_M_MMAP_THRESHOLD, HEAP_ALLOCATIONS):
        mallopt(_M_TRIM_THRESHOLD, KEPT_HEAP)


def _serve_stage(
    conn: Connection,
    blob: bytes,
    interpreter: bool,
    probe: Connection | None,
    premapped: dict[int, _Arena] | None = None,
) -> None:
    """Load the stage, run on_start, answer batches until STOP, run on_stop."""
    if probe is not None:
        _start_answering_probes(probe)
    try:
        stage, files, cpus = cloudpickle.loads(blob)
        if not interpreter:  # a worker interpreter is a thread of the parent's, left as it is
            _cpus.use(cpus)
        for fn in (stage.fn, stage.on_start, stage.on_stop):
            _restore_filenames(fn, files, set())
    except BaseException as exc:
        conn.send_bytes(pickle.dumps((_FAILED, "load", _pack_error(exc)), 5))
        return
    try:
        state = stage.on_start() if stage.on_start is not None else None
    except BaseException as exc:
        conn.send_bytes(pickle.dumps((_FAILED, "on_start", _pack_error(exc)), 5))
        return
    set_worker_state(state)
    conn.send_bytes(pickle.dumps((_READY,), 5))
    # In a subinterpreter, this thread's CPU time is the worker's (the process's is everyone's).
    cpu_time = thread_time if interpreter else process_time
    server = _Server(conn, stage, cpu_time, premapped)
    try:
        if not server.serve():
            return
        error = None
        if stage.on_stop is not None:
            try:
                stage.on_stop(state)
            except BaseException as exc:
                error = _pack_error(exc)
        with contextlib.suppress(OSError):
            conn.send_bytes(pickle.dumps((_STOPPED, error), 5))
    finally:
        server.close()


_STACK_FRAMES = 12  # innermost frames a probe's answer holds, as stall reports show them


def _answer_probes(probe: Connection, main: int) -> None:
    """A worker process's probe thread: whenever the parent asks (its stall report),
    say where the ``main`` thread is -- the item the stage function is on, and its
    stack -- which the parent cannot see from its own process.

    A question is a number; the answer begins with it (the parent drops answers
    to questions it gave up on). It costs the stage nothing until asked, and
    needs the GIL only then: a stage holding it in C code for longer than the
    parent waits leaves the question unanswered.
    """
    while True:
        try:
            question = probe.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            answer = _where_is(sys._current_frames().get(main))
        except Exception as exc:  # an item whose repr raises is handled; anything else
            answer = (None, [f"    (not available: {type(exc).__name__})"])
        try:
            probe.send_bytes(question + pickle.dumps(answer, 5))
        except OSError:
            return


def _where_is(frame: FrameType | None) -> tuple[str | None, list[str]]:
    """The item the stage function is on (a short repr, or None) and the stack below it
    (formatted lines), for a thread whose innermost frame is ``frame``."""
    if frame is None:
        return None, ["    (stack not available)"]
    frames: list[FrameType] = []
    walk: FrameType | None = frame
    while walk is not None:
        frames.append(walk)
        walk = walk.f_back
    frames.reverse()  # outermost first
    item: str | None = None
    inner = 0  # where the frames shown begin: the stage's own code, if it runs
    for index, candidate in enumerate(frames):
        if candidate.f_code in ITEM_LOOPS:  # the innermost wins
            inner = index + 1
            item = _item_of(candidate)
    if inner == len(frames):  # in the policy's loop itself, between two calls
        inner = 0
    shown = frames[inner:][-_STACK_FRAMES:]
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in shown)
    lines = ["    " + line for entry in summary.format() for line in entry.rstrip().splitlines()]
    return item, lines


def _item_of(frame: FrameType) -> str | None:
    """The item a frame of the policy's loops is on (``batch[i]``), as a short repr."""
    local = frame.f_locals
    batch, index = local.get("batch"), local.get("i")
    if isinstance(batch, list) and isinstance(index, int) and 0 <= index < len(batch):
        return item_repr(batch[index])
    return None


def interpreter_main(
    target: Callable[[Connection, bytes, bool], None], fd: int, blob: bytes, path: tuple[str, ...]
) -> None:
    """The body of a worker subinterpreter: ``target`` (`_child_main`) on the socket ``fd``.

    A new interpreter starts with the ``sys.path`` of the process's start-up;
    it gets the parent's as it is now, so that the stage's modules are found.
    """
    sys.path[:] = path
    target(Connection(fd), blob, True)


def _stage_blob(stage: Stage, cpus: frozenset[int] | None) -> bytes:
    """The stage as sent to each worker: cloudpickled, with the files its functions come
    from and the CPUs a worker process runs on (see `conveyor.runtime._cpus`; None: as
    it started)."""
    files = {}
    for fn in (stage.fn, stage.on_start, stage.on_stop):
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        filename = getattr(module, "__file__", None)
        if module is not None and filename:
            files[module.__name__] = filename
    blob: bytes = cloudpickle.dumps((stage, files, cpus), 5)
    return blob


def _restore_filenames(obj: Any, files: dict[str, str], seen: set[int]) -> None:
    """Give functions pickled by value their source file back, for readable tracebacks.

    cloudpickle names the file of such code ``<dynamic-code>``; the
    traceback of an error in the worker would show neither the file nor the
    line. Follows the functions' globals and closures (helpers also sent by
    value), not classes.
    """
    # Functions only: a class such as types.FunctionType has a __code__ too (a descriptor).
    if not isinstance(obj, FunctionType) or id(obj) in seen:
        return
    seen.add(id(obj))
    code = obj.__code__
    filename = files.get(getattr(obj, "__module__", None) or "")
    if filename and code.co_filename == "<dynamic-code>":
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            obj.__code__ = _renamed(code, filename)
    for value in getattr(obj, "__globals__", {}).values():
        _restore_filenames(value, files, seen)
    for cell in getattr(obj, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            _restore_filenames(cell.cell_contents, files, seen)


def _renamed(code: CodeType, filename: str) -> CodeType:
    consts = tuple(_renamed(c, filename) if isinstance(c, CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _exit_with_parent() -> None:
    """Exit at once if the parent process dies, even in the middle of an item."""
    parent = _parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch(sentinel: int) -> None:
        connection.wait([sentinel])
        os._exit(1)

    threading.Thread(
        target=watch, args=(parent.sentinel,), name="conveyor-parent-watch", daemon=True
    ).start()
