"""Worker processes started ahead of need, for the next worker of any stage or run to take.

Starting a worker process through the forkserver takes several hand-offs
between three processes (the parent asks the forkserver, which forks; the
parent sends the new process its preparation data; the process unpickles
it and boots): 5 to 8 ms before the first item here, on a run that may
last 100 ms. A process started that way and waiting has done all of it:
given its stage (one message) it loads it, runs on_start and says ready.

So when a worker process ends at the end of its input, a replacement is
started in the background (the process runtime's background thread,
``_background``: the run that ended does not wait for it) and kept
waiting, up to ``STANDBY_PROCESSES`` of them (a setting of
`conveyor.runtime.processes`); the next worker to start takes one instead
of starting a process. Not at the end of the program's first
run of worker processes, though: a program that runs one pipeline (a
``conveyor run``) would start a standby only to end it.

A standby is started like any worker (forked from the forkserver, or
spawned) and has run nothing of the program's: it is the process a start
would give, as long as what that start would give it is the same: the start
method, multiprocessing's preparation data (the current directory,
``sys.path``, the main module), and for "spawn", whose process inherits the
environment of its start, ``os.environ``. One started under other data is
let go, not used. Not for the "fork" start method, whose process has the
parent's memory as it was at its start: a standby would keep it from
before. With "spawn" (the default on macOS; POSIX only) a start costs the
interpreter's start-up and the main module's imports (50 ms and more), which
a standby has done before it is needed. Like the forkserver's workers, a
spawned standby has the main module's imports as they were when it started:
a module edited on disk since is not read again.

A standby is also given the spare blocks free when it starts (`_spare`), and
maps each for writing while it waits: the page faults a new worker takes on
its first messages (about 4 ms of a run of 1 MiB arrays here). The worker
that takes it uses them before any other block; a standby let go gives them
back to the spares.

A standby waits on its pipe; it ends when the parent ends (its pipe ends),
or is killed when the parent lets it go. At the interpreter's exit the
process runtime waits for its background thread (no half-started process
then reports a broken pipe) and lets the standbys go, before multiprocessing
reaps what is left.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from multiprocessing import spawn
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from . import _process_table
from ._spare import SPARES
from ._wire import _Arena

__all__ = ["STANDBYS", "Standby", "eligible"]

_METHODS = ("forkserver", "spawn")
_REAP_TIMEOUT = 5.0  # for a killed standby's end (a process in an uninterruptible wait)


class Standby(NamedTuple):
    """A started worker process waiting for its stage, and the parent's ends of its pipes."""

    process: Any  # multiprocessing.Process
    conn: Connection
    probe: Connection
    prepared: str  # the preparation data it was started with (`prepared`)
    blocks: list[_Arena]  # spare blocks it has mapped (their ids are their places here)


def eligible(context: Any) -> bool:
    """Whether workers of ``context`` may be standbys (see the module docstring)."""
    method = getattr(context, "get_start_method", None)  # None: interpreters
    # POSIX only: on Windows a spawned process's pipes and handles differ, and are untried.
    return method is not None and method() in _METHODS and os.name == "posix"


def prepared(context: Any) -> str:
    """What a start through ``context`` would give a new process now, in comparable form:
    the method, the preparation data multiprocessing sends it, and for "spawn" the
    environment it inherits."""
    method = context.get_start_method()
    data = spawn.get_preparation_data("conveyor-standby")
    given = sorted((key, bytes(v) if key == "authkey" else v) for key, v in data.items())
    environment = sorted(os.environ.items()) if method == "spawn" else None
    return repr((method, given, environment))


class _Standbys:
    """The process's standby workers, and the starts under way. Lanes of any stage call
    in (and the starting threads), so a lock guards both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: list[Standby] = []
        self._pid = os.getpid()
        # Runs that ended workers: a program's first is not taken for a sign of a second.
        self._runs = 0
        self._last_run = 0
        # The spare budget (`processes.SPARE_BYTES`) the blocks of a standby let go return
        # under; the process runtime sets it.
        self.spare_bytes: Callable[[], int] = lambda: 0

    def take(self, context: Any) -> Standby | None:
        """A standby that can serve as a worker of ``context`` now, or None. Those that
        cannot (ended, or started under other preparation data) are let go."""
        if not eligible(context):
            return None
        now = prepared(context)
        while True:
            with self._lock:
                if not self._ready:
                    return None
                standby = self._ready.pop()
            if standby.prepared == now and _process_table.alive(standby.process):
                return standby
            self.let_go(standby)

    def replenish(
        self, context: Any, start: Callable[[], Standby], limit: int, run: object
    ) -> None:
        """Start a standby (in this thread: the process runtime's background one) unless
        ``limit`` are there, or this is the first ``run`` (a runtime) of the program to
        end a worker."""
        if not eligible(context) or os.getpid() != self._pid:
            return
        with self._lock:
            if id(run) != self._last_run:
                self._last_run = id(run)
                self._runs += 1
            if self._runs < 2 or len(self._ready) >= limit:
                return
        try:
            standby = start()
        except Exception:  # no standby then: the next worker starts as it would have
            return
        with self._lock:
            self._ready.append(standby)

    def pids(self) -> list[int]:
        """The process ids of the standbys there now."""
        with self._lock:
            return [s.process.pid for s in self._ready]

    def clear(self) -> None:
        """Let every standby go (tests; the interpreter's exit; a program may call it to
        end the processes and give their blocks back to the spares)."""
        with self._lock:
            ready, self._ready = self._ready, []
        for standby in ready:
            self.let_go(standby)

    def let_go(self, standby: Standby) -> None:
        """Close the parent's ends, kill the standby and reap it. Its blocks are spare again
        (nobody else maps them).

        Killed, not waited for: it holds nothing of the program's (no item, no on_start
        run), and a spawned one may still be importing the main module, seconds for heavy
        imports, where it reads no pipe. Waiting for it to see its pipe end held a run
        whose worker let it go, or the program's exit, up to a second per standby.
        """
        for conn in (standby.conn, standby.probe):
            with contextlib.suppress(OSError):
                conn.close()
        process = standby.process
        if _process_table.exitcode(process) is None:
            with contextlib.suppress(OSError):
                process.kill()
        _process_table.join(process, _REAP_TIMEOUT)
        orphaned = _process_table.orphaned(process)  # its forkserver ended: it may still run
        with contextlib.suppress(ValueError):
            _process_table.close(process)
        for arena in standby.blocks:
            SPARES.dispose(arena, not orphaned, self.spare_bytes())

    def forsake(self) -> None:
        """In a process forked from this one: the standbys are the parent's; the child
        closes its copies of their pipes (so that they still see the parent end)."""
        self._lock = threading.Lock()
        ready, self._ready = self._ready, []
        self._pid = os.getpid()
        for standby in ready:
            for conn in (standby.conn, standby.probe):
                with contextlib.suppress(OSError):
                    conn.close()
            for arena in standby.blocks:
                arena.close()


STANDBYS = _Standbys()
"""The standby worker processes of this process."""

if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=STANDBYS.forsake)
