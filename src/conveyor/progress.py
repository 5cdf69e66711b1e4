"""Watching a run: the monitor thread, the live display and progress log lines.

A `Monitor` is a thread started next to a run when someone asked to watch
it (``progress=True``, ``report=...`` or ``stall_timeout=...``). Every tick
it takes the per-stage statistics once and hands them to whatever watches:

    run.stats() --tick--> Timeline (charts of the HTML report)
                     +--> StallDetector (a WARNING when nothing moves)
                     +--> LiveDisplay (rich, on a terminal) or LogDisplay (log lines)

At the end it draws the final state and writes the HTML report. Nothing
here runs on a worker's hot path: the workers only add to their counters.
The thread and its tick are a `Watcher`, which the Redis driver's progress
(``conveyor.redis.status.ProgressWatcher``) shares, sampling Redis instead.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

from rich.console import Console
from rich.live import Live
from rich.text import Text

from .metrics import COUNTS, StageStats, Timeline, find_bottleneck, printable
from .report import format_seconds

if TYPE_CHECKING:
    from .engine import Run
    from .stall import StallDetector

__all__ = [
    "LIVE_REFRESH",
    "LOG_INTERVAL",
    "TICK",
    "LiveDisplay",
    "LogDisplay",
    "Monitor",
    "Watcher",
    "new_display",
    "source_length",
]

log = logging.getLogger("conveyor")

TICK = 0.1
"""Seconds between two samples of a watched run."""
LIVE_REFRESH = 0.25
"""Seconds between two redraws of the live table (each holds the GIL for about 0.4 ms)."""
LOG_INTERVAL = 5.0
"""Seconds between two progress log lines when the output is not a terminal."""


def source_length(source: object) -> int | None:
    """How many items ``source`` will yield, when it can tell (``len`` or a length hint)."""
    try:
        return len(source)  # type: ignore[arg-type]
    except Exception:
        pass
    try:
        hint = operator.length_hint(source, -1)
    except Exception:
        return None
    return hint if hint > 0 else None


class Display(Protocol):
    """What the monitor draws on: a terminal table or log lines."""

    def update(self, stats: Sequence[StageStats], elapsed: float) -> None:
        """Show the run's state now (called every tick; draws at its own pace)."""

    def close(self, stats: Sequence[StageStats], elapsed: float) -> None:
        """Show the final state and release the output."""


def new_display(
    source: object = None, console: Console | None = None, *, outcomes: bool = False
) -> Display:
    """A live table when ``console`` (default: stderr) is a terminal, log lines otherwise.

    Args:
        source: the pipeline's source, for the total and the ETA.
        console: the rich console to draw on (default: stderr).
        outcomes: log lines also give each stage's outputs and failures
            (the live table always does).
    """
    console = console or Console(stderr=True)
    total = source_length(source)
    if console.is_terminal:
        return LiveDisplay(console, total)
    return LogDisplay(total, outcomes=outcomes)


def _eta(stats: Sequence[StageStats], total: int | None) -> str:
    """ "done/total (pct), ETA" from the first stage's inputs, or just the count."""
    if not stats:
        return ""
    first = stats[0]
    if total is None:
        return f"{first.items_in:,} items in"
    done = min(first.items_in, total)
    text = f"{done:,}/{total:,} items in ({done / total:.0%})" if total else "0 items"
    rate = first.rate_now
    if done < total and rate > 0:
        text += f", ETA {format_seconds((total - done) / rate)}"
    return text


def _recent_busy(prev: StageStats | None, cur: StageStats) -> float:
    """Utilisation since the previous snapshot (the whole run's, without one)."""
    if prev is None:
        return cur.utilisation
    wall = (cur.elapsed_seconds - prev.elapsed_seconds) * cur.workers
    if wall <= 0:
        return cur.utilisation
    return max(0.0, min(1.0, (cur.busy_seconds - prev.busy_seconds) / wall))


def _fill_bar(s: StageStats, width: int = 10) -> Text:
    if s.queue_capacity <= 0:
        return Text(f"{s.queue_size}")
    filled = round(width * s.queue_fill)
    bar = Text("█" * filled, style="red" if s.queue_fill >= 0.9 else "cyan")
    bar.append("░" * (width - filled), style="dim")
    bar.append(f" {s.queue_size}/{s.queue_capacity}")
    return bar


_LIVE_COLUMNS = ("stage", "workers", "in", "out", "failed", "items/s", "busy")


class LiveDisplay:
    """A table redrawn in place on a terminal: a row per stage and a total line.

    The table is laid out here, in plain aligned columns, rather than by a
    rich `Table`: a redraw then costs about 0.4 ms instead of 4 to 7 ms of
    the GIL, which the pipeline's threads are waiting for.
    """

    def __init__(self, console: Console, total: int | None, refresh: float = LIVE_REFRESH) -> None:
        self._console = console
        self._total = total
        self._refresh = refresh
        self._last_draw = 0.0
        self._prev: dict[str, StageStats] = {}
        # stdout stays the user's: only stderr (the console's own stream) goes
        # through the display, so prints to a redirected stdout land where expected.
        self._live = Live(
            console=console, auto_refresh=False, transient=False, redirect_stdout=False
        )
        self._live.start()

    def render(self, stats: Sequence[StageStats], elapsed: float, final: bool = False) -> Text:
        """The table for ``stats`` (kept public for tests and custom displays)."""
        rows = [list(_LIVE_COLUMNS)]
        for s in stats:
            busy = s.utilisation if final else _recent_busy(self._prev.get(s.name), s)
            rate = s.throughput if final else s.rate_now
            rows.append(
                [
                    printable(s.name),  # escaped before it is measured
                    str(s.workers),
                    f"{s.items_in:,}",
                    f"{s.items_out:,}",
                    f"{s.failed:,}",
                    f"{rate:,.0f}",
                    f"{busy:.0%}",
                ]
            )
        self._prev = {s.name: s for s in stats}
        widths = [max(len(row[i]) for row in rows) for i in range(len(_LIVE_COLUMNS))]
        text = Text()
        text.append("conveyor\n", style="bold")
        for n, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
            text.append("  ".join(cells) + "  ", style="bold" if n == 0 else "")
            text.append_text(_fill_bar(stats[n - 1]) if n else Text("queue", style="bold"))
            text.append("\n")
        footer = f"{_eta(stats, self._total)} · {format_seconds(elapsed)} elapsed"
        bottleneck = find_bottleneck(stats)
        if bottleneck is not None and bottleneck.stage is not None:
            footer += f" · bottleneck: {bottleneck.stage}"
        text.append(footer)
        return text

    def update(self, stats: Sequence[StageStats], elapsed: float) -> None:
        now = perf_counter()
        if now - self._last_draw < self._refresh:
            return
        self._last_draw = now
        self._live.update(self.render(stats, elapsed), refresh=True)

    def close(self, stats: Sequence[StageStats], elapsed: float) -> None:
        self._live.update(self.render(stats, elapsed, final=True), refresh=True)
        self._live.stop()


class LogDisplay:
    """A progress line on the ``conveyor`` logger (INFO) every ``interval`` seconds.

    With ``outcomes``, each stage's outputs and failures are in the line too
    (for runs whose workers are elsewhere, where the log is all one sees).
    """

    def __init__(
        self, total: int | None, interval: float = LOG_INTERVAL, *, outcomes: bool = False
    ) -> None:
        self._total = total
        self._interval = interval
        self._next = interval
        self._outcomes = outcomes

    @staticmethod
    def line(
        stats: Sequence[StageStats], total: int | None, elapsed: float, outcomes: bool = False
    ) -> str:
        """One line summing up every stage: with ``outcomes``, its outputs and failures
        always; else the failures, like the report's other counts, when there are some."""
        stages = " | ".join(
            f"{s.name} {s.items_in:,} in, "
            + (f"{s.items_out:,} out, {s.failed:,} failed, " if outcomes else "")
            + "".join(
                f"{n:,} {name}, "
                for name in COUNTS
                if (n := getattr(s, name)) and not (outcomes and name == "failed")
            )
            + f"{s.rate_now:,.0f}/s, {s.utilisation:.0%} busy, "
            f"queue {s.queue_size}/{s.queue_capacity}"
            for s in stats
        )
        return f"conveyor: {format_seconds(elapsed)}: {stages} | {_eta(stats, total)}"

    def update(self, stats: Sequence[StageStats], elapsed: float) -> None:
        if elapsed >= self._next:
            self._next = elapsed + self._interval
            log.info("%s", self.line(stats, self._total, elapsed, self._outcomes))

    def close(self, stats: Sequence[StageStats], elapsed: float) -> None:
        log.info("%s (done)", self.line(stats, self._total, elapsed, self._outcomes))


class Watcher:
    """Samples a run every tick from a thread of its own, for its timeline and display.

    What a sample is belongs to the subclass: `Monitor` reads a local run's
    counters in memory; the Redis backend's ``ProgressWatcher`` reads a
    distributed run's counters from Redis.
    """

    def __init__(self, timeline: Timeline, display: Display | None, tick: float, name: str) -> None:
        self.timeline = timeline
        """The samples behind the charts of the HTML report."""
        self._display = display
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _sample(self) -> tuple[list[StageStats], float] | None:
        """The stats now and the run's elapsed seconds; None when there is none this tick."""
        raise NotImplementedError

    def _ticked(self) -> None:
        """Called after each sample, before the display (the stall detector's place)."""

    def _loop(self) -> None:
        while not self._stop.wait(self._tick):
            sample = self._sample()
            if sample is None:
                continue
            stats, elapsed = sample
            self.timeline.add(elapsed, stats)
            self._ticked()
            if self._display is not None:
                try:
                    self._display.update(stats, elapsed)
                except Exception:  # a broken terminal must not break the run
                    log.exception("conveyor: the progress display failed; it is turned off")
                    self._display = None

    def _end_thread(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class Monitor(Watcher):
    """Watches a run from a thread of its own; see the module's docstring.

    Args:
        run: the run to watch (already started).
        display: where to show progress, or None.
        report: write the HTML report there at the end, or None.
        stall_timeout: seconds without any item moving before a stall report.
        tick: seconds between samples.
    """

    def __init__(
        self,
        run: Run,
        display: Display | None = None,
        report: Path | None = None,
        stall_timeout: float | None = None,
        tick: float = TICK,
    ) -> None:
        names = [s.name for s in run.stages]
        capacities = [c.maxsize for c in run.channels[: len(run.stages)]]
        super().__init__(Timeline(names, capacities), display, tick, "conveyor-monitor")
        self._run = run
        self._report = report
        self.stall: StallDetector | None = None
        if stall_timeout is not None:
            from .stall import StallDetector

            self.stall = StallDetector(run, stall_timeout)
        run.timeline = self.timeline

    @classmethod
    def start(
        cls,
        run: Run,
        *,
        source: object = None,
        progress: bool = False,
        report: Path | None = None,
        stall_timeout: float | None = None,
        console: Console | None = None,
    ) -> Monitor:
        """Start watching ``run``: a live table on a terminal, log lines elsewhere.

        Args:
            run: the run, already started.
            source: the pipeline's source, for the total and the ETA.
            progress: show progress (on stderr, or ``console``).
            report: where to write the HTML report at the end.
            stall_timeout: seconds without movement before a stall report.
            console: the rich console to draw on (default: stderr).
        """
        display = new_display(source, console) if progress else None
        monitor = cls(run, display, report, stall_timeout)
        monitor.begin()
        return monitor

    def begin(self) -> None:
        """Take the first sample and start the monitor's thread."""
        stats, elapsed = self._sample()
        self.timeline.add(elapsed, stats)
        self._thread.start()

    def _sample(self) -> tuple[list[StageStats], float]:
        # Without the CPU times: reading them costs a file read per worker, every tick.
        stats = [m.snapshot(cpu=False) for m in self._run.metrics]
        return stats, perf_counter() - self._run.started

    def _ticked(self) -> None:
        if self.stall is not None:
            self.stall.check()

    def close(self) -> None:
        """Stop watching: final sample, final display, then the HTML report.

        Raises:
            OSError: the report could not be written, and the run itself did
                not fail (when it did, the write error is logged instead, so
                the run's own error reaches the caller).
        """
        self._end_thread()
        stats, sampled = self._sample()
        self.timeline.add(sampled, stats, force=True)
        elapsed = self._run.result().elapsed_seconds
        if self._display is not None:
            self._display.close(stats, elapsed)
        if self._report is not None:
            self._write_report()

    def _write_report(self) -> None:
        from .report import write_report

        assert self._report is not None
        run = self._run
        write_report(self._report, run.result(), run.control.error, run.control.stopped.is_set())
