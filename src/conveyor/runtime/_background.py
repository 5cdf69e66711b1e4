"""The process runtime's one background thread: what the end of a run leaves to do.

At the end of its input a worker process says it stopped (on_stop has run),
and the run ends there; what is left does not concern the run: waiting for
the process to exit (it unmaps its blocks, the kernel frees its memory:
about 3 ms for a worker of a 512 MiB run), giving its blocks back to the
spares, then starting a standby for the next run (``_standby``).

One thread does it all, in the order given, for the whole program: it is
started by the first job and lives as long as the program (a daemon, named
`THREAD_NAME`), like the forkserver process. So a run leaves no thread of its
own behind, and nothing started for it runs on after it but this thread's
jobs. `wait` waits until it has nothing left to do (tests, benchmarks, the
interpreter's exit).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["BACKGROUND", "THREAD_NAME"]

THREAD_NAME = "conveyor-processes-background"
"""The name of the thread (see the module docstring)."""

_log = logging.getLogger("conveyor")


class _Background:
    """A queue of jobs and the thread that runs them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a job came, or one was done
        self._jobs: deque[Callable[[], None]] = deque()
        self._pending = 0  # jobs given and not done yet
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` in the background thread, after the jobs given before it."""
        with self._lock:
            self._jobs.append(job)
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until every job given is done; whether they are."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs:
                    self._changed.wait()
                job = self._jobs.popleft()
            try:
                job()
            except Exception:  # a job's failure is its own; the next ones still run
                _log.exception("conveyor: a background job of the process runtime failed")
            finally:
                with self._lock:
                    self._pending -= 1
                    self._changed.notify_all()

    def forsake(self) -> None:
        """In a process forked from this one: no thread runs the jobs there; start afresh."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._jobs = deque()
        self._pending = 0
        self._thread = None


BACKGROUND = _Background()
"""This process's background thread of the process runtime."""

if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=BACKGROUND.forsake)
