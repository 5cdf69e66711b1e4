"""The main module, imported once in the forkserver rather than again in every worker.

``multiprocessing`` puts ``"__main__"`` on the forkserver's preload list, but
up to CPython 3.13 the forkserver is not told where the main module is, so
it skips it: every worker process then runs the main script again (as
``__mp_main__``, compiling it from source: a script has no cached bytecode),
with whatever it imports that the forkserver has not. For a script of a few
hundred lines that is about 10 ms of every worker's start; for one that
imports a large library, the whole import, per worker.

So the parent puts this module on the forkserver's preload list, and
`prepare` starts the forkserver with the main module named in an environment
variable; imported in the forkserver, this module imports the main module there as
``__mp_main__``, as multiprocessing means to. A worker then finds it already
imported and does not run it again.

A main module that starts a process pipeline when imported (no
``if __name__ == "__main__":`` guard) is left out: the forkserver drops it
silently, each worker runs it as before and tells the parent, which raises
the `conveyor.ConfigurationError` that explains the guard. From Python 3.14
the forkserver imports the main module itself, but lets such an error end
the server (the parent then sees a reset connection): so the parent takes
``"__main__"`` off the preload list and this module imports it instead.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from multiprocessing import forkserver, process, spawn
from types import FrameType

__all__ = ["MainStartsPipeline", "importing", "prepare"]

_ENV = "CONVEYOR_FORKSERVER_MAIN"
# What the environment variable carries (JSON): spawn's preparation data for the main module.
_KEYS = ("init_main_from_path", "init_main_from_name")
_lock = threading.Lock()
_importing = False


class MainStartsPipeline(BaseException):
    """Raised in the forkserver when the main module, being imported there, starts a
    process pipeline (a BaseException, so that the script's own handlers let it through)."""


def importing() -> bool:
    """Whether this process is the forkserver importing the main module (see above)."""
    return _importing


def prepare() -> None:
    """In the parent: start the forkserver (unless it runs already), telling it to import
    the main module; the environment variable is set only meanwhile. Nothing while a main
    module is being imported (in a worker, or in the forkserver itself)."""
    if getattr(process.current_process(), "_inheriting", False):
        return
    entry = _main_entry()
    if entry is None:
        return
    with _lock:
        os.environ[_ENV] = entry
        try:
            forkserver.ensure_running()
        finally:
            os.environ.pop(_ENV, None)


def _main_entry() -> str | None:
    """How spawn's children find the main module, and the arguments it sees, as the
    environment variable says it."""
    data = spawn.get_preparation_data("conveyor")
    for key in _KEYS:
        value = data.get(key)
        if isinstance(value, str):
            if key == "init_main_from_path" and not os.path.isfile(value):
                return None  # '<stdin>', '-c': no file to import (and nothing to gain)
            argv = data.get("sys_argv", sys.argv)
            return json.dumps({key: value, "sys_argv": argv, "parent": os.getpid()})
    return None


def _import_main() -> None:
    """In the forkserver: import the main module the environment variable names."""
    global _importing
    entry = os.environ.pop(_ENV, None)
    if not entry:
        return
    try:
        data = json.loads(entry)
    except ValueError:
        return
    if not isinstance(data, dict) or not any(isinstance(data.get(k), str) for k in _KEYS):
        return
    # Only in the forkserver the parent started (not in another child it started meanwhile).
    if data.get("parent") != os.getppid() or not _in_forkserver():
        return
    main = sys.modules.get("__main__")
    current: object = process.current_process()
    # As multiprocessing does while importing the main module: a process started meanwhile
    # raises, rather than the forkserver starting workers.
    current._inheriting = True  # type: ignore[attr-defined]
    _importing = True
    try:
        spawn.prepare({k: data[k] for k in (*_KEYS, "sys_argv") if k in data})
    except BaseException:  # the script fails when imported: each worker runs it as before
        if main is not None:
            sys.modules["__main__"] = main
        sys.modules.pop("__mp_main__", None)
    finally:
        _importing = False
        del current._inheriting  # type: ignore[attr-defined]


def _in_forkserver() -> bool:
    """Whether this import is the forkserver's preload (its ``main`` is on the stack)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


_import_main()
