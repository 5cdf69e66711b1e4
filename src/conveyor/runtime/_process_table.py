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
"""

from __future__ import annotations

import threading
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["alive", "close", "exitcode", "join", "start"]

_lock = threading.RLock()


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
