"""What a new user tripped on, each from its repro: now a clear error, or working.

A second run over a one-shot source, a process pipeline inside a process
stage, an exception whose ``__init__`` takes two arguments, a cancelled
``aput_many``, ``max_items_per_worker`` on threads, and a pipeline iterator
left suspended at interpreter exit. (Bad parameter values: test_validation.)
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import conveyor as cv
from conveyor.redis import RedisBackend
from redis_helpers import new_namespace

if TYPE_CHECKING:
    from conftest import RedisServer

SRC = Path(cv.__file__).resolve().parent.parent
WAIT = 60.0
"""Upper bound of every wait here (seconds)."""


# ---------------------------------------------------------------------- one-shot sources


def test_a_second_run_over_a_generator_source_is_refused_instead_of_returning_nothing() -> None:
    pipeline = cv.Pipeline(x for x in range(3)).map(str)
    assert list(pipeline) == ["0", "1", "2"]
    with pytest.raises(
        cv.ConfigurationError, match=r"'source' is a one-shot iterator \(generator\)"
    ):
        list(pipeline)  # was [] without a word


def test_every_pipeline_built_over_the_same_one_shot_source_shares_its_single_run() -> None:
    base = cv.Pipeline(iter([1, 2, 3]))
    assert base.map(abs).run(collect=True).outputs == [1, 2, 3]
    with pytest.raises(cv.ConfigurationError, match="earlier run already pulled"):
        base.filter(bool).run()
    with pytest.raises(cv.ConfigurationError, match="one-shot"):
        base.map(abs).start()


def test_a_second_run_over_an_async_generator_source_is_refused() -> None:
    async def numbers() -> AsyncIterator[int]:
        for i in range(3):
            yield i

    pipeline = cv.Pipeline(numbers()).map(abs)
    assert pipeline.run(collect=True).outputs == [0, 1, 2]
    with pytest.raises(cv.ConfigurationError, match="one-shot"):
        asyncio.run(pipeline.arun())


def test_a_refused_run_starts_nothing() -> None:
    pipeline = cv.Pipeline(iter(range(3))).map(abs, workers=4)
    list(pipeline)
    before = set(threading.enumerate())
    with pytest.raises(cv.ConfigurationError):
        list(pipeline)
    assert set(threading.enumerate()) <= before


def test_a_reiterable_source_still_runs_any_number_of_times() -> None:
    pipeline = cv.Pipeline(range(4)).map(abs)
    assert [list(pipeline) for _ in range(3)] == [[0, 1, 2, 3]] * 3


# ---------------------------------------------------------------------- nested processes


def run_inner_process_pipeline(n: int) -> int:
    return sum(cv.Pipeline(range(n)).map(abs, runtime="process").run(collect=True).outputs or [])


def test_a_process_pipeline_inside_a_process_stage_is_a_clear_error_naming_both_stages() -> None:
    # Was a bare AssertionError: "daemonic processes are not allowed to have children".
    outer = cv.Pipeline(range(2)).map(run_inner_process_pipeline, runtime="process")
    with pytest.raises(cv.ConfigurationError) as info:
        outer.run()
    message = str(info.value)
    assert "stage 'abs' (map) has 'runtime'='process'" in message
    assert "runtime='thread'" in message
    assert any("'run_inner_process_pipeline' (map)" in note for note in info.value.__notes__)


def run_inner_thread_pipeline(n: int) -> int:
    return sum(cv.Pipeline(range(n)).map(abs, workers=2).run(collect=True).outputs or [])


def test_a_thread_pipeline_inside_a_process_stage_works() -> None:
    outer = cv.Pipeline([3, 4]).map(run_inner_thread_pipeline, runtime="process")
    assert outer.run(collect=True).outputs == [3, 6]


# ---------------------------------------------------------------------- user exceptions


class BadRow(Exception):
    """The issue's exception: its __init__ takes two arguments, its args hold one."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"row {row}: {reason}")
        self.row = row


def reject_row_two(x: int) -> int:
    if x == 2:
        raise BadRow(x, "no name")
    return x


class BadRowWithLock(BadRow):
    """Carries an attribute that cannot be pickled beside one that can."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(row, reason)
        self.lock = threading.Lock()


def reject_with_lock(x: int) -> int:
    raise BadRowWithLock(x, "locked")


def test_a_two_argument_exception_from_a_process_stage_arrives_as_itself() -> None:
    with pytest.raises(BadRow, match="row 2: no name") as info:
        cv.Pipeline(range(4)).map(reject_row_two, runtime="process").run()
    assert type(info.value) is BadRow
    assert info.value.row == 2
    assert 'raise BadRow(x, "no name")' in str(info.value.__cause__)


def test_an_exception_keeps_its_picklable_attributes_when_another_cannot_cross() -> None:
    with pytest.raises(BadRowWithLock, match="row 0: locked") as info:
        cv.Pipeline(range(1)).map(reject_with_lock, runtime="process").run()
    assert info.value.row == 0
    assert not hasattr(info.value, "lock")  # stayed in the worker: it cannot be pickled


@pytest.mark.parametrize("runtime", ["thread", "process"])
def test_a_two_argument_exception_through_redis_arrives_as_itself(
    redis_server: RedisServer, runtime: str
) -> None:
    pipeline = cv.Pipeline(range(4)).map(reject_row_two, runtime=runtime)  # type: ignore[call-overload]
    backend = RedisBackend(
        redis_server.url, namespace=new_namespace(), local_workers=True, max_deliveries=1
    )
    with pytest.raises(cv.DeadLettersError) as info:
        pipeline.start(backend=backend).join(timeout=WAIT)
    cause = info.value.__cause__
    assert type(cause) is BadRow
    assert (str(cause), cause.row) == ("row 2: no name", 2)


# ---------------------------------------------------------------------- a cancelled aput_many


async def _parked_aput_many(ch: cv.Channel[int], items: list[int]) -> asyncio.Task[None]:
    """Start ``aput_many(items)`` and return once it waits for room."""
    task = asyncio.ensure_future(ch.aput_many(items))
    for _ in range(10_000):  # bounded: the task parks within a few loop turns
        await asyncio.sleep(0)
        if ch.full():
            break
    assert ch.full() and not task.done()
    return task


def test_a_cancelled_aput_many_says_how_many_items_went_in() -> None:
    async def main() -> None:
        ch: cv.Channel[int] = cv.Channel(2)
        task = await _parked_aput_many(ch, [10, 11, 12, 13, 14])
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as info:
            await task
        assert info.value.items_put == 2  # type: ignore[attr-defined]
        assert [ch.get_nowait(), ch.get_nowait()] == [10, 11]

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
def test_an_aput_many_cut_by_asyncio_timeout_says_how_many_items_went_in() -> None:
    async def main() -> None:
        ch: cv.Channel[int] = cv.Channel(3)
        with pytest.raises(TimeoutError) as info:
            async with asyncio.timeout(0.05):
                await ch.aput_many(range(10))
        assert info.value.__cause__.items_put == 3  # type: ignore[union-attr]
        assert ch.qsize() == 3

    asyncio.run(main())


# ---------------------------------------------------------------------- max_items_per_worker


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_max_items_per_worker_on_threads_starts_the_worker_afresh(timeout: float | None) -> None:
    # Was silently ignored on the thread runtime.
    counter = itertools.count()
    stopped: list[int] = []

    def tag(x: int) -> tuple[int, Any]:
        return x, cv.worker_state()

    result = (
        cv.Pipeline(range(10))
        .map(
            tag,
            max_items_per_worker=3,
            on_start=lambda: next(counter),
            on_stop=stopped.append,
            timeout=timeout,
        )
        .run(collect=True)
    )
    states = [state for _, state in result.outputs or []]
    assert states == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert stopped == [0, 1, 2, 3]


def test_max_items_per_worker_on_threads_with_several_workers_keeps_every_item() -> None:
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def count_state(x: int) -> int:
        with lock:
            seen[cv.worker_state()] = seen.get(cv.worker_state(), 0) + 1
        return x

    counter = itertools.count()
    result = (
        cv.Pipeline(range(200))
        .map(count_state, workers=3, max_items_per_worker=7, on_start=lambda: next(counter))
        .run(collect=True)
    )
    assert sorted(result.outputs or []) == list(range(200))
    assert max(seen.values()) <= 7


def test_an_on_start_that_fails_when_a_worker_starts_afresh_fails_the_run() -> None:
    starts = itertools.count()

    def start() -> int:
        n = next(starts)
        if n == 1:
            raise OSError("no second connection")
        return n

    with pytest.raises(OSError, match="no second connection") as info:
        cv.Pipeline(range(10)).map(abs, max_items_per_worker=2, on_start=start).run()
    assert any("on_start of stage 'abs' (map) failed" in n for n in info.value.__notes__)


# ---------------------------------------------------------------------- interpreter exit


@pytest.mark.parametrize(
    "stages",
    [
        ".map(lambda x: x + 1, workers=2)",
        ".batch(10, interval=0.1)",
        ".map(lambda x: x, timeout=5).filter(bool)",
    ],
)
def test_a_pipeline_iterator_left_suspended_at_exit_prints_nothing(stages: str) -> None:
    # Was "ImportError: sys.meta_path is None, Python is likely shutting down" from
    # the generator's finalizer, run while the interpreter tore its modules down.
    script = textwrap.dedent(
        f"""
        import conveyor as cv
        it = iter(cv.Pipeline(range(100_000)){stages})
        print(next(it) is not None)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "True\n", "")
