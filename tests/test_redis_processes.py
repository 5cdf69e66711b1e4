"""Real worker processes: the outputs of one machine, and nothing lost or doubled by kill -9."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import pytest
import redis

import conveyor as cv
from conveyor.redis import RedisBackend, RedisRunResult
from conveyor.redis.streams import WORKER_GROUP, Keys, pipeline_id
from redis_helpers import (
    GATE_ENV,
    GATE_FILE_ENV,
    HELD_IN_PACK,
    WorkerProcess,
    new_namespace,
    packed_and_held,
    slow_stages,
    spread,
    three_stages,
    two_processes,
    wait_until,
    worker_logs,
    worker_processes,
)

if TYPE_CHECKING:
    from conftest import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def test_three_worker_processes_give_the_outputs_of_a_single_machine_run(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    pipeline = three_stages(20_000)
    expected = pipeline.run(collect=True).outputs
    namespace = new_namespace()
    with worker_processes("redis_helpers:three_stages", redis_server.url, namespace, 3, tmp_path):
        result = pipeline.run(
            collect=True, backend=RedisBackend(redis_server.url, namespace=namespace)
        )
    assert result.outputs == expected, worker_logs(tmp_path)
    assert [s.items_in for s in result.stats] == [20_000, 20_000, 15_000]
    assert result.stats[1].filtered == 5_000
    assert result.items_out == len(expected)
    # The run cleans up after itself: no key of it is left.
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.keys(f"{namespace}:*") == []


def test_workers_killed_mid_batch_lose_nothing_and_duplicate_nothing(
    redis_server: RedisServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    n = 4000
    pipeline = slow_stages(n)
    expected = Counter(x for i in range(n) for x in spread(i * 3))
    namespace = new_namespace()
    backend = RedisBackend(
        redis_server.url, namespace=namespace, visibility_timeout=1.0, max_deliveries=50
    )
    client = redis.Redis.from_url(redis_server.url)
    request.addfinalizer(client.close)
    rng = random.Random(7)
    with worker_processes(
        "redis_helpers:slow_stages", redis_server.url, namespace, 3, tmp_path
    ) as workers:
        handle = _start_in_thread(pipeline, backend)
        kills = 0
        for round_ in range(1, 6):
            # Kill once the work stage has moved on by another sixth of the items:
            # with ~0.3 ms per item and batches of up to 100, a kill lands mid-batch.
            wait_until(
                lambda r=round_: _acked(client, namespace, 0) >= r * n // 7,
                f"progress before kill {round_}",
            )
            victim = workers.pop(rng.randrange(len(workers)))
            victim.kill()
            kills += 1
            workers.append(
                type(victim)(
                    "redis_helpers:slow_stages",
                    redis_server.url,
                    namespace,
                    tmp_path / f"replacement-{round_}.log",
                )
            )
        result = handle.join()
    assert kills == 5
    assert isinstance(result, RedisRunResult)
    assert Counter(result.outputs) == expected, worker_logs(tmp_path)
    assert result.redelivered["work"] > 0  # the killed workers' entries ran again
    assert "re-executions after a worker died or failed: work: " in result.report()
    assert json.loads(result.to_json())["redis"]["redelivered"] == result.redelivered
    assert result.stats[0].items_in == n


def test_a_worker_killed_holding_a_packed_entry_loses_and_duplicates_none_of_its_items(
    redis_server: RedisServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker holds a pack whose items before the held one are done in its memory,
    # not handed on; it is killed (kill -9). Another worker takes the pack over after
    # the visibility timeout and splits it, one entry per item: every item runs again
    # and its outputs are added once.
    monkeypatch.setenv(GATE_FILE_ENV, str(tmp_path / "gate"))
    n = 3000
    pipeline = packed_and_held(n)
    expected = Counter(x for i in range(n) for x in spread(i * 3))
    namespace, run_id = new_namespace(), "killed-pack"
    backend = RedisBackend(
        redis_server.url,
        namespace=namespace,
        run_id=run_id,
        visibility_timeout=1.0,
        max_deliveries=5,
    )
    keys = Keys(namespace, pipeline_id(pipeline.stages), run_id)
    client = redis.Redis.from_url(redis_server.url)
    request.addfinalizer(client.close)
    target = "redis_helpers:packed_and_held"
    with worker_processes(target, redis_server.url, namespace, 1, tmp_path) as workers:
        handle = _start_in_thread(pipeline, backend)
        size = wait_until(lambda: _held_pack(client, keys), "the held item's pack in hand")
        assert size >= 2
        workers.pop().kill()
        workers.append(
            WorkerProcess(target, redis_server.url, namespace, tmp_path / "replacement.log")
        )
        (tmp_path / "gate").touch()
        result = handle.join()
    assert isinstance(result, RedisRunResult)
    assert Counter(result.outputs) == expected, worker_logs(tmp_path)
    assert result.redelivered["work"] >= size  # the pack's items, each delivered again
    assert result.stats[0].items_in == n


def _held_pack(client: redis.Redis, keys: Keys) -> int:
    """How many items the pending pack holding `HELD_IN_PACK` carries (0: none yet)."""
    stream = keys.stream(0)
    try:
        held = client.xpending_range(stream, WORKER_GROUP, "-", "+", 100)
    except redis.ResponseError:  # NOGROUP: the driver has not made the run's streams yet
        return 0
    for pending in held:
        entry_id = pending["message_id"]
        for _, fields in client.xrange(stream, entry_id, entry_id):
            if b"p" in fields:
                items = msgpack.unpackb(fields[b"p"])
                if any(path == [HELD_IN_PACK] for _, path in items):
                    return len(items)
    return 0


def _acked(client: redis.Redis, namespace: str, stage: int) -> int:
    for key in client.scan_iter(f"{namespace}:*:counters"):
        return int(client.hget(key, f"in:{stage}") or 0)
    return 0


class _Background:
    """A driver running in a thread, whose result (or error) `join` returns."""

    def __init__(self, pipeline: cv.Pipeline[int], backend: RedisBackend) -> None:
        import threading

        self.result: cv.RunResult | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(pipeline, backend), daemon=True)
        self._thread.start()

    def _run(self, pipeline: cv.Pipeline[int], backend: RedisBackend) -> None:
        try:
            self.result = pipeline.run(collect=True, backend=backend)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 90.0) -> cv.RunResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the driver did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _start_in_thread(pipeline: cv.Pipeline[int], backend: RedisBackend) -> _Background:
    return _Background(pipeline, backend)


def test_a_runs_report_counts_the_workers_that_served_it_in_every_process(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The repro: the report's workers column gave the stage's own setting (1), not the
    # two worker processes that served it.
    namespace = new_namespace()
    monkeypatch.setenv(GATE_ENV, f"{redis_server.url} {namespace}:meet")
    target = "redis_helpers:two_processes"
    with worker_processes(target, redis_server.url, namespace, 2, tmp_path):
        backend = RedisBackend(redis_server.url, namespace=namespace, batch_size=1)
        result = two_processes().run(backend=backend)
    assert result.stats[0].items_in == 40, worker_logs(tmp_path)
    assert result.stats[0].workers == 2
