"""The process runtime's lanes keep to CPUs of their own, apart from the worker
processes, when each worker and the lanes can have one (`conveyor.runtime._cpus`).

The plan's rule is tested on its own; then, with real worker processes under
every start method, where the lanes and the worker run, that a worker never keeps
the lanes' CPUs (a worker started by a lane inherits them), that a caller's own
affinity bounds them all, and that the plan forgets the workers of a run however
it ends.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

import conveyor as cv
from conveyor.runtime import _cpus, processes

cloudpickle.register_pickle_by_value(sys.modules[__name__])

needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="CPU affinity (Linux)"
)
ALLOWED = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs two CPUs or more")
METHODS = [
    m for m in ("forkserver", "spawn", "fork") if m in multiprocessing.get_all_start_methods()
]
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


def test_a_lane_sets_its_cpus_once_then_again_only_when_the_plan_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = _cpus._Plan()
    plan.add(1)
    calls: list[frozenset[int] | None] = []
    monkeypatch.setattr(_cpus, "PLAN", plan)
    monkeypatch.setattr(_cpus, "use", calls.append)
    four = frozenset({0, 1, 2, 3})

    def lane() -> None:  # a thread of its own: what it applied is per thread
        _cpus.keep_lane_apart(four)
        _cpus.keep_lane_apart(four)
        plan.add(1)
        _cpus.keep_lane_apart(four)
        _cpus.keep_lane_apart(None)  # no CPUs to keep to (another OS, or turned off)

    thread = threading.Thread(target=lane)
    thread.start()
    thread.join(WAIT)
    assert calls == [{1, 2, 3}, {2, 3}]


@needs_affinity
def test_use_leaves_a_thread_as_it_is_when_asked_for_cpus_it_cannot_have() -> None:
    before = os.sched_getaffinity(0)
    _cpus.use(frozenset({10**6}))  # no such CPU: refused, and nothing else happens
    _cpus.use(None)
    assert os.sched_getaffinity(0) == before


# ---------------------------------------------------------------------- runs


def where_am_i(_: Any) -> list[int]:
    """The stage: the CPUs the worker process may run on."""
    return sorted(os.sched_getaffinity(0))


def lanes_cpus(stage: str) -> dict[str, list[int]]:
    """The CPUs of the lanes of ``stage`` now running, by thread name."""
    return {
        t.name: sorted(os.sched_getaffinity(t.native_id))
        for t in threading.enumerate()
        if t.name.startswith(f"conveyor-{stage}-") and t.native_id is not None
    }


def held_source(release: threading.Event) -> Iterator[int]:
    """Two items; the second once ``release`` is set: the lanes stay up until then."""
    yield 0
    if not release.wait(WAIT):
        raise TimeoutError("the test never released the source")
    yield 1


def run_and_look(
    workers: int = 1, runtime: str = "process"
) -> tuple[set[tuple[int, ...]], dict[str, list[int]]]:
    """A run of ``where_am_i``: the CPUs its workers saw, and its lanes' while it ran."""
    release = threading.Event()
    seen: set[tuple[int, ...]] = set()
    lanes: dict[str, list[int]] = {}
    pipeline = cv.Pipeline(held_source(release)).map(
        where_am_i, runtime=runtime, workers=workers, name="where"
    )
    try:
        for out in pipeline:
            seen.add(tuple(out))
            if not lanes:
                lanes = lanes_cpus("where")
                release.set()
    finally:
        release.set()
    assert _cpus.PLAN._workers == 0  # the run's workers are off the plan once it ended
    return seen, lanes


@needs_affinity
@needs_two_cpus
@pytest.mark.parametrize("method", METHODS)
def test_the_lanes_keep_apart_and_the_worker_runs_on_all_the_run_s_cpus(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # spawn and fork start the worker from a lane, forkserver from a server a lane may
    # have started: each would inherit the lanes' CPUs, unless it sets its own.
    monkeypatch.setattr(processes, "START_METHOD", method)
    assert _cpus.PLAN._workers == 0
    seen, lanes = run_and_look()
    assert seen == {tuple(sorted(ALLOWED))}
    assert len(lanes) == 2, lanes  # both lanes, the one that sent nothing yet too
    assert all(cpus == sorted(ALLOWED)[1:] for cpus in lanes.values()), lanes


@needs_affinity
@needs_two_cpus
def test_lanes_are_left_alone_when_the_workers_take_the_cpus() -> None:
    workers = len(ALLOWED) // 2 + 1  # more than half: the lanes would crowd
    seen, lanes = run_and_look(workers)
    assert seen == {tuple(sorted(ALLOWED))}
    assert lanes and all(cpus == sorted(ALLOWED) for cpus in lanes.values()), lanes


@needs_affinity
@needs_two_cpus
def test_the_caller_s_own_affinity_bounds_the_workers_and_the_lanes() -> None:
    # A caller restricted to one CPU (taskset, or its thread's affinity): its run's
    # workers and lanes stay there, and with one CPU nothing is kept apart.
    one = min(ALLOWED)
    found: list[Any] = []

    def caller() -> None:
        os.sched_setaffinity(0, {one})
        try:
            found.append(run_and_look())
        except BaseException as exc:
            found.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert not isinstance(found[0], BaseException), found
    seen, lanes = found[0]
    assert seen == {(one,)}
    assert lanes and all(cpus == [one] for cpus in lanes.values()), lanes


@needs_affinity
def test_turned_off_the_lanes_run_anywhere_and_the_workers_as_they_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processes, "LANES_APART", False)
    seen, lanes = run_and_look()
    assert seen == {tuple(sorted(ALLOWED))}
    assert lanes and all(cpus == sorted(ALLOWED) for cpus in lanes.values()), lanes


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
def test_worker_interpreters_and_their_lanes_are_left_where_they_are() -> None:
    # A worker interpreter is a thread of this process that a lane starts: it would
    # inherit the lanes' CPUs, and it is the one that needs a CPU of its own.
    seen, lanes = run_and_look(runtime="interpreter")
    assert seen == {tuple(sorted(ALLOWED))}
    assert lanes and all(cpus == sorted(ALLOWED) for cpus in lanes.values()), lanes
