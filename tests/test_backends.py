"""backend= on every way to run a pipeline: run(), iterate(), start(), arun()."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

import conveyor as cv
from conveyor.redis import RedisBackend
from redis_helpers import WAIT, new_namespace, triple
from test_pipeline_helpers import conveyor_threads

if TYPE_CHECKING:
    from conftest import RedisServer


def test_iterate_without_a_backend_is_iteration_here() -> None:
    pipeline = cv.Pipeline(range(5)).map(triple)
    assert list(pipeline.iterate()) == list(pipeline) == [0, 3, 6, 9, 12]


def test_the_local_backend_is_the_default_one_named() -> None:
    pipeline = cv.Pipeline(range(5)).map(triple)
    local = cv.LocalBackend()
    assert pipeline.run(collect=True, backend=local).outputs == [0, 3, 6, 9, 12]
    assert list(pipeline.iterate(backend=local)) == [0, 3, 6, 9, 12]
    with pipeline.start(collect=True, backend=local) as handle:
        assert handle.join().outputs == [0, 3, 6, 9, 12]
    assert asyncio.run(pipeline.arun(collect=True, backend=local)).outputs == [0, 3, 6, 9, 12]


@pytest.mark.parametrize("method", ["run", "iterate", "start"])
def test_something_that_is_not_a_backend_is_refused_at_once(method: str) -> None:
    pipeline = cv.Pipeline(range(5)).map(triple)
    with pytest.raises(cv.ConfigurationTypeError, match=rf"{method}\(\) 'backend' must be"):
        getattr(pipeline, method)(backend="redis://localhost:6379")


def test_stall_timeout_is_refused_with_a_backend_of_elsewhere(redis_server: RedisServer) -> None:
    pipeline = cv.Pipeline(range(5)).map(triple)
    backend = RedisBackend(redis_server.url, namespace=new_namespace())
    for call in (
        lambda: pipeline.run(backend=backend, stall_timeout=1.0),
        lambda: pipeline.start(backend=backend, stall_timeout=1.0),
    ):
        with pytest.raises(cv.ConfigurationError, match="'stall_timeout' applies to runs"):
            call()


def _backend(server: RedisServer, **options: object) -> RedisBackend:
    return RedisBackend(server.url, namespace=new_namespace(), local_workers=True, **options)  # type: ignore[arg-type]


def test_iterate_start_and_arun_take_the_redis_backend(redis_server: RedisServer) -> None:
    pipeline = cv.Pipeline(range(50)).map(triple)
    expected = [3 * x for x in range(50)]
    assert list(pipeline.iterate(backend=_backend(redis_server))) == expected
    with pipeline.start(collect=True, backend=_backend(redis_server)) as handle:
        assert handle.join().outputs == expected
    result = asyncio.run(pipeline.arun(collect=True, backend=_backend(redis_server)))
    assert result.outputs == expected


def test_a_started_redis_run_stops_and_resumes_with_its_run_id(redis_server: RedisServer) -> None:
    gate = threading.Event()
    reached = threading.Event()

    def held(x: int) -> int:
        if x == 5:
            reached.set()
            gate.wait(30)
        return x

    pipeline = cv.Pipeline(range(20)).map(held)
    namespace = new_namespace()

    def backend() -> RedisBackend:
        return RedisBackend(
            redis_server.url, namespace=namespace, run_id="resume-me", local_workers=True
        )

    handle = pipeline.start(collect=True, backend=backend())
    assert reached.wait(30)
    handle.stop()
    gate.set()
    stopped = handle.join(30)
    assert stopped.stopped
    rest = pipeline.run(collect=True, backend=backend()).outputs or []
    assert sorted(set((stopped.outputs or []) + rest)) == list(range(20))


def test_a_backend_that_cannot_drain_refuses_stop_drain_and_stops_as_it_is() -> None:
    """The Redis and local backends drain (the contract suite); one without
    `Backend.drains` says so, and its handle still stops and reads as the others'."""
    started = threading.Event()

    class Elsewhere(cv.Backend):
        def run(self, pipeline: Any, *, stop: threading.Event | None = None, **_: Any) -> Any:
            assert stop is not None
            started.set()
            stop.wait(30)
            return cv.RunResult(stats=[], stopped=True)

        def iterate(self, pipeline: Any, **options: Any) -> Iterator[Any]:
            raise AssertionError("never reached")

    handle = cv.Pipeline(range(5)).map(triple).start(backend=Elsewhere())
    with handle:
        assert started.wait(30)
        with pytest.raises(cv.ConfigurationError, match=r"drain=True.*cannot drain"):
            handle.stop(drain=True)
        assert handle.result_so_far().stats == []  # it publishes nothing while it runs
        handle.stop()
        assert handle.join(30).stopped


async def _cancel_soon(
    pipeline: cv.Pipeline[int], backend: RedisBackend, release: threading.Event
) -> None:
    task = asyncio.create_task(pipeline.arun(backend=backend))
    await asyncio.sleep(0)  # let it start
    task.cancel()
    release.set()  # the stage's items end: the stopped run's workers can be joined
    with pytest.raises(asyncio.CancelledError):
        await task


def test_cancelling_arun_with_a_backend_stops_its_run(redis_server: RedisServer) -> None:
    release = threading.Event()
    pipeline = cv.Pipeline(range(5)).map(lambda x: release.wait(30) and x)
    try:
        asyncio.run(asyncio.wait_for(_cancel_soon(pipeline, _backend(redis_server), release), 20))
    finally:
        release.set()
    assert conveyor_threads() == []


@pytest.mark.parametrize("method", ["run", "start"])
def test_a_backend_called_directly_refuses_an_unknown_option_at_once(
    redis_server: RedisServer, method: str
) -> None:
    """A typo in a run option is refused before any run starts, not by the thread
    that would have run it (``start`` returns at once)."""
    pipeline = cv.Pipeline(range(5)).map(triple)
    backend = _backend(redis_server)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'colect'; it takes collect"):
        getattr(backend, method)(pipeline, colect=True)
    with pytest.raises(TypeError, match="colect"):
        getattr(cv.LocalBackend(), method)(pipeline, colect=True)


def test_a_backend_called_directly_takes_the_run_options(redis_server: RedisServer) -> None:
    pipeline = cv.Pipeline(range(20)).map(triple)
    expected = [3 * x for x in range(20)]
    for backend in (cv.LocalBackend(), _backend(redis_server)):
        assert backend.run(pipeline, collect=True).outputs == expected
        with backend.start(pipeline, collect=True) as handle:
            assert handle.join().outputs == expected
        assert asyncio.run(backend.arun(pipeline, collect=True)).outputs == expected


def test_a_redis_run_waits_for_its_local_workers_as_long_as_a_local_run(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the driver waited up to 30 s for its local workers at the end of a
    run, whatever the stages' ``stop_timeout``: an ``on_stop`` that hangs held the run
    30 s, where a local run waits a second more than ``stop_timeout``
    (`engine.join_timeout`)."""
    release = threading.Event()
    entered = threading.Event()

    def close_hangs(state: object) -> None:
        entered.set()
        release.wait(WAIT)  # stands for a connection whose close never returns

    pipeline = cv.Pipeline(range(20)).map(triple, on_stop=close_hangs, stop_timeout=0.2)
    started = time.monotonic()
    try:
        result = pipeline.run(backend=_backend(redis_server), collect=True)
        took = time.monotonic() - started
    finally:
        release.set()
    assert entered.is_set()
    assert sorted(result.outputs or []) == [3 * x for x in range(20)]
    # A local run takes a second more than stop_timeout (1.2 s here).
    assert took < 4.0, f"the run took {took:.1f} s"


@pytest.mark.parametrize(("stop_timeout", "wait"), [(5.0, 30.0), (45.0, 46.0)])
def test_a_stopping_worker_waits_for_on_stop_as_long_as_its_stop_timeout_asks(
    redis_server: RedisServer, stop_timeout: float, wait: float
) -> None:
    """Regression: ``conveyor worker`` (and ``with Worker(...)``) waited 30 s for its
    batches in hand and ``on_stop`` whatever the stages' ``stop_timeout``: an
    ``on_stop`` given 45 s (a long flush) was cut off at 30."""
    from conveyor.redis.worker import Worker

    pipeline = cv.Pipeline(range(3)).map(triple, stop_timeout=stop_timeout)
    worker = Worker(pipeline, redis_server.url, namespace=new_namespace())
    with worker:
        assert worker.stop_wait() == wait
