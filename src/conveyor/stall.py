"""The stall detector: when nothing moves for a while, say who holds what, and where.

A run is stalled when no item has moved for ``stall_timeout`` seconds: the
source yielded nothing, no worker finished a batch, no channel received an
item and the caller took no output. The detector then logs a WARNING on the
``conveyor`` logger naming, for every worker inside the stage function, the
item it holds, for how long, and its thread's current stack; every worker
inside its stage's ``on_start`` or ``on_stop``, with its stack; and the fill
of every channel, so a full queue in front of a stuck stage is visible.

For a process stage the stack is that of the parent thread which waits for
the child process (the child's own stack is not reachable from here). For an
async worker it is where its coroutine awaits, unless the coroutine holds
the event loop's thread (then that thread's stack shows the blocking call).

It reports once when the timeout is crossed, then again each time the stall
has doubled in length, until something moves.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from time import perf_counter
from types import FrameType
from typing import TYPE_CHECKING, Any

from .metrics import StageMetrics, WorkerCounters
from .stage import item_repr

if TYPE_CHECKING:
    import asyncio

    from .engine import Run

__all__ = ["StallDetector"]

log = logging.getLogger("conveyor")

_STACK_FRAMES = 12  # innermost frames shown per worker: the user's code and what called it
_MAX_AWAITS = 200  # a bound on following an async worker's chain of awaits


class StallDetector:
    """Watches one run's counters; call `check` periodically (the `Monitor` does)."""

    def __init__(self, run: Run, timeout: float) -> None:
        self._run = run
        self.timeout = timeout
        self._last_moves = -1
        self._since = perf_counter()
        self._next_report = timeout
        self.reports = 0
        """How many stall reports were logged (for tests and the final summary)."""

    def _moves(self) -> int:
        """A number that grows whenever any item moves anywhere in the run."""
        run = self._run
        total = run.pulled + run.items_out
        for m in run.metrics:
            for w in list(m.workers):
                total += w.items_in + w.items_out + w.batches
        for channel in run.channels:
            total += channel.stats().total_put
        return total

    def check(self, now: float | None = None) -> str | None:
        """Log a stall report if nothing moved for too long; return its text if so."""
        now = perf_counter() if now is None else now
        moves = self._moves()
        if moves != self._last_moves:
            self._last_moves, self._since, self._next_report = moves, now, self.timeout
            return None
        idle = now - self._since
        if idle < self._next_report:
            return None
        self._next_report = 2 * idle
        text = self.describe(idle, now)
        log.warning("%s", text)
        self.reports += 1
        return text

    def describe(self, idle: float, now: float) -> str:
        """The stall report: who holds which item for how long, their stacks, the queues."""
        run = self._run
        frames = sys._current_frames()
        lines = [
            f"conveyor: stalled: no item has moved for {idle:.1f} s "
            f"(stall_timeout={self.timeout:g} s)"
        ]
        holders = 0
        for m in run.metrics:
            for w in list(m.workers):
                if w.current_since is None:
                    continue
                holders += 1
                lines.append(_holder_line(m, w, now))
                lines.extend(_worker_stack(frames, w.thread_id, w.task))
            for call in list(m.hook_calls.values()):
                holders += 1
                lines.append(
                    f"  {_where(m)}, worker {call.worker}: in {call.hook} for "
                    f"{now - call.since:.1f} s; its stack:"
                )
                lines.extend(_worker_stack(frames, call.thread_id, call.task))
        if not holders:
            lines.append("  no worker is inside a stage function")
            feeder = getattr(run, "_feeder", None)
            if feeder is not None and feeder.is_alive():
                lines.append(f"  the source ({run.pulled:,} items pulled so far) is at:")
                lines.extend(_stack_lines(frames.get(feeder.ident or -1)))
        lines.append("  queues: " + ", ".join(_queue_state(m) for m in run.metrics))
        last = run.channels[-1]
        if last.maxsize and last.qsize() >= last.maxsize:
            lines.append(
                "  the outputs channel is full: nothing is consuming the pipeline's outputs"
            )
        return "\n".join(lines)


def _where(m: StageMetrics) -> str:
    runtime = m.stage.runtime
    # The worker thread only waits there: the stage function runs in a child or interpreter.
    if runtime in ("process", "interpreter"):
        return f"{runtime} stage {m.stage.label}"
    return f"stage {m.stage.label}"


def _holder_line(m: StageMetrics, w: WorkerCounters, now: float) -> str:
    held = now - (w.current_since or now)
    # The worker records its batch's first item only (a per-item record would
    # cost on the hot path); slow items come in batches of one.
    return (
        f"  {_where(m)}, worker {w.thread_name}: in the stage function for {held:.1f} s, "
        f"on a batch starting with item {item_repr(w.current_item)}; its stack:"
    )


def _stack_lines(frame: FrameType | None) -> list[str]:
    if frame is None:
        return ["    (stack not available)"]
    entries = traceback.extract_stack(frame)
    while entries and entries[0].filename == threading.__file__:
        del entries[0]  # the thread's bootstrap: the same for every worker
    formatted = traceback.format_list(entries[-_STACK_FRAMES:])
    return ["    " + line for entry in formatted for line in entry.rstrip().splitlines()]


def _worker_stack(
    frames: dict[int, FrameType], thread_id: int | None, task: asyncio.Task[Any] | None
) -> list[str]:
    """A worker's stack: its thread's, or where its coroutine awaits (an async worker)."""
    awaiting = _awaiting_frames(task) if task is not None else None
    if awaiting is not None:
        return _format_frames(awaiting)
    # A thread worker, or a coroutine that holds its loop's thread now.
    return _stack_lines(frames.get(thread_id or -1))


def _awaiting_frames(task: asyncio.Task[Any]) -> list[FrameType] | None:
    """Where an async worker's coroutine awaits; None while it runs (then it holds
    its loop's thread, whose stack shows where).

    `asyncio.Task.get_stack` gives only the task's own coroutine frame: the
    chain of awaits below it is followed here, down to the awaited future.
    """
    frames: list[FrameType] = []
    awaiting: Any = task.get_coro()
    while awaiting is not None and len(frames) < _MAX_AWAITS:
        if getattr(awaiting, "cr_running", False) or getattr(awaiting, "gi_running", False):
            return None
        frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "gi_frame", None)
        if frame is None:  # a future, or a coroutine that has just ended
            break
        frames.append(frame)
        awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "gi_yieldfrom", None)
    return frames or None


def _format_frames(frames: list[FrameType]) -> list[str]:
    entries = traceback.StackSummary.extract((f, f.f_lineno) for f in frames[-_STACK_FRAMES:])
    return ["    " + line for entry in entries.format() for line in entry.rstrip().splitlines()]


def _queue_state(m: StageMetrics) -> str:
    size, capacity = m.channel.qsize(), m.channel.maxsize
    full = " (full)" if capacity and size >= capacity else ""
    return f"{m.stage.name!r} input {size}/{capacity}{full}"
