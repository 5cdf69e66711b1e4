"""The Redis backend's semantics against a real redis-server, with workers in this process."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conveyor as cv
from conveyor.cli import cli
from conveyor.redis import DeadLettersError, RedisBackend, RedisRunResult, Worker
from conveyor.redis.codec import get_codec
from conveyor.redis.streams import Keys, pipeline_id
from redis_helpers import (
    POISON,
    new_namespace,
    poisoned,
    refuse,
    three_stages,
    triple,
    wait_until,
)

if TYPE_CHECKING:
    from conftest import RedisServer, RedisServerFactory

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

SECRET = b"a secret key of the test, 32 b.."


@contextmanager
def serving(pipeline: cv.Pipeline[Any], url: str, namespace: str, **kw: Any) -> Iterator[Worker]:
    """Workers for ``pipeline`` in threads of this process, stopped at the end."""
    worker = Worker(pipeline, url, namespace=namespace, **kw).start()
    try:
        yield worker
    finally:
        worker.stop()
        worker.join(30.0)


class Unserved:
    """A run driven from a thread of this process, no worker serving it until `finish`."""

    def __init__(
        self, pipeline: cv.Pipeline[Any], url: str, run_id: str, client: redis.Redis
    ) -> None:
        self.pipeline, self.url, self.client = pipeline, url, client
        self.namespace = new_namespace()
        self.keys = Keys(self.namespace, pipeline_id(pipeline.stages), run_id)
        backend = RedisBackend(url, namespace=self.namespace, run_id=run_id)
        self.results: list[cv.RunResult] = []
        self.driver = threading.Thread(
            target=lambda: self.results.append(pipeline.run(collect=True, backend=backend)),
            daemon=True,
        )
        self.driver.start()

    def fed(self) -> int:
        """Source items the feeder has added so far."""
        return int(self.client.hget(self.keys.counters, "fed") or 0)

    def finish(self) -> cv.RunResult:
        """Serve the run with workers until it ends; its result."""
        with serving(self.pipeline, self.url, self.namespace):
            self.driver.join(60.0)
        return self.results[0]


@contextmanager
def redis_client(url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client for looking at what the backend wrote."""
    client = redis.Redis.from_url(url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """``closing(x)`` returns x and closes it at the end of the test (clients, backends)."""
    things: list[Any] = []

    def add(thing: Any) -> Any:
        things.append(thing)
        return thing

    yield add
    for thing in things:
        thing.close()


def counters(url: str, pipeline: cv.Pipeline[Any], namespace: str, run_id: str) -> dict[str, int]:
    keys = Keys(namespace, pipeline_id(pipeline.stages), run_id)
    with redis_client(url) as client:
        raw = client.hgetall(keys.counters)
    return {k.decode(): int(v) for k, v in raw.items()}


# ---------------------------------------------------------------------- plain runs


def test_a_run_through_redis_reports_no_redelivery_when_nothing_failed(
    redis_server: RedisServer,
) -> None:
    # Stays outside the contract suite: the result's redelivery counts are the Redis
    # backend's own (RedisRunResult). The contract suite checks the outputs of every
    # stage kind against the plain-Python loop on every runtime x backend.
    pipeline = three_stages(3000)
    namespace = new_namespace()
    backend = RedisBackend(redis_server.url, namespace=namespace, local_workers=True)
    result = pipeline.run(collect=True, backend=backend)
    assert isinstance(result, RedisRunResult)
    assert result.redelivered == {"triple": 0, "keep": 0, "spread": 0}


def test_a_redis_runs_report_shows_no_per_item_latency_it_did_not_measure(
    redis_server: RedisServer,
) -> None:
    # The repro: the report's p50 and p99 read "0" on Redis, whose workers time
    # batches, not items: they read "-", and the stats say None.
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    result = cv.Pipeline(range(50)).map(triple).run(backend=backend)
    [stats] = result.stats
    assert (stats.latency_p50, stats.latency_p99) == (None, None)
    assert stats.as_dict()["latency_p50"] is None
    header, row = result.report().splitlines()[1:4:2]
    cells = dict(zip(header.split(), row.split(), strict=True))
    assert (cells["p50"], cells["p99"]) == ("-", "-")
    # Nor the waits (they read 0% and fed the bottleneck line as if measured).
    assert (stats.waiting_input, stats.blocked_output) == (None, None)
    assert stats.as_dict()["wait_input_seconds"] is None
    assert (cells["starved"], cells["blocked"]) == ("-", "-")


def test_an_empty_source_finishes_at_once(redis_server: RedisServer) -> None:
    pipeline = cv.Pipeline([]).map(triple)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    result = pipeline.run(collect=True, backend=backend)
    assert result.outputs == []


def test_skipped_items_and_their_errors_arrive_as_themselves(
    redis_server: RedisServer,
) -> None:
    # Stays outside the contract suite as the regression test below (a built-in
    # exception whose argument keeps its type, through Redis). The contract suite
    # checks the outputs and failures of on_error="skip" on every runtime x backend.
    def picky(x: int) -> int:
        if x % 10 == 0:
            raise KeyError(x)
        return x

    pipeline = cv.Pipeline(range(50)).map(picky, on_error="skip", name="picky")
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    result = pipeline.run(collect=True, backend=backend)
    # The items and the errors as themselves, as on one machine (they were '0' and a
    # RemoteError rebuilt from text).
    assert sorted(f.item for f in result.failures) == [0, 10, 20, 30, 40]
    assert all(type(f.error) is KeyError for f in result.failures)
    assert sorted(f.error.args[0] for f in result.failures) == [0, 10, 20, 30, 40]


class BadRow(Exception):
    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"row {row}: {reason}")
        self.row = row
        self.reason = reason


def reject_odd(x: int) -> int:
    if x % 2:
        raise BadRow(x, "odd")
    return x


@pytest.mark.parametrize("runtime", ["thread", "process"])
def test_a_skipped_items_own_exception_class_arrives_as_itself_with_its_attributes(
    redis_server: RedisServer, runtime: str
) -> None:
    pipeline = cv.Pipeline(range(6)).map(reject_odd, on_error="skip", runtime=runtime)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    result = pipeline.run(collect=True, backend=backend)
    assert result.outputs == [0, 2, 4]
    failures = sorted(result.failures, key=lambda f: f.item)
    assert [f.item for f in failures] == [1, 3, 5]
    assert all(type(f.error) is BadRow for f in failures)
    assert [(f.error.row, f.error.reason) for f in failures] == [(1, "odd"), (3, "odd"), (5, "odd")]  # type: ignore[attr-defined]
    assert any("reject_odd" in str(f.error.__cause__) for f in failures)


def test_async_stages_and_batch_stages_run_on_redis_workers(redis_server: RedisServer) -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    pipeline = cv.Pipeline(range(40)).map(double, runtime="async", workers=4).batch(10)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    outputs = pipeline.run(collect=True, backend=backend).outputs or []
    # Each group is what one read returned, in source order within the group.
    assert sorted(x for group in outputs for x in group) == [2 * x for x in range(40)]
    bad = [group for group in outputs if group != sorted(group)]
    assert not bad, outputs
    assert all(1 <= len(group) <= 10 for group in outputs)


def triple_and_pid(x: int) -> tuple[int, int]:
    return 3 * x, os.getpid()


def test_a_process_stage_runs_in_child_processes_of_the_worker(redis_server: RedisServer) -> None:
    pipeline = cv.Pipeline(range(200)).map(triple_and_pid, runtime="process", workers=2)
    namespace = new_namespace()
    with serving(pipeline, redis_server.url, namespace) as worker:
        assert type(worker.runtimes["process"]).__name__ == "ProcessRuntime"
        result = pipeline.run(
            collect=True, backend=RedisBackend(redis_server.url, namespace=namespace)
        )
    outputs = result.outputs or []
    assert [x for x, _ in outputs] == [3 * x for x in range(200)]
    pids = {pid for _, pid in outputs}
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


# ---------------------------------------------------------------------- dead letters


def test_a_poison_item_goes_to_dead_letters_and_a_replay_after_the_fix_finishes_the_run(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_TEST_FIXED", raising=False)
    pipeline = poisoned(50)
    namespace = new_namespace()
    url = redis_server.url
    backend = RedisBackend(
        url, namespace=namespace, run_id="poison", visibility_timeout=0.2, max_deliveries=3
    )
    with serving(pipeline, url, namespace), pytest.raises(DeadLettersError) as caught:
        pipeline.run(collect=True, backend=backend)
    assert caught.value.dead == {"fragile": 1}
    assert f"cannot handle {POISON}" in str(caught.value)

    runner = CliRunner()
    args = ["redis_helpers:poisoned", "--redis", url, "--namespace", namespace]
    listed = runner.invoke(cli, ["dlq", "list", *args, "--json"], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    [letter] = json.loads(listed.output)
    assert letter["item"] == POISON
    assert letter["item_format"] == "json"
    assert letter["stage"] == "fragile"
    assert letter["deliveries"] == 4  # delivered max_deliveries times, then once more: dead
    assert f"ValueError: cannot handle {POISON}" in letter["error"]

    monkeypatch.setenv("CONVEYOR_TEST_FIXED", "1")
    replayed = runner.invoke(cli, ["dlq", "replay", *args], catch_exceptions=False)
    assert replayed.output.strip() == "replayed 1 dead letters"
    with serving(pipeline, url, namespace):
        rest = pipeline.run(collect=True, backend=backend)
    # The first driver delivered the outputs before the poison item; the
    # resumed run delivers the rest, in order, and nothing twice.
    assert rest.outputs == [3 * (x + 1) for x in range(POISON, 50)]
    with redis_client(url) as client:
        assert client.keys(f"{namespace}:*") == []


def test_dlq_list_json_gives_items_as_json_where_json_carries_them_else_their_repr(
    redis_server: RedisServer,
) -> None:
    """Regression: ``dlq list --json`` gave every item as its repr, a string (a dict
    item came as ``"{'a': [1, 2.5, None]}"``)."""
    namespace, url = new_namespace(), redis_server.url
    items: list[Any] = [{"a": [1, 2.5, None], "b": "text"}, b"\x00raw", "plain"]
    backend = RedisBackend(
        url, namespace=namespace, run_id="kinds", max_deliveries=1, local_workers=True
    )
    with pytest.raises(DeadLettersError):
        cv.Pipeline(items).map(refuse, name="refuse", ordered=False).run(backend=backend)
    args = ["redis_helpers:refusing", "--redis", url, "--namespace", namespace, "--json"]
    listed = CliRunner().invoke(cli, ["dlq", "list", *args], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    letters = sorted(json.loads(listed.output), key=lambda d: d["source_id"])
    got = {json.dumps(d["item"]): d["item_format"] for d in letters}
    assert got == {
        json.dumps({"a": [1, 2.5, None], "b": "text"}): "json",
        json.dumps(repr(b"\x00raw")): "repr",
        json.dumps("plain"): "json",
    }
    assert all(d["item_error"] is None and d["run_id"] == "kinds" for d in letters)


def test_dlq_list_json_says_when_an_item_could_not_be_decoded(redis_server: RedisServer) -> None:
    """A pickle run's dead letter listed without the key: ``item`` null, format "none"."""
    namespace, url = new_namespace(), redis_server.url
    backend = RedisBackend(
        url, namespace=namespace, run_id="sealed", max_deliveries=1, local_workers=True,
        codec="pickle", secret_key=SECRET,
    )  # fmt: skip
    with pytest.raises(DeadLettersError):
        cv.Pipeline([1]).map(refuse, name="refuse", ordered=False).run(backend=backend)
    args = ["redis_helpers:refusing", "--redis", url, "--namespace", namespace, "--json"]
    listed = CliRunner(env={"CONVEYOR_SECRET_KEY": None}).invoke(
        cli, ["dlq", "list", *args], catch_exceptions=False
    )
    [letter] = json.loads(listed.output)
    assert (letter["item"], letter["item_format"]) == (None, "none")
    assert letter["item_error"]


def test_purged_dead_letters_let_an_ordered_run_finish_without_them(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_TEST_FIXED", raising=False)
    pipeline = poisoned(30)
    namespace = new_namespace()
    url = redis_server.url
    backend = RedisBackend(
        url,
        namespace=namespace,
        run_id="purge",
        visibility_timeout=0.2,
        max_deliveries=1,
        on_dead_letters="wait",
    )
    done = threading.Event()
    results: list[cv.RunResult] = []

    def drive() -> None:
        results.append(pipeline.run(collect=True, backend=backend))
        done.set()

    with serving(pipeline, url, namespace):
        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        wait_until(
            lambda: counters(url, pipeline, namespace, "purge").get("dead:0"), "a dead letter"
        )
        assert not done.is_set()  # with on_dead_letters="wait", the driver waits
        purged = CliRunner().invoke(
            cli,
            ["dlq", "purge", "redis_helpers:poisoned", "--redis", url, "--namespace", namespace],
            catch_exceptions=False,
        )
        assert purged.output.strip() == "purged 1 dead letters"
        driver.join(60.0)
    assert results and results[0].outputs == [3 * (x + 1) for x in range(30) if x != POISON]


def test_a_forged_pickle_entry_is_dead_lettered_and_never_unpickled(
    redis_server: RedisServer, tmp_path: Path, closing: Callable[[Any], Any]
) -> None:
    marker = tmp_path / "unpickled"
    pipeline = cv.Pipeline([]).map(triple)
    namespace = new_namespace()
    backend = closing(
        RedisBackend(redis_server.url, namespace=namespace, codec="pickle", secret_key=SECRET)
    )
    live = backend.open(pipeline, run_id="forged")
    bomb = pickle.dumps(_Bomb(str(marker)))
    client = closing(redis.Redis.from_url(redis_server.url))
    client.xadd(live.keys.stream(0), {"d": bomb})  # unsigned
    client.xadd(live.keys.stream(0), {"d": bomb, "s": b"\0" * 32})  # a wrong signature
    live.submit([1, 2])
    with serving(pipeline, redis_server.url, namespace, secret_key=SECRET):
        got: list[int] = []
        wait_until(lambda: got.extend(live.results(timeout=0.1)) or len(got) >= 2, "outputs")
        wait_until(lambda: live.state().dead == 2, "two dead letters")
    assert sorted(got) == [3, 6]
    assert not marker.exists()
    from conveyor.redis.dlq import list_dead

    letters = list_dead(client, live.info, get_codec("pickle", SECRET))
    assert [d.item for d in letters] == [None, None]
    assert "unsigned pickle entry refused" in letters[0].error
    assert "wrong signature" in letters[1].error
    assert "refused" in (letters[1].item_error or "")
    assert not marker.exists()


class _Bomb:
    """Unpickling it creates a file: proof that an entry was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_a_worker_without_the_secret_key_refuses_to_serve_a_pickle_run(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, closing: Callable[[Any], Any]
) -> None:
    pipeline = cv.Pipeline(range(3)).map(triple)
    namespace = new_namespace()
    backend = closing(
        RedisBackend(redis_server.url, namespace=namespace, codec="pickle", secret_key=SECRET)
    )
    live = backend.open(pipeline, run_id="keyless")
    live.submit([1])
    with caplog.at_level("ERROR", logger="conveyor.redis"):
        with serving(pipeline, redis_server.url, namespace, secret_key=b"another key, 16+ bytes"):
            wait_until(lambda: "not serving it" in caplog.text, "the refusal in the log")
    assert live.state().stages[0].acked == 0


def as_set(x: int) -> set[int]:
    return {x}


def test_an_output_the_codec_cannot_carry_is_a_serialization_error_that_skip_records(
    redis_server: RedisServer,
) -> None:
    backend = RedisBackend(
        redis_server.url,
        namespace=new_namespace(),
        local_workers=True,
        codec="json",
        max_deliveries=2,
        visibility_timeout=0.2,
    )
    pipeline = cv.Pipeline([1, 2]).map(as_set, on_error="skip")
    result = pipeline.run(backend=backend, collect=True)
    assert result.outputs == []
    assert [(f.stage, f.item, type(f.error)) for f in result.failures] == [
        ("as_set", 1, cv.SerializationError),
        ("as_set", 2, cv.SerializationError),
    ]


def test_a_database_number_redis_does_not_have_is_a_backend_error_naming_the_url(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/99"
    backend = RedisBackend(url, namespace=new_namespace(), local_workers=True)
    with pytest.raises(cv.BackendError, match=f"Redis at {url}.*DB index is out of range"):
        cv.Pipeline([1]).map(abs).run(backend=backend)


THREADS_SEEN: list[int] = []


async def count_threads(x: int) -> int:
    THREADS_SEEN.append(threading.active_count())
    await asyncio.sleep(0.001)
    return x


# Regression: each coroutine worker waited for Redis in a thread of its own.
def test_an_async_stage_on_redis_waits_for_hundreds_of_calls_with_a_few_threads(
    redis_server: RedisServer,
) -> None:
    THREADS_SEEN.clear()
    before = threading.active_count()
    pipeline = cv.Pipeline(range(1000)).map(count_threads, runtime="async", workers=300)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    assert pipeline.run(backend=backend, collect=True).outputs == list(range(1000))
    assert max(THREADS_SEEN) - before < 50, f"{max(THREADS_SEEN) - before} threads more"


# Regression: the driver waited for ever, and said no worker served the stage.
def test_a_pickle_run_whose_workers_lack_the_key_fails_saying_so(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_SECRET_KEY", raising=False)
    namespace = new_namespace()
    pipeline = cv.Pipeline(range(5)).map(triple)
    backend = RedisBackend(redis_server.url, namespace=namespace, codec="pickle", secret_key=SECRET)
    with serving(pipeline, redis_server.url, namespace):  # no key
        handle = pipeline.start(backend=backend)
        try:
            with pytest.raises(cv.BackendError, match="does not have the secret key") as info:
                handle.join(timeout=15.0)
            assert f"(pid {os.getpid()})" in str(info.value)  # which worker
        finally:
            handle.stop()


GATE = threading.Event()
ENTERED = threading.Event()
WAIT_FOR_GATE = 30.0


def held_at_the_gate(x: int) -> int:
    ENTERED.set()
    GATE.wait(WAIT_FOR_GATE)
    return x


# A race (the worker's poll of the deleted stream against its noticing that the run is
# gone) that failed 5 runs in 6 while the backlog script asked XINFO of a stream that
# no longer exists ('ResponseError: no such key'); a run with a byte budget polls after
# every hand-off, so it met it at almost every end of a run.
def test_a_worker_held_back_by_a_limit_survives_its_run_being_cancelled(
    redis_server: RedisServer, closing: Callable[[Any], Any]
) -> None:
    GATE.clear()
    ENTERED.clear()
    namespace = new_namespace()
    pipeline = cv.Pipeline(range(20)).map(triple, name="first").map(held_at_the_gate)
    backend = closing(RedisBackend(redis_server.url, namespace=namespace, limit=1, run_id="held"))
    with serving(pipeline, redis_server.url, namespace) as worker:
        handle = pipeline.start(backend=backend)
        try:
            assert ENTERED.wait(WAIT_FOR_GATE)
            # With limit=1, the entry at the gate fills the output stream of 'first':
            # from its first hand-off on, 'first' is held back, polling for room.
            wait_until(lambda: worker.stats()[0].items_out >= 1, "'first' to hand on")
        finally:
            handle.stop()
        backend.cancel(pipeline, "held")  # its keys are gone (stop() may have deleted them)
        GATE.set()
        # The worker serves on: a new run of the pipeline completes.
        again = closing(RedisBackend(redis_server.url, namespace=namespace))
        done = pipeline.start(backend=again, collect=True)
        try:
            assert done.join(timeout=10.0).outputs == [x * 3 for x in range(20)]
        finally:
            done.stop()
        assert not worker.stopped.is_set()


# ---------------------------------------------------------------------- long-lived runs


def test_producers_submit_to_a_long_lived_run_served_by_running_workers(
    redis_server: RedisServer, closing: Callable[[Any], Any]
) -> None:
    pipeline = cv.Pipeline([]).map(triple).filter(lambda x: x % 2 == 0)
    namespace = new_namespace()
    backend = closing(RedisBackend(redis_server.url, namespace=namespace))
    got: list[int] = []
    with serving(pipeline, redis_server.url, namespace):
        producers = [
            threading.Thread(target=backend.submit, args=(pipeline, range(k, 300, 3)))
            for k in range(3)
        ]
        for p in producers:
            p.start()
        for p in producers:
            p.join(30.0)
        live = backend.open(pipeline)
        live.close()
        wait_until(
            lambda: got.extend(live.results(timeout=0.1)) or live.state().complete,
            "the long-lived run to complete",
        )
    assert sorted(got) == [3 * x for x in range(300) if x % 2 == 0]


def _status(url: str, namespace: str, target: str = "redis_helpers:tripled") -> list[Any]:
    args = ["status", target, "--redis", url, "--namespace", namespace, "--json"]
    done = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    runs: list[Any] = json.loads(done.output)
    return runs


def test_close_closes_a_long_lived_run_for_every_handle_and_status_says_open_closed_drained(
    redis_server: RedisServer, closing: Callable[[Any], Any]
) -> None:
    """Regression: status said "source feeding", then "source done" and complete, and
    close() closed only its handle: another handle (or backend.submit) still added items."""
    from conveyor.loading import load_pipeline

    pipeline = load_pipeline("redis_helpers:tripled")
    namespace, url = new_namespace(), redis_server.url
    backend = closing(RedisBackend(url, namespace=namespace))
    with serving(pipeline, url, namespace):
        live, other = backend.open(pipeline), backend.open(pipeline)
        assert live.submit(range(10)) == 10
        [run] = _status(url, namespace)
        assert (run["kind"], run["state"], run["complete"]) == ("long-lived", "open", False)

        live.close()
        with pytest.raises(cv.ShutDown, match="'live', which is closed"):
            other.submit([100])
        with pytest.raises(cv.ShutDown, match="which is closed"):
            backend.submit(pipeline, [100])
        with pytest.raises(cv.ShutDown, match="which this handle closed"):
            live.submit([100])
        wait_until(lambda: live.state().stages[0].out == 10, "the submitted items to go through")
        [run] = _status(url, namespace)
        assert (run["state"], run["fed"], run["complete"]) == ("closed", 10, False)
        assert not other.drained()

        got: list[int] = []
        wait_until(lambda: got.extend(other.results(timeout=0.1)) or other.drained(), "drained")
    assert sorted(got) == [triple(x) for x in range(10)]  # the refused 100 never came
    [run] = _status(url, namespace)
    assert (run["state"], run["complete"]) == ("drained", True)
    text = CliRunner().invoke(
        cli, ["status", "redis_helpers:tripled", "--redis", url, "--namespace", namespace]
    )
    assert "run live (long-lived, drained: closed, every output taken;" in text.output
    assert backend.cancel(pipeline, "live")
    assert _status(url, namespace) == []


def test_status_says_whether_a_driven_run_has_a_driver(redis_server: RedisServer) -> None:
    namespace, url = new_namespace(), redis_server.url
    pipeline = cv.Pipeline(range(50)).map(triple)
    backend = RedisBackend(url, namespace=namespace, run_id="driven")
    handle = pipeline.start(backend=backend)  # no worker: it waits
    wait_until(lambda: _status(url, namespace), "the run to exist")
    [run] = _status(url, namespace)
    assert (run["kind"], run["state"]) == ("driven", "running")
    handle.stop()
    assert handle.join(30.0).stopped
    [run] = _status(url, namespace)
    assert (run["state"], run["left"]) == ("left", "stopped and left in Redis")
    assert RedisBackend(url, namespace=namespace).cancel(pipeline, "driven")


def test_status_gives_a_run_its_byte_budget(redis_server: RedisServer) -> None:
    namespace, url = new_namespace(), redis_server.url
    pipeline = cv.Pipeline(range(50)).map(triple)
    backend = RedisBackend(url, namespace=namespace, run_id="budgeted")
    handle = pipeline.start(backend=backend, max_bytes="1.5MiB")  # no worker: it waits
    wait_until(lambda: _status(url, namespace), "the run to exist")
    [run] = _status(url, namespace)
    assert run["max_bytes"] == 3 * 2**19
    args = ["status", "redis_helpers:tripled", "--redis", url, "--namespace", namespace]
    shown = CliRunner().invoke(cli, args, catch_exceptions=False).output
    assert "byte budget 1.5 MiB" in " ".join(shown.split())
    handle.stop()
    assert handle.join(30.0).stopped
    assert RedisBackend(url, namespace=namespace).cancel(pipeline, "budgeted")


def test_long_lived_runs_and_cancel_refuse_bad_arguments_naming_them(
    redis_server: RedisServer, closing: Callable[[Any], Any]
) -> None:
    """Regression: open([1]), submit([1], items) and cancel(None, id) were
    AttributeErrors from inside conveyor, submit(5) a bare TypeError, and
    cancel(pipeline, 5) answered False."""
    pipeline = cv.Pipeline([]).map(triple)
    backend = closing(RedisBackend(redis_server.url, namespace=new_namespace()))
    not_a_pipeline = "RedisBackend 'pipeline' must be a conveyor.Pipeline, got list"
    for call in (
        lambda: backend.open([1]),
        lambda: backend.submit([1], [1, 2]),
        lambda: backend.cancel([1], "r1"),
    ):
        with pytest.raises(cv.ConfigurationTypeError, match=not_a_pipeline):
            call()
    with pytest.raises(cv.ConfigurationTypeError, match=r"cancel\(\) 'run_id' must be"):
        backend.cancel(pipeline, 5)  # type: ignore[arg-type]
    live = backend.open(pipeline, run_id="bad-items")
    with pytest.raises(cv.ConfigurationTypeError, match="'items' must be an iterable"):
        live.submit(5)  # type: ignore[arg-type]
    assert live.submit([1, 2]) == 2  # the refusal added nothing, and the run goes on
    assert backend.cancel(pipeline, "bad-items")


def test_a_producer_waits_while_the_first_stream_is_over_its_limit(
    redis_server: RedisServer, closing: Callable[[Any], Any]
) -> None:
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for i in range(2000):
            pulled.append(i)
            yield i

    pipeline = cv.Pipeline(source()).map(triple, capacity=150)
    client = closing(redis.Redis.from_url(redis_server.url))
    run = Unserved(pipeline, redis_server.url, "bp", client)
    wait_until(lambda: run.fed() >= 150, "the first stream to fill")
    # No worker yet: the feeder is held at the limit (plus at most one chunk in hand).
    # The limit counts items, whether an entry carries one item or a pack of them.
    assert run.fed() <= 150 + 100
    assert client.xlen(run.keys.stream(0)) <= 150 + 100
    assert len(pulled) <= 150 + 2 * 100
    assert run.finish().outputs == [3 * x for x in range(2000)]


def test_the_feeder_packs_items_once_the_first_stage_has_said_its_batch_size(
    redis_server: RedisServer, closing: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: at a run's start no batch size was recorded, and the feeder filled the
    whole first stream with one-item entries (over half the entries of a 50k-item run),
    which every stage then read and handed on one by one. Now it adds one chunk of them
    and waits for the first hand-off to record how many items a pack may carry."""
    # Only the recorded batch size ends the wait here (not its time limit).
    monkeypatch.setattr("conveyor.redis.backend.FIRST_TAKE_SECONDS", 600.0)
    # A limit far above the run's size: only the wait can hold the feeder back.
    pipeline = cv.Pipeline(range(600)).map(triple, ordered=False, capacity=100_000)
    client = closing(redis.Redis.from_url(redis_server.url))
    run = Unserved(pipeline, redis_server.url, "first-take", client)
    wait_until(lambda: run.fed() >= 100, "the first chunk")
    client.hset(run.keys.counters, "take:0", 64)  # what the first hand-off records
    wait_until(lambda: run.fed() == 600, "the rest of the source")
    entries = client.xrange(run.keys.stream(0))
    head, rest = entries[:100], entries[100:]
    assert all(b"d" in fields for _, fields in head)  # one item each: no batch size yet
    # The 500 items after them went in packs of up to 64 (a chunk's last items may
    # make a smaller one).
    assert len(rest) <= 500 // 8
    assert any(b"p" in fields for _, fields in rest)
    assert sorted(run.finish().outputs or []) == [3 * x for x in range(600)]


# ---------------------------------------------------------------------- Redis itself


def test_a_wrong_password_gives_a_clear_error(
    redis_server_factory: RedisServerFactory,
) -> None:
    server = redis_server_factory(password="right-password")
    pipeline = cv.Pipeline(range(3)).map(triple)
    wrong = server.url.replace("right-password", "wrong-password")
    with pytest.raises(cv.BackendError, match="refused the credentials") as caught:
        pipeline.run(backend=RedisBackend(wrong))
    assert "wrong-password" not in str(caught.value)  # the message hides the password
    none = server.url.replace(":right-password@", "")
    with pytest.raises(cv.BackendError, match="requires a password"):
        pipeline.run(backend=RedisBackend(none))
    result = CliRunner().invoke(cli, ["status", "redis_helpers:poisoned", "--redis", wrong])
    assert result.exit_code == 1
    assert "refused the credentials" in result.output
    ok = pipeline.run(collect=True, backend=RedisBackend(server.url, local_workers=True))
    assert ok.outputs == [0, 3, 6]


def test_an_acl_user_with_a_password_can_run_a_pipeline(
    redis_server_factory: RedisServerFactory,
) -> None:
    server = redis_server_factory(
        "--user", "default", "off", "--user", "app", "on", ">pw", "~*", "&*", "+@all"
    )
    url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    pipeline = cv.Pipeline(range(5)).map(triple)
    result = pipeline.run(collect=True, backend=RedisBackend(url, local_workers=True))
    assert result.outputs == [3 * x for x in range(5)]


def test_tls_with_a_self_signed_certificate(
    redis_server_factory: RedisServerFactory, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = redis_server_factory(
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        tls=True,
    )  # fmt: skip
    url = f"{server.url}?ssl_ca_certs={cert}"
    pipeline = cv.Pipeline(range(20)).map(triple)
    result = pipeline.run(collect=True, backend=RedisBackend(url, local_workers=True))
    assert result.outputs == [3 * x for x in range(20)]
    # Without trusting the certificate: refused at once, saying why and what to do.
    with pytest.raises(cv.BackendError, match=r"CERTIFICATE_VERIFY_FAILED.*ssl_ca_certs"):
        pipeline.run(backend=RedisBackend(server.url))


def test_a_run_survives_a_redis_restart(redis_server_factory: RedisServerFactory) -> None:
    server = redis_server_factory("--appendonly", "yes", "--appendfsync", "always")
    pipeline = three_stages(4000)
    namespace = new_namespace()
    backend = RedisBackend(server.url, namespace=namespace, run_id="restart")
    with serving(pipeline, server.url, namespace):
        handle = pipeline.start(collect=True, backend=backend)
        wait_until(
            lambda: counters(server.url, pipeline, namespace, "restart").get("in:2", 0) > 500,
            "the run to be under way",
        )
        server.stop()
        server.start()
        result = handle.join(60.0)
    assert result.outputs == pipeline.run(collect=True).outputs


def test_status_shows_each_stage_its_stream_and_consumers(
    redis_server: RedisServer, closing: Callable[[Any], Any]
) -> None:
    pipeline = poisoned(10)
    namespace = new_namespace()
    backend = closing(RedisBackend(redis_server.url, namespace=namespace, run_id="seen"))
    live = backend.open(pipeline, run_id="seen")
    live.submit([1, 2, 3])
    result = CliRunner().invoke(
        cli,
        ["status", "redis_helpers:poisoned", "--redis", redis_server.url, "--namespace", namespace],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "run seen" in result.output
    assert "fragile" in result.output and "triple" in result.output
    as_json = CliRunner().invoke(
        cli,
        ["status", "redis_helpers:poisoned", "--redis", redis_server.url, "--namespace",
         namespace, "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    [status] = json.loads(as_json.output)
    assert status["fed"] == 3
    assert [s["stream_length"] for s in status["stages"]] == [3, 0]
    args = ["redis_helpers:poisoned", "--redis", redis_server.url, "--namespace", namespace]
    cancelled = CliRunner().invoke(cli, ["cancel", *args, "--run", "seen"])
    assert cancelled.output.strip() == "deleted run seen"
    with redis_client(redis_server.url) as client:
        assert client.keys(f"{namespace}:*") == []
    again = CliRunner().invoke(cli, ["cancel", *args, "--run", "seen"])
    assert again.exit_code == 1
    assert "no run 'seen'" in again.output


def test_status_of_a_stopped_run_says_its_source_stopped_until_it_is_resumed(
    redis_server: RedisServer, closing: Callable[[Any], Any]
) -> None:
    """Regression: a run its driver had left in Redis showed "source feeding"."""

    def pipeline() -> cv.Pipeline[int]:
        return cv.Pipeline(itertools.count()).map(triple)  # the stages of `tripled`

    namespace = new_namespace()
    args = ["status", "redis_helpers:tripled", "--redis", redis_server.url]
    args += ["--namespace", namespace, "--run", "left"]

    def status() -> dict[str, Any]:
        """The run's status ({} before the driver made it)."""
        shown = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
        if shown.exit_code != 0:
            assert "no run 'left'" in shown.output, shown.output
            return {}
        [one] = json.loads(shown.output)
        return dict(one)

    backend = closing(RedisBackend(redis_server.url, namespace=namespace, run_id="left"))
    handle = pipeline().start(backend=backend)  # no worker: the source fills the stream
    wait_until(lambda: status().get("fed", 0) > 0, "the run to be fed")
    handle.stop()
    assert handle.join(timeout=30.0).stopped
    shown = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "(source stopped)" in shown.output and "stopped and left in Redis" in shown.output
    assert status()["left"] == "stopped and left in Redis"
    # Resumed with its run id, a driver feeds it again.
    again = closing(RedisBackend(redis_server.url, namespace=namespace, run_id="left"))
    resumed = pipeline().start(backend=again)
    try:
        wait_until(lambda: status().get("left") == "", "the resumed run to be no longer left")
        assert "(source feeding)" in CliRunner().invoke(cli, args).output
    finally:
        resumed.stop()
        resumed.join(timeout=30.0)


def test_conveyor_run_with_redis_drives_a_run_that_workers_serve(redis_server: RedisServer) -> None:
    from redis_helpers import three_stages as make

    pipeline = make()
    with serving(pipeline, redis_server.url, "conveyor"):
        result = CliRunner().invoke(
            cli,
            ["run", "redis_helpers:three_stages", "--redis", redis_server.url, "--json"],
            catch_exceptions=False,
        )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["items_out"] == len(pipeline.run(collect=True).outputs or [])
    assert [s["items_in"] for s in report["stages"]] == [20_000, 20_000, 15_000]
    # --progress is on by default: the driver's progress lines go to stderr.
    assert "20,000/20,000 items in (100%) (done)" in result.stderr


def test_conveyor_run_with_redis_meets_workers_of_another_namespace(
    redis_server: RedisServer, conveyor_logger_kept: None
) -> None:
    """`conveyor run` had no --namespace: workers started with one could not be driven."""
    from redis_helpers import tripled

    namespace = new_namespace()
    with serving(tripled(), redis_server.url, namespace):
        result = CliRunner().invoke(
            cli,
            [
                "run",
                "redis_helpers:tripled",
                "--redis",
                redis_server.url,
                "--namespace",
                namespace,
                "--json",
                "--no-progress",
                "--connect-timeout",
                "30",
            ],
            catch_exceptions=False,
        )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["items_out"] == 50


def test_a_stage_with_more_consumers_than_a_default_connection_pool_runs_to_the_end(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """300 coroutine workers each wait for Redis on a connection of the worker's one
    client: redis-py 8 caps a pool at 100, and the run failed with BackendUnavailable
    ("cannot reach Redis ...: Too many connections") while Redis was there all along."""

    async def add_one(x: int) -> int:
        return x + 1

    pipeline = cv.Pipeline(range(600)).map(add_one, runtime="async", workers=300)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    with caplog.at_level("WARNING", logger="conveyor"):
        result = pipeline.run(backend=backend, collect=True)
    assert result.outputs == list(range(1, 601))
    assert "Too many connections" not in caplog.text


def test_conveyor_run_with_redis_writes_a_report_and_refuses_a_stall_timeout(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    from redis_helpers import three_stages as make

    path = tmp_path / "run.html"
    target = ["run", "redis_helpers:three_stages", "--redis", redis_server.url]
    with serving(make(), redis_server.url, "conveyor"):
        result = CliRunner().invoke(cli, [*target, "--report", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "keep" in path.read_text(encoding="utf-8")
    refused = CliRunner().invoke(cli, [*target, "--stall-timeout", "5"])
    assert refused.exit_code == 2
    assert "--stall-timeout applies to runs in this process" in refused.stderr
    missing = CliRunner().invoke(cli, [*target, "--report", str(tmp_path / "no" / "r.html")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_conveyor_run_with_redis_exits_1_and_says_why_when_the_run_fails(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_TEST_FIXED", raising=False)
    monkeypatch.setattr(cv.RedisBackend, "__init__", _failing_fast(cv.RedisBackend.__init__))
    namespace = "conveyor"
    with serving(poisoned(20), redis_server.url, namespace):
        result = CliRunner().invoke(
            cli,
            ["run", "redis_helpers:poisoned", "--redis", redis_server.url, "--run-id", "bad"],
        )
    assert result.exit_code == 1, result.output
    assert "conveyor: the run failed: DeadLettersError" in result.stderr
    RedisBackend(redis_server.url, namespace=namespace).cancel(poisoned(20), "bad")


def _failing_fast(init: Callable[..., None]) -> Callable[..., None]:
    """RedisBackend.__init__ with short redelivery settings: a poisoned item dead-letters fast."""

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("visibility_timeout", 0.2)
        kwargs.setdefault("max_deliveries", 2)
        init(self, *args, **kwargs)

    return patched


def test_consumers_that_hold_nothing_and_went_silent_are_forgotten(
    redis_server: RedisServer, closing: Callable[[Any], Any]
) -> None:
    from conveyor.redis.streams import Scripts

    client = closing(redis.Redis.from_url(redis_server.url))
    stream = f"{new_namespace()}:s0"
    client.xgroup_create(stream, "workers", id="0", mkstream=True)
    client.xgroup_createconsumer(stream, "workers", "ghost")
    client.xadd(stream, {"d": b"1"})
    client.xreadgroup("workers", "holder", {stream: ">"})
    wait_until(
        lambda: all(c["idle"] > 5 for c in client.xinfo_consumers(stream, "workers")),
        "both consumers to be idle a little",
    )
    Scripts(client).reclaim(keys=[stream], args=["workers", "me", 60_000, "0-0", 10, 5])
    names = {c["name"] for c in client.xinfo_consumers(stream, "workers")}
    # Redis 8 (8.0.6 here) registers the caller of XAUTOCLAIM ("me", alive) even when
    # it claims nothing; 7.0 does not. The ghost is what must go.
    names.discard(b"me")
    assert names == {b"holder"}  # it still holds an entry; the ghost held nothing


def test_a_failing_source_ends_the_run_and_leaves_nothing_in_redis(
    redis_server: RedisServer,
) -> None:
    def source() -> Iterator[int]:
        yield from range(10)
        raise OSError("the disk went away")

    namespace = new_namespace()
    pipeline = cv.Pipeline(source()).map(triple)
    backend = RedisBackend(redis_server.url, namespace=namespace, local_workers=True)
    with pytest.raises(OSError, match="the disk went away") as caught:
        pipeline.run(backend=backend)
    assert any("was deleted" in note for note in getattr(caught.value, "__notes__", []))
    with redis_client(redis_server.url) as client:
        assert client.keys(f"{namespace}:*") == []


@pytest.mark.timeout(60)
def test_a_source_item_the_codec_cannot_carry_is_a_serialization_error_naming_the_source(
    redis_server: RedisServer,
) -> None:
    """Repro: the error named the codec and the value, not that it was the source's."""
    import threading

    namespace = new_namespace()
    pipeline = cv.Pipeline([1, threading.Lock(), 3]).map(triple)
    backend = RedisBackend(redis_server.url, namespace=namespace, local_workers=True)
    with pytest.raises(cv.SerializationError, match=r"the source's item 1 \(counting from 0\)"):
        pipeline.run(backend=backend)
    with redis_client(redis_server.url) as client:
        assert client.keys(f"{namespace}:*") == []


def test_the_driver_says_when_no_worker_serves_its_run(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import conveyor.redis.backend as backend_module

    monkeypatch.setattr(backend_module, "QUIET_SECONDS", 0.2)
    pipeline = cv.Pipeline(range(5)).map(triple, name="lonely")
    namespace = new_namespace()
    results: list[cv.RunResult] = []
    driver = threading.Thread(
        target=lambda: results.append(
            pipeline.run(collect=True, backend=RedisBackend(redis_server.url, namespace=namespace))
        ),
        daemon=True,
    )
    with caplog.at_level("WARNING", logger="conveyor.redis"):
        driver.start()
        wait_until(lambda: "no worker serves 'lonely'" in caplog.text, "the driver's warning")
    with serving(pipeline, redis_server.url, namespace):
        driver.join(30.0)
    assert results[0].outputs == [0, 3, 6, 9, 12]


def test_the_drivers_no_worker_hint_names_the_loaded_target_and_the_masked_url(
    redis_server_factory: RedisServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: the hint said `conveyor worker MODULE:ATTR --redis URL` even when
    the driver knew both (``conveyor run redis_helpers:tripled --redis URL``)."""
    import conveyor.redis.backend as backend_module
    from conveyor.loading import load_pipeline

    monkeypatch.setattr(backend_module, "QUIET_SECONDS", 0.2)
    server = redis_server_factory(password="s3cret-pass")
    pipeline = load_pipeline("redis_helpers:tripled")
    namespace = new_namespace()
    backend = RedisBackend(server.url, namespace=namespace, run_id="hinted")
    with caplog.at_level("WARNING", logger="conveyor.redis"):
        handle = pipeline.start(collect=True, backend=backend)
        wait_until(lambda: "no worker serves" in caplog.text, "the driver's warning")
    masked = server.url.replace("s3cret-pass", "***")
    assert (
        f"start `conveyor worker redis_helpers:tripled --redis {masked} --namespace "
        f"{namespace}` with this version" in caplog.text
    )
    assert "s3cret-pass" not in caplog.text
    with serving(pipeline, server.url, namespace):
        assert handle.join(30.0).outputs == [triple(x) for x in range(50)]


def test_a_pipeline_built_from_a_loaded_one_is_not_named_by_its_target() -> None:
    from conveyor.loading import load_pipeline

    loaded = load_pipeline("redis_helpers:tripled")
    assert loaded.target == "redis_helpers:tripled"
    assert loaded.with_stage("triple", workers=3).target == "redis_helpers:tripled"
    assert loaded.map(triple).target is None  # other stages: another pipeline
    assert cv.Pipeline(range(3)).map(triple).target is None


# ---------------------------------------------------------------------- random shapes


def _fan_out(n: int) -> Callable[[int], list[int]]:
    def fan(x: int) -> list[int]:
        return [x * 10 + j for j in range(x % (n + 1))]

    return fan


@st.composite
def shapes(draw: st.DrawFn) -> list[tuple[str, int, int, bool]]:
    """Stages as (kind, parameter, workers, ordered)."""
    return [
        (
            draw(st.sampled_from(["map", "filter", "flat_map"])),
            draw(st.integers(1, 3)),
            draw(st.integers(1, 3)),
            draw(st.booleans()),
        )
        for _ in range(draw(st.integers(1, 3)))
    ]


@settings(
    deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(shape=shapes(), n=st.integers(0, 300), batch_size=st.sampled_from([1, 7, 100]))
def test_random_pipelines_give_what_one_machine_gives(
    redis_server: RedisServer, shape: list[tuple[str, int, int, bool]], n: int, batch_size: int
) -> None:
    pipeline: cv.Pipeline[Any] = cv.Pipeline(range(n))
    for kind, k, workers, ordered in shape:
        if kind == "map":
            pipeline = pipeline.map(lambda x, k=k: x + k, workers=workers, ordered=ordered)
        elif kind == "filter":
            pipeline = pipeline.filter(lambda x, k=k: x % (k + 1), workers=workers, ordered=ordered)
        else:
            pipeline = pipeline.flat_map(_fan_out(k), workers=workers, ordered=ordered)
    expected = pipeline.run(collect=True).outputs or []
    backend = RedisBackend(
        redis_server.url, namespace=new_namespace(), batch_size=batch_size, local_workers=True
    )
    got = pipeline.run(collect=True, backend=backend).outputs or []
    if pipeline.stages[-1].ordered:
        assert got == expected
    else:
        assert sorted(got) == sorted(expected)


class OpenFailed(Exception):
    pass


def failing_on_start() -> None:
    raise OpenFailed("no database")


@pytest.mark.parametrize("runtime", ["thread", "process"])
def test_local_workers_that_fail_to_start_end_the_run_with_their_error(
    redis_server: RedisServer, runtime: str
) -> None:
    # Before, the driver waited for ever: nobody else served the run.
    pipeline = cv.Pipeline(range(10)).map(triple, runtime=runtime, on_start=failing_on_start)
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    with pytest.raises(OpenFailed, match="no database") as caught:
        pipeline.run(backend=backend)
    assert any("on_start" in note for note in caught.value.__notes__)
