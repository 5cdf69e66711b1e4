"""A signal while a ``conveyor`` command starts: a clean stop, not a death by signal.

Until a command installs handlers of its own (a worker's, once it is about to
serve; ``conveyor run``'s, around a run in this process), SIGTERM would end the
process by the signal, without a word, and Ctrl-C would raise KeyboardInterrupt in
whatever was importing (a traceback) or make click say "Aborted!" (exit 1). The
entry point installs these handlers first thing, before click and the user's module
are imported, so a signal in that time says in one line what happened and exits:

- ``conveyor worker``: 0, as a worker stopped while it serves; it had taken nothing;
- the other commands: 143 for SIGTERM, 130 for Ctrl-C, as ``conveyor run`` stopped.

The process exits at once (``os._exit``): nothing was started that needs an end,
and nothing in the user's code can hold the exit up. Commands that do not set
handlers of their own (``status``, ``dlq``, ``cancel``) keep these to their end;
``conveyor run --redis`` sets its own, as a local run does: the driver's run is
stopped and left in Redis, resumable. A signal in
the first tens of milliseconds, before Python runs any of conveyor's code, still
ends the process by the signal (a shell says 143 for SIGTERM), having done nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only stdlib modules already loaded at start-up are imported at run time
    from collections.abc import Callable
    from types import FrameType
    from typing import Any, TypeAlias

    _Handler: TypeAlias = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_WORKER_STOPPED", "install", "release"]

EXIT_WORKER_STOPPED = 0  # a worker stopped by a signal, in any state
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + signal 2, what shells report for it
EXIT_TERMINATED = 143  # SIGTERM (docker stop, kill): 128 + signal 15


_DEFAULTS: dict[signal.Signals, _Handler] = {
    signal.SIGTERM: signal.SIG_DFL,
    signal.SIGINT: signal.default_int_handler,
}
"""Python's own handlers, which these replace and `release` puts back."""


def install() -> None:
    """Stop cleanly on SIGTERM and Ctrl-C until the command sets its own handlers.

    Only where Python's defaults are in place: a signal the parent ignores (a
    background job's SIGINT) stays ignored.
    """
    for sig, default in _DEFAULTS.items():
        if signal.getsignal(sig) is default:
            signal.signal(sig, _stop)


def release(sig: signal.Signals) -> None:
    """Give ``sig`` back to Python's default, if these handlers still have it (and
    this is the main thread, where handlers are set)."""
    if signal.getsignal(sig) is _stop:
        signal.signal(sig, _DEFAULTS[sig])


def _stop(signum: int, frame: FrameType | None) -> None:
    name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    if sys.argv[1:2] == ["worker"]:
        line = f"conveyor: worker stopped ({name}) before it started serving: it took nothing"
        code = EXIT_WORKER_STOPPED
    else:
        what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        line = f"conveyor: {what}"
        code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    try:
        sys.stdout.flush()
    except (OSError, ValueError):  # a closed or broken stdout: the line below still goes
        pass
    try:
        os.write(2, f"{line}\n".encode())
    except OSError:
        pass
    os._exit(code)
