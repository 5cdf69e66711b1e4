"""`ProcessEvent`, apart from the runner: stage functions use it in worker processes and
worker interpreters, and a subinterpreter can import this module (only the standard
library), not `runners` (psutil's extension module refuses subinterpreters)."""

from __future__ import annotations

import os
import select
from pathlib import Path
from typing import Any

WAIT = 30.0
"""Upper bound of every wait in these tests (seconds)."""


class ProcessEvent:
    """An event that a stage sets from any process (a worker process too): a FIFO.

    The test's process holds the FIFO's read end, open from the start, so that
    `set` (anywhere on this machine) can always write its byte, which `wait`
    sees without polling. Pickled by value into a worker process, it is the path.
    """

    def __init__(self, folder: Path, name: str) -> None:
        self.path = str(folder / name)
        os.mkfifo(self.path)
        self._reader: int | None = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_reader": None}

    def set(self) -> None:
        """Set it (from any process, while the test's process holds the read end)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)

    def wait(self, timeout: float | None = WAIT) -> bool:
        """Wait until it is set, ``timeout`` seconds at most (in any process: the byte
        `set` writes is never read, so every reader's end stays readable)."""
        if self._reader is not None:
            return bool(select.select([self._reader], [], [], timeout)[0])
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return bool(select.select([fd], [], [], timeout)[0])
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None
