"""A batch stage on Redis: one consumer makes the groups, and a take-over changes none.

The groups themselves, on every runtime, are checked by the contract suite
(tests/contract); these tests check what only Redis has: a batch worker
killed with entries in hand, several workers serving the batch stage, dead
letters in front of a batch stage.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

import conveyor as cv
from conveyor.errors import DeadLettersError
from conveyor.redis import RedisBackend, RedisRunResult, Worker
from conveyor.redis.dlq import move_dead
from conveyor.redis.state import RunInfo
from redis_helpers import (
    GATE_FILE_ENV,
    WAIT,
    gated_batches,
    keep,
    members,
    new_namespace,
    plain_groups,
    spread,
    triple,
    wait_until,
    worker_logs,
    worker_processes,
)

if TYPE_CHECKING:
    from conftest import RedisServer, RedisServerFactory

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def _counters(client: redis.Redis, namespace: str) -> dict[bytes, bytes]:
    for key in client.scan_iter(f"{namespace}:*:counters"):
        return client.hgetall(key)  # type: ignore[return-value]
    return {}


def _pending(client: redis.Redis, namespace: str, stage: int) -> int:
    for key in client.scan_iter(f"{namespace}:*:s{stage}"):
        return int(client.xpending(key, "workers")["pending"])
    return 0


def test_a_batch_worker_killed_mid_run_is_replaced_and_the_groups_stay_the_same(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Item 100 is held up in the first stage (with the items of its batch there):
    # the batch stage has handed on groups before it, may hold a group in the
    # making, and holds the entries that came after, behind the missing places.
    # Its worker is killed then (kill -9); a new one takes the lease over, claims
    # what the killed one held, starts at its cursor: the groups are the same.
    gate = tmp_path / "gate"
    monkeypatch.setenv(GATE_FILE_ENV, str(gate))
    n = 2000
    namespace = new_namespace()
    url = redis_server.url
    backend = RedisBackend(url, namespace=namespace, visibility_timeout=1.0, max_deliveries=100)
    client = redis.Redis.from_url(url)
    try:
        with worker_processes(
            "redis_helpers:gated_batches",
            url,
            namespace,
            1,
            tmp_path,
            *("--stage", "work", "--stage", "keep", "--stage", "out"),
        ) as workers:
            batcher = type(workers[0])(
                "redis_helpers:gated_batches",
                url,
                namespace,
                tmp_path / "group-1.log",
                *("--stage", "group"),
            )
            workers.append(batcher)
            driver = gated_batches(n).start(collect=True, backend=backend)
            wait_until(
                lambda: int(_counters(client, namespace).get(b"in:2", 0)) >= 14,
                "groups before the held-up item",
            )
            wait_until(lambda: _pending(client, namespace, 2) >= 30, "entries held behind the gap")
            batcher.kill()
            workers.remove(batcher)
            workers.append(
                type(batcher)(
                    "redis_helpers:gated_batches",
                    url,
                    namespace,
                    tmp_path / "group-2.log",
                    *("--stage", "group"),
                )
            )
            gate.touch()
            result = driver.join(90.0)
    finally:
        client.close()
    assert result.outputs == plain_groups(n), worker_logs(tmp_path)
    assert isinstance(result, RedisRunResult)
    # The new holder claimed what the killed one held: delivered a second time.
    assert result.redelivered["group"] >= 30
    assert result.stale["group"] == 0
    assert result.stats[2].items_in == sum(map(len, plain_groups(n)))  # not the places left empty


def test_two_workers_serving_a_batch_stage_one_makes_the_groups_nothing_twice(
    redis_server: RedisServer,
) -> None:
    n = 3000
    pipeline = (
        cv.Pipeline(range(n))
        .map(triple, workers=2)
        .filter(keep, workers=2)
        .flat_map(spread, workers=2)
        .batch(5)
        .map(members, workers=2)
    )
    flat = [y for x in range(n) if keep(triple(x)) for y in spread(triple(x))]
    namespace = new_namespace()
    with (
        Worker(pipeline, redis_server.url, namespace=namespace) as first,
        Worker(pipeline, redis_server.url, namespace=namespace) as second,
    ):
        result = pipeline.run(
            collect=True, backend=RedisBackend(redis_server.url, namespace=namespace)
        )
        made = sorted(w.stats()[3].items_in for w in (first, second))
    assert result.outputs == [flat[i : i + 5] for i in range(0, len(flat), 5)]
    assert made == [0, len(flat)]  # one worker took every item into its groups
    assert isinstance(result, RedisRunResult)
    assert result.stale["batch"] == 0
    assert result.redelivered["batch"] == 0


def test_a_dead_letter_before_a_batch_stage_stops_the_run_and_a_replay_ends_it_as_plain_groups(
    redis_server: RedisServer,
) -> None:
    # The batch stage holds the entries after the dead letter's place: the run is
    # stalled (not running for ever), and once the item is replayed the groups are
    # those of a plain loop.
    fixed = threading.Event()

    def fragile(x: int) -> int:
        if x == 13 and not fixed.is_set():
            raise ValueError(f"cannot handle {x}")
        return x

    pipeline = cv.Pipeline(range(40)).map(fragile, name="fragile").batch(6).map(members)
    namespace = new_namespace()

    def backend() -> RedisBackend:
        return RedisBackend(
            redis_server.url,
            namespace=namespace,
            run_id="dead-before-batch",
            # An item that raises is redelivered at once: dead on its third delivery.
            visibility_timeout=2.0,
            max_deliveries=2,
            local_workers=True,
        )

    with pytest.raises(DeadLettersError) as caught:
        pipeline.run(collect=True, backend=backend())
    assert caught.value.dead == {"fragile": 1}
    fixed.set()
    keys = backend().keys(pipeline, "dead-before-batch")
    with redis.Redis.from_url(redis_server.url) as client:
        info = RunInfo.from_meta(keys, client.hgetall(keys.meta))
        assert move_dead(client, info, "replay") == 1
    outputs = pipeline.run(collect=True, backend=backend()).outputs or []
    plain = [list(range(i, min(i + 6, 40))) for i in range(0, 40, 6)]
    # The groups after the dead letter come now; the first run gave those before it
    # (and may give them again here: outputs reach the caller at least once).
    assert outputs[-5:] == plain[2:]
    assert all(group in plain for group in outputs)


@pytest.mark.parametrize("loss", ["restart", "flushall", "cancel"])
def test_a_group_in_the_making_of_a_run_redis_lost_never_goes_into_the_next_run(
    redis_server_factory: RedisServerFactory, loss: str
) -> None:
    # The repro: a long-lived worker's batch stage held 3 items of a run, a group in
    # the making, when Redis restarted without persistence; the next run's first
    # group was those 3 items and 4 of its own (an output of 687 groups for 686).
    server = redis_server_factory()  # no persistence
    namespace = new_namespace()
    release = threading.Event()

    def three_then_held() -> Iterator[int]:
        yield from (100, 101, 102)
        release.wait(WAIT)

    served = cv.Pipeline[int]([]).batch(7)
    with Worker(served, server.url, namespace=namespace) as worker:
        vanishing = cv.Pipeline(three_then_held()).batch(7)
        handle = vanishing.start(
            backend=RedisBackend(server.url, namespace=namespace, run_id="vanishing")
        )
        try:
            wait_until(lambda: worker.stats()[0].items_in == 3, "the group's first 3 items")
            if loss == "restart":
                server.stop()
                server.start()
            elif loss == "flushall":
                server.flushall()
            else:
                RedisBackend(server.url, namespace=namespace).cancel(vanishing, "vanishing")
        finally:
            release.set()
        with pytest.raises(cv.RunStateLost):
            handle.join(WAIT)
        result = (
            cv.Pipeline(range(14))
            .batch(7)
            .run(collect=True, backend=RedisBackend(server.url, namespace=namespace))
        )
    assert result.outputs == [list(range(7)), list(range(7, 14))]
