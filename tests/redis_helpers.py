"""Pipelines and worker processes for the Redis backend's tests.

The pipelines live in this importable module so that worker processes can
load them by name (``python -m conveyor worker redis_helpers:three_stages``):
a worker and a driver that build the same stages meet on the same keys.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import conveyor as cv

TESTS = Path(__file__).resolve().parent
WAIT = 60.0
"""Upper bound of every wait in these tests (seconds)."""

# ---------------------------------------------------------------------- pipelines


def triple(x: int) -> int:
    return x * 3


def keep(x: int) -> bool:
    return x % 4 != 0


def spread(x: int) -> list[int]:
    return [x, -x] if x % 2 else [x]


def tripled() -> cv.Pipeline[int]:
    """One stage over 50 items, for the command line."""
    return cv.Pipeline(range(50)).map(triple)


def three_stages(n: int = 20_000) -> cv.Pipeline[int]:
    """map -> filter -> flat_map, the end-to-end test's pipeline."""
    return (
        cv.Pipeline(range(n))
        .map(triple, workers=2)
        .filter(keep, workers=2)
        .flat_map(spread, workers=2)
    )


def busy_triple(x: int) -> int:
    # About 0.3 ms of work per item, so batches are in flight when a worker is killed.
    deadline = time.perf_counter() + 0.0003
    while time.perf_counter() < deadline:
        pass
    return x * 3


def slow_stages(n: int = 3000) -> cv.Pipeline[int]:
    """Two stages with a little work per item (the kill -9 test)."""
    return (
        cv.Pipeline(range(n))
        .map(busy_triple, workers=2, name="work", ordered=False)
        .flat_map(spread, name="spread", ordered=False)
    )


POISON = 13


def fragile(x: int) -> int:
    """Fails on POISON until the environment says the bug is fixed."""
    if x == POISON and not os.environ.get("CONVEYOR_TEST_FIXED"):
        raise ValueError(f"cannot handle {x}")
    return x + 1


def poisoned(n: int = 50) -> cv.Pipeline[int]:
    return cv.Pipeline(range(n)).map(fragile, name="fragile").map(triple, name="triple")


def refuse(item: Any) -> Any:
    """Fails on every item: each becomes a dead letter."""
    raise ValueError(f"refused {item!r}")


def refusing() -> cv.Pipeline[Any]:
    """One stage that dead-letters everything (the ``dlq`` commands' tests)."""
    return cv.Pipeline([]).map(refuse, name="refuse", ordered=False)


GATE_ENV = "CONVEYOR_TEST_GATE"
"""``URL PREFIX``: the Redis server and key prefix through which `gated` and a test meet."""


def gate_keys(prefix: str) -> tuple[str, str, str]:
    """The keys of a gate: taken (the first item claims it), entered, release."""
    return f"{prefix}:taken", f"{prefix}:entered", f"{prefix}:release"


def gated(x: Any) -> Any:
    """Holds the first item it sees, in whatever process, until the test opens the gate.

    The first call claims the gate, says so on the ``entered`` list and waits
    on the ``release`` list (a test pushes to it); every later call passes.
    """
    import redis

    url, prefix = os.environ[GATE_ENV].split(" ")
    taken, entered, release = gate_keys(prefix)
    with redis.Redis.from_url(url) as client:
        if client.set(taken, 1, nx=True):
            client.rpush(entered, x)
            deadline = time.monotonic() + WAIT
            # In short blocking reads: redis-py's socket timeout is shorter than WAIT.
            while not client.blpop([release], timeout=1) and time.monotonic() < deadline:
                pass
    return x


def met_by_two(x: Any) -> Any:
    """Waits until two processes have called it (a barrier in Redis, under the gate's
    prefix): each worker process of a run then holds an item of the stage."""
    import redis

    url, prefix = os.environ[GATE_ENV].split(" ")
    with redis.Redis.from_url(url) as client:
        client.sadd(f"{prefix}:pids", os.getpid())
        deadline = time.monotonic() + WAIT
        while client.scard(f"{prefix}:pids") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the other worker process is starting: nothing to wait on
    return x


def two_processes(n: int = 40) -> cv.Pipeline[int]:
    """One stage that each of two worker processes serves (see `met_by_two`)."""
    return cv.Pipeline(range(n)).map(met_by_two, name="meet")


BIG = 64 * 1024
"""The size of `large_items`' items."""


def large_items(n: int = 60) -> list[bytes]:
    """``n`` distinct items of `BIG` bytes (the first four: the item's number)."""
    return [i.to_bytes(4, "big") + bytes(BIG - 4) for i in range(n)]


def passed_on(item: Any) -> Any:
    return item


def held_large(n: int = 60) -> cv.Pipeline[bytes]:
    """map -> a gated map over `large_items`: the byte budget's worker-process test."""
    return cv.Pipeline(large_items(n)).map(passed_on, name="pass").map(gated, name="gate")


def metered(n: int = 200) -> cv.Pipeline[int]:
    """map -> filter -> a gated map: the metrics test's pipeline (n - n//4 items reach the gate)."""
    return (
        cv.Pipeline(range(n))
        .map(triple, workers=2, name="triple")
        .filter(keep, name="keep")
        .map(gated, name="gate")
    )


GATED = 100
"""The item that `wait_for_gate` holds up."""
GATE_FILE_ENV = "CONVEYOR_TEST_GATE_FILE"
"""A file that `wait_for_gate` waits for."""


def wait_for_gate(x: int) -> int:
    """Holds item `GATED`, every time it comes (also taken over by another worker:
    unlike `gated`), until the file named by GATE_FILE_ENV exists (the test creates
    it); a bounded wait: a test that never opens it fails here."""
    if x == GATED:
        _wait_for_gate_file()
    return x


def _wait_for_gate_file() -> None:
    gate = Path(os.environ[GATE_FILE_ENV])
    deadline = time.monotonic() + WAIT
    while not gate.exists():  # nothing to wait on across processes but the file
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate {gate} was never opened")
        time.sleep(0.01)


HELD_IN_PACK = 1500
"""The item that `hold_in_pack` holds up: far enough in the source to travel in a pack."""


def hold_in_pack(x: int) -> int:
    """Holds item `HELD_IN_PACK` as `wait_for_gate` holds `GATED`; triples the others."""
    if x == HELD_IN_PACK:
        _wait_for_gate_file()
    return x * 3


def packed_and_held(n: int = 3000) -> cv.Pipeline[int]:
    """A held map -> flat_map: the kill -9 of a worker holding a packed entry."""
    return (
        cv.Pipeline(range(n))
        .map(hold_in_pack, name="work", ordered=False)
        .flat_map(spread, name="spread", ordered=False)
    )


def members(group: list[int]) -> list[int]:
    return list(group)


def gated_batches(n: int = 2000) -> cv.Pipeline[list[int]]:
    """map (held up at GATED) -> filter -> batch(7) -> map: the batch take-over test."""
    return (
        cv.Pipeline(range(n))
        .map(wait_for_gate, workers=4, name="work")
        .filter(keep, name="keep")
        .batch(7, name="group")
        .map(members, name="out")
    )


def plain_groups(n: int = 2000) -> list[list[int]]:
    """What `gated_batches` gives on one machine, written as a plain loop."""
    kept = [x for x in range(n) if keep(x)]
    return [kept[i : i + 7] for i in range(0, len(kept), 7)]


# ---------------------------------------------------------------------- processes


class WorkerProcess:
    """``python -m conveyor worker TARGET --redis URL`` in a child process."""

    def __init__(self, target: str, url: str, namespace: str, log: Path, *args: str) -> None:
        self.log_path = log
        self._log: IO[bytes] = log.open("ab")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conveyor",
                "worker",
                target,
                "--redis",
                url,
                "--namespace",
                namespace,
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def kill(self) -> None:
        """kill -9."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)
        self._log.close()

    def stop(self) -> None:
        """SIGTERM, then wait (kill -9 if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT / 2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        if not self._log.closed:
            self._log.close()


@contextmanager
def worker_processes(
    target: str, url: str, namespace: str, count: int, logdir: Path, *args: str
) -> Iterator[list[WorkerProcess]]:
    """Start ``count`` worker processes; stop them (and any added to the list) at the end."""
    workers = [
        WorkerProcess(target, url, namespace, logdir / f"worker-{i}.log", *args)
        for i in range(count)
    ]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def worker_logs(logdir: Path) -> str:
    """Every worker log, for assertion messages."""
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(logdir.glob("*.log")))


def new_namespace() -> str:
    """A namespace of its own for one test, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:8]}"


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``condition`` until it returns something true; fail after ``timeout`` s.

    Redis offers nothing to wait on for a counter to reach a value, so this
    polls with a short sleep; every caller bounds the wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)
