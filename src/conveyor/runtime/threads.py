"""Thread runtime: each worker is a thread of this process (the default).

For I/O and for code that releases the GIL. A worker calls the stage
function directly; with a per-item ``timeout`` the call runs in a helper
thread the worker waits on, because a Python thread cannot be interrupted:
when an item times out, the stage's error policy gets a `TimeoutError` and
the helper thread is abandoned to finish (or hang) on its own. It is a
daemon thread named ``conveyor-<stage>-<n>-timed``, so it never blocks the
interpreter's exit; it is the only thread conveyor may leave behind.
"""

from __future__ import annotations

import threading
from functools import partial
from time import monotonic
from typing import Any

from ..policy import add_note, apply_one, process_batch, timeout_error
from ..stage import Stage, set_worker_state
from .base import Runtime, StageRun, batch_loop, worker_loop

__all__ = ["RUNTIME", "ThreadRuntime", "TimedCaller"]


class _Call:
    """One call handed to a helper thread, and its result."""

    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.done = threading.Event()
        self.result: tuple[list[Any], bool] = ([], False)
        self.error: BaseException | None = None


class TimedCaller:
    """Applies a stage to one item in a helper thread, giving up after the stage's timeout."""

    def __init__(self, name: str, state: Any) -> None:
        self._name = name
        self._state = state
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._call: _Call | None = None
        self._helper: threading.Thread | None = None
        self._abandoned = False

    def __call__(self, stage: Stage, item: Any) -> tuple[list[Any], bool]:
        call = _Call(item)
        with self._lock:
            if self._helper is None:
                self._helper = threading.Thread(
                    target=self._serve, args=(stage,), name=f"{self._name}-timed", daemon=True
                )
                self._helper.start()
            self._call = call
            self._ready.notify()
        if not call.done.wait(stage.timeout):
            with self._lock:
                # Abandon the helper: it keeps running the stuck call; a new one takes over.
                self._helper = None
                self._call = None
            raise timeout_error(stage)
        if call.error is not None:
            raise call.error
        return call.result

    def _serve(self, stage: Stage) -> None:
        set_worker_state(self._state)
        me = threading.current_thread()
        while True:
            with self._lock:
                while self._call is None or self._call.done.is_set():
                    if self._helper is not me:
                        return
                    self._ready.wait()
                call = self._call
            try:
                call.result = apply_one(stage, call.item)
            except BaseException as exc:
                call.error = exc
            call.done.set()
            with self._lock:
                if self._helper is not me:
                    return

    def close(self) -> None:
        """End the helper thread (if any) and wait for it: it is idle now.

        Only an abandoned helper (stuck in a timed-out call) outlives the run.
        """
        with self._lock:
            helper, self._helper = self._helper, None
            self._ready.notify_all()
        if helper is not None:
            helper.join()


class ThreadRuntime(Runtime):
    """Runs each worker of a stage in a thread of its own."""

    name = "thread"

    def __init__(self) -> None:
        self._runs: list[StageRun] = []

    def start(self, sr: StageRun) -> None:
        self._runs.append(sr)
        if sr.stage.kind == "batch":
            sr.start_thread(0, partial(batch_loop, sr))
            return
        for worker in range(sr.stage.workers):
            sr.start_thread(worker, partial(_run_worker, sr, worker))

    def join(self, timeout: float) -> list[str]:
        return join_threads([t for sr in self._runs for t in sr.threads], timeout)


def join_threads(threads: list[threading.Thread], timeout: float) -> list[str]:
    """Join ``threads`` within ``timeout`` seconds overall; return the names still alive."""
    deadline = monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - monotonic()))
    return [t.name for t in threads if t.is_alive()]


def _run_worker(sr: StageRun, worker: int) -> None:
    """A worker thread: the per-worker hooks around the shared worker loop."""
    stage, control = sr.stage, sr.control
    try:
        state = stage.on_start() if stage.on_start is not None else None
    except BaseException as exc:
        control.fail(add_note(exc, f"conveyor: on_start of stage {stage.label} failed"))
        sr.ports[worker].close()
        return
    set_worker_state(state)
    timed = TimedCaller(sr.thread_name(worker), state) if stage.timeout is not None else None
    execute = partial(process_batch, stage, call=timed, sleep=control.sleep, track=sr.tracks)
    try:
        worker_loop(sr, worker, execute)
    finally:
        if timed is not None:
            timed.close()
        if stage.on_stop is not None:
            try:
                stage.on_stop(state)
            except BaseException as exc:
                control.fail(add_note(exc, f"conveyor: on_stop of stage {stage.label} failed"))
        set_worker_state(None)


RUNTIME = ThreadRuntime
