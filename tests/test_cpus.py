"""The process runtime's lanes keep to CPUs of their own, apart from the worker
processes, when each worker and the lanes can have one (`conveyor.runtime._cpus`).

The plan's rule is tested on its own; then, with real worker processes (forkserver
and spawn), where the lanes and the worker run, that a worker never keeps
the lanes' CPUs (a worker started by a lane inherits them), that a caller's own
affinity bounds them all, and that the plan forgets the workers of a run however
it ends.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import conveyor as cv
from conveyor.runtime import _cpus, _wire, processes

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Quick (a few seconds): the worker interpreters' case runs on Python 3.14+ only.
pytestmark = pytest.mark.quick

needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="CPU affinity (Linux)"
)
ALLOWED = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs or more")
# Not fork: it is unsafe in a process running threads, as this one does (Python 3.12+
# warns, and a child forked before the warning's error outlives the test). A worker
# spawned from a lane inherits its CPUs as a forked one would.
METHODS = [m for m in ("forkserver", "spawn") if m in multiprocessing.get_all_start_methods()]
WAIT = 30.0


# ---------------------------------------------------------------------- the plan


def test_lanes_get_the_cpus_left_by_the_workers_while_each_worker_and_the_lanes_have_one() -> None:
    plan = _cpus._Plan()
    four = frozenset({0, 1, 2, 3})
    assert plan.lane_cpus(four) == four  # no worker yet
    plan.add(1)
    assert plan.lane_cpus(four) == {1, 2, 3}
    plan.add(1)
    assert plan.lane_cpus(four) == {2, 3}
    plan.add(1)  # three workers: the lanes of three would crowd onto one CPU
    assert plan.lane_cpus(four) == four
    plan.remove(2)
    assert plan.lane_cpus(four) == {1, 2, 3}
    # The run's CPUs as the caller's affinity gives them: any numbers, in order.
    assert plan.lane_cpus(frozenset({9, 2, 7, 5})) == {5, 7, 9}
    assert plan.lane_cpus(frozenset({3})) == {3}  # one CPU: nothing to keep apart
    plan.remove(5)  # never below none
    assert plan.lane_cpus(four) == four


def test_the_plan_changes_its_generation_with_every_change() -> None:
    plan = _cpus._Plan()
    seen = [plan.generation]
    plan.add(2)
    seen.append(plan.generation)
    plan.remove(1)
    seen.append(plan.generation)
    assert len(set(seen)) == 3


def test_a_lane_moves_only_when_its_place_or_the_plan_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = _cpus._Plan()
    plan.add(1)
    calls: list[frozenset[int] | None] = []
    monkeypatch.setattr(_cpus, "PLAN", plan)
    monkeypatch.setattr(_cpus, "use", calls.append)
    four = frozenset({0, 1, 2, 3})

    def lane() -> None:  # a thread of its own: where it is placed is per thread
        _cpus.place_lane(four, apart=False)  # where it started: no call
        _cpus.place_lane(four, apart=True)
        _cpus.place_lane(four, apart=True)
        plan.add(1)
        _cpus.place_lane(four, apart=True)
        _cpus.place_lane(four, apart=False)  # back on all the run's CPUs
        _cpus.place_lane(four, apart=False)
        _cpus.place_lane(None, apart=True)  # nothing to keep to (another OS, or turned off)

    thread = threading.Thread(target=lane)
    thread.start()
    thread.join(WAIT)
    assert calls == [{1, 2, 3}, {2, 3}, four]


@needs_affinity
def test_use_leaves_a_thread_as_it_is_when_asked_for_cpus_it_cannot_have() -> None:
    before = os.sched_getaffinity(0)
    _cpus.use(frozenset({10**6}))  # no such CPU: refused, and nothing else happens
    _cpus.use(None)
    assert os.sched_getaffinity(0) == before


# ---------------------------------------------------------------------- runs

BIG = _wire.SHM_THRESHOLD  # bytes from which an item crosses through shared memory


def where_am_i(x: Any) -> list[int]:
    """The stage: the CPUs the worker process may run on; busy for a while on each item
    (a lane keeps apart only for a worker busy on its last message)."""
    time.sleep(2 * processes.QUIET_BUSY)  # the stage's work, not a synchronisation
    return sorted(os.sched_getaffinity(0))


Send = tuple[bool, tuple[int, ...]]


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[Send]:
    """Each message a lane sends: whether it carries big buffers to a worker that was
    busy on its last message, and the CPUs the lane may run on as it copies and sends."""
    seen: list[Send] = []
    send = processes._Child.send

    def recorded(child: Any, payload: bytes, pids: bool, buffers: Any, *rest: Any) -> Any:
        copies = bool(buffers.total) and child.busy >= processes.QUIET_BUSY
        seen.append((copies, tuple(sorted(os.sched_getaffinity(0)))))
        return send(child, payload, pids, buffers, *rest)

    monkeypatch.setattr(processes._Child, "send", recorded)
    return seen


def mixed(n: int) -> list[Any]:
    """Small items and big ones, in runs long enough to make messages of each kind."""
    return [b"x" * BIG if (i // 3) % 2 else i for i in range(n)]


def run(items: list[Any], workers: int = 1, runtime: str = "process") -> set[tuple[int, ...]]:
    """The CPUs the workers of a run of ``where_am_i`` saw."""
    assert _cpus.PLAN._workers == 0
    seen = set(map(tuple, cv.Pipeline(items).map(where_am_i, runtime=runtime, workers=workers)))
    assert _cpus.PLAN._workers == 0  # the run's workers are off the plan once it ended
    return seen


@needs_affinity
@needs_two_cpus
@pytest.mark.parametrize("method", METHODS)
def test_lanes_copy_apart_from_the_worker_which_runs_on_all_the_run_s_cpus(
    monkeypatch: pytest.MonkeyPatch, sends: list[Send], method: str
) -> None:
    # spawn starts a worker from a lane, forkserver from a server a lane may have
    # started: each would inherit the lanes' CPUs, unless it sets its own.
    monkeypatch.setattr(processes, "START_METHOD", method)
    everywhere = tuple(sorted(ALLOWED))
    assert run(mixed(60)) == {everywhere}
    assert {copies for copies, _ in sends} == {True, False}, sends  # both kinds were sent
    for copies, cpus in sends:  # big buffers for a busy worker: apart; else anywhere again
        assert cpus == (everywhere[1:] if copies else everywhere), sends


def as_it_came(x: Any) -> Any:
    return x


@needs_affinity
@needs_two_cpus
def test_lanes_stay_on_all_the_cpus_for_a_worker_with_little_to_do(sends: list[Send]) -> None:
    # Big items the stage hands straight back: the parent is the busier side. (Whether
    # the worker was busy is timed: a message it was slow on, under load, counts as busy.)
    items = [b"x" * BIG] * 40
    assert list(cv.Pipeline(items).map(as_it_came, runtime="process")) == items
    everywhere = tuple(sorted(ALLOWED))
    assert any(not busy for busy, _ in sends), sends
    for busy, cpus in sends:
        assert cpus == (everywhere[1:] if busy else everywhere), sends


def where_and_who(x: Any) -> tuple[int, tuple[int, ...]]:
    """The stage: the worker process, and the CPUs it may run on (busy a while first)."""
    time.sleep(2 * processes.QUIET_BUSY)  # the stage's work, not a synchronisation
    return os.getpid(), tuple(sorted(os.sched_getaffinity(0)))


@needs_affinity
@needs_two_cpus
@pytest.mark.parametrize("method", METHODS)
def test_a_worker_a_lane_starts_after_copying_apart_takes_all_the_run_s_cpus(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # Recycled after three items, each worker after the first is started by a lane kept
    # apart (spawn: that very thread; forkserver: a server started anywhere).
    monkeypatch.setattr(processes, "START_METHOD", method)
    items = [b"x" * BIG] * 9
    pipeline = cv.Pipeline(items).map(where_and_who, runtime="process", max_items_per_worker=3)
    seen = set(pipeline)
    assert len({pid for pid, _ in seen}) == 3, seen  # three workers in turn
    assert {cpus for _, cpus in seen} == {tuple(sorted(ALLOWED))}, seen
    assert _cpus.PLAN._workers == 0


@needs_affinity
@needs_two_cpus
def test_lanes_are_left_alone_when_the_workers_take_the_cpus(
    sends: list[Send],
) -> None:
    workers = len(ALLOWED) // 2 + 1  # more than half: the lanes would crowd
    everywhere = tuple(sorted(ALLOWED))
    assert run(mixed(60), workers) == {everywhere}
    assert sends and all(cpus == everywhere for _, cpus in sends), sends


@needs_affinity
@needs_two_cpus
def test_the_caller_s_own_affinity_bounds_the_workers_and_the_lanes(
    sends: list[Send],
) -> None:
    # A caller restricted to one CPU (taskset, or its thread's affinity): its run's
    # workers and lanes stay there, and with one CPU nothing is kept apart.
    one = min(ALLOWED)
    found: list[Any] = []

    def caller() -> None:
        os.sched_setaffinity(0, {one})
        try:
            found.append(run(mixed(30)))
        except BaseException as exc:
            found.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert found == [{(one,)}]
    assert sends and all(cpus == (one,) for _, cpus in sends), sends


@needs_affinity
def test_turned_off_lanes_run_anywhere_and_workers_as_they_started(
    monkeypatch: pytest.MonkeyPatch, sends: list[Send]
) -> None:
    monkeypatch.setattr(processes, "LANES_APART", False)
    everywhere = tuple(sorted(ALLOWED))
    assert run(mixed(30)) == {everywhere}
    assert sends and all(cpus == everywhere for _, cpus in sends), sends


@needs_affinity
@needs_two_cpus
def test_the_workers_of_runs_at_once_are_counted_together(sends: list[Send]) -> None:
    # Run A keeps its worker (its source waits) while run B goes through: B's lanes
    # count two workers, which on two or three CPUs leaves the lanes where they are.
    release, a_running = threading.Event(), threading.Event()
    outputs: list[Any] = []

    def held() -> Any:
        yield b"x" * BIG
        if not release.wait(WAIT):
            raise TimeoutError("the test never released run A")

    def run_a() -> None:
        try:
            for out in cv.Pipeline(held()).map(where_am_i, runtime="process"):
                outputs.append(out)
                a_running.set()
        except BaseException as exc:
            outputs.append(exc)
            a_running.set()

    thread = threading.Thread(target=run_a)
    thread.start()
    try:
        assert a_running.wait(WAIT)
        assert _cpus.PLAN._workers == 1, outputs
        sends.clear()
        everywhere = tuple(sorted(ALLOWED))
        seen = set(map(tuple, cv.Pipeline(mixed(60)).map(where_am_i, runtime="process")))
        assert seen == {everywhere}
    finally:
        release.set()
        thread.join(WAIT)
    assert not thread.is_alive()
    assert outputs == [list(everywhere)]
    lanes = everywhere[2:] if len(everywhere) >= 4 else everywhere
    assert any(copies for copies, _ in sends), sends
    for copies, cpus in sends:
        assert cpus == (lanes if copies else everywhere), sends
    assert _cpus.PLAN._workers == 0


def fail_on_two(x: int) -> int:
    if x == 2:
        raise ValueError("two")
    return x


@needs_affinity
def test_the_plan_forgets_the_workers_of_a_run_however_it_ends() -> None:
    assert _cpus.PLAN._workers == 0
    with pytest.raises(ValueError, match="two"):  # failed
        list(cv.Pipeline(range(5)).map(fail_on_two, runtime="process"))
    assert _cpus.PLAN._workers == 0
    for _ in cv.Pipeline(range(10_000)).map(abs, runtime="process", workers=2):
        break  # left: the run is stopped
    assert _cpus.PLAN._workers == 0
    handle = cv.Pipeline(range(10_000)).map(abs, runtime="process").start()
    handle.stop()
    handle.join()
    assert _cpus.PLAN._workers == 0


@needs_affinity
@needs_two_cpus
@pytest.mark.skipif(sys.version_info < (3, 14), reason="runtime='interpreter': Python 3.14+")
def test_worker_interpreters_and_their_lanes_are_left_where_they_are(
    sends: list[Send],
) -> None:
    # A worker interpreter is a thread of this process that a lane starts: it would
    # inherit the lanes' CPUs, and it is the one that needs a CPU of its own.
    everywhere = tuple(sorted(ALLOWED))
    assert run(mixed(30), runtime="interpreter") == {everywhere}
    assert sends and all(cpus == everywhere for _, cpus in sends), sends


SCRIPT_BACKGROUND = """
import os, threading, time
import conveyor as cv
from conveyor.runtime import _background, _wire, processes

def busy(x):
    time.sleep(2 * processes.QUIET_BUSY)
    return x

if __name__ == "__main__":
    items = [b"x" * _wire.SHM_THRESHOLD] * 20
    assert list(cv.Pipeline(items).map(busy, runtime="process")) == items
    processes.settle()  # the background thread, started by the run's last lane, is idle
    for thread in threading.enumerate():
        if thread.name == _background.THREAD_NAME:
            print(sorted(os.sched_getaffinity(thread.native_id)))
"""


@needs_affinity
@needs_two_cpus
def test_a_lane_ends_on_all_the_run_s_cpus(tmp_path: Path) -> None:
    # The run's last lane starts the background thread as it retires its worker: a
    # thread inherits its creator's CPUs, and that one lives as long as the program.
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT_BACKGROUND))
    done = subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == str(sorted(ALLOWED)), done
