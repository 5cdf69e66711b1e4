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
  `TimeoutError` on time, and its call is given up, not stopped. A call
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
from typing import Any

from ..errors import ConfigurationError
from ._child import interpreter_main
from .processes import ProcessRuntime

__all__ = ["RUNTIME", "InterpreterRuntime"]


class _Interpreter:
    """A worker interpreter, with the interface of a `multiprocessing.Process`
    that the process runtime uses (start, sentinel, join, terminate, kill, close).

    ``target(conn, blob)`` (the process runtime's `_child_main`) runs in a new
    interpreter, called from a daemon thread of this process. `terminate` and
    `kill` shut the interpreter's socket down: it ends once its current call
    returns. `kill` also abandons it: `join` returns at once, and whichever of
    `close` and the end of the thread comes last closes the interpreter.
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
        self._lock = threading.Lock()  # guards _closed and exitcode
        self._stopped = False  # its socket was shut down: the worker's errors are expected
        self._abandoned = False
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
        try:
            path = tuple(sys.path)
            self._interpreter.call(interpreter_main, self._target, fd, self._blob, path)
            code = 0
        except BaseException:  # it escaped the worker: shown as a worker process's would be
            if not self._stopped:  # else: its socket, shut down under it
                traceback.print_exc()
        finally:
            with self._lock:
                self.exitcode = code
                close = self._closed
            os.close(self._ended_writer)
            if close:
                self._destroy()

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` s for the interpreter to end; at once when abandoned."""
        assert self._thread is not None
        if not self._abandoned:
            self._thread.join(timeout)

    def terminate(self) -> None:
        """Shut the interpreter's socket down: it ends after its current call."""
        self._stopped = True
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        """As `terminate`, and abandon it: nobody waits for its current call any more."""
        self.terminate()
        with self._lock:
            self._abandoned = True

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


class _Context:
    """Where the process runtime starts its workers: here, in interpreters."""

    Process = _Interpreter
    Pipe = staticmethod(multiprocessing.Pipe)


class InterpreterRuntime(ProcessRuntime):
    """Runs each worker of a stage in a subinterpreter of this process (see the module
    docstring); Python 3.14 and later."""

    name = "interpreter"
    worker = "worker interpreter"
    overrun = (
        "its worker interpreter was given up (its call runs on in the background) and replaced"
    )

    def __init__(self) -> None:
        if os.name != "posix":  # a socket's end crosses as a file descriptor; untested elsewhere
            raise ConfigurationError(
                "runtime='interpreter' runs on POSIX systems (Linux, macOS); "
                "use runtime='process' here"
            )
        super().__init__(_Context())


RUNTIME = InterpreterRuntime
"""How a stage's workers run: one module per runtime behind one interface (`base.Runtime`)."""
