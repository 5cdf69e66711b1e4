"""Live per-stage display of a running pipeline."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live

from .report import stats_table

if TYPE_CHECKING:
    from .engine import Run

__all__ = ["Progress"]


class Progress:
    """Refreshes a per-stage table from a thread while the run goes on."""

    def __init__(self, run: Run, interval: float = 0.25) -> None:
        self._run = run
        self._interval = interval
        self._stop = threading.Event()
        self._console = Console(stderr=True)
        self._live = Live(stats_table(run.stats()), console=self._console, transient=False)
        self._thread = threading.Thread(target=self._loop, name="conveyor-progress", daemon=True)

    @classmethod
    def start(cls, run: Run) -> Progress:
        """Start displaying ``run``."""
        progress = cls(run)
        progress._live.start()
        progress._thread.start()
        return progress

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._live.update(stats_table(self._run.stats()))

    def close(self) -> None:
        """Draw the final state and stop."""
        self._stop.set()
        self._thread.join()
        self._live.update(stats_table(self._run.stats()))
        self._live.stop()
