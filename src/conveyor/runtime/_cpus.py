"""Where the process runtime's threads run: the parent's lanes on CPUs of their own,
apart from the worker processes, when there are CPUs enough for both (Linux).

A lane and its worker process take turns: the lane copies a batch into shared memory
and sends it; the worker computes while the lane waits; the answer wakes the lane.
Left to the scheduler, the two end up on one CPU: a message through a pipe or socket
wakes its reader on the writer's CPU (a "sync" wake-up: the writer is expected to
sleep next), while the writer goes on working. So the worker waits behind a lane's
copy, or a lane behind the worker, while another CPU idles, and each evicts the
other's data from the CPU's caches. With the lanes kept to CPUs of their own, the
worker has the rest: 1 MiB arrays through one worker on two CPUs went a fifth to two
fifths faster when the stage makes new ones (`a.copy()` +24%, `a * 2` +39%, paired;
docs/benchmarks.md, "lanes-apart").

Only while a lane sends big buffers (copies to make) to a worker that was busy on
its last message (``processes.QUIET_BUSY``, as for quiet wake-ups): otherwise the
parent is the busier side, and lanes kept to fewer CPUs slowed it (100,000 ints
through one worker: 6% slower; 1 MiB arrays returned as they came: 2-5%). And only
when each worker can have a CPU and the lanes as many (``2 * workers <= CPUs``,
counting the process workers of every run in the process): with fewer, the lanes
would be crowded onto too few CPUs, and they are left where the scheduler puts them.

The CPUs are those of the thread that starts the run (its affinity, as ``taskset``
sets it); worker processes are not pinned, and each sets its affinity back to those
CPUs when it starts (a worker started by a lane, or by a server a lane started,
would inherit the lanes' CPUs). Elsewhere than Linux, nothing is done.
"""

from __future__ import annotations

import os
import threading

__all__ = ["PLAN", "allowed", "place_lane", "use"]


def allowed() -> frozenset[int] | None:
    """The CPUs the calling thread may run on, or None where that cannot be told or set."""
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        return frozenset(os.sched_getaffinity(0))
    except OSError:
        return None


def use(cpus: frozenset[int] | None) -> None:
    """Run the calling thread on ``cpus`` (a worker process, when it starts); None: as is."""
    if cpus is None:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, ValueError):  # CPUs gone since (hot-unplugged), or not allowed here
        pass


class _Plan:
    """How many process workers of this process's runs are there now; the lanes keep
    apart from them (see the module docstring) while they fit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers = 0
        self.generation = 0  # changes whenever the count does: lanes look again

    def add(self, workers: int) -> None:
        with self._lock:
            self._workers += workers
            self.generation += 1

    def remove(self, workers: int) -> None:
        with self._lock:
            self._workers = max(0, self._workers - workers)
            self.generation += 1

    def lane_cpus(self, cpus: frozenset[int]) -> frozenset[int]:
        """The CPUs for lanes out of a run's ``cpus``: all but as many as there are
        workers when each can have one and the lanes as many, else all of them."""
        workers = self._workers
        if workers == 0 or 2 * workers > len(cpus):
            return cpus
        return frozenset(sorted(cpus)[workers:])


PLAN = _Plan()


class _Placed(threading.local):
    """Where the calling lane runs: as it started (on its run's CPUs, inherited from
    the thread that started the run), or apart, as of a generation of the plan."""

    apart = False
    generation = -1


_PLACED = _Placed()


def place_lane(cpus: frozenset[int] | None, apart: bool) -> None:
    """Run the calling lane on the lanes' CPUs out of its run's ``cpus`` (``apart``:
    it is about to copy big buffers), or on all of them; None: leave it be. Called
    before each message: a system call only when the answer changed."""
    if cpus is None:
        return
    placed = _PLACED
    if not apart:
        if placed.apart:
            placed.apart = False
            use(cpus)
        return
    generation = PLAN.generation
    if placed.apart and placed.generation == generation:
        return
    placed.apart, placed.generation = True, generation
    use(PLAN.lane_cpus(cpus))
