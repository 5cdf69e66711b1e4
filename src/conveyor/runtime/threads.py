"""Thread runtime: each worker is a thread of this process (the default).

For I/O and for code that releases the GIL. A worker calls the stage
function directly; with a per-item ``timeout`` the call runs in a helper
thread the worker waits on, because a Python thread cannot be interrupted:
when an item times out, the stage's error policy gets a `TimeoutError` and
the helper thread is abandoned to finish (or hang) on its own. It is a
daemon thread named ``conveyor-<stage>-<n>-timed``, so it never blocks the
interpreter's exit. Likewise a worker recycled by ``max_items_per_worker``
whose ``on_stop`` overruns its stage's ``stop_timeout`` is left to finish it (see
`_Hooks`): these are the only threads conveyor may leave behind.
"""

from __future__ import annotations

import threading
from functools import partial
from time import monotonic
from typing import Any

from ..errors import ShutDown
from ..policy import BatchOutcome, add_note, apply_one, process_batch, timeout_error
from ..stage import Stage, set_worker_state
from .base import Runtime, StageRun, batch_loop, warn_stop_overran, worker_loop

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
        deadline = monotonic() + timeout
        for sr in self._runs:
            for thread in list(sr.threads):
                released = sr.released.get(thread)
                left = max(0.0, deadline - monotonic())
                if released is None:
                    thread.join(left)
                elif released.wait(left):
                    thread.join(0.1 if thread not in sr.given_up else 0.0)  # it is ending
        return [
            t.name
            for sr in self._runs
            for t in sr.threads
            if t.is_alive() and (t in sr.given_up or not sr.released.get(t, _UNSET).is_set())
        ]


_UNSET = threading.Event()  # never set: a thread without a `StageRun.released` event


def join_threads(threads: list[threading.Thread], timeout: float) -> list[str]:
    """Join ``threads`` within ``timeout`` seconds overall; return the names still alive."""
    deadline = monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - monotonic()))
    return [t.name for t in threads if t.is_alive()]


class _Hooks:
    """A worker's ``on_start``/``on_stop`` around its items, and its recycling.

    With ``max_items_per_worker``, the worker starts afresh after that many
    items, as a process worker is replaced: once the batch that used the
    quota up is handed on (`retire`), ``on_stop`` runs with the old state,
    ``on_start`` makes a new one (and a new helper thread, with a ``timeout``)
    when the next batch comes, so that the last items leave no life that
    takes none. The worker loop takes at most the items left before then
    (``BatchOutcome.size_limit``), so a batch never straddles two lives.

    An ``on_stop`` that has not returned within the stage's ``stop_timeout``
    does not hold the worker up: a thread cannot be killed, so a fresh thread
    (of the same name) takes the worker's port over and goes on, and the
    stuck one is left to finish on its own, named in a warning, and by the
    end of the run if it is still there.
    """

    def __init__(self, sr: StageRun, worker: int) -> None:
        self.sr, self.worker = sr, worker
        self.quota = sr.stage.max_items_per_worker
        self.left = self.quota
        self.state: Any = None
        self.timed: TimedCaller | None = None
        self.live = False  # on_start ran and on_stop has not: on_stop is owed
        self.spent = False  # the quota is used up: the life ends after this batch's hand-off
        self.sleep = sr.control.sleep  # looked up once, not per batch
        self.track = sr.tracks  # the ports are open before any worker starts

    def start(self) -> bool:
        """Run on_start; False (the run failed) if it raised."""
        stage = self.sr.stage
        try:
            if stage.on_start is not None:
                with self.sr.metrics.in_hook("on_start"):
                    self.state = stage.on_start()
            else:
                self.state = None
        except BaseException as exc:
            self.sr.control.fail(add_note(exc, f"conveyor: on_start of stage {stage.label} failed"))
            return False
        self.live = True
        set_worker_state(self.state)
        if stage.timeout is not None:
            self.timed = TimedCaller(self.sr.thread_name(self.worker), self.state)
        return True

    def stop(self) -> bool:
        """Run on_stop; False (the run failed) if it raised."""
        stage = self.sr.stage
        if self.timed is not None:
            self.timed.close()
            self.timed = None
        if not self.live:
            return True
        self.live = False
        ok = True
        if stage.on_stop is not None:
            try:
                with self.sr.metrics.in_hook("on_stop"):
                    stage.on_stop(self.state)
            except BaseException as exc:
                self.sr.control.fail(
                    add_note(exc, f"conveyor: on_stop of stage {stage.label} failed")
                )
                ok = False
        set_worker_state(None)
        return ok

    def execute(self, batch: list[Any]) -> BatchOutcome:
        """The policy on ``batch`` (in a new life if the last one used up its quota); then,
        with a quota, end the worker's life if it is used up."""
        sr = self.sr
        if not self.live and not self.start():
            raise ShutDown  # the run failed in on_start: this worker ends
        outcome = process_batch(sr.stage, batch, self.timed, self.sleep, self.track)
        if self.left is not None and self.quota is not None:
            self.left -= len(batch)
            if self.left <= 0:
                self.left = self.quota
                self.spent = True
            outcome.size_limit = self.left
        return outcome

    def retire(self) -> bool:
        """After a hand-off: end the worker's life if its quota is used up. True when this
        thread goes on; False when on_stop overran and a fresh thread took the port over.

        Raises:
            ShutDown: on_stop raised (the run failed): this worker ends.
        """
        if not self.spent:
            return True
        self.spent = False
        sr, worker = self.sr, self.worker
        me = threading.current_thread()
        handed = threading.Lock()  # whoever takes it first decides: go on here, or hand over

        def hand_over() -> None:
            if handed.acquire(blocking=False):
                sr.given_up.append(me)
                # The fresh thread first: a join that goes on past this one must see it.
                sr.start_thread(worker, partial(_run_worker, sr, worker, False))
                sr.released[me].set()  # a join waiting for it goes on
                warn_stop_overran(
                    sr.stage, f"worker thread {me.name}", "is left behind; a fresh thread goes on"
                )

        timer = None
        if sr.stage.on_stop is not None:  # only user code can overrun
            timer = threading.Timer(sr.stage.stop_timeout, hand_over)
            timer.daemon = True
            timer.start()
        try:
            ok = self.stop()
        finally:
            if timer is not None:
                timer.cancel()
        if not handed.acquire(blocking=False):
            return False  # the port is the fresh thread's now
        if not ok:
            raise ShutDown  # the run failed in on_stop: this worker ends
        return True


def _run_worker(sr: StageRun, worker: int, first: bool = True) -> None:
    """A worker thread: the per-worker hooks around the shared worker loop.

    ``first``: False for a thread taking over the port of a worker whose
    on_stop overran (`_Hooks.retire`); its on_start waits for its first batch.
    """
    released = sr.released[threading.current_thread()] = threading.Event()
    try:
        hooks = _Hooks(sr, worker)
        if first and not hooks.start():
            sr.ports[worker].close()
            return
        try:
            # Without a timeout or recycling, execute() is the policy alone: the
            # worker may run single items itself.
            direct = sr.stage.timeout is None and hooks.quota is None
            retire = None if hooks.quota is None else hooks.retire
            worker_loop(sr, worker, hooks.execute, direct=direct, retire=retire)
        finally:
            hooks.stop()
    finally:
        released.set()


RUNTIME = ThreadRuntime
