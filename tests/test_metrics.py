"""Per-stage metrics, the timeline, the bottleneck rule and the stall detector.

Slow stages here are made slow by their work (a fixed sleep per item, or a
wait on an Event the test controls), never by sleeping in the test itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import psutil
import pytest

import conveyor as cv
from conveyor import stall
from conveyor.metrics import (
    LATENCY_BUCKETS,
    Bottleneck,
    RecentRate,
    StageStats,
    Timeline,
    find_bottleneck,
    latency_bucket,
    latency_quantile,
)
from test_pipeline_helpers import (  # noqa: F401 - no_thread_left is a fixture
    WAIT,
    conveyor_log,
    conveyor_threads,
    must_wait,
    no_thread_left,
)

pytestmark = pytest.mark.usefixtures("no_thread_left")

SLOW_ITEM = 0.002  # seconds of sleep per item in the deliberately slow stage


def work_slowly(x: int) -> int:
    """The slow stage's work: a fixed sleep per item (the work itself, not a synchronisation)."""
    time.sleep(SLOW_ITEM)
    return x


def plus_one(x: int) -> int:
    return x + 1


def slow_middle(n: int = 150, workers: int = 1) -> cv.Pipeline[int]:
    """read (fast) -> parse (slow, small input queue) -> write (fast)."""
    return (
        cv.Pipeline(range(n))
        .map(plus_one, workers=2, name="read")
        .map(work_slowly, workers=workers, capacity=16, name="parse")
        .map(plus_one, name="write")
    )


def stats(name: str = "s", **changes: Any) -> StageStats:
    """A synthetic snapshot: one worker over 10 s, idle unless ``changes`` say otherwise."""
    base = StageStats(
        name=name,
        kind="map",
        runtime="thread",
        workers=1,
        items_in=100,
        items_out=100,
        filtered=0,
        failed=0,
        retried=0,
        busy_seconds=0.0,
        wait_input_seconds=0.0,
        wait_output_seconds=0.0,
        elapsed_seconds=10.0,
        queue_size=0,
        queue_capacity=16,
    )
    return replace(base, **changes)


# ---------------------------------------------------------------------- latency histogram


@pytest.mark.quick
def test_latency_buckets_grow_with_the_time_and_stay_in_range() -> None:
    times = [0.0, 1e-8, 1e-6, 1e-3, 1.0, 1e6]
    buckets = [latency_bucket(t) for t in times]
    assert buckets == sorted(buckets)
    assert buckets[0] == 0 and buckets[-1] == LATENCY_BUCKETS - 1
    assert len(set(buckets[2:5])) == 3


@pytest.mark.quick
def test_latency_quantiles_are_exact_to_a_bucket() -> None:
    histogram = [0] * LATENCY_BUCKETS
    for t, count in ((0.001, 90), (0.1, 10)):
        histogram[latency_bucket(t)] += count
    assert latency_quantile(histogram, 0.5) == pytest.approx(0.001, rel=0.1)
    assert latency_quantile(histogram, 0.99) == pytest.approx(0.1, rel=0.1)
    assert latency_quantile([0] * LATENCY_BUCKETS, 0.5) == 0.0


def test_a_runs_latency_is_the_time_per_item_of_the_stage_function() -> None:
    result = slow_middle(60).run()
    read, parse, _ = result.stats
    # A sleep of 2 ms takes at least 2 ms; the bucket's middle is within ~10% of it.
    assert parse.latency_p50 >= SLOW_ITEM * 0.9
    assert parse.latency_p99 >= parse.latency_p50
    assert read.latency_p50 < parse.latency_p50 / 10


# ---------------------------------------------------------------------- fractions and plain data


@pytest.mark.quick
def test_the_shares_of_worker_time_are_fractions_of_the_workers_wall_time() -> None:
    s = stats(
        workers=4,
        busy_seconds=20.0,
        wait_input_seconds=8.0,
        wait_output_seconds=4.0,
        elapsed_seconds=10.0,
    )
    assert (s.utilisation, s.waiting_input, s.blocked_output) == (0.5, 0.2, 0.1)
    assert s.throughput == 10.0
    assert stats(elapsed_seconds=0.0).utilisation == 0.0


@pytest.mark.quick
def test_stats_are_plain_data_for_json() -> None:
    data = stats(cpu_seconds=1.5).as_dict()
    assert json.loads(json.dumps(data)) == data
    assert {"utilisation", "waiting_input", "blocked_output", "throughput", "queue_fill"} <= set(
        data
    )
    assert {"latency_p50", "latency_p99", "rate_now", "cpu_seconds"} <= set(data)


def test_the_result_json_holds_stages_bottleneck_failures_and_timeline(tmp_path: Path) -> None:
    result = slow_middle(80).run(report=tmp_path / "run.html")
    data = json.loads(result.to_json())
    assert [s["name"] for s in data["stages"]] == ["read", "parse", "write"]
    assert data["bottleneck"]["stage"] == "parse"
    assert data["bottleneck"]["text"] == str(result.bottleneck)
    assert data["failures"] == []
    timeline = data["timeline"]
    assert timeline["stages"] == ["read", "parse", "write"]
    assert timeline["samples"][-1]["items_in"] == [80, 80, 80]


def test_a_live_handle_gives_stats_while_the_run_goes_on() -> None:
    gate = threading.Event()
    taken = threading.Event()

    def held(x: int) -> int:
        taken.set()
        must_wait(gate)
        return x

    with cv.Pipeline(range(10)).map(held, name="held").start() as handle:
        must_wait(taken)
        (live,) = handle.stats()
        assert live.name == "held" and live.items_in == 0
        assert live.elapsed_seconds > 0
        gate.set()
        result = handle.join(10)
    assert result.stats[0].items_in == 10


@pytest.mark.quick
def test_a_recent_rate_is_the_growth_over_the_last_seconds_and_none_before_half_a_second() -> None:
    recent = RecentRate()
    assert recent.rate(0.0, 0) is None
    assert recent.rate(0.4, 40) is None  # too little history yet
    assert recent.rate(1.0, 100) == pytest.approx(100.0)
    recent.rate(2.0, 200)
    recent.rate(3.0, 300)
    # Only the last three seconds count: a stall shows as a falling rate.
    assert recent.rate(5.0, 300) == pytest.approx((300 - 200) / 3.0)
    assert recent.rate(5.05, 300) == 0.0  # the window has slid past the last growth


def test_rate_now_follows_recent_progress_and_is_the_overall_rate_at_the_end() -> None:
    result = slow_middle(60).run()
    for s in result.stats:
        assert s.rate_now == pytest.approx(s.throughput)


def test_a_sleeping_stage_uses_little_cpu_for_its_busy_time() -> None:
    (s,) = cv.Pipeline(range(40)).map(work_slowly, name="sleepy").run().stats
    assert s.cpu_seconds is not None
    assert 0.0 <= s.cpu_seconds < 0.5 * s.busy_seconds


def slow_io(x: int) -> int:
    time.sleep(0.005)  # over twice the 2 ms a batch aims at: a batch never grows
    return x


async def aslow_io(x: int) -> int:
    await asyncio.sleep(0.005)
    return x


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("runtime", ["thread", "async"])
def test_workers_take_slow_items_one_at_a_time(runtime: Any, ordered: bool) -> None:
    # A batch of several slow items would run them one after the other in one
    # worker while its peers wait: every take must return one item.
    fn: Any = slow_io if runtime == "thread" else aslow_io
    result = (
        cv.Pipeline(range(48))
        .map(fn, workers=8, runtime=runtime, ordered=ordered)
        .map(fn, workers=8, runtime=runtime, ordered=ordered)
        .run(collect=True)
    )
    assert result.outputs is not None
    assert (result.outputs if ordered else sorted(result.outputs)) == list(range(48))
    for s in result.stats:
        assert (s.items_in, s.batches) == (48, 48)


def test_workers_take_quick_items_in_batches() -> None:
    (s,) = cv.Pipeline(range(20_000)).map(str, workers=2).run().stats
    assert s.items_in == 20_000
    assert 0 < s.batches < s.items_in


# ---------------------------------------------------------------------- timeline


@pytest.mark.quick
def test_the_timeline_keeps_a_bounded_even_series_ending_with_the_latest_sample() -> None:
    timeline = Timeline(["a"], [10], max_samples=50)
    for i in range(1000):
        timeline.add(i * 0.1, [stats("a", items_in=i, queue_size=i % 10)])
    timeline.add(100.0, [stats("a", items_in=1000)], force=True)  # the final state
    samples = timeline.samples
    assert len(samples) <= 51
    assert samples[-1].items_in == (1000,)
    gaps = [b.seconds - a.seconds for a, b in pairwise(samples[:-1])]  # the last is forced
    assert max(gaps) <= 2 * min(gaps) + 1e-9
    assert all(r == pytest.approx(10.0) for _, r in timeline.rates(0))
    assert all(s.queue_size == (s.items_in[0] % 10,) for s in samples[:-1])


@pytest.mark.quick
def test_a_timeline_without_samples_in_the_middle_gives_no_typical_fill() -> None:
    timeline = Timeline(["a"], [10])
    timeline.add(0.0, [stats("a", queue_size=10)])
    assert timeline.rates(0) == []
    timeline.add(1.0, [stats("a", items_in=200, queue_size=10)])
    assert timeline.typical_fill(0) is None  # the first and last samples are left out
    assert timeline.rates(0) == [(1.0, 100.0)]


# ---------------------------------------------------------------------- the bottleneck rule


@pytest.mark.quick
def test_the_busiest_stage_whose_output_is_free_is_the_bottleneck() -> None:
    result = find_bottleneck(
        [
            stats("read", busy_seconds=3.0, wait_output_seconds=7.0),  # waits for parse
            stats("parse", workers=4, busy_seconds=39.2, wait_input_seconds=0.4),
            stats("write", busy_seconds=1.0, wait_input_seconds=9.0),
        ]
    )
    assert result is not None
    assert (result.where, result.stage) == ("stage", "parse")
    assert "4 workers at 98% busy" in result.evidence
    assert result.hint == "more workers would help"
    assert str(result) == f"{result.evidence}: {result.hint}"


@pytest.mark.quick
def test_a_busy_stage_blocked_on_its_output_is_not_the_bottleneck() -> None:
    result = find_bottleneck(
        [
            stats("a", busy_seconds=6.0, wait_output_seconds=4.0),
            stats("b", busy_seconds=5.5, wait_input_seconds=0.5),
        ]
    )
    assert result is not None and result.stage == "b"


@pytest.mark.quick
def test_the_evidence_gives_the_input_queues_median_fill_when_sampled() -> None:
    timeline = Timeline(["parse"], [16])
    for i in range(5):
        timeline.add(float(i), [stats("parse", queue_size=16)])
    result = find_bottleneck([stats("parse", busy_seconds=9.9)], timeline)
    assert result is not None
    assert "input queue full (100% median fill)" in result.evidence


@pytest.mark.quick
def test_a_starved_first_stage_names_the_source() -> None:
    result = find_bottleneck([stats("a", busy_seconds=1.0, wait_input_seconds=9.0)])
    assert result is not None
    assert (result.where, result.stage) == ("source", None)
    assert "waited for input 90% of the time" in result.evidence


@pytest.mark.quick
def test_a_blocked_last_stage_names_the_consumer_of_the_outputs() -> None:
    result = find_bottleneck([stats("a", busy_seconds=1.0, wait_output_seconds=9.0)])
    assert result is not None
    assert result.where == "consumer"


@pytest.mark.quick
def test_unmeasured_waits_name_the_busiest_stage_on_its_busy_time_and_never_the_ends() -> None:
    # Regression: a Redis run's waits, not measured, read 0%, and the bottleneck line
    # built "waiting for input 0% of the time, output blocked 0%" on them.
    unknown = {"wait_input_seconds": None, "wait_output_seconds": None}
    result = find_bottleneck(
        [stats("a", busy_seconds=2.0, **unknown), stats("b", busy_seconds=8.0, **unknown)]
    )
    assert result is not None and (result.where, result.stage) == ("stage", "b")
    assert result.evidence == "stage 'b': 1 worker at 80% busy (its waits are not measured)"
    # No stage busy enough: neither the source nor the consumer is named on no evidence.
    assert find_bottleneck([stats("a", busy_seconds=1.0, **unknown)]) is None
    assert stats("a", **unknown).as_dict()["waiting_input"] is None


@pytest.mark.quick
def test_no_bottleneck_is_named_without_evidence() -> None:
    assert find_bottleneck([]) is None
    assert find_bottleneck([stats("a", items_in=0)]) is None
    assert find_bottleneck([stats("a", busy_seconds=2.0, wait_input_seconds=2.0)]) is None


@pytest.mark.quick
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"cpu_seconds": 9.5}, "runtime='process'"),
        ({"cpu_seconds": 0.5}, "more workers would help"),
        ({"cpu_seconds": None}, "more workers would help"),
        ({"runtime": "async"}, "more concurrency would help"),
        ({"runtime": "process", "workers": 1}, "more worker processes would help"),
        ({"runtime": "process", "workers": 4096}, "already cover the"),
        ({"runtime": "interpreter", "workers": 1}, "more worker interpreters would help"),
        ({"runtime": "interpreter", "workers": 4096}, "its 4096 interpreters already cover"),
    ],
)
def test_the_hint_depends_on_the_stages_runtime_and_cpu_use(
    changes: dict[str, Any], expected: str
) -> None:
    busy = 9.8 * changes.get("workers", 1)
    result = find_bottleneck([stats("parse", busy_seconds=busy, **changes)])
    assert isinstance(result, Bottleneck)
    assert expected in result.hint


def test_a_pipeline_with_a_known_slow_stage_names_it_with_evidence(tmp_path: Path) -> None:
    result = slow_middle(150).run(report=tmp_path / "run.html")
    bottleneck = result.bottleneck
    assert bottleneck is not None and bottleneck.stage == "parse"
    assert bottleneck.evidence.startswith("stage 'parse': 1 worker at ")
    assert "input queue full" in bottleneck.evidence  # 16 slots, 150 items waiting
    assert bottleneck.hint == "more workers would help"  # sleeping work: threads help
    read, parse, write = result.stats
    assert parse.utilisation >= 0.5
    assert read.blocked_output > parse.blocked_output
    assert write.waiting_input > 0.5


def test_the_bottleneck_moves_when_the_first_stage_is_the_slow_one() -> None:
    p = (
        cv.Pipeline(range(150))
        .map(work_slowly, name="fetch")
        .map(plus_one, workers=2, name="parse")
        .map(plus_one, name="write")
    )
    bottleneck = p.run().bottleneck
    assert bottleneck is not None and bottleneck.stage == "fetch"


def test_the_hint_for_a_slow_process_stage_is_more_processes() -> None:
    def sleep_in_a_process(x: int) -> int:  # local: sent to the workers by value
        time.sleep(0.002)  # the work
        return x

    p = cv.Pipeline(range(200)).map(plus_one, name="read")
    bottleneck = p.map(sleep_in_a_process, runtime="process", name="work").run().bottleneck
    assert bottleneck is not None and bottleneck.stage == "work"
    assert "more worker processes would help" in bottleneck.hint


def test_the_hint_for_a_slow_async_stage_is_more_concurrency() -> None:
    async def await_slowly(x: int) -> int:
        await asyncio.sleep(SLOW_ITEM)  # the work
        return x

    p = cv.Pipeline(range(200)).map(plus_one, name="read")
    bottleneck = p.map(await_slowly, runtime="async", name="work").run().bottleneck
    assert bottleneck is not None and bottleneck.stage == "work"
    assert "more concurrency would help" in bottleneck.hint


def test_a_slow_source_is_named_as_the_bottleneck() -> None:
    def slow_source() -> Iterator[int]:
        for i in range(150):
            time.sleep(SLOW_ITEM)  # the source's work
            yield i

    bottleneck = cv.Pipeline(slow_source()).map(plus_one, name="inc").run().bottleneck
    assert bottleneck is not None and bottleneck.where == "source"


# ---------------------------------------------------------------------- stall detector


class WarningCatcher(logging.Handler):
    """Collects the 'conveyor' logger's warnings and signals the first one."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.first = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.first.set()


@pytest.fixture
def warnings_caught() -> Iterator[WarningCatcher]:
    catcher = WarningCatcher()
    logger = logging.getLogger("conveyor")
    logger.addHandler(catcher)
    try:
        yield catcher
    finally:
        logger.removeHandler(catcher)


def test_a_stall_names_the_worker_its_item_how_long_and_its_stack(
    warnings_caught: WarningCatcher,
) -> None:
    gate = threading.Event()

    def stuck_on_gate(x: int) -> int:
        if x == 3:
            must_wait(gate)
        return x

    p = cv.Pipeline(range(10)).map(stuck_on_gate, name="stuck", capacity=4)
    with p.start(stall_timeout=0.2) as handle:
        must_wait(warnings_caught.first)
        gate.set()
        handle.join(10)
    record = warnings_caught.records[0]
    assert record.name == "conveyor" and record.levelno == logging.WARNING
    text = record.getMessage()
    assert "no item has moved for" in text
    assert "stage 'stuck' (map), worker conveyor-stuck-0: in the stage function for" in text
    first = re.search(r"on a batch starting with item (\d+); its stack:", text)
    assert first is not None and int(first.group(1)) <= 3  # the batch holding item 3
    assert "in stuck_on_gate" in text and "must_wait(gate)" in text
    assert "'stuck' input" in text


def holding_until_released(at: int, release: Path) -> Callable[[int], int]:
    """A stage function that holds item ``at`` until the file ``release`` exists (a
    bounded polling loop: nothing else reaches a worker process)."""

    def stuck_until_released(x: int) -> int:
        if x == at:
            deadline = time.monotonic() + 30.0
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return x

    return stuck_until_released


def test_a_stall_in_a_process_stage_says_process_stage_once(
    warnings_caught: WarningCatcher, tmp_path: Path
) -> None:
    # The repro: "  stage process stage 'stuck' (map), worker conveyor-stuck-0-lane1: ...".
    release = tmp_path / "release"
    stuck_until_released = holding_until_released(3, release)

    p = cv.Pipeline(range(10)).map(stuck_until_released, runtime="process", name="stuck")
    with p.start(stall_timeout=0.2) as handle:
        must_wait(warnings_caught.first)
        release.touch()
        handle.join(30)
    text = warnings_caught.records[0].getMessage()
    assert re.search(r"\n  process stage 'stuck' \(map\), worker conveyor-stuck-0", text), text
    assert "stage process stage" not in text


def test_a_stall_in_a_process_stage_names_the_item_the_worker_process_is_on_and_its_stack(
    warnings_caught: WarningCatcher, tmp_path: Path
) -> None:
    # The repro: the report named the first item of each lane's batch (items 31 and
    # 47 for a worker stuck on 37), twice as "in the stage function", each with the
    # stack of the parent's thread waiting for the child: conveyor's own code.
    release = tmp_path / "release"
    stuck_until_released = holding_until_released(37, release)

    p = cv.Pipeline(range(100)).map(stuck_until_released, runtime="process", name="stuck")
    with p.start(stall_timeout=0.3) as handle:
        must_wait(warnings_caught.first)
        release.touch()
        assert handle.join(30).stats[0].items_out == 100
    text = warnings_caught.records[0].getMessage()
    holder = re.search(
        r"\n  process stage 'stuck' \(map\), worker conveyor-stuck-0 \(pid (\d+)\): in the "
        r"stage function on item 37, its batch held for [\d.]+ s[^;]*; its stack in the "
        r"worker process:\n",
        text,
    )
    assert holder is not None, text
    assert text.count("worker conveyor-stuck-0") == 1, text  # its two lanes: one worker
    assert "in stuck_until_released" in text and "time.sleep(0.02)" in text
    assert "processes.py" not in text  # the parent's waiting is not what is shown


def test_a_stall_in_a_process_stage_that_cannot_answer_says_its_stack_is_not_available(
    warnings_caught: WarningCatcher,
) -> None:
    # A worker process that cannot say where it is (stopped here; a stage holding
    # the GIL in C code alike) is reported once, with the first item of its batch.
    def stops_itself(x: int) -> int:
        if x == 3:
            os.kill(os.getpid(), signal.SIGSTOP)
        return x

    p = cv.Pipeline(range(10)).map(stops_itself, runtime="process", name="stopped")
    with p.start(stall_timeout=0.2) as handle:
        try:
            must_wait(warnings_caught.first)
        finally:
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)
        assert handle.join(30).stats[0].items_out == 10
    text = warnings_caught.records[0].getMessage()
    assert re.search(
        r"\n  process stage 'stopped' \(map\), worker conveyor-stopped-0: on a batch for "
        r"[\d.]+ s.*; its stack: not available \(the worker process did not say where it "
        r"is within 0.5 s",
        text,
    ), text
    assert text.count("worker conveyor-stopped-0") == 1, text


@pytest.mark.parametrize("runtime", ["thread", "async", "process"])
def test_a_stall_in_on_start_names_the_stage_the_hook_and_its_stack(
    warnings_caught: WarningCatcher, tmp_path: Path, runtime: str
) -> None:
    # The repro: an on_start that hangs was reported as "no worker is inside a
    # stage function" (thread, async), or as a worker in the stage function on
    # item 0 (process), with no word of on_start.
    release = tmp_path / "release"

    def connect() -> None:
        deadline = time.monotonic() + 30.0
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # bounded polling: the same file reaches a worker process

    async def connect_async() -> None:
        connect()

    fn: Any = plus_one
    if runtime == "async":

        async def fn(x: int) -> int:
            return x + 1

    hook = connect_async if runtime == "async" else connect
    p = cv.Pipeline(range(10)).map(fn, name="db", runtime=runtime, on_start=hook)  # type: ignore[call-overload]
    with p.start(stall_timeout=0.2) as handle:
        must_wait(warnings_caught.first)
        release.touch()
        assert handle.join(30).stats[0].items_out == 10
    text = warnings_caught.records[0].getMessage()
    assert "no worker is inside a stage function" not in text
    where = "process stage 'db' (map)" if runtime == "process" else "stage 'db' (map)"
    assert re.search(rf"\n  {re.escape(where)}, worker conveyor-db-0\S*: in on_start for ", text), (
        text
    )
    assert re.search(r"; its stack( \(pid \d+\), in the worker process)?:", text), text
    assert "in connect" in text  # the hook's own frame (a worker process says where it is)


@pytest.mark.parametrize("runtime", ["thread", "async", "process"])
def test_a_stall_in_on_stop_names_the_stage_and_the_hook(
    warnings_caught: WarningCatcher, tmp_path: Path, runtime: str
) -> None:
    # The repro: an on_stop that hung, on a worker recycled by max_items_per_worker
    # (the process runtime), was reported as "no worker is inside a stage function",
    # or as a worker in the stage function.
    release = tmp_path / "release"

    def flush(state: object) -> None:
        deadline = time.monotonic() + 30.0
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # bounded polling: the same file reaches a worker process

    fn: Any = plus_one
    if runtime == "async":

        async def fn(x: int) -> int:
            return x + 1

    recycle = {} if runtime == "async" else {"max_items_per_worker": 3}
    p = cv.Pipeline(range(10)).map(fn, name="db", runtime=runtime, on_stop=flush, **recycle)  # type: ignore[call-overload]
    with p.start(stall_timeout=0.2) as handle:
        # A slow start of a worker process may be reported first (as in on_start).
        while not (texts := _messages_about("on_stop", warnings_caught)):
            warnings_caught.first.clear()
            if not _messages_about("on_stop", warnings_caught):  # none came meanwhile
                must_wait(warnings_caught.first)
        release.touch()
        assert handle.join(30).stats[0].items_out == 10
    text = texts[0]
    assert "no worker is inside a stage function" not in text
    where = "process stage 'db' (map)" if runtime == "process" else "stage 'db' (map)"
    pattern = rf"\n  {re.escape(where)}, worker conveyor-db-0\S*: in on_stop for "
    assert re.search(pattern, text), text
    assert "in flush" in text  # the hook's own frame (a worker process says where it is)


def test_a_hook_begun_while_worker_processes_answer_waits_for_the_next_stall_report(
    warnings_caught: WarningCatcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The repro (the [process] case above, once in a CI run): a worker began on_stop
    # while the report asked the worker processes where they are; the report then
    # described that hook, nobody having asked its process, with the stack of the
    # thread that called it in the parent ("in on_stop ...; its stack: ... processes.py").
    # Here a hook call begins in exactly that window, deterministically.
    release = tmp_path / "release"
    stuck_until_released = holding_until_released(3, release)

    asking = stall._ask_worker_processes
    hooks = contextlib.ExitStack()
    began = threading.Event()

    def ask_while_a_hook_begins(seen: Any) -> Any:
        answers = asking(seen)
        if not began.is_set():
            m = seen[0].metrics
            probe = next(iter(m.probes.values()))  # the worker process's own
            hooks.enter_context(m.in_hook("on_stop", worker="conveyor-stuck-0", probe=probe))
            began.set()
        return answers

    monkeypatch.setattr(stall, "_ask_worker_processes", ask_while_a_hook_begins)
    p = cv.Pipeline(range(10)).map(stuck_until_released, runtime="process", name="stuck")
    with hooks, p.start(stall_timeout=0.2) as handle:
        while len(_messages_about("stalled:", warnings_caught)) < 2:
            warnings_caught.first.clear()
            if len(_messages_about("stalled:", warnings_caught)) < 2:
                must_wait(warnings_caught.first)
        release.touch()
        assert handle.join(30).stats[0].items_out == 10
    first, second = _messages_about("stalled:", warnings_caught)[:2]
    assert "on_stop" not in first, first  # begun after the look: the next report's
    hook = r"\n  process stage 'stuck' \(map\), worker conveyor-stuck-0: in on_stop for "
    assert re.search(hook + r"[\d.]+ s; its stack \(pid \d+\), in the worker process:", second)
    assert "processes.py" not in second and "stall.py" not in second, second


def test_a_stall_report_says_a_thread_left_in_on_stop_is_left_behind(
    warnings_caught: WarningCatcher,
) -> None:
    # The repro: a worker thread left behind in an on_stop that overran its
    # stop_timeout (a fresh thread took its place) was named "in on_stop" in every
    # stall report, like a worker the stall was waiting for.
    hung, stalled = threading.Event(), threading.Event()

    def flush(state: object) -> None:
        hung.wait(WAIT)

    def fn(x: int) -> int:
        if x >= 3:  # the fresh thread's first item: the stall the reports are about
            stalled.wait(WAIT)
        return x + 1

    p = cv.Pipeline(range(5)).map(
        fn, name="db", max_items_per_worker=3, on_stop=flush, stop_timeout=0.1
    )
    try:
        with p.start(stall_timeout=0.3) as handle:
            while not (texts := _messages_about("in on_stop", warnings_caught)):
                warnings_caught.first.clear()
                if not _messages_about("in on_stop", warnings_caught):
                    must_wait(warnings_caught.first)
            # The next stall report (the stall goes on) must leave the thread out.
            while len(later := _reports_after(texts[0], warnings_caught)) < 1:
                warnings_caught.first.clear()
                if not _reports_after(texts[0], warnings_caught):
                    must_wait(warnings_caught.first)
            stalled.set()
            hung.set()
            assert handle.join(30).stats[0].items_out == 5
    finally:
        stalled.set()
        hung.set()
    line = next(x for x in texts[0].splitlines() if "in on_stop" in x)
    assert (
        "(left behind: it overran its stop_timeout of 0.1 s, a fresh thread goes on; "
        "not reported again)"
    ) in line
    assert re.search(r"worker conveyor-db-0\S*: in the stage function", texts[0]), texts[0]
    # Named once, then omitted; the stall is the fresh thread's, still reported.
    assert "in on_stop" not in later[0], later[0]
    assert re.search(r"worker conveyor-db-0\S*: in the stage function", later[0]), later[0]


def _reports_after(text: str, caught: WarningCatcher) -> list[str]:
    stalls = _messages_about("stalled:", caught)
    return stalls[stalls.index(text) + 1 :] if text in stalls else []


def _messages_about(word: str, caught: WarningCatcher) -> list[str]:
    return [m for m in (r.getMessage() for r in list(caught.records)) if word in m]


def test_a_stall_in_an_async_stage_names_each_worker_and_shows_its_coroutines_stack(
    warnings_caught: WarningCatcher,
) -> None:
    # The repro: both workers were "worker conveyor-async-loop", each with the event
    # loop's stack (select), nothing of the coroutine that holds the item.
    gate = threading.Event()

    async def fetch(x: int) -> int:
        if x >= 3:  # each worker ends up holding such an item
            while not gate.is_set():
                await asyncio.sleep(0.01)  # stands for a request that does not answer
        return x

    p = cv.Pipeline(range(100)).map(fetch, runtime="async", workers=2, name="fetch")
    with p.start(stall_timeout=0.2) as handle:
        must_wait(warnings_caught.first)
        gate.set()
        assert handle.join(10).stats[0].items_out == 100
    text = warnings_caught.records[0].getMessage()
    for worker in ("conveyor-fetch-0", "conveyor-fetch-1"):
        assert f"stage 'fetch' (map), worker {worker}: in the stage function for" in text, text
    assert "conveyor-async-loop" not in text
    assert "in fetch" in text and "await asyncio.sleep(0.01)" in text


def test_a_stall_in_an_async_stage_that_blocks_its_loop_shows_the_blocking_call(
    warnings_caught: WarningCatcher,
) -> None:
    gate = threading.Event()

    async def blocks(x: int) -> int:
        if x == 3:
            must_wait(gate)  # a blocking call: the event loop's thread waits here
        return x

    p = cv.Pipeline(range(10)).map(blocks, runtime="async", name="blk")
    with p.start(stall_timeout=0.2) as handle:
        must_wait(warnings_caught.first)
        gate.set()
        assert handle.join(10).stats[0].items_out == 10
    text = warnings_caught.records[0].getMessage()
    assert "stage 'blk' (map), worker conveyor-blk-0: in the stage function for" in text, text
    assert "must_wait(gate)" in text


def test_a_stall_in_the_source_shows_the_sources_stack(
    warnings_caught: WarningCatcher,
) -> None:
    gate = threading.Event()

    def stuck_source() -> Iterator[int]:
        yield 1
        must_wait(gate)
        yield 2

    with cv.Pipeline(stuck_source()).map(plus_one, name="inc").start(stall_timeout=0.2) as handle:
        must_wait(warnings_caught.first)
        gate.set()
        assert handle.join(10).stats[0].items_in == 2
    text = warnings_caught.records[0].getMessage()
    assert "no worker is inside a stage function" in text
    assert "in stuck_source" in text


def test_a_run_that_keeps_moving_reports_no_stall(warnings_caught: WarningCatcher) -> None:
    slow_middle(100).run(stall_timeout=0.5)
    assert warnings_caught.records == []


def test_watching_a_run_leaves_no_monitor_thread_behind(tmp_path: Path) -> None:
    slow_middle(20).run(progress=True, report=tmp_path / "r.html", stall_timeout=5.0)
    assert "conveyor-monitor" not in conveyor_threads()


@pytest.mark.quick
def test_a_bad_stall_timeout_is_refused_before_the_run() -> None:
    p = cv.Pipeline(range(3)).map(plus_one)
    with pytest.raises(cv.ConfigurationError, match="'stall_timeout' must be a positive number"):
        p.run(stall_timeout=0)
    with pytest.raises(cv.ConfigurationTypeError, match="'stall_timeout'"):
        p.start(stall_timeout="soon")  # type: ignore[arg-type]


def test_arun_watches_like_run_a_report_progress_lines_and_stalls(
    warnings_caught: WarningCatcher, tmp_path: Path
) -> None:
    path = tmp_path / "arun.html"
    info: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: info.append(record.getMessage())  # type: ignore[method-assign]

    async def main() -> cv.RunResult:
        gate = asyncio.Event()

        async def stuck_on_gate(x: int) -> int:
            if x == 3:
                await gate.wait()
            return x

        async def release_after_the_stall_is_reported() -> None:
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, warnings_caught.first.wait, WAIT)
            gate.set()

        p = cv.Pipeline(range(10)).map(stuck_on_gate, name="stuck", runtime="async")
        watched = p.arun(collect=True, progress=True, report=path, stall_timeout=0.2)
        result, _ = await asyncio.gather(watched, release_after_the_stall_is_reported())
        return result

    with conveyor_log(handler):
        result = asyncio.run(main())
    assert sorted(result.outputs or []) == list(range(10))
    assert "stage 'stuck' (map)" in warnings_caught.records[0].getMessage()
    assert any(line.endswith("(done)") for line in info)
    assert "stuck" in path.read_text(encoding="utf-8")
    assert "conveyor-monitor" not in conveyor_threads()


@pytest.mark.quick
def test_arun_refuses_a_bad_report_path_or_stall_timeout_before_the_run(tmp_path: Path) -> None:
    p = cv.Pipeline(range(3)).map(plus_one)
    with pytest.raises(cv.ConfigurationError, match="'stall_timeout' must be a positive number"):
        asyncio.run(p.arun(stall_timeout=0))
    with pytest.raises(cv.ConfigurationError, match="arun"):
        asyncio.run(p.arun(report=tmp_path / "no-such-folder" / "r.html"))
