"""Interpreter runtime: each worker of a stage is a subinterpreter of this process (Python 3.14+).

For CPU-bound Python, without starting processes. Every interpreter made by
`concurrent.interpreters` (PEP 734) has a GIL of its own (PEP 684), so the
workers of a stage compute in parallel inside one process. This runtime is
the process runtime with another place to run the worker: everything else
is that runtime's, unchanged (see `conveyor.runtime.processes`)::

    this process
    main interpreter                                    | worker interpreter (own GIL)
                                                        |
    lane 1, lane 2: threads running base.worker_loop    | _child_main, as in a worker
      execute(batch): one message ----- a socket pair --+-> process: on_start, then
      (the process runtime's _Worker and _Child,        |   process_batch per message,
       its messages, shared memory and failures)        |   on_stop; its outcome back
                                                        |
    _Interpreter: a thread of this process that ran  ---+-> interpreter_main, until STOP
      ``Interpreter.call`` and stays in it

What differs, all in `_Interpreter` (what the process runtime takes for a
worker process):

- Start-up: an interpreter is made and imports conveyor (about 0.1 s, no
  fork, no exec); the stage is sent to it with cloudpickle as to a process,
  and it gets the parent's ``sys.path``. Its end of the socket pair is
  passed as a file descriptor (the process is the same).
- A worker interpreter is a thread of this process inside ``Interpreter.call``
  for its whole life; when it ends, a pipe (its "sentinel") says so to the
  lanes, as a process's sentinel does. An interpreter runs one call at a
  time, so it serves its two lanes' messages in turn, as a process does.
- Nothing can stop an interpreter in the middle of a call. Where the process
  runtime sends a signal (stop, abort, Ctrl-C, an item over its ``timeout``),
  the interpreter's socket is shut down and the interpreter is *abandoned*:
  the lanes go on at once (a fresh interpreter takes the next items after a
  timeout), while the call in progress runs to its end in the background;
  then the interpreter finds its socket closed, ends and is closed. So
  ``timeout`` is honoured as on the thread runtime: the item fails with a
  `TimeoutError` on time, and its call is given up, not stopped. The
  messages waiting in the socket are thrown away: an interpreter between
  calls ends at once, and one still starting up (importing conveyor) ends
  after its imports, having called nothing. A run that is stopped or fails
  waits for the interpreters still inside a call as it waits for threads
  (at most ``conveyor.engine.ABORT_WAIT`` seconds), and the caller's error
  names the stage of those left behind (by their threads' names,
  ``conveyor-<stage>-<n>-interpreter``); one given up for its timeout is not
  waited for, as a timed-out call's helper thread is not. A call
  that never returns keeps its interpreter (and a daemon thread) until the
  process exits; Python then warns of "remaining subinterpreters" and ends
  them. So does a program that exits in the middle of a run it never
  stopped.
- Extension modules: an interpreter with its own GIL imports only those that
  declare support for it (``Py_mod_multiple_interpreters``); conveyor's
  accelerator does, NumPy does not. A stage whose function needs such a
  module fails in ``on_start`` or on its first item, with the module's
  `ImportError`: use ``runtime="process"`` for it.
- CPU time: a worker reports its thread's, not the process's.
- POSIX only (the socket's end crosses as a file descriptor).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from time import monotonic
from typing import Any

from ..errors import ConfigurationError
from ._child import interpreter_main
from .processes import ProcessRuntime

__all__ = ["RUNTIME", "InterpreterRuntime"]


class _Interpreter:
    """A worker interpreter, with the interface of a `multiprocessing.Process`
    that the process runtime uses (start, sentinel, join, terminate, kill, close).

    ``target(conn, blob)`` (the process runtime's `_child_main`) runs in a new
    interpreter, called from a daemon thread of this process, once the
    interpreter has imported conveyor (its start-up). `terminate` and `kill`
    shut the interpreter's socket down and throw away the messages waiting in
    it: an interpreter between calls ends at once, one still starting up ends
    after its imports without calling anything, and one inside a call ends
    when the call returns. Either way `join` returns at once from then on, and
    whichever of `close` and the end of the thread comes last closes the
    interpreter. `terminate` stops it with its run, which waits for it as for a
    thread (`in_user_code`); `kill` (first) gives it up for good, as for an item
    over its timeout.
    """

    def __init__(
        self,
        target: Callable[..., None],
        args: tuple[multiprocessing.connection.Connection, bytes],
        name: str,
        daemon: bool = True,
    ) -> None:
        assert daemon, "a worker interpreter's thread is a daemon: a stuck call cannot block exit"
        self._target = target
        self._conn, self._blob = args
        self.name = name
        self.pid = os.getpid()
        self.exitcode: int | None = None
        self._ended_reader, self._ended_writer = os.pipe()
        self.sentinel = self._ended_reader
        """Readable (end of file) once the interpreter's call has returned."""
        self._lock = threading.Lock()  # guards the flags below, exitcode and the socket's close
        self._stopped = False  # its socket was shut down: the worker's errors are expected
        self._abandoned = False  # killed before it was terminated: nobody waits for it
        self._calling = False  # past its start-up: it runs the worker (user code among it)
        self._closed = False
        self._socket: socket.socket | None = None  # a handle on its socket, to shut it down
        self._interpreter: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Make the interpreter and start the thread that runs the worker in it."""
        interpreters: Any = importlib.import_module("concurrent.interpreters")
        self._interpreter = interpreters.create()
        # The caller closes its handle on the child's end after start(), as for a process:
        # the interpreter gets a copy of its own, and this object one to shut it down.
        self._socket = socket.socket(fileno=os.dup(self._conn.fileno()))
        fd = os.dup(self._conn.fileno())
        self._thread = threading.Thread(
            target=self._run, args=(fd,), name=f"{self.name}-interpreter", daemon=True
        )
        self._thread.start()

    def _run(self, fd: int) -> None:
        code = 1
        calling = False
        try:
            # Stopped while it was starting up, it calls nothing: no user code has run.
            calling = self._start_up()
            if calling:
                self._interpreter.call(
                    interpreter_main, self._target, fd, self._blob, tuple(sys.path)
                )
            code = 0
        except BaseException:  # it escaped the worker: shown as a worker process's would be
            if not self._stopped:  # else: its socket, shut down under it
                traceback.print_exc()
        finally:
            if not calling:  # else the interpreter's connection owns (and closes) it
                os.close(fd)
            with self._lock:
                self.exitcode = code
                close = self._closed
            os.close(self._ended_writer)
            if close:
                self._destroy()

    def _start_up(self) -> bool:
        """Import conveyor in the interpreter (most of its start-up, none of it user code),
        with the parent's ``sys.path``; False if it was stopped meanwhile."""
        self._interpreter.prepare_main(path=tuple(sys.path))
        self._interpreter.exec(_START_UP)
        with self._lock:
            self._calling = not self._stopped
            return self._calling

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` s for the interpreter to end; not at all once it is
        stopped (terminated or killed): its call, if any, cannot be stopped."""
        assert self._thread is not None
        if not self._stopped:
            self._thread.join(timeout)

    def terminate(self) -> None:
        """Stop the interpreter (see the class docstring): it ends after its current call."""
        with self._lock:
            self._stopped = True
            if not self._closed and self._socket is not None:
                _shut(self._socket)

    def kill(self) -> None:
        """As `terminate`; when first, it also gives the interpreter up (see `in_user_code`)."""
        with self._lock:
            if not self._stopped:
                self._abandoned = True
        self.terminate()

    def in_user_code(self, timeout: float) -> bool:
        """Whether the interpreter, stopped with its run, is still inside a call after
        waiting up to ``timeout`` s for it to end. An interpreter given up (`kill`), or
        stopped in its start-up (it ends by itself, having called nothing), is not waited for.
        """
        assert self._thread is not None
        if self._abandoned or not (self._stopped and self._calling):
            return False
        self._thread.join(timeout)
        return self._thread.is_alive()

    @property
    def ended(self) -> bool:
        """Whether its thread has returned (a given-up call, too, in the end)."""
        return self._thread is not None and not self._thread.is_alive()

    def close(self) -> None:
        """Release the interpreter now if it has ended, else when its call returns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            ended = self.exitcode is not None
            if self._socket is not None:
                self._socket.close()
        os.close(self._ended_reader)
        if ended:
            self._destroy()

    def _destroy(self) -> None:
        with contextlib.suppress(Exception):  # already gone with the process's end
            self._interpreter.close()


_START_UP = "import sys; sys.path[:] = path; import conveyor.runtime._child"
"""Run in a new interpreter before the worker: conveyor's imports, where the parent finds them."""
_DRAIN_SIZE = 1 << 16  # what one read takes of the messages thrown away


def _shut(sock: socket.socket) -> None:
    """Shut a worker's socket down, and throw away the messages waiting in it unread:
    the worker then finds the end of its input at once, and starts on nothing more."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):  # BlockingIOError: the worker emptied it first
        while sock.recv(_DRAIN_SIZE, socket.MSG_DONTWAIT):
            pass


class _Context:
    """Where the process runtime starts its workers: here, in interpreters. It keeps the
    interpreters that have not ended, for the runtime's join to wait for those stopped
    inside a call."""

    Pipe = staticmethod(multiprocessing.Pipe)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: list[_Interpreter] = []

    def Process(self, **kwargs: Any) -> _Interpreter:  # multiprocessing.Process, as it is named
        """A new worker interpreter (not started), as ``multiprocessing.Process(**kwargs)``."""
        interpreter = _Interpreter(**kwargs)
        with self._lock:
            self._started = [i for i in self._started if not i.ended] + [interpreter]
        return interpreter

    def in_user_code(self, timeout: float) -> list[str]:
        """The threads of the interpreters stopped inside a call, still there after up to
        ``timeout`` s (see `_Interpreter.in_user_code`)."""
        deadline = monotonic() + timeout
        with self._lock:
            started = list(self._started)
        return [
            f"{i.name}-interpreter"
            for i in started
            if i.in_user_code(max(0.0, deadline - monotonic()))
        ]


class InterpreterRuntime(ProcessRuntime):
    """Runs each worker of a stage in a subinterpreter of this process (see the module
    docstring); Python 3.14 and later."""

    name = "interpreter"
    worker = "worker interpreter"
    overrun = (
        "its worker interpreter was given up (its call runs on in the background) and replaced"
    )
    stopped_overrun = "was given up (its on_stop runs on in the background)"
    # A stall report shows the lane's stack: a worker interpreter takes its one socket.
    probes = False
    exits_in_background = False  # a worker's end is its interpreter's: waited for, as ever
    # A worker interpreter is a thread of this process, started by a lane: it would
    # inherit the lanes' CPUs, and it is the one that needs a CPU of its own.
    lanes_apart = False

    def __init__(self) -> None:
        if os.name != "posix":  # a socket's end crosses as a file descriptor; untested elsewhere
            raise ConfigurationError(
                "runtime='interpreter' runs on POSIX systems (Linux, macOS); "
                "use runtime='process' here"
            )
        self._interpreters = _Context()
        super().__init__(self._interpreters)

    def join(self, timeout: float) -> list[str]:
        """The process runtime's join; then, as threads are joined, the interpreters
        stopped inside a call are waited for until ``timeout`` and named if still there."""
        deadline = monotonic() + timeout
        stuck = super().join(timeout)
        return stuck + self._interpreters.in_user_code(max(0.0, deadline - monotonic()))


RUNTIME = InterpreterRuntime
"""How a stage's workers run: one module per runtime behind one interface (`base.Runtime`)."""
