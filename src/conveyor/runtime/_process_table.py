"""Starting and reaping worker processes from several threads, one poller at a time.

A forkserver child's exit status reaches the parent as four bytes on its
sentinel pipe, written by the server once it has reaped the child. Whoever
polls the process reads them: ``join``, ``is_alive``, ``exitcode``, and
multiprocessing itself, which polls every child of the process at each
``Process.start()`` (``_cleanup``). Two threads that find the sentinel
readable at once both read it; the second one waits on the pipe for bytes
that never come, for ever (seen: a lane starting a worker while another
thread reaped one that had ended, a start hung in ``read_signed``).

The process runtime starts workers from lanes, standbys from background
threads, and lets ended workers exit in background threads, so every start
and every poll goes through here, under one lock: waits for an exit watch
the sentinel without reading it, then poll under the lock.

If the forkserver itself ends (killed), every child's sentinel reads its
end: multiprocessing reports exit code 255 for children that still run,
orphaned, with nobody left to report their end. `orphaned` tells those
apart and kills them, so that no worker runs on unseen, and their shared
memory is not handed to another worker while they may still write it.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["alive", "close", "exitcode", "join", "orphaned", "start"]

_lock = threading.RLock()

# What multiprocessing reports for a forkserver child whose status it could not read.
_UNREAD_STATUS = 255
# How long a server whose pipes have closed may take to end: a process closes its files
# (which ends its children's sentinels) shortly before it becomes waitable. Also what a
# worker that exited with 255 itself costs to report.
_SERVER_EXIT = 0.1


def start(process: Any) -> None:
    """``process.start()`` (which polls the other children); a forkserver child is told
    which server started it (`orphaned`)."""
    with _lock:
        process.start()
        if getattr(process, "_start_method", None) == "forkserver":
            from multiprocessing import forkserver

            server = getattr(forkserver, "_forkserver", None)
            process.conveyor_server = getattr(server, "_forkserver_pid", None)


def join(process: Any, timeout: float | None = None) -> None:
    """``process.join(timeout)``: wait for its end without reading the status, then poll.
    A worker interpreter (not a process: no status to race for, and a join of its own
    that returns at once once it is stopped) is joined as it joins."""
    if not isinstance(process, BaseProcess):
        process.join(timeout)
        return
    if timeout is None or timeout > 0:
        wait([process.sentinel], timeout)
    with _lock:
        process.join(0)


def exitcode(process: Any) -> int | None:
    """``process.exitcode`` (None while it runs)."""
    with _lock:
        code: int | None = process.exitcode
        return code


def alive(process: Any) -> bool:
    """``process.is_alive()``."""
    with _lock:
        return bool(process.is_alive())


def close(process: Any) -> None:
    """``process.close()`` (which polls it: ValueError while it runs)."""
    with _lock:
        process.close()


def orphaned(process: Any) -> bool:
    """Whether ``process``, reported ended, is a forkserver child still running (or not yet
    reaped by anyone) because its server ended: then it is killed (it is not this process's
    child, so it cannot be waited for).

    Both must hold: the status 255 multiprocessing reports when the server's pipe ends,
    and that server ended (a child that exited with 255 itself was reaped by a live
    server, and its pid may be another process's by now: never signalled). The server's
    pipes close a moment before it can be waited for: that moment is waited for.
    """
    server = getattr(process, "conveyor_server", None)  # forkserver children only (`start`)
    if server is None or exitcode(process) != _UNREAD_STATUS or not _ended(server):
        return False
    try:
        os.kill(process.pid, signal.SIGKILL)
    except OSError:  # gone (ProcessLookupError), or not ours to signal
        return False
    return True


def _ended(server: int, timeout: float = _SERVER_EXIT) -> bool:
    """Whether the forkserver ``server`` (a child of this process) has ended, waiting up
    to ``timeout`` for an end under way, without reaping it (multiprocessing does, when
    it next starts a worker). False when that cannot be told (macOS: neither pidfd nor
    ``waitid``)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            pidfd = pidfd_open(server)
        except ProcessLookupError:  # reaped already: multiprocessing started another since
            return True
        except OSError:  # no pidfd in this kernel
            pass
        else:
            try:  # readable once it has ended (a zombie)
                return bool(select.select([pidfd], [], [], timeout)[0])
            finally:
                os.close(pidfd)
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return False
    try:
        return waitid(os.P_PID, server, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
