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
import signal
import threading
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["alive", "close", "exitcode", "join", "orphaned", "start"]

_lock = threading.RLock()

# What multiprocessing reports for a forkserver child whose status it could not read.
_UNREAD_STATUS = 255


def start(process: Any) -> None:
    """``process.start()`` (which polls the other children)."""
    with _lock:
        process.start()


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
    child, so it cannot be waited for). A child that really exited with 255 was reaped by
    the server before the server wrote that status, so its pid is gone by then."""
    if getattr(process, "_start_method", None) != "forkserver":
        return False
    if exitcode(process) != _UNREAD_STATUS:
        return False
    try:
        os.kill(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except OSError:  # not ours to signal: not the worker any more
        return False
    return True
