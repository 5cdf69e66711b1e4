"""Regression tests of the Redis driver: each one is the repro of a defect it once had."""

from __future__ import annotations

import inspect
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import redis

import conveyor as cv
import conveyor.errors
import conveyor.redis
import conveyor.redis.backend
import conveyor.redis.codec
import conveyor.redis.dlq
import conveyor.redis.state
from conveyor.redis import RedisBackend
from conveyor.redis.streams import DRIVER_GROUP, Keys, Scripts, pipeline_id
from redis_helpers import TESTS, WAIT, new_namespace, three_stages, triple, wait_until

if TYPE_CHECKING:
    from conftest import RedisServer, RedisServerFactory

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
        # Each id with the number of items its entry carries.
        pairs = [x for entry_id in ids for x in (entry_id, 1)]
        acked = Scripts(client).ack(
            keys=[final, keys.counters, keys.done], args=[DRIVER_GROUP, "", 0, "", *pairs]
        )
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
    handle = pipeline.start(collect=True, backend=backend)
    try:
        wait_until(
            lambda: _counters(redis_server.url, keys).get("out:0", 0) >= n - 1,
            "every item but the first to be processed",
        )
    finally:
        release.set()
    assert handle.join(WAIT).outputs == list(range(n))


# ---------------------------------------------------------------------- 2. at least once


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
def test_outputs_left_behind_by_a_caller_that_broke_off_come_back_when_the_run_resumes(
    redis_server: RedisServer, namespace: str, ordered: bool
) -> None:
    # The repro: break after 10 outputs, resume with the same run_id: the
    # rest of the chunk read with those 10 had been acknowledged, so lost.
    n = 3000
    pipeline = cv.Pipeline(range(n)).map(triple, workers=2, ordered=ordered)
    expected = [3 * x for x in range(n)]

    def backend() -> RedisBackend:
        # Entries the stopped local workers held are taken over after the
        # visibility timeout: a short one keeps the resumed run quick.
        return RedisBackend(
            redis_server.url,
            namespace=namespace,
            run_id="broke-off",
            local_workers=True,
            visibility_timeout=0.5,
        )

    seen: list[int] = []
    outputs = backend().iterate(pipeline)
    for value in outputs:
        seen.append(value)
        if len(seen) == 10:
            break
    outputs.close()
    again = list(backend().iterate(pipeline))

    assert len(again) == len(set(again))  # the resumed run gives each output once
    assert set(seen) | set(again) == set(expected)
    # The chunk the caller held when it left was not acknowledged: the last
    # output it took comes again; duplicates are only outputs it took.
    assert seen[-1] in again
    assert len(seen) + len(again) - n <= len(seen)
    if ordered:
        assert seen == expected[:10]
        resumed_at = expected.index(again[0])
        assert resumed_at < 10
        assert again == expected[resumed_at:]


KILLED_DRIVER = """
import sys
from conveyor.redis import RedisBackend
from redis_helpers import three_stages

url, namespace = sys.argv[1:3]
backend = RedisBackend(
    url, namespace=namespace, run_id="killed", local_workers=True, visibility_timeout=0.5
)
for i, value in enumerate(backend.iterate(three_stages(3000))):
    print(value, flush=True)
    if i == 49:
        sys.stdin.readline()  # holds the run here until the test kills this process
"""


def test_outputs_of_a_killed_driver_that_it_had_not_printed_come_back_when_the_run_resumes(
    redis_server: RedisServer, namespace: str
) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_DRIVER, redis_server.url, namespace],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = [int(proc.stdout.readline()) for _ in range(50)]
    finally:
        proc.kill()
        rest, _ = proc.communicate(timeout=WAIT)
    printed += [int(line) for line in rest.split()]
    pipeline = three_stages(3000)
    keys = _keys(pipeline, namespace, "killed")
    assert _counters(redis_server.url, keys)["fed"] > 0  # the run was left in Redis

    backend = RedisBackend(
        redis_server.url, namespace=namespace, run_id="killed", local_workers=True
    )
    again = list(backend.iterate(pipeline))

    expected = three_stages(3000).run(collect=True).outputs or []
    assert printed == expected[: len(printed)]
    # The resumed run goes on in order from the start of the chunk the killed
    # driver held (not acknowledged): nothing is missing, and only outputs
    # it printed come twice.
    resumed_at = expected.index(again[0])
    assert resumed_at < len(printed)
    assert again == expected[resumed_at:]


# ---------------------------------------------------------------------- 3. state lost


@pytest.mark.parametrize("way", ["iterate", "run"])
@pytest.mark.parametrize("loss", ["restart", "flushall"])
def test_a_run_whose_state_redis_lost_ends_with_run_state_lost_and_leaves_no_thread(
    redis_server_factory: RedisServerFactory,
    caplog: pytest.LogCaptureFixture,
    loss: str,
    way: str,
) -> None:
    # The repro: Redis restarted without persistence mid-run; the driver died
    # with a raw NOGROUP ResponseError (or a ConnectionError) and a log line
    # advising to resume a run that no longer exists.
    server = redis_server_factory(password="pw-not-shown")  # no persistence
    gate = threading.Event()

    def held_from_100(x: int) -> int:
        if x >= 100:
            assert gate.wait(WAIT)
        return x

    pipeline = cv.Pipeline(range(2000)).map(held_from_100, workers=2)
    namespace = new_namespace()
    backend = RedisBackend(server.url, namespace=namespace, run_id="vanishing", local_workers=True)
    keys = _keys(pipeline, namespace, "vanishing")
    threads_before = set(threading.enumerate())
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            pipeline.run(backend=backend)
        except BaseException as exc:
            errors.append(exc)

    outputs = backend.iterate(pipeline) if way == "iterate" else iter(())
    driver = threading.Thread(target=drive, daemon=True)
    with caplog.at_level("WARNING", logger="conveyor.redis"):
        try:
            if way == "iterate":
                assert [next(outputs) for _ in range(10)] == list(range(10))
            else:
                driver.start()
                wait_until(
                    lambda: _counters(server.url, keys).get("delivered", 0) >= 10,
                    "the run to deliver outputs",
                )
            if loss == "restart":
                server.stop()
                server.start()
            else:
                server.flushall()
        finally:
            gate.set()
        if way == "iterate":
            with pytest.raises(cv.RunStateLost) as caught:
                for _ in outputs:
                    pass
            error: BaseException = caught.value
        else:
            driver.join(WAIT)
            assert not driver.is_alive()
            [error] = errors

    assert isinstance(error, cv.RunStateLost), repr(error)
    message = str(error)
    assert "lost the state of run 'vanishing'" in message
    assert "restarted without persistence" in message
    assert f"127.0.0.1:{server.port}" in message and "pw-not-shown" not in message
    assert "resume" not in message and "run_id=" not in message
    assert "resume" not in caplog.text
    assert set(threading.enumerate()) <= threads_before


# ---------------------------------------------------------------------- strays


@pytest.mark.parametrize("ordered", [False, True])
def test_a_stray_entry_is_refused_and_dead_lettered_and_the_run_still_finishes(
    redis_server: RedisServer, namespace: str, ordered: bool
) -> None:
    # Repro: one valid msgpack entry added to a stage stream of an unordered run was
    # yielded as an output, and the driver then waited for ever (completion compared
    # counters). Here strays go into the stage stream and the final stream mid-run.
    import msgpack

    run_id = f"stray-{ordered}"
    holder: dict[str, Keys] = {}

    def add_strays_on_first(x: int) -> int:
        if x == 0:
            keys = holder["keys"]
            client = redis.Redis.from_url(redis_server.url)
            stray = {"d": msgpack.packb(999)}
            client.xadd(keys.stream(0), stray)  # no sequence path: not this run's
            client.xadd(keys.stream(1), stray)  # straight into the final stream
            client.close()
        return x + 1

    pipeline = cv.Pipeline(range(20)).map(add_strays_on_first, ordered=ordered)
    holder["keys"] = _keys(pipeline, namespace, run_id)
    backend = RedisBackend(
        redis_server.url, namespace=namespace, run_id=run_id, local_workers=True, keep=True
    )
    result = pipeline.run(collect=True, backend=backend)
    outputs = result.outputs or []
    assert (outputs if ordered else sorted(outputs)) == list(range(1, 21))
    keys = holder["keys"]
    client = redis.Redis.from_url(redis_server.url)
    try:
        [(_, stage_dead)] = client.xrange(keys.dead(0))
        assert b"not made by this run" in stage_dead[b"err"]
        [(_, final_dead)] = client.xrange(keys.dead(1))
        assert b"not an entry of this run: no path" in final_dead[b"err"]
    finally:
        backend.cancel(pipeline, run_id)
        client.close()


@pytest.mark.timeout(20)  # under the 30 s visibility timeout the entries would have waited out
def test_a_stopped_workers_unfinished_entries_are_taken_over_at_once(
    redis_server: RedisServer, namespace: str
) -> None:
    pipeline = cv.Pipeline(range(3000)).map(triple, ordered=False)
    run_id = "let-go"

    def backend() -> RedisBackend:
        return RedisBackend(
            redis_server.url, namespace=namespace, run_id=run_id, local_workers=True
        )

    seen = []
    for x in backend().iterate(pipeline):
        seen.append(x)
        if len(seen) == 10:
            break  # the local workers stop holding entries they read ahead
    rest = backend().run(pipeline, collect=True).outputs or []
    assert sorted(set(seen) | set(rest)) == [3 * x for x in range(3000)]


def test_a_batch_stage_still_sends_its_last_partial_group_after_an_upstream_stray(
    redis_server: RedisServer, namespace: str
) -> None:
    # The stray, dead-lettered by stage 0, counts beside the run's own entries: the
    # batch stage must still see that its input has ended (it waited for ever).
    import msgpack

    run_id = "stray-batch"
    holder: dict[str, Keys] = {}

    def add_stray_on_first(x: int) -> int:
        if x == 0:
            client = redis.Redis.from_url(redis_server.url)
            client.xadd(holder["keys"].stream(0), {"d": msgpack.packb(999)})
            client.close()
        return x

    pipeline = cv.Pipeline(range(10)).map(add_stray_on_first).batch(3)
    holder["keys"] = _keys(pipeline, namespace, run_id)
    backend = RedisBackend(redis_server.url, namespace=namespace, run_id=run_id, local_workers=True)
    groups = pipeline.run(collect=True, backend=backend).outputs or []
    assert sorted(x for group in groups for x in group) == list(range(10))


# ---------------------------------------------------------------------- one driver per run


def test_a_second_driver_of_a_run_being_driven_is_refused_and_the_first_finishes(
    redis_server: RedisServer, namespace: str
) -> None:
    # The repro: two drivers with the same run_id (two overlapping `conveyor run
    # --run-id nightly`) both fed the source and shared the final stream: one
    # failed with "Redis lost writes it had acknowledged" (advice to turn on
    # fsync), the other waited for ever for outputs the first had taken.
    n = 500
    pipeline = cv.Pipeline(range(n)).map(triple, workers=2)

    def backend() -> RedisBackend:
        return RedisBackend(
            redis_server.url, namespace=namespace, run_id="nightly", local_workers=True
        )

    first = backend().iterate(pipeline)
    seen = [next(first)]  # the first driver holds the run from here on
    with pytest.raises(cv.BackendError, match=r"run 'nightly' has another driver") as info:
        list(backend().iterate(pipeline))
    assert "one driver per run" in str(info.value)
    seen += list(first)
    assert sorted(seen) == [3 * x for x in range(n)]
    # Once the first driver ended, the run id is free again.
    assert sorted(backend().iterate(pipeline)) == [3 * x for x in range(n)]


# ---------------------------------------------------------------------- stopping


def test_stop_after_the_driver_saw_the_run_in_progress_is_prompt_with_the_source_stuck(
    redis_server: RedisServer, namespace: str
) -> None:
    # The repro: start(backend=...).stop() took 10 s (join(10) raised TimeoutError)
    # when the source was stuck and the driver had read the run's counters once
    # before: it kept them (to tell that nothing moved) where it keeps those of a
    # complete run, so the stopped run ended as a complete one does, waiting 10 s
    # for a feeder that waited for the source.
    first_delivered = threading.Event()
    stuck = threading.Event()
    release = threading.Event()

    def source() -> Any:
        yield 0
        first_delivered.wait(WAIT)  # the outputs come in two reads: the driver looped
        yield from range(1, 10)
        stuck.set()
        release.wait(WAIT)
        yield from range(10, 20)

    pipeline = cv.Pipeline(source()).map(triple)
    keys = _keys(pipeline, namespace, "stuck-source")
    backend = RedisBackend(
        redis_server.url, namespace=namespace, run_id="stuck-source", local_workers=True
    )
    handle = pipeline.start(backend=backend, collect=True)
    try:
        wait_until(lambda: _counters(redis_server.url, keys).get("delivered", 0) >= 1, "0 out")
        first_delivered.set()
        assert stuck.wait(WAIT), "the source never got stuck"
        # Output 0 was acknowledged, the driver looped and read outputs 1 to 9 after it.
        wait_until(lambda: _counters(redis_server.url, keys).get("delivered", 0) >= 10, "9 out")
        stopping = time.monotonic()
        handle.stop()
        result = handle.join(WAIT)
        took = time.monotonic() - stopping
    finally:
        release.set()
        handle.stop()
    assert took < 1.0, f"stop() took {took:.2f} s"
    assert result.stopped
    assert result.outputs == [3 * x for x in range(10)]


# ---------------------------------------------------------------------- items too big for Redis


def test_an_item_over_the_largest_value_redis_takes_is_a_serialization_error_at_once(
    redis_server: RedisServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The repro: an item of 513 MiB (Redis takes values up to 512 MiB) made Redis
    # close the connection; the driver took it for an outage, sent it again and
    # again, warned "no worker serves 'len'" and failed after unavailable_timeout
    # with BackendUnavailable "cannot reach Redis", which was up all along. The
    # limit is lowered here so that the test moves kilobytes, not half a gigabyte.
    monkeypatch.setattr(conveyor.redis.codec, "MAX_ENTRY_BYTES", 4096)
    backend = RedisBackend(redis_server.url, namespace=namespace, local_workers=True)
    started = time.monotonic()
    with pytest.raises(cv.SerializationError, match=r"5\d{3} bytes.*over the 4096 bytes") as info:
        cv.Pipeline([b"small", b"x" * 5000]).map(len).run(backend=backend)
    assert time.monotonic() - started < 5.0
    assert "proto-max-bulk-len" in str(info.value)


# ---------------------------------------------------------------------- long-lived runs


def test_a_long_lived_run_is_refused_with_local_workers_that_would_never_serve_it(
    redis_server: RedisServer, namespace: str
) -> None:
    # The repro: open() with local_workers=True started none, so results() returned []
    # for ever without a word.
    backend = RedisBackend(redis_server.url, namespace=namespace, local_workers=True)
    pipeline = cv.Pipeline([]).map(triple)
    with pytest.raises(cv.ConfigurationError, match=r"'local_workers'.*conveyor worker"):
        backend.open(pipeline)
    with pytest.raises(cv.ConfigurationError, match="'local_workers'"):
        backend.submit(pipeline, [1, 2])


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"count": 0}, cv.ConfigurationError, r"results\(\) 'count' must be an int >= 1, got 0"),
        ({"count": "10"}, cv.ConfigurationTypeError, r"results\(\) 'count' must be an int"),
        ({"timeout": -1}, cv.ConfigurationError, r"results\(\) 'timeout'"),
        ({"timeout": math.nan}, cv.ConfigurationError, r"results\(\) 'timeout'"),
    ],
)
def test_live_results_refuses_a_bad_count_or_timeout_naming_it(
    redis_server: RedisServer,
    namespace: str,
    options: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    # The repro: count=0 raised redis-py's DataError ("XREADGROUP count must be a
    # positive integer"); timeout=-1 was taken as 1 ms without a word.
    live = RedisBackend(redis_server.url, namespace=namespace).open(cv.Pipeline([]).map(triple))
    with pytest.raises(error, match=match):
        live.results(**options)


def test_a_closed_live_run_refuses_more_items_from_the_same_handle(
    redis_server: RedisServer, namespace: str
) -> None:
    # The repro: submit() after close() went in without a word, after the run had
    # been told that no more would come.
    live = RedisBackend(redis_server.url, namespace=namespace).open(cv.Pipeline([]).map(triple))
    assert live.submit([1, 2]) == 2
    live.close()
    with pytest.raises(cv.ShutDown, match=r"submit\(\) to run .live., which this handle closed"):
        live.submit([3])
    assert live.state().fed == 2


def test_a_long_lived_worker_forgets_the_runs_that_ended(redis_server: RedisServer) -> None:
    """A worker serving run after run kept a few entries per run it had served
    (batch size told, next trim, next reclaim) for ever; they go with the run."""
    from conveyor.redis.port import RedisPort
    from conveyor.redis.worker import Worker

    namespace = new_namespace()
    pipeline = cv.Pipeline(range(30)).map(triple, workers=2)
    worker = Worker(pipeline, redis_server.url, namespace=namespace).start()
    try:
        for _ in range(5):
            result = pipeline.run(
                collect=True, backend=RedisBackend(redis_server.url, namespace=namespace)
            )
            assert result.outputs == [3 * x for x in range(30)]
        ports = [p for sr in worker.stage_runs for p in sr.ports if isinstance(p, RedisPort)]
        assert ports

        def forgotten() -> bool:
            return all(
                not (p._told or p._next_trim or p._next_reclaim or p._reclaim_cursor) for p in ports
            )

        wait_until(forgotten, "the ports to forget the ended runs")
    finally:
        worker.stop()
        worker.join(WAIT)


# ---------------------------------------------------------------------- Ctrl-C, Redis down


def sleepy(x: int) -> int:
    time.sleep(0.005)  # the local workers are in user code, then hand their batch on
    return x


def test_ctrl_c_while_redis_is_down_ends_with_keyboard_interrupt(
    redis_server_factory: RedisServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Repro: Ctrl-C while the local workers retried a hand-off to a Redis gone down
    # raised redis-py's ConnectionError from a local worker in place of the
    # KeyboardInterrupt (a `conveyor run` then exited 1, not 130).
    server = redis_server_factory()
    pipeline = cv.Pipeline(range(100_000)).map(sleepy, workers=2)
    backend = RedisBackend(server.url, namespace=new_namespace(), local_workers=True)
    main = threading.main_thread().ident or 0

    def caller_waits_for_redis() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None and not frame.f_code.co_filename.endswith("streams.py"):
            frame = frame.f_back
        return frame is not None

    def press_when_a_worker_waits_for_redis() -> None:
        # Pressed while the caller's thread retries its read, inside the run (not in the
        # loop's body, which would close the run as a break does).
        wait_until(
            lambda: "Redis unavailable (worker)" in caplog.text and caller_waits_for_redis(),
            "the caller and a worker to retry",
        )
        signal.pthread_kill(main, signal.SIGINT)

    presser = threading.Thread(target=press_when_a_worker_waits_for_redis)
    with caplog.at_level("WARNING", logger="conveyor"), pytest.raises(KeyboardInterrupt) as caught:
        outputs = pipeline.iterate(backend=backend)
        assert [next(outputs) for _ in range(20)] == list(range(20))
        server.stop()
        presser.start()
        for _ in outputs:
            pass
    presser.join()
    assert "left in Redis (KeyboardInterrupt)" in caplog.text
    assert isinstance(caught.value, KeyboardInterrupt)


# ---------------------------------------------------------------------- outputs on the error


def test_the_outputs_run_acknowledged_before_dead_letters_stopped_it_are_on_the_error(
    redis_server: RedisServer,
) -> None:
    # The repro: run(collect=True) ended with DeadLettersError after acknowledging the
    # outputs of items 0 to 6; the caller never had them (run() raised), and the run
    # resumed after a replay yielded the other 43 only: 7 outputs lost.
    fixed = threading.Event()

    def fragile(x: int) -> int:
        if x % 10 == 7 and not fixed.is_set():
            raise ValueError(f"cannot handle {x}")
        return x * 2

    pipeline = cv.Pipeline(range(50)).map(fragile, workers=2)
    namespace = new_namespace()

    def backend() -> RedisBackend:
        return RedisBackend(
            redis_server.url,
            namespace=namespace,
            run_id="partial",
            max_deliveries=2,
            local_workers=True,
        )

    with pytest.raises(cv.DeadLettersError) as caught:
        pipeline.run(collect=True, backend=backend())
    first = caught.value.result
    assert isinstance(first, conveyor.redis.RedisRunResult)
    assert first.run_id == "partial"
    assert first.dead_letters == {"fragile": 5}
    assert first.stats[0].items_in >= 45
    expected = [x * 2 for x in range(50)]
    # Ordered: the outputs of items 0 to 6 came out before item 7, a dead letter.
    assert first.outputs == expected[:7]
    assert first.items_out == 7
    fixed.set()
    keys = backend().keys(pipeline, "partial")
    with redis.Redis.from_url(redis_server.url) as client:
        info = conveyor.redis.state.RunInfo.from_meta(keys, client.hgetall(keys.meta))
        assert conveyor.redis.dlq.move_dead(client, info, "replay") == 5
    again = pipeline.run(collect=True, backend=backend()).outputs
    assert first.outputs + (again or []) == expected


def test_a_run_without_collect_ending_on_dead_letters_has_its_counts_on_the_error(
    redis_server: RedisServer,
) -> None:
    def fragile(x: int) -> int:
        if x == 3:
            raise ValueError("cannot handle 3")
        return x

    backend = RedisBackend(
        redis_server.url, namespace=new_namespace(), max_deliveries=1, local_workers=True
    )
    with pytest.raises(cv.DeadLettersError) as caught:
        cv.Pipeline(range(10)).map(fragile).run(backend=backend)
    result = caught.value.result
    assert result is not None and result.outputs is None
    assert result.items_out == 3  # 0, 1 and 2: ordered, the others wait for 3
    assert result.dead_letters == {"fragile": 1}
    assert result.as_dict()["stages"][0]["items_in"] == 9  # handed on; 3 is a dead letter
