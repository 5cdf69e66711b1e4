"""The stall detector: when nothing moves for a while, say who holds what, and where.

A run is stalled when no item has moved for ``stall_timeout`` seconds: the
source yielded nothing, no worker finished a batch, no channel received an
item and the caller took no output. The detector then logs a WARNING on the
``conveyor`` logger naming, for every worker inside the stage function, the
item it holds, for how long, and its thread's current stack; every worker
inside its stage's ``on_start`` or ``on_stop``, with its stack; and the fill
of every channel, so a full queue in front of a stuck stage is visible.

For a process stage, the worker process itself is asked (`WorkerProbe`: a
thread of the worker process answers on a pipe of its own) which item its
stage function is on and where its code is: a worker's lanes (the parent's
threads that feed it) only wait for it, and are reported as one worker. A
worker process whose code holds the GIL for longer than `PROBE_WAIT` cannot
answer: the report says so. For an async worker the stack is where its
coroutine awaits, unless the coroutine holds the event loop's thread (then
that thread's stack shows the blocking call). A worker interpreter's stack
is not reachable: it is reported once per worker, its stack not available (in
a hook, that of the thread waiting for it is shown).

It reports once when the timeout is crossed, then again each time the stall
has doubled in length, until something moves.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from time import monotonic, perf_counter
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

from .metrics import HookCall, ProbeAnswer, StageMetrics, WorkerCounters, WorkerProbe
from .stage import item_repr

if TYPE_CHECKING:
    import asyncio

    from .engine import Run

__all__ = ["StallDetector"]

log = logging.getLogger("conveyor")

_STACK_FRAMES = 12  # innermost frames shown per worker: the user's code and what called it
PROBE_WAIT = 0.5
"""How long a stall report waits for the worker processes it asks where they are."""
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
        self._left_named: set[int | None] = set()
        # Threads left behind in an overrun on_stop that a report already named.

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
        # One look at who holds what, taken before the worker processes are asked: a
        # hook or batch begun while they answer would otherwise be described with
        # nobody's answer (a hook then showed the stack of the parent's lane).
        seen = [_Seen.of(m) for m in run.metrics]
        answers, asked = _ask_worker_processes(seen)
        # Worker threads whose on_stop overran its stop_timeout: a fresh thread took
        # their place, so the stall is not theirs, though they are still in the hook.
        given_up = {t.ident for sr in run.stage_runs for t in sr.given_up}
        holders = 0
        for m, workers, calls in seen:
            reported: set[int] = set()  # process workers already reported (by group)
            for w in workers:
                holders += 1
                if w.group is not None and w.group in m.probes:
                    if w.group not in reported:
                        reported.add(w.group)
                        lanes = [x for x in workers if x.group == w.group]
                        probe = id(m.probes[w.group])
                        lines.extend(
                            _process_holder(m, lanes, answers.get(probe), probe in asked, now)
                        )
                    continue
                lines.append(_holder_line(m, w, now))
                lines.extend(_worker_stack(frames, w.thread_id, w.task))
            for call in calls:
                left = ""
                if call.thread_id in given_up:
                    # Not a worker the stall waits for (a fresh thread goes on): named
                    # in one report, then left out.
                    if call.thread_id in self._left_named:
                        continue
                    self._left_named.add(call.thread_id)
                    left = (
                        f" (left behind: it overran its stop_timeout of "
                        f"{m.stage.stop_timeout:g} s, a fresh thread goes on; "
                        "not reported again)"
                    )
                else:
                    holders += 1
                answer = None if call.probe is None else answers.get(id(call.probe))
                doing = f"  {_where(m)}, worker {call.worker}: in {call.hook} for "
                doing += f"{now - call.since:.1f} s{left}; its stack"
                if answer is not None:
                    lines.append(f"{doing} (pid {answer.pid}), in the worker process:")
                    lines.extend(answer.stack)
                elif call.probe is not None and id(call.probe) in asked:
                    lines.append(f"{doing}: not available ({_unanswered(m, True)})")
                else:  # a thread's hook, or a worker interpreter's: the waiting thread's
                    lines.append(f"{doing}:")
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


class _Seen(NamedTuple):
    """A stage's workers that hold a batch, and its hook calls, at one moment."""

    metrics: StageMetrics
    holding: list[WorkerCounters]
    calls: list[HookCall]

    @classmethod
    def of(cls, m: StageMetrics) -> _Seen:
        holding = [w for w in list(m.workers) if w.current_since is not None]
        return cls(m, holding, list(m.hook_calls.values()))


def _ask_worker_processes(seen: list[_Seen]) -> tuple[dict[int, ProbeAnswer], set[int]]:
    """Where the worker processes that hold a batch or run a hook are, by the id of their
    `WorkerProbe`: every one asked at once, the answers awaited `PROBE_WAIT` seconds;
    and the ids of those asked (a worker interpreter cannot be)."""
    probes: dict[int, WorkerProbe] = {}
    for m, holding, calls in seen:
        for w in holding:
            probe = None if w.group is None else m.probes.get(w.group)
            if probe is not None:
                probes[id(probe)] = probe
        for call in calls:
            if call.probe is not None:
                probes[id(call.probe)] = call.probe
    asked = [(key, probe) for key, probe in probes.items() if probe.ask()]
    deadline = monotonic() + PROBE_WAIT
    answers = {}
    for key, probe in asked:
        answer = probe.answer(deadline)
        if answer is not None:
            answers[key] = answer
    return answers, {key for key, _ in asked}


def _process_holder(
    m: StageMetrics,
    lanes: list[WorkerCounters],
    answer: ProbeAnswer | None,
    asked: bool,
    now: float,
) -> list[str]:
    """A worker process holding batches (``lanes``: the parent's threads that sent them):
    the item it is on and its stack, as it said (``answer``, if ``asked``)."""
    held = now - min(w.current_since or now for w in lanes)
    waiting = "" if len(lanes) < 2 else f", {len(lanes) - 1} more waiting"
    if answer is None:
        name = lanes[0].thread_name.rpartition("-lane")[0] or lanes[0].thread_name
        return [
            f"  {_where(m)}, worker {name}: on a batch for {held:.1f} s{waiting} (the first "
            f"item: {item_repr(lanes[0].current_item)}); its stack: not available "
            f"({_unanswered(m, asked)})"
        ]
    worker = f"worker {answer.worker} (pid {answer.pid})"
    batch = f"its batch held for {held:.1f} s{waiting}"
    if answer.item is None:
        doing = f"not inside the stage function now, {batch}"
    else:
        doing = f"in the stage function on item {answer.item}, {batch}"
    return [f"  {_where(m)}, {worker}: {doing}; its stack in the worker process:", *answer.stack]


def _unanswered(m: StageMetrics, asked: bool) -> str:
    """Why a worker process of stage ``m`` did not say where it is."""
    if asked:
        return (
            f"the worker process did not say where it is within {PROBE_WAIT:g} s: its "
            f"code holds the GIL, or the process is stopped"
        )
    if m.stage.runtime == "interpreter":
        return "a worker interpreter's code runs in an interpreter of its own"
    return "the worker process has ended"


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
