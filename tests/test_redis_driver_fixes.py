"""Regression tests of the Redis driver: each one is the repro of a defect it once had."""

from __future__ import annotations

import inspect
import threading
from typing import TYPE_CHECKING, Any

import pytest
import redis

import conveyor as cv
import conveyor.errors
import conveyor.redis
import conveyor.redis.backend
from conveyor.redis import RedisBackend
from conveyor.redis.streams import DRIVER_GROUP, Keys, Scripts, pipeline_id
from redis_helpers import WAIT, new_namespace, wait_until

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


# ---------------------------------------------------------------------- where errors live


def test_the_redis_errors_live_in_conveyor_errors_and_are_re_exported() -> None:
    for name in ("DeadLettersError", "RemoteError", "RunStateLost"):
        cls = getattr(conveyor.errors, name)
        assert cls.__module__ == "conveyor.errors"
        assert getattr(conveyor.redis, name) is cls
    assert cv.DeadLettersError is conveyor.errors.DeadLettersError
    assert cv.RunStateLost is conveyor.errors.RunStateLost
    assert issubclass(cv.RunStateLost, cv.BackendError)
    assert issubclass(cv.DeadLettersError, cv.BackendError)


def test_no_exception_class_is_defined_in_the_driver_and_every_one_is_in_the_tree() -> None:
    defined_here = [
        name
        for name, obj in vars(conveyor.redis.backend).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == conveyor.redis.backend.__name__
    ]
    assert defined_here == []
    tree = conveyor.errors.__doc__ or ""
    for name, obj in vars(conveyor.errors).items():
        if inspect.isclass(obj) and obj.__module__ == "conveyor.errors":
            assert f"+-- {name} " in tree, name
            assert (obj.__doc__ or "").strip(), name


# ---------------------------------------------------------------------- fixture helpers


@pytest.fixture
def namespace() -> str:
    return new_namespace()


def _keys(pipeline: cv.Pipeline[Any], namespace: str, run_id: str) -> Keys:
    return Keys(namespace, pipeline_id(pipeline.stages), run_id)


def _counters(url: str, keys: Keys) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    try:
        return {k.decode(): int(v) for k, v in client.hgetall(keys.counters).items()}
    finally:
        client.close()


# ---------------------------------------------------------------------- 1. unpack limit


def test_the_ack_script_takes_ten_thousand_ids_at_once(
    redis_server: RedisServer, namespace: str
) -> None:
    # Lua's unpack() overflows past about 8000 values: one XACK with every id failed.
    keys = Keys(namespace, "p", "r")
    final = keys.stream(1)
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.xgroup_create(final, DRIVER_GROUP, id="0", mkstream=True)
        pipe = client.pipeline(transaction=False)
        for i in range(10_000):
            pipe.xadd(final, {"d": str(i)})
        pipe.execute()
        reply = client.xreadgroup(DRIVER_GROUP, "driver", {final: ">"}, count=20_000)
        ids = [entry_id for entry_id, _ in reply[0][1]]
        assert len(ids) == 10_000
        acked = Scripts(client).ack(keys=[final, keys.counters], args=[DRIVER_GROUP, "", *ids])
        assert acked == 10_000
        assert client.hget(keys.counters, "delivered") == b"10000"
        assert client.xpending(final, DRIVER_GROUP)["pending"] == 0
    finally:
        client.delete(final, keys.counters)
        client.close()


def test_an_ordered_run_whose_first_item_is_slow_releases_thousands_at_once_and_finishes(
    redis_server: RedisServer, namespace: str
) -> None:
    # The repro: item 0 slow, the others done meanwhile; once 0 is done, the
    # driver released (and acknowledged) every held output in one script call.
    n = 9_000
    release = threading.Event()

    def slow_first(x: int) -> int:
        if x == 0:
            assert release.wait(WAIT)
        return x

    pipeline = cv.Pipeline(range(n)).map(slow_first, workers=4)
    backend = RedisBackend(
        redis_server.url,
        namespace=namespace,
        run_id="slow-head",
        local_workers=True,
        reorder_window=n + 1000,
    )
    keys = _keys(pipeline, namespace, "slow-head")
    results: list[cv.RunResult] = []
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            results.append(pipeline.run(collect=True, backend=backend))
        except BaseException as exc:
            errors.append(exc)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        wait_until(
            lambda: _counters(redis_server.url, keys).get("out:0", 0) >= n - 1,
            "every item but the first to be processed",
        )
    finally:
        release.set()
    driver.join(WAIT)
    assert not driver.is_alive()
    assert not errors, errors
    assert results[0].outputs == list(range(n))
