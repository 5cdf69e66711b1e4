"""Every public parameter refuses a bad value at once, naming it, before anything starts.

The property test draws a parameter of the public API (stage options,
``batch``, ``with_stage``, ``Pipeline`` and its run methods, ``Channel`` and
its methods, ``Backoff``, ``RedisBackend``) and a bad value for it (negative,
zero where meaningless, inf, NaN, huge, the wrong type, a bool where an int
is meant), and checks the error's type, that its message names the
parameter, and that no thread, process or Redis connection was started.
Combinations that cannot work together have tests of their own below.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conveyor as cv
from conveyor.pipeline import StageOptions
from conveyor.redis import RedisBackend
from conveyor.validate import MAX_SECONDS, MAX_TASKS, MAX_WORKERS
from redis_helpers import new_namespace

if TYPE_CHECKING:
    from conftest import RedisServer

UNREACHABLE = "redis://127.0.0.1:1/0"
"""A Redis URL nothing listens on: connecting there fails (refused) at once."""

RANGE = cv.ConfigurationError  # a value of the right type, out of range (a ValueError)
TYPE = cv.ConfigurationTypeError  # a value of the wrong type (a TypeError)

Bad = st.SearchStrategy[tuple[Any, type[Exception]]]
"""Draws a bad value and the error it must raise."""


def _as(error: type[Exception], values: st.SearchStrategy[Any]) -> Bad:
    return values.map(lambda v: (v, error))


WRONG_TYPES = st.one_of(st.text(max_size=5), st.just([]), st.just(object()), st.binary(max_size=3))


def bad_count(minimum: int, maximum: int | None = None, optional: bool = False) -> Bad:
    """An int parameter: too small, too large, a float (inf, NaN), a bool, another type."""
    low = _as(RANGE, st.integers(max_value=minimum - 1))
    high = _as(RANGE, st.integers(min_value=maximum + 1)) if maximum is not None else st.nothing()
    typed = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True), st.booleans(), WRONG_TYPES
    ) | (st.nothing() if optional else st.none())
    return low | high | _as(TYPE, typed)


def bad_byte_size() -> Bad:
    """A size in bytes: under one byte (an int, a whole float, a string), a float that is
    not whole (NaN, inf), a string that is no size, a bool, another type."""
    low = st.one_of(
        st.integers(max_value=0),
        st.floats(max_value=0.0).filter(float.is_integer),
        st.sampled_from(["0", "0.4B", "0KiB", "0.0001k"]),
    )
    not_sizes = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not f.is_integer()),
        st.sampled_from(["", "MiB", "1e3", "5 XB", "-1MiB", "1,5GB", "ten", "1 KiBs"]),
    )
    typed = st.one_of(st.booleans(), st.just([]), st.just(object()), st.binary(max_size=3))
    return _as(RANGE, low | not_sizes) | _as(TYPE, typed)


def bad_seconds(
    zero: bool = False, optional: bool = True, maximum: float | None = MAX_SECONDS
) -> Bad:
    """A duration: negative (zero when meaningless), NaN, inf and huge where bounded,
    a bool, another type."""
    below = st.floats(max_value=-1e-300) if zero else st.floats(max_value=0.0)
    out = st.one_of(below, st.integers(max_value=-1 if zero else 0), st.just(math.nan))
    if maximum is not None:
        out |= st.one_of(
            st.just(math.inf), st.just(1e12), st.floats(min_value=maximum, exclude_min=True)
        )
    typed = st.one_of(st.booleans(), WRONG_TYPES) | (st.nothing() if optional else st.none())
    return _as(RANGE, out) | _as(TYPE, typed)


def bad_flag() -> Bad:
    return _as(TYPE, st.one_of(st.integers(), st.floats(), st.none(), WRONG_TYPES))


def bad_choice(choices: tuple[str, ...]) -> Bad:
    wrong = st.text(max_size=8).filter(lambda s: s not in choices)
    return _as(RANGE, st.one_of(wrong, st.sampled_from([c.upper() for c in choices]), st.none()))


def bad_callable(optional: bool = True) -> Bad:
    return _as(
        TYPE, st.one_of(st.integers(), WRONG_TYPES) | (st.nothing() if optional else st.none())
    )


def bad_name() -> Bad:
    return _as(TYPE, st.one_of(st.just(""), st.integers(), st.binary(min_size=1, max_size=3)))


BAD_BACKEND = _as(TYPE, st.one_of(st.integers(), WRONG_TYPES))
"""None is a backend (this process); these are not."""


@dataclass(frozen=True)
class Param:
    """A public parameter: how to give it a value, and the bad values it must refuse."""

    where: str
    name: str
    give: Callable[[Any], object]
    bad: Bad

    def __repr__(self) -> str:
        return f"{self.where} {self.name}"


def _pipeline() -> cv.Pipeline[int]:
    return cv.Pipeline(range(3))


def _stage_params() -> list[Param]:
    options: dict[str, Bad] = {
        "workers": bad_count(1, MAX_TASKS),
        "capacity": bad_count(1),
        "ordered": bad_flag(),
        "retries": bad_count(0),
        "backoff": _as(TYPE, st.one_of(st.integers(), WRONG_TYPES)),
        "timeout": bad_seconds(),
        "on_error": bad_choice(("raise", "skip")),
        "name": bad_name(),
        "on_start": bad_callable(),
        "on_stop": bad_callable(),
        "stop_timeout": bad_seconds(optional=False),
        "runtime": bad_choice(("thread", "process", "async")),
    }
    params = []
    for method in ("map", "filter", "flat_map", "each"):
        for name, bad in options.items():

            def give(value: Any, method: str = method, name: str = name) -> object:
                return getattr(_pipeline(), method)(abs, **{name: value})

            params.append(Param(f"{method}()", name, give, bad))
    params.append(
        Param(
            "map()",
            "max_items_per_worker",
            lambda v: _pipeline().map(abs, max_items_per_worker=v),
            bad_count(1, optional=True),
        )
    )
    for name in ("workers", "capacity", "retries", "timeout", "stop_timeout", "runtime", "ordered"):

        def change(value: Any, name: str = name) -> object:
            return _pipeline().map(abs).with_stage("abs", **{name: value})

        params.append(Param("with_stage()", name, change, options[name]))
    batch: dict[str, Bad] = {
        "size": bad_count(1, optional=True),
        "interval": bad_seconds(),
        "capacity": bad_count(1),
        "name": bad_name(),
    }
    for name, bad in batch.items():

        def group(value: Any, name: str = name) -> object:
            kwargs = {"size": 10, name: value}
            return _pipeline().batch(**kwargs)

        params.append(Param("batch()", name, group, bad))
    return params


BAD_METRICS = _as(TYPE, st.one_of(st.integers(), st.just([]), st.text(max_size=5)))
"""A ``metrics=`` that is no exporter (an object with ``watch(source)``)."""


def _run_params() -> list[Param]:
    def runs(method: str, **kwargs: Any) -> object:
        p = _pipeline().map(abs)
        if method == "arun":
            return asyncio.run(p.arun(**kwargs))
        if method == "iterate":
            return p.iterate(**kwargs)
        return getattr(p, method)(**kwargs)

    params = [
        Param("Pipeline", "source", cv.Pipeline, _as(TYPE, st.one_of(st.integers(), st.none()))),
        Param("iterate()", "progress", lambda v: runs("iterate", progress=v), bad_flag()),
        Param("iterate()", "backend", lambda v: runs("iterate", backend=v), BAD_BACKEND),
        Param("iterate()", "metrics", lambda v: runs("iterate", metrics=v), BAD_METRICS),
        Param(
            "iterate()",
            "max_bytes",
            lambda v: runs("iterate", max_bytes=v),
            bad_byte_size(),
        ),
    ]
    for method in ("run", "start", "arun"):
        for name, bad in (
            ("collect", bad_flag()),
            ("progress", bad_flag()),
            ("stall_timeout", bad_seconds()),
            ("backend", BAD_BACKEND),
            ("report", _as(TYPE, st.one_of(st.integers(), st.just([])))),
            ("metrics", BAD_METRICS),
            ("max_bytes", bad_byte_size()),
        ):

            def give(value: Any, method: str = method, name: str = name) -> object:
                return runs(method, **{name: value})

            params.append(Param(f"{method}()", name, give, bad))
    return params


def _channel_params() -> list[Param]:
    ch: cv.Channel[int] = cv.Channel(4)  # never waited on: the checks come first
    timeout = bad_seconds(zero=True, maximum=None)
    return [
        Param("Channel", "maxsize", cv.Channel, bad_count(0, optional=True)),
        Param(
            "Channel",
            "max_bytes",
            lambda v: cv.Channel(4, max_bytes=v),
            bad_byte_size(),
        ),
        Param("Channel.put()", "timeout", lambda v: ch.put(1, timeout=v), timeout),
        Param("Channel.get()", "timeout", lambda v: ch.get(timeout=v), timeout),
        Param("Channel.put_many()", "timeout", lambda v: ch.put_many([1], timeout=v), timeout),
        Param("Channel.get_many()", "timeout", lambda v: ch.get_many(2, timeout=v), timeout),
        Param("Channel.get_many()", "max_items", ch.get_many, bad_count(1)),
        Param("Channel.wait_for_room()", "timeout", ch.wait_for_room, timeout),
        Param(
            "Channel.wait_for_room()", "least", lambda v: ch.wait_for_room(least=v), bad_count(1)
        ),
    ]


def _backoff_params() -> list[Param]:
    seconds = bad_seconds(zero=True, optional=False)
    return [
        Param("Backoff", "initial", lambda v: cv.Backoff(initial=v), seconds),
        Param("Backoff", "maximum", lambda v: cv.Backoff(maximum=v), seconds),
        Param(
            "Backoff",
            "multiplier",
            lambda v: cv.Backoff(multiplier=v),
            _as(RANGE, st.one_of(st.floats(max_value=0.999), st.just(math.nan), st.just(1e9)))
            | _as(TYPE, st.one_of(st.booleans(), WRONG_TYPES, st.none())),
        ),
        Param("Backoff", "jitter", lambda v: cv.Backoff(jitter=v), bad_flag()),
    ]


def _redis_params(url: str) -> list[Param]:
    options: dict[str, Bad] = {
        "run_id": bad_name() | _as(RANGE, st.sampled_from(["my run", "a\tb"])),
        "namespace": bad_name() | _as(TYPE, st.none()) | _as(RANGE, st.just("two words")),
        "codec": bad_choice(("msgpack", "json", "pickle")),
        "secret_key": _as(TYPE, st.one_of(st.integers(), st.just([])))
        | _as(RANGE, st.one_of(st.binary(max_size=15), st.text(max_size=3))),
        "batch_size": bad_count(1, 100_000),
        "visibility_timeout": bad_seconds(optional=False),
        "max_deliveries": bad_count(1),
        "limit": bad_count(1, optional=True),
        "reorder_window": bad_count(1, optional=True),
        "on_dead_letters": bad_choice(("raise", "wait")),
        "keep": bad_flag(),
        "unavailable_timeout": bad_seconds(),
        "local_workers": bad_flag(),
        "redis_options": _as(TYPE, st.one_of(st.integers(), st.just([]), st.text(max_size=3))),
    }
    params = [
        Param(
            "RedisBackend",
            "url",
            RedisBackend,
            _as(TYPE, st.one_of(st.integers(), st.none(), st.binary(max_size=3)))
            | _as(RANGE, st.sampled_from(["", "http://x", "localhost:6379", "REDIS://x"])),
        )
    ]
    for name, bad in options.items():

        def give(value: Any, name: str = name) -> object:
            return RedisBackend(url, **{name: value})

        params.append(Param("RedisBackend", name, give, bad))

    def budget(value: Any) -> object:
        return RedisBackend(url).run(_pipeline().map(abs), max_bytes=value)

    def budget_through_run(value: Any) -> object:
        return _pipeline().map(abs).run(backend=RedisBackend(url), max_bytes=value)

    bad_budget = bad_byte_size()
    params.append(Param("RedisBackend.run()", "max_bytes", budget, bad_budget))
    params.append(Param("run()", "max_bytes", budget_through_run, bad_budget))
    return params + _worker_params(url)


def _worker_params(url: str) -> list[Param]:
    """`conveyor.redis.Worker`: every argument checked before anything connects (its
    url, stages and workers were not: a bad one failed later, or said nothing)."""
    from conveyor.redis import Worker

    bad_url = _as(TYPE, st.one_of(st.integers(), st.none(), st.binary(max_size=3))) | _as(
        RANGE, st.sampled_from(["", "http://x", "localhost:6379"])
    )
    options: dict[str, Bad] = {
        "stages": _as(TYPE, st.one_of(st.just("abs"), st.integers(), st.just(object())))
        | _as(RANGE, st.sampled_from([["nope"], []])),
        "workers": _as(TYPE, st.one_of(st.text(max_size=3), st.just([]), st.floats()))
        | _as(RANGE, st.one_of(st.integers(max_value=0), st.just({"nope": 2}))),
        "namespace": bad_name() | _as(RANGE, st.just("two words")),
        "secret_key": _as(TYPE, st.one_of(st.integers(), st.just([])))
        | _as(RANGE, st.one_of(st.binary(max_size=15), st.text(max_size=3))),
        "unavailable_timeout": bad_seconds(),
        "redis_options": _as(TYPE, st.one_of(st.integers(), st.just([]), st.text(max_size=3))),
    }
    params = [
        Param("Worker", "url", lambda v: Worker(_pipeline().map(abs), v), bad_url),
        Param("Worker", "pipeline", lambda v: Worker(v, url), BAD_BACKEND),
    ]
    for name, bad in options.items():

        def give(value: Any, name: str = name) -> object:
            return Worker(_pipeline().map(abs), url, **{name: value})

        params.append(Param("Worker", name, give, bad))
    return params


# ---------------------------------------------------------------------- nothing started


@dataclass
class Started:
    """What a call may have started: threads, child processes, Redis connections and keys."""

    threads: frozenset[int]
    children: frozenset[int]
    connections: int
    keys: int


def _started(client: redis.Redis) -> Started:
    stats = client.info("stats")
    return Started(
        threads=frozenset(t.ident or 0 for t in threading.enumerate()),
        children=frozenset(p.pid or 0 for p in multiprocessing.active_children()),
        connections=int(stats["total_connections_received"]),
        keys=int(client.dbsize()),
    )


@pytest.fixture(scope="module")
def watcher(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """One long-lived client: counting connections opens none."""
    client = redis.Redis.from_url(redis_server.url)
    client.ping()
    yield client
    client.close()


def _all_params(url: str) -> list[Param]:
    return [
        *_stage_params(),
        *_run_params(),
        *_channel_params(),
        *_backoff_params(),
        *_redis_params(url),
    ]


def test_the_property_covers_every_parameter_of_the_public_signatures(
    redis_server: RedisServer,
) -> None:
    import inspect

    covered = {(p.where, p.name) for p in _all_params(redis_server.url)}
    from conveyor.redis import Worker

    for cls, where in ((RedisBackend, "RedisBackend"), (cv.Backoff, "Backoff"), (Worker, "Worker")):
        names = set(inspect.signature(cls).parameters)
        assert {n for n in names if (where, n) not in covered} == set(), where
    stage_keys = set(StageOptions.__optional_keys__)
    assert {n for n in stage_keys if ("map()", n) not in covered} == set()
    for method in ("run", "start", "arun"):
        names = set(inspect.signature(getattr(cv.Pipeline, method)).parameters) - {"self"}
        assert {n for n in names if (f"{method}()", n) not in covered} == set(), method


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_bad_value_of_any_public_parameter_is_refused_at_once_naming_it(
    redis_server: RedisServer, watcher: redis.Redis, data: st.DataObject
) -> None:
    param = data.draw(st.sampled_from(_all_params(redis_server.url)), label="parameter")
    value, error = data.draw(param.bad, label="value")
    before = _started(watcher)
    with pytest.raises((ValueError, TypeError)) as info:
        param.give(value)
    assert isinstance(info.value, cv.ConveyorError), repr(info.value)
    assert type(info.value) is error, f"{param}={value!r}: {info.value!r}"
    message = str(info.value)
    assert f"'{param.name}'" in message, message
    assert param.where.split(".")[0].split("(")[0] in message, message
    assert _started(watcher) == before


def test_a_bad_redis_backend_value_with_an_unreachable_url_fails_at_once() -> None:
    # At once: nothing tries to connect (which would retry for unavailable_timeout).
    start = time.perf_counter()
    for bad in ({"limit": -1}, {"limit": 0}, {"batch_size": 0}, {"visibility_timeout": math.inf}):
        with pytest.raises(cv.ConfigurationError, match=f"'{next(iter(bad))}'"):
            RedisBackend(UNREACHABLE, **bad)
    assert time.perf_counter() - start < 0.5


def test_a_redis_option_redis_py_does_not_take_is_refused_at_once_naming_it() -> None:
    # The repro: accepted, then every run failed with redis-py's bare "TypeError:
    # AbstractConnection.__init__() got an unexpected keyword argument 'socket_timout'".
    with pytest.raises(cv.ConfigurationTypeError) as info:
        RedisBackend(UNREACHABLE, redis_options={"socket_timout": 2})
    message = str(info.value)
    assert message.startswith("RedisBackend 'redis_options' must hold options of redis.Redis")
    assert "'socket_timout'" in message
    # Options of the connection and of its pool are taken; nothing connects.
    RedisBackend(UNREACHABLE, redis_options={"socket_timeout": 2, "max_connections": 8})


# ---------------------------------------------------------------------- regressions from issue 13


def test_redis_limit_minus_one_is_refused_instead_of_a_run_that_hangs() -> None:
    # Was accepted; the driver then waited for ever for the backlog to go under -1.
    with pytest.raises(
        cv.ConfigurationError, match=r"RedisBackend 'limit' must be an int >= 1, got -1"
    ):
        RedisBackend(UNREACHABLE, limit=-1)


def test_redis_limit_zero_is_refused_instead_of_silently_meaning_the_default() -> None:
    with pytest.raises(cv.ConfigurationError, match=r"'limit' must be an int >= 1, got 0"):
        RedisBackend(UNREACHABLE, limit=0)
    assert RedisBackend(UNREACHABLE, limit=None).limit is None  # the default stays None


@pytest.mark.parametrize("timeout", [math.inf, 1e12])
def test_an_infinite_or_huge_timeout_is_refused_at_construction_naming_it(timeout: float) -> None:
    # Was accepted, then failed at run time with an OverflowError that did not name it.
    with pytest.raises(cv.ConfigurationError, match=r"map\(\) 'timeout' must be a positive number"):
        cv.Pipeline(range(3)).map(abs, timeout=timeout)
    assert cv.Pipeline(range(3)).map(abs, timeout=MAX_SECONDS).stages[0].timeout == MAX_SECONDS


def test_ten_million_workers_are_refused_with_the_documented_maximum() -> None:
    with pytest.raises(cv.ConfigurationError, match=str(MAX_TASKS)):
        cv.Pipeline(range(3)).map(abs, workers=10**7)


@pytest.mark.parametrize("runtime", ["thread", "process"])
def test_more_workers_than_a_thread_or_process_stage_may_have_is_refused(runtime: str) -> None:
    with pytest.raises(cv.ConfigurationError, match=rf"'workers' must be at most {MAX_WORKERS}"):
        cv.Pipeline(range(3)).map(abs, workers=MAX_WORKERS + 1, runtime=runtime)  # type: ignore[call-overload]
    p = cv.Pipeline(range(3)).map(abs, workers=2)
    with pytest.raises(cv.ConfigurationError, match="'workers' must be at most"):
        p.with_stage("abs", workers=MAX_WORKERS + 1)


def test_zero_workers_on_a_process_stage_names_the_limit_of_its_runtime() -> None:
    # Repro: "must be an int from 1 to 100000, got 0", where a process stage takes 1024.
    with pytest.raises(
        cv.ConfigurationError, match=rf"at most {MAX_WORKERS} unless runtime='async'"
    ):
        cv.Pipeline(range(3)).map(abs, workers=0, runtime="process")


def test_an_async_stage_may_have_more_workers_than_a_thread_stage() -> None:
    async def double(x: int) -> int:
        return 2 * x

    stage = cv.Pipeline(range(3)).map(double, runtime="async", workers=MAX_WORKERS * 2).stages[0]
    assert stage.workers == MAX_WORKERS * 2


def test_max_items_per_worker_with_the_async_runtime_is_refused() -> None:
    async def double(x: int) -> int:
        return 2 * x

    with pytest.raises(cv.ConfigurationError, match="'max_items_per_worker' applies to"):
        cv.Pipeline(range(3)).map(double, runtime="async", max_items_per_worker=5)


@pytest.mark.parametrize("hook", ["on_start", "on_stop"])
@pytest.mark.parametrize("runtime", ["thread", "process"])
def test_an_async_hook_on_a_stage_that_is_not_async_is_refused_naming_the_hook(
    runtime: str, hook: str
) -> None:
    # The repro: map(f, on_start=<async def>) on threads or processes ran the
    # hook without awaiting it, so cv.worker_state() returned a coroutine object
    # (and Python warned "coroutine ... was never awaited" at exit).
    async def connect(*state: Any) -> int:
        return 5

    refused = rf"map\(\) stage 'abs': '{hook}' is a coroutine function"
    with pytest.raises(cv.ConfigurationError, match=refused):
        cv.Pipeline(range(3)).map(abs, runtime=runtime, **{hook: connect})  # type: ignore[call-overload]
    plain = cv.Pipeline(range(3)).map(abs, runtime=runtime)  # type: ignore[call-overload]
    with pytest.raises(cv.ConfigurationError, match=f"'{hook}' is a coroutine"):
        plain.with_stage("abs", **{hook: connect})


def test_an_async_hook_on_an_async_stage_is_awaited() -> None:
    async def connect() -> int:
        return 5

    async def with_state(x: int) -> tuple[int, Any]:
        return x, cv.worker_state()

    pipeline = cv.Pipeline(range(2)).map(with_state, runtime="async", on_start=connect)
    assert list(pipeline) == [(0, 5), (1, 5)]


def test_a_generator_function_given_as_the_source_is_refused_with_a_hint_to_call_it() -> None:
    # The repro: Pipeline(numbers) for Pipeline(numbers()) said only "got function".
    def numbers() -> Iterator[int]:
        yield 1

    hinted = r"got function; call it: Pipeline\(numbers\(\)\)"
    with pytest.raises(cv.ConfigurationTypeError, match=hinted):
        cv.Pipeline(numbers)  # type: ignore[arg-type]
    with pytest.raises(cv.ConfigurationTypeError, match=r"got NoneType$"):
        cv.Pipeline(None)  # type: ignore[arg-type]


def test_with_stage_refuses_an_option_the_stage_does_not_have() -> None:
    p = cv.Pipeline(range(3)).map(abs).batch(2)
    with pytest.raises(TypeError, match=r"with_stage.*'workres'.*did you mean 'workers'"):
        p.with_stage("abs", workres=2)
    with pytest.raises(TypeError, match="'retries'"):
        p.with_stage("batch", retries=2)
    with pytest.raises(cv.ConfigurationError, match="'name': no stage named 'nope'"):
        p.with_stage("nope", workers=2)
    assert p.with_stage("batch", batch_size=5).stages[1].batch_size == 5


def test_with_stage_renames_a_stage_and_refuses_a_name_already_used() -> None:
    # Repro: with_stage("abs", name="absolute") raised "got multiple values for
    # argument 'name'", the method's own parameter, so no stage could be renamed.
    p = cv.Pipeline(range(3)).map(abs).map(str, name="text")
    renamed = p.with_stage("abs", name="absolute", workers=2)
    assert [(s.name, s.workers) for s in renamed.stages] == [("absolute", 2), ("text", 1)]
    assert renamed.run(collect=True).outputs == ["0", "1", "2"]
    with pytest.raises(cv.ConfigurationError, match="stage name 'text' is already used"):
        p.with_stage("abs", name="text")
    with pytest.raises(cv.ConfigurationTypeError, match=r"with_stage\('abs'\) 'name'"):
        p.with_stage("abs", name="")


def test_backoff_delay_after_many_retries_is_the_cap_not_an_overflow() -> None:
    backoff = cv.Backoff(initial=0.1, maximum=2.0, multiplier=2.0, jitter=False)
    assert backoff.delay(5000) == 2.0


# ---------------------------------------------------------------------- combinations on Redis


def _connections(client: redis.Redis) -> int:
    return int(client.info("stats")["total_connections_received"])


def test_a_redis_limit_below_a_batch_size_is_refused_before_connecting(
    redis_server: RedisServer, watcher: redis.Redis
) -> None:
    # A batch stage holds its input entries until its group is full; with a smaller
    # limit the stream upstream stays "full" and the run stopped moving for good.
    pipeline = cv.Pipeline(range(300)).map(abs).batch(50)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), limit=10)
    before = (_connections(watcher), watcher.dbsize())
    for call in (
        lambda: pipeline.run(backend=backend),
        lambda: pipeline.start(backend=backend),
        lambda: list(pipeline.iterate(backend=backend)),
        lambda: asyncio.run(pipeline.arun(backend=backend)),
    ):
        with pytest.raises(
            cv.ConfigurationError, match=r"'limit' \(10\) is below the size of batch"
        ):
            call()
    assert (_connections(watcher), watcher.dbsize()) == before


def test_a_batch_stage_on_redis_whose_capacity_is_below_its_size_runs_to_the_end(
    redis_server: RedisServer,
) -> None:
    # The default limit of a stream is the capacity of the stage it feeds; for a
    # batch stage it is now at least its size (it used to stop moving).
    pipeline = cv.Pipeline(range(300)).map(abs, capacity=10).batch(50, capacity=10)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    with pipeline.start(backend=backend, collect=True) as handle:
        outputs = handle.join(timeout=30).outputs or []
    assert sorted(x for group in outputs for x in group) == list(range(300))
    assert [len(group) for group in outputs] == [50] * 6


def test_a_stage_timeout_longer_than_the_visibility_timeout_is_refused_before_connecting() -> None:
    # The repro: map(slow, timeout=10) on RedisBackend(visibility_timeout=5) let a call
    # run its 10 s while its entry was taken over after 5 s, run again elsewhere, and
    # dead-lettered after max_deliveries ("no error recorded"), however healthy.
    pipeline = cv.Pipeline(range(3)).map(abs, timeout=10.0, name="slow")
    backend = RedisBackend(UNREACHABLE, visibility_timeout=5.0)
    refused = r"stage 'slow' 'timeout' \(10.0 s\) is longer than RedisBackend 'visibility_t"
    with pytest.raises(cv.ConfigurationError, match=refused):
        pipeline.run(backend=backend)
    RedisBackend(UNREACHABLE, visibility_timeout=10.0).check(pipeline)


def test_a_redis_limit_below_a_batch_size_with_an_interval_is_accepted() -> None:
    pipeline = cv.Pipeline(range(3)).map(abs).batch(50, interval=0.05)
    RedisBackend(UNREACHABLE, limit=10).check(pipeline)  # a partial group goes on in time


def test_unreachable_port_is_really_unreachable() -> None:
    # The URL above must refuse connections, or the "fails at once" tests prove nothing.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", 1), timeout=1):
        pass


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda h: h.join(timeout=math.inf), cv.ConfigurationError, "timeout"),
        (lambda h: h.join(timeout=-1), cv.ConfigurationError, "timeout"),
        (lambda h: h.join(timeout="1"), cv.ConfigurationTypeError, "timeout"),
        (lambda h: h.stop(drain="yes"), cv.ConfigurationTypeError, "drain"),
    ],
)
def test_a_run_handle_refuses_a_bad_value_and_the_run_goes_on(
    call: Callable[[cv.RunHandle], object], error: type[Exception], name: str
) -> None:
    # join(timeout=inf) used to raise OverflowError from the Event's wait.
    gate = threading.Event()

    def wait_for_gate(x: int) -> int:
        gate.wait(30)
        return x

    with cv.Pipeline(range(3)).map(wait_for_gate).start(collect=True) as handle:
        with pytest.raises(error, match=f"RunHandle.*'{name}'"):
            call(handle)
        assert not handle.done()
        gate.set()
        assert handle.join(timeout=30).outputs == [0, 1, 2]


# ---------------------------------------------------------------------- found trying it out


def test_a_worker_refuses_a_worker_count_for_a_stage_it_does_not_serve() -> None:
    """``workers={"nope": 2}`` (``conveyor worker --workers nope=2``) was ignored without a
    word: the stage kept its own count. Refused before connecting."""
    from conveyor.redis import Worker

    pipeline = cv.Pipeline(range(3)).map(str, name="show").map(len, name="size")
    with pytest.raises(cv.ConfigurationError, match="'workers': no stage named 'shwo'"):
        Worker(pipeline, UNREACHABLE, workers={"shwo": 2})
    with pytest.raises(cv.ConfigurationError, match="served stages: 'size'"):
        Worker(pipeline, UNREACHABLE, stages=["size"], workers={"show": 2})
    with pytest.raises(cv.ConfigurationError, match="'stages': no stage named 'nope'"):
        Worker(pipeline, UNREACHABLE, stages=["nope"])


def test_a_worker_refuses_an_empty_list_of_stages_and_a_short_secret_key_at_once() -> None:
    """``stages=[]`` served every stage; ``secret_key="short"`` was taken, and the worker
    then refused each run of the pickle codec (the driver's run failed with "does not
    have the secret key"), where `RedisBackend` refuses a key under 16 bytes."""
    from conveyor.redis import Worker

    pipeline = cv.Pipeline(range(3)).map(str, name="show")
    with pytest.raises(cv.ConfigurationError) as empty:
        Worker(pipeline, UNREACHABLE, stages=[])
    assert str(empty.value) == (
        "Worker 'stages' is empty: give the names of the stages to serve, "
        "or None for every stage ('show')"
    )
    for make in (
        lambda: Worker(pipeline, UNREACHABLE, secret_key="short"),
        lambda: RedisBackend(UNREACHABLE, secret_key=b"short"),
    ):
        with pytest.raises(cv.ConfigurationError, match="'secret_key' must be at least 16 bytes"):
            make()


def test_a_bad_backoff_names_the_method_once() -> None:
    with pytest.raises(cv.ConfigurationTypeError) as info:
        cv.Pipeline([1]).map(str, backoff=3)  # type: ignore[arg-type]
    assert str(info.value) == "map() 'backoff' must be a conveyor.Backoff, got int"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("bad", "error", "got"),
    [
        (-1, cv.ConfigurationError, "got -1"),
        (0, cv.ConfigurationError, "got 0"),
        (True, cv.ConfigurationTypeError, "got bool True"),
        (1.5, cv.ConfigurationTypeError, "got float 1.5"),
        ("3", cv.ConfigurationTypeError, "got str '3'"),
    ],
)
@pytest.mark.parametrize(
    ("build", "where"),
    [
        (lambda c: cv.Pipeline(range(3)).map(str, name="dbl", capacity=c), "map() stage 'dbl'"),
        (lambda c: cv.Pipeline(range(3)).batch(2, name="dbl", capacity=c), "batch() stage 'dbl'"),
        (
            lambda c: cv.Pipeline(range(3)).each(print, name="dbl").with_stage("dbl", capacity=c),
            "with_stage('dbl') stage 'dbl'",
        ),
    ],
)
def test_a_bad_capacity_names_the_stage_the_parameter_and_what_is_accepted(
    build: Callable[[object], object], where: str, bad: object, error: type[Exception], got: str
) -> None:
    # The repro: capacity=-1 said "map() 'capacity' must be an int >= 1", naming no
    # stage; each place that takes a capacity checked it on its own.
    with pytest.raises(error) as info:
        build(bad)
    assert str(info.value) == (
        f"{where}: 'capacity' must be an int >= 1 (the number of items the channel in "
        f"front of the stage holds), {got}"
    )
