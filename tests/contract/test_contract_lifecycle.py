"""A run's life: per-worker hooks, leaving a loop early, stopping, resuming.

Every test runs on every runtime x backend (the ``runner`` fixture, conftest.py),
but resuming by ``run_id``, which only the Redis backend has.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from process_events import ProcessEvent
from runners import ASYNC_ONLY, REDIS_ONLY, WAIT, Leftovers, Runner, ctrl_c_when

import conveyor as cv
from conveyor import engine
from test_pipeline_helpers import quiet_after

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def triple(x: int) -> int:
    return 3 * x


def inc(x: int) -> int:
    return x + 1


def two_stages(runner: Runner, source: Any) -> cv.Pipeline[int]:
    return (
        cv.Pipeline(source)
        .map(runner.fn(triple), workers=2, runtime=runner.runtime)
        .map(runner.fn(inc), workers=2, runtime=runner.runtime)
    )


# ---------------------------------------------------------------------- hooks


def test_a_recycled_worker_whose_on_stop_hangs_is_given_up_after_a_grace_and_the_run_ends(
    runner: Runner,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The repro: an on_stop that hangs, on a worker recycled by max_items_per_worker:
    # the stall report named it, and the run never ended.
    if runner.runtime == "async":  # no worker to recycle: coroutines are not replaced
        with pytest.raises(cv.ConfigurationError, match="max_items_per_worker"):
            cv.Pipeline(range(3)).map(runner.fn(inc), runtime="async", max_items_per_worker=3)
        return
    monkeypatch.setattr(engine, "JOIN_TIMEOUT", 1.0)  # for the threads left in on_stop
    release = ProcessEvent(tmp_path, "release")

    def close_hangs(state: object) -> None:
        release.wait(WAIT)  # stands for a connection whose close never returns

    leftovers = Leftovers()
    pipeline = cv.Pipeline(range(6)).map(
        runner.fn(inc),
        runtime=runner.runtime,
        name="leaky",
        max_items_per_worker=3,
        on_stop=close_hangs,
        stop_timeout=0.2,
    )
    try:
        with caplog.at_level("WARNING", logger="conveyor"):
            result = runner.run(pipeline, collect=True)
        assert sorted(result.outputs) == list(range(1, 7))
        # Two lives, items 0-2 and 3-5, each ending in on_stop (a worker process's
        # second at the end of the input; no third thread life starts, having no item).
        said = "conveyor: on_stop of stage 'leaky' (map) did not return within 0.2 s: "
        warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith(said)]
        if runner.runtime == "thread":
            fate = "worker thread conveyor-leaky-0 is left behind; a fresh thread goes on"
            assert warnings == [said + fate] * 2, caplog.text
            stuck = "left behind: conveyor-leaky-0, conveyor-leaky-0 (daemon threads, "
            assert stuck in caplog.text, caplog.text
        else:
            worker = "worker interpreter" if runner.runtime == "interpreter" else "worker process"
            assert len(warnings) == 2, caplog.text
            assert all(w.startswith(f"{said}{worker} conveyor-leaky-0 (pid ") for w in warnings)
            assert "left behind" not in caplog.text  # the workers were killed, not left
        leftovers.assert_only_daemons_left()
    finally:
        release.set()
        release.close()
    leftovers.assert_none()


def test_stop_timeout_gives_a_slow_on_stop_the_time_it_needs_and_no_more(
    runner: Runner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The repro: a worker's on_stop had 5 s, fixed: a flush that needed more was killed
    # (a worker process) or left behind, its writes lost, and nothing could give it more.
    if runner.runtime == "async":  # no worker to recycle: coroutines are not replaced
        return
    folder = str(tmp_path)

    def slow_flush(state: object) -> None:
        time.sleep(0.6)  # the flush's own work, not a wait for the test
        Path(folder, f"flushed-{uuid.uuid4().hex}").touch()

    for stop_timeout, flushes in ((30.0, 2), (0.2, 0)):
        for old in Path(folder).glob("flushed-*"):
            old.unlink()
        pipeline = cv.Pipeline(range(6)).map(
            runner.fn(inc),
            runtime=runner.runtime,
            name="flusher",
            max_items_per_worker=3,
            on_stop=slow_flush,
            stop_timeout=stop_timeout,
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="conveyor"):
            result = runner.run(pipeline, collect=True)
        assert sorted(result.outputs) == list(range(1, 7))
        overran = "on_stop of stage 'flusher' (map) did not return within"
        if flushes:  # each life's on_stop ran to its end, unwarned
            assert len(list(Path(folder).glob("flushed-*"))) == flushes, caplog.text
            assert overran not in caplog.text
        else:
            assert overran in caplog.text


def hooks(
    folder: str, stage: str
) -> tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]:
    """on_start / on_stop that leave files behind (worker processes can report too).

    on_start writes ``<stage>-start-<token>`` (one token per worker) holding its
    pid, and returns the worker's state, ``{"token": token, "items": 0}``;
    on_stop writes ``<stage>-stop-<token>`` holding the state's ``items``.
    """

    def on_start() -> dict[str, Any]:
        token = uuid.uuid4().hex
        Path(folder, f"{stage}-start-{token}").write_text(str(os.getpid()))
        return {"token": token, "items": 0}

    def on_stop(state: dict[str, Any]) -> None:
        Path(folder, f"{stage}-stop-{state['token']}").write_text(str(state["items"]))

    return on_start, on_stop


def files(folder: Path, stage: str, what: str) -> dict[str, str]:
    """token -> content of the ``<stage>-<what>-<token>`` files."""
    return {p.name.rsplit("-", 1)[1]: p.read_text() for p in folder.glob(f"{stage}-{what}-*")}


def test_on_start_and_on_stop_run_once_per_worker_with_its_own_state(
    runner: Runner, tmp_path: Path
) -> None:
    folder = str(tmp_path)

    def seen_by(stage: str) -> Callable[[int], int]:
        def mark(x: int) -> int:
            state = cv.worker_state()
            state["items"] += 1  # the very object on_start returned, kept across calls
            Path(folder, f"{stage}-seen-{state['token']}").write_text(str(os.getpid()))
            return x

        return mark

    def keep_odd(x: int) -> bool:
        return x % 2 == 1

    # runner.fn makes a hook a coroutine function on the async runtime: each stage
    # has one plain hook and one that is `async def` there.
    start_all, stop_all = hooks(folder, "all")
    start_odd, stop_odd = hooks(folder, "odd")
    pipeline = (
        cv.Pipeline(range(60))
        .map(
            runner.fn(seen_by("all")),
            workers=2,
            runtime=runner.runtime,
            on_start=start_all,
            on_stop=runner.fn(stop_all),
            name="all",
        )
        .filter(runner.fn(keep_odd), runtime=runner.runtime)
        .map(
            runner.fn(seen_by("odd")),
            workers=3,
            runtime=runner.runtime,
            on_start=runner.fn(start_odd),
            on_stop=stop_odd,
            # A call under a timeout sees its worker's state too.
            timeout=WAIT,
            name="odd",
        )
    )
    result = runner.run(pipeline, collect=True)
    assert result.outputs == list(range(1, 60, 2))
    for stage, workers, items in (("all", 2, 60), ("odd", 3, 30)):
        started = files(tmp_path, stage, "start")
        if runner.on_redis or runner.runtime == "async":
            # A Redis worker's hooks run once per consumer and worker lifetime; an async
            # stage's tasks start as work comes, up to `workers` (see the test below).
            assert 1 <= len(started) <= workers, (stage, started)
        else:
            assert len(started) == workers, (stage, started)
        # Every worker was stopped, with its own state, by the time the run returned.
        stopped = files(tmp_path, stage, "stop")
        assert stopped.keys() == started.keys(), stage
        assert sum(int(n) for n in stopped.values()) == items, (stage, stopped)
        # A worker's calls run where its on_start ran (its process, for the process runtime).
        seen = files(tmp_path, stage, "seen")
        assert seen.keys() <= started.keys(), stage
        assert {token: started[token] for token in seen} == seen, stage


@pytest.mark.parametrize("runner", ASYNC_ONLY, indirect=True)
def test_an_async_stage_of_a_few_workers_starts_them_all_at_once_a_slow_on_start_paid_once(
    runner: Runner,
) -> None:
    # Repro: with tasks started only as work came, the 8 on_start calls of a stage
    # ran one round after another (1, then 5, then the rest): a slow on_start (a
    # connection made) was paid three times over. Here each on_start waits for all
    # 8 to be in progress: the run ends only if they run at once.
    started: list[int] = []
    all_in: list[asyncio.Event] = []

    async def connect() -> int:
        if not all_in:
            all_in.append(asyncio.Event())
        started.append(len(started))
        if len(started) == 8:
            all_in[0].set()
        await asyncio.wait_for(all_in[0].wait(), WAIT)
        return started[-1]

    async def work(x: int) -> int:
        return x

    pipeline = cv.Pipeline(range(50)).map(work, workers=8, runtime="async", on_start=connect)
    assert sorted(runner.run(pipeline, collect=True).outputs or []) == list(range(50))
    assert len(started) == 8


@pytest.mark.parametrize("runner", ASYNC_ONLY, indirect=True)
def test_async_workers_start_as_work_comes_up_to_workers_each_with_its_hooks(
    runner: Runner,
) -> None:
    # Repro: workers=100_000 made every task (and its port) up front: 2.3 s and about
    # 300 MB for 2,000 items. Now tasks start when all running ones are busy.
    live: dict[str, int] = {"now": 0, "most": 0, "started": 0, "stopped": 0}
    everyone_in: list[asyncio.Event] = []

    def on_start() -> int:
        live["started"] += 1
        return live["started"]

    def on_stop(state: int) -> None:
        live["stopped"] += 1

    async def meet(x: int) -> int:
        # Items 0..5 wait for each other: the run ends only if 6 tasks run at once.
        assert isinstance(cv.worker_state(), int)
        if x >= 6:
            return x
        if not everyone_in:
            everyone_in.append(asyncio.Event())
        live["now"] += 1
        live["most"] = max(live["most"], live["now"])
        if live["now"] == 6:
            everyone_in[0].set()
        await asyncio.wait_for(everyone_in[0].wait(), WAIT)
        live["now"] -= 1
        return x

    pipeline = cv.Pipeline(range(200)).map(
        meet, workers=6, runtime="async", on_start=on_start, on_stop=on_stop, ordered=False
    )
    assert sorted(runner.run(pipeline, collect=True).outputs or []) == list(range(200))
    assert live["most"] == 6
    assert live["started"] == live["stopped"] == 6  # never more than `workers`

    async def trivial(x: int) -> int:
        return x

    live.update(started=0, stopped=0)
    many = cv.Pipeline(range(2000)).map(
        trivial, workers=100_000, runtime="async", on_start=on_start, on_stop=on_stop
    )
    result = runner.run(many, collect=True)
    assert result.outputs == list(range(2000))
    # A trivial stage keeps few tasks busy at once: far fewer start than `workers`.
    assert 1 <= live["started"] == live["stopped"] <= 100, live
    assert result.stats[0].workers == 100_000


def test_max_items_per_worker_gives_each_life_its_quota_and_no_idle_life_at_the_end(
    runner: Runner, tmp_path: Path
) -> None:
    """A thread worker that used up its quota on the last items started a fifth life,
    its on_start (a connection opened) and on_stop, for no item at all."""
    if runner.runtime == "async":  # coroutines are not started afresh: refused at once
        with pytest.raises(cv.ConfigurationError, match="'max_items_per_worker'"):
            cv.Pipeline(range(20)).map(runner.fn(inc), runtime="async", max_items_per_worker=5)
        return
    folder = str(tmp_path)
    on_start, on_stop = hooks(folder, "life")

    def count(x: int) -> int:
        cv.worker_state()["items"] += 1
        return x

    pipeline = cv.Pipeline(range(20)).map(
        count,
        runtime=runner.runtime,
        max_items_per_worker=5,
        on_start=on_start,
        on_stop=on_stop,
    )
    assert runner.run(pipeline, collect=True).outputs == list(range(20))
    started = files(tmp_path, "life", "start")
    stopped = files(tmp_path, "life", "stop")
    assert stopped.keys() == started.keys()
    assert sorted(int(n) for n in stopped.values()) == [5, 5, 5, 5]


# ---------------------------------------------------------------------- leaving early


def test_breaking_out_of_the_loop_stops_the_run_and_leaves_nothing_running(
    runner: Runner,
) -> None:
    leftovers = Leftovers()
    pipeline = two_stages(runner, range(100_000))
    got = []
    left = time.monotonic()
    # closing(): what leaving the loop does in CPython, but an error while the
    # run ends reaches the test rather than being printed as unraisable.
    with closing(runner.iterate(pipeline, run_id="left-early")) as outputs:
        for x in outputs:
            got.append(x)
            if len(got) == 5:
                left = time.monotonic()
                break
    took = time.monotonic() - left
    assert took < 5.0, f"leaving the loop took {took:.1f} s to end the run"
    assert got == [inc(triple(x)) for x in range(5)]
    leftovers.assert_none()
    if runner.on_redis:
        # The run stays in Redis, to resume or cancel (docs/distributed.md).
        assert runner.backend_for().cancel(pipeline, "left-early")


def test_stop_ends_a_started_run_promptly_and_leaves_nothing_running(runner: Runner) -> None:
    pulled = threading.Event()

    def endless() -> Iterator[int]:
        for i in itertools.count():
            if i == 50:
                pulled.set()
            yield i

    async def slow_inc(x: int) -> int:
        await asyncio.sleep(0.001)  # a little work per item
        return x + 1

    leftovers = Leftovers()
    pipeline = cv.Pipeline(endless()).map(runner.fn(slow_inc), workers=2, runtime=runner.runtime)
    handle = runner.start(pipeline, collect=True)
    with handle:
        assert pulled.wait(WAIT), "the run did not pull 50 items"
        stopping = time.monotonic()
        handle.stop()
        result = handle.join(WAIT)
        took = time.monotonic() - stopping
    assert took < 5.0, f"stop() took {took:.1f} s"
    assert result.stopped
    outputs = result.outputs or []
    assert outputs == [x + 1 for x in range(len(outputs))]  # what came through, in order
    leftovers.assert_none()


def test_stop_cancels_an_async_source_waiting_for_its_next_item_and_runs_its_cleanup(
    runner: Runner,
) -> None:
    """An async source waits by awaiting, so a stop can cancel it: its cleanup runs,
    and no thread is left waiting in it (one was, for as long as the source waited)."""
    waiting, cleaned = threading.Event(), threading.Event()
    leftovers = Leftovers()
    source = quiet_after(5, waiting, cleaned)
    pipeline = cv.Pipeline(source).map(runner.fn(triple), runtime=runner.runtime)
    handle = runner.start(pipeline, collect=True)
    with handle:
        assert waiting.wait(WAIT), "the source never waited"
        handle.stop()
        result = handle.join(WAIT)
    assert result.stopped
    assert cleaned.wait(WAIT), "the source's cleanup never ran"
    outputs = result.outputs or []
    assert outputs == [triple(x) for x in range(len(outputs))]
    leftovers.assert_none()


def test_ctrl_c_while_iterating_stops_the_run_promptly_and_leaves_nothing_running(
    runner: Runner,
) -> None:
    async def slow_triple(x: int) -> int:
        await asyncio.sleep(0.05)  # slow work: the loop mostly waits inside the library
        return triple(x)

    # The source never ends: only the KeyboardInterrupt gets the test out of the loop.
    pipeline = cv.Pipeline(itertools.count()).map(
        runner.fn(slow_triple), workers=2, runtime=runner.runtime
    )
    leftovers = Leftovers()
    five = threading.Event()
    got = []
    pressed = time.monotonic()
    with ctrl_c_when(five), pytest.raises(KeyboardInterrupt):
        for x in runner.iterate(pipeline, run_id="interrupted"):
            got.append(x)
            if len(got) == 5:
                pressed = time.monotonic()
                five.set()
    took = time.monotonic() - pressed
    assert took < 5.0, f"Ctrl-C took {took:.1f} s to end the run"
    assert got == [triple(x) for x in range(len(got))]
    leftovers.assert_none()
    if runner.on_redis:
        assert runner.backend_for().cancel(pipeline, "interrupted")


# ---------------------------------------------------------------------- resuming


@pytest.mark.parametrize("runner", REDIS_ONLY, indirect=True)
def test_a_run_left_early_resumes_by_run_id_and_every_output_arrives(runner: Runner) -> None:
    async def slow_on_0(x: int) -> int:
        if x == 0:
            await asyncio.sleep(0.3)  # slow work: the others wait behind it, then go at once
        return triple(x)

    expected = [inc(triple(x)) for x in range(200)]
    pipeline = (
        cv.Pipeline(range(200))
        .map(runner.fn(slow_on_0), workers=2, runtime=runner.runtime)
        .map(runner.fn(inc), workers=2, runtime=runner.runtime)
    )
    # The entries the stopped workers held come back after the visibility timeout.
    options = {"visibility_timeout": 1.0}
    first = []
    for x in runner.iterate(pipeline, run_id="resumed", backend_options=options):
        first.append(x)
        if len(first) == 10:
            break
    assert first == expected[:10]
    rest = runner.run(pipeline, run_id="resumed", backend_options=options, collect=True).outputs
    rest = rest or []
    # At least once: the resumed run may repeat some of the first outputs, never skip one.
    assert len(rest) >= len(expected) - len(first), rest[:20]
    assert rest == expected[len(expected) - len(rest) :], rest[:20]


# ---------------------------------------------------------------------- running again


def test_a_second_run_over_a_closed_and_drained_channel_says_so(runner: Runner) -> None:
    channel: cv.Channel[int] = cv.Channel(16)
    channel.put_many(list(range(10)))
    channel.close()
    pipeline = two_stages(runner, channel)
    assert runner.run(pipeline, collect=True).outputs == [inc(triple(x)) for x in range(10)]
    # The channel gave everything to the first run: a second run would silently be empty.
    with pytest.raises(cv.ConfigurationError, match="Channel that is closed and drained"):
        runner.run(pipeline, collect=True)
    with pytest.raises(cv.ConfigurationError, match="Channel that is closed and drained"):
        list(runner.iterate(pipeline))


def drained_channel() -> cv.Channel[int]:
    channel: cv.Channel[int] = cv.Channel(16)
    channel.put_many(list(range(10)))
    channel.close()
    return channel


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (lambda: (x for x in range(10)), r"'source' is a one-shot iterator \(generator\)"),
        (drained_channel, "Channel that is closed and drained"),
    ],
    ids=["generator", "channel"],
)
def test_a_backends_own_methods_refuse_a_second_run_over_a_used_up_source(
    runner: Runner, source: Callable[[], Any], message: str
) -> None:
    """Regression: ``RedisBackend(...).run(pipeline)`` and ``.iterate(pipeline)``, called
    directly, skipped the pipeline's checks: a second run over a generator or a drained
    Channel gave [] without a word."""
    backend = runner.direct_backend()
    pipeline = two_stages(runner, source())
    result = backend.run(pipeline, collect=True)
    assert result.outputs == [inc(triple(x)) for x in range(10)]
    with pytest.raises(cv.ConfigurationError, match=message):
        backend.run(pipeline, collect=True)
    with pytest.raises(cv.ConfigurationError, match=message):
        backend.iterate(pipeline)  # at the call, not at the first output
    with pytest.raises(cv.ConfigurationError, match=message):
        backend.start(pipeline)  # at once, not when the handle is joined
    with pytest.raises(cv.ConfigurationError, match=message):
        pipeline.run(backend=backend)


def test_a_backends_own_methods_refuse_what_is_no_pipeline_and_flags_that_are_no_bool(
    runner: Runner,
) -> None:
    """Regression: ``backend.run([1, 2])`` was an AttributeError from inside conveyor,
    and ``RedisBackend.run(pipeline, collect="yes")`` ran, the str taken as true."""
    backend = runner.direct_backend()
    method = type(backend).__name__
    for name, call in (
        ("run", backend.run),
        ("iterate", backend.iterate),
        ("start", backend.start),
    ):
        with pytest.raises(
            cv.ConfigurationTypeError,
            match=rf"{method}.{name}\(\) 'pipeline' must be a conveyor.Pipeline, got list",
        ):
            call([1, 2, 3])
    pipeline = two_stages(runner, range(3))
    for flag in ("collect", "progress"):
        with pytest.raises(cv.ConfigurationTypeError, match=f"'{flag}' must be True or False"):
            backend.run(pipeline, **{flag: "yes"})
        with pytest.raises(cv.ConfigurationTypeError, match=f"'{flag}' must be True or False"):
            backend.start(pipeline, **{flag: "yes"})
    with pytest.raises(cv.ConveyorError, match="'progress'"):  # local: never takes it
        backend.iterate(pipeline, progress="yes")  # type: ignore[arg-type]
    # Nothing refused was counted as a run of the source, nor started one.
    assert backend.run(pipeline, collect=True).outputs == [inc(triple(x)) for x in range(3)]


def test_a_backends_start_runs_its_pipeline_once(runner: Runner) -> None:
    """``start`` admits the run and its thread runs it: a one-shot source is counted
    once (admitting it again in the thread must not refuse it as pulled)."""
    backend = runner.direct_backend()
    handle = backend.start(two_stages(runner, (x for x in range(10))), collect=True)
    assert handle.join(WAIT).outputs == [inc(triple(x)) for x in range(10)]


def test_a_first_run_over_a_closed_empty_channel_is_an_empty_run(runner: Runner) -> None:
    empty: cv.Channel[int] = cv.Channel(4)
    empty.close()
    assert runner.run(two_stages(runner, empty), collect=True).outputs == []


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf")])
def test_join_refuses_a_bad_timeout_naming_join_and_the_run_goes_on(
    runner: Runner, timeout: float
) -> None:
    handle = runner.start(two_stages(runner, range(20)))
    # On Redis the handle said "BackgroundRun.wait()", a method the caller did not call.
    with pytest.raises(cv.ConfigurationError, match=r"\.join\(\) 'timeout' must be"):
        handle.join(timeout=timeout)
    assert handle.join(timeout=WAIT).items_out == 20


# ---------------------------------------------------------------------- the handle


def endless(pulled: threading.Event, at: int = 30) -> Iterator[int]:
    """0, 1, 2, ... for ever, setting ``pulled`` once item ``at`` is pulled."""
    for i in itertools.count():
        if i == at:
            pulled.set()
        yield i


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_a_started_runs_handle_has_the_local_handles_methods_on_every_backend(
    runner: Runner,
) -> None:
    """Regression: on Redis ``start()`` gave a handle without ``result_so_far()``."""
    from conveyor.pipeline import RunHandle

    with runner.start(two_stages(runner, range(20)), collect=True) as handle:
        assert _public(type(handle)) == _public(RunHandle)
        result = handle.join(WAIT)
    assert handle.wait(0) and handle.done()
    assert handle.result_so_far().outputs == result.outputs == [inc(triple(x)) for x in range(20)]


def test_result_so_far_and_stats_are_live_while_a_started_run_goes_on(runner: Runner) -> None:
    """Regression: on Redis ``stats()`` was empty and ``result_so_far()`` missing until the end."""
    pulled = threading.Event()
    handle = runner.start(two_stages(runner, endless(pulled)), collect=True)
    with handle:
        assert pulled.wait(WAIT), "the run did not pull 30 items"
        deadline = time.monotonic() + WAIT
        # Bounded polling: a run's counters offer nothing to wait on.
        while handle.result_so_far().stats[1].items_out < 10:
            assert time.monotonic() < deadline, "result_so_far() never showed 10 outputs"
            time.sleep(0.01)
        assert not handle.done()
        assert handle.stats()[0].name == "triple"
        assert [s.name for s in handle.result_so_far().stats] == ["triple", "inc"]
        handle.stop()
        result = handle.join(WAIT)
    assert result.stopped
    assert handle.result_so_far().stopped


def test_stop_with_drain_lets_the_items_inside_finish_on_every_backend(runner: Runner) -> None:
    """Regression: ``stop(drain=True)`` was refused on Redis (ConfigurationError)."""
    pulled = threading.Event()
    pipeline = two_stages(runner, endless(pulled))
    handle = runner.start(pipeline, collect=True)
    with handle:
        assert pulled.wait(WAIT), "the run did not pull 30 items"
        handle.stop(drain=True)
        result = handle.join(WAIT)
    assert result.stopped
    outputs = result.outputs or []
    assert len(outputs) >= 1
    # Every item the source gave before the drain came through: nothing lost, in order.
    assert outputs == [inc(triple(x)) for x in range(len(outputs))]
    assert result.stats[0].items_in == len(outputs)
    if runner.on_redis:
        # Drained, the run completed: nothing is left in Redis to resume.
        assert not runner.backend_for().cancel(pipeline, getattr(result, "run_id", ""))


# ---------------------------------------------------------------------- the source


def exit_on_tenth(x: int) -> int:
    if x == 10:
        raise SystemExit(3)
    return x


class Broke(Exception):
    """A stage's error."""


def fail_on_tenth(x: int) -> int:
    if x == 10:
        raise Broke(x)
    return x


@pytest.mark.parametrize("how", ["a stage fails", "the loop is left", "stop()"])
@pytest.mark.parametrize("flavour", ["generator", "async generator"])
def test_a_run_that_ends_early_closes_its_generator_source_before_it_returns(
    runner: Runner, how: str, flavour: str
) -> None:
    # Repro: a failed run left its generator source to the garbage collector, so
    # the generator's `finally:` (a file's `with` block) ran late, in another thread.
    pulled, closed = threading.Event(), threading.Event()
    threads: list[int] = []

    def endless() -> Iterator[int]:
        threads.append(threading.get_ident())
        try:
            for i in itertools.count():
                if i == 20:
                    pulled.set()
                yield i
        finally:
            threads.append(threading.get_ident())
            closed.set()

    async def aendless() -> Any:
        try:
            for i in itertools.count():
                if i == 20:
                    pulled.set()
                yield i
                await asyncio.sleep(0)
        finally:
            closed.set()

    source = endless() if flavour == "generator" else aendless()
    # An item's error does not end a run on Redis (it is delivered again, then
    # dead-lettered, while the endless source goes on): a SystemExit does.
    fail = exit_on_tenth if runner.on_redis else fail_on_tenth
    stage = fail if how == "a stage fails" else inc
    pipeline = cv.Pipeline(source).map(runner.fn(stage), workers=2, runtime=runner.runtime)
    if how == "a stage fails":
        with pytest.raises((Broke, SystemExit)):
            runner.run(pipeline)
    elif how == "the loop is left":
        with closing(runner.iterate(pipeline)) as outputs:
            for x in outputs:
                if x == 5:
                    break
    else:
        handle = runner.start(pipeline)
        with handle:
            assert pulled.wait(WAIT), "the run did not pull 20 items"
            handle.stop()
            handle.join(WAIT)
    assert closed.is_set(), "the source was not closed when the run ended"
    if flavour == "generator":
        first, last = threads
        assert first == last, "the source was closed from another thread than its feeder's"


@pytest.mark.timeout(60)
def test_an_on_stop_that_hangs_holds_the_run_about_a_second_past_its_stop_timeout_no_more(
    runner: Runner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The bound a hung on_stop puts on the end of a run: its stop_timeout, then at most
    # the second the end of a run adds (engine.join_timeout), on every runtime x backend.
    release = ProcessEvent(tmp_path, "release")
    began = tmp_path / "on_stop-began"

    def close_hangs(state: object) -> None:
        if not began.exists():
            began.write_text(repr(time.time()))
        release.wait(WAIT)  # stands for a connection whose close never returns

    stop_timeout = 0.5
    pipeline = cv.Pipeline(range(3)).map(
        runner.fn(inc),
        runtime=runner.runtime,
        name="hangs",
        on_stop=close_hangs,
        stop_timeout=stop_timeout,
    )
    try:
        with caplog.at_level("WARNING", logger="conveyor"):
            result = runner.run(pipeline, collect=True)
        ended = time.time()
        assert sorted(result.outputs) == [1, 2, 3]
        held = ended - float(began.read_text())
        slack = 1.0  # reading the result, ending the run's threads, on a loaded machine
        assert stop_timeout * 0.9 <= held <= stop_timeout + 1.0 + slack, (held, caplog.text)
        assert "'hangs'" in caplog.text  # said: overran (a process killed) or left behind
    finally:
        release.set()
        release.close()
