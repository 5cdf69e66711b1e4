"""Prometheus metrics: scraped over HTTP from a local run and from a real ``conveyor worker``.

Every scrape goes through HTTP and prometheus_client's own parser, so the text
is valid exposition format. Runs are held at a known point by a gate (an
event locally, Redis lists across processes) and the scrapes are checked
against the counts that point implies; after the gate opens, against the totals.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import conveyor as cv
from conveyor.cli import cli
from conveyor.prometheus import PrometheusExporter
from redis_helpers import (
    GATE_ENV,
    WAIT,
    gate_keys,
    metered,
    new_namespace,
    poisoned,
    wait_until,
    worker_logs,
    worker_processes,
)

if TYPE_CHECKING:
    from conftest import RedisServer, RedisServerFactory

FAMILIES = {
    "conveyor_stage_items": "counter",
    "conveyor_stage_retries": "counter",
    "conveyor_stage_dead_letters": "counter",
    "conveyor_stage_busy_seconds": "counter",
    "conveyor_stage_item_seconds": "histogram",
    "conveyor_stage_workers": "gauge",
    "conveyor_stage_busy_workers": "gauge",
    "conveyor_stage_backlog": "gauge",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition text, by name and labels; checks the families."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {name: f.type for name, f in families.items()} == FAMILIES
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples
    }


def scrape(port: int) -> Samples:
    """GET /metrics from ``port`` on this machine and parse it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as reply:
        return parse(reply.read().decode())


def value(samples: Samples, name: str, stage: str, pipeline: str, **labels: str) -> float:
    """One sample of one stage (KeyError if it is not there)."""
    key = frozenset({"pipeline": pipeline, "stage": stage, **labels}.items())
    return samples[(name, key)]


def items(samples: Samples, stage: str, outcome: str, pipeline: str) -> float:
    """``conveyor_stage_items_total{stage=..., outcome=...}``."""
    return value(samples, "conveyor_stage_items_total", stage, pipeline, outcome=outcome)


def histogram_count(samples: Samples, stage: str, pipeline: str) -> float:
    """Items in a stage's latency histogram, checked against its +Inf bucket."""
    count = value(samples, "conveyor_stage_item_seconds_count", stage, pipeline)
    inf = value(samples, "conveyor_stage_item_seconds_bucket", stage, pipeline, le="+Inf")
    assert count == inf
    return count


# ---------------------------------------------------------------------- a local run


def test_a_local_run_is_scraped_while_it_runs_and_its_totals_after(tmp_path: Path) -> None:
    # More items than the two inc workers can hold (batches of at most 512) and the
    # gate's input together, so that the run is still going at the scrape.
    n, capacity = 5000, 8
    entered, release = threading.Event(), threading.Event()

    def hold_first(x: int) -> int:
        if not entered.is_set():  # the gate stage has one worker: no race here
            entered.set()
            release.wait(WAIT)
        return x

    pipeline = (
        cv.Pipeline(range(n))
        .map(lambda x: x + 1, workers=2, name="inc")
        .map(hold_first, name="gate", capacity=capacity)
    )
    with PrometheusExporter(port=0, pipeline="local") as exporter:
        assert exporter.port is not None
        port = exporter.port
        handle = pipeline.start(metrics=exporter)
        try:
            assert entered.wait(WAIT)
            # The gate holds one item; inc fills the gate's input and waits.
            full = wait_until(
                lambda: (
                    (s := scrape(port))
                    and value(s, "conveyor_stage_backlog", "gate", "local") == capacity
                    and s
                ),
                "the gate stage's input to fill up",
            )
            assert value(full, "conveyor_stage_busy_workers", "gate", "local") == 1
            assert value(full, "conveyor_stage_workers", "inc", "local") == 2
            assert items(full, "gate", "in", "local") == 0
            assert 1 <= items(full, "inc", "in", "local") < n
        finally:
            release.set()
        result = handle.join(WAIT)
        after = scrape(port)
    assert [s.items_in for s in result.stats] == [n, n]
    for stage in ("inc", "gate"):
        assert items(after, stage, "in", "local") == n
        assert items(after, stage, "out", "local") == n
        assert items(after, stage, "failed", "local") == 0
        assert histogram_count(after, stage, "local") == n
        assert value(after, "conveyor_stage_busy_workers", stage, "local") == 0
        assert value(after, "conveyor_stage_backlog", stage, "local") == 0
    busy = value(after, "conveyor_stage_busy_seconds_total", "gate", "local")
    assert busy == value(after, "conveyor_stage_item_seconds_sum", "gate", "local") > 0


def test_a_process_worker_counts_as_one_busy_worker_whatever_its_lanes_hold(
    tmp_path: Path,
) -> None:
    # The repro: a process worker's two lanes (one batch in the child, the next
    # waiting in the pipe) counted as two busy workers: 4 of 2 under load.
    release = str(tmp_path / "release")

    def hold_first(x: int) -> int:
        if x == 0:
            deadline = time.monotonic() + WAIT
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)  # bounded polling: the file reaches the worker process
        return x

    pipeline = cv.Pipeline(range(50)).map(hold_first, runtime="process", name="held")
    with PrometheusExporter(port=0, pipeline="local") as exporter:
        assert exporter.port is not None
        handle = pipeline.start(metrics=exporter)
        try:
            lanes = handle._run.metrics[0].workers
            wait_until(
                lambda: sum(w.current_since is not None for w in list(lanes)) == 2,
                "both lanes of the one worker to hold a batch",
            )
            samples = scrape(exporter.port)
            assert value(samples, "conveyor_stage_workers", "held", "local") == 1
            assert value(samples, "conveyor_stage_busy_workers", "held", "local") == 1
        finally:
            Path(release).touch()
        assert handle.join(WAIT).stats[0].items_out == 50


def test_runs_through_one_exporter_add_up_and_failures_and_retries_are_counted() -> None:
    calls: dict[int, int] = {}

    def flaky(x: int) -> int:
        calls[x] = calls.get(x, 0) + 1
        if x == 3 and calls[x] == 1:
            raise ValueError("once")  # retried
        if x == 5:
            raise ValueError("always")  # skipped
        return x

    registry = CollectorRegistry()
    exporter = PrometheusExporter(registry=registry, pipeline="twice")
    pipeline = cv.Pipeline(range(10)).map(flaky, name="flaky", retries=1, on_error="skip")
    for _ in range(2):
        calls.clear()
        pipeline.run(metrics=exporter)
    samples = parse(generate_latest(registry).decode())
    assert items(samples, "flaky", "in", "twice") == 20
    assert items(samples, "flaky", "out", "twice") == 18
    assert items(samples, "flaky", "failed", "twice") == 2
    # 3 fails once then passes; 5 fails twice (one retry): 2 retries per run.
    assert value(samples, "conveyor_stage_retries_total", "flaky", "twice") == 4
    exporter.close()
    assert generate_latest(registry) == b""  # closing takes the collector off the registry


def test_exporters_of_two_pipelines_share_one_registry() -> None:
    # The repro: the second exporter on an application's registry raised
    # prometheus_client's DuplicatedTimeseries, the docs' advice notwithstanding.
    registry = CollectorRegistry()
    etl = PrometheusExporter(registry=registry, pipeline="etl")
    audit = PrometheusExporter(registry=registry, pipeline="audit")
    cv.Pipeline(range(3)).map(lambda x: x, name="clean").run(metrics=etl)
    cv.Pipeline(range(5)).map(lambda x: x, name="clean").run(metrics=audit)
    samples = parse(generate_latest(registry).decode())
    assert items(samples, "clean", "out", "etl") == 3
    assert items(samples, "clean", "out", "audit") == 5
    etl.close()
    samples = parse(generate_latest(registry).decode())
    assert items(samples, "clean", "out", "audit") == 5
    assert not any(dict(labels)["pipeline"] == "etl" for _, labels in samples)
    audit.close()
    assert generate_latest(registry) == b""


def test_a_second_exporter_of_one_pipeline_on_one_registry_is_refused_naming_it() -> None:
    registry = CollectorRegistry()
    with PrometheusExporter(registry=registry, pipeline="etl"):
        with pytest.raises(cv.ConfigurationError, match="'pipeline' 'etl'"):
            PrometheusExporter(registry=registry, pipeline="etl")
    with PrometheusExporter(registry=registry, pipeline="etl"):  # free again once closed
        pass


def test_a_stage_name_utf8_cannot_encode_leaves_the_scrape_working() -> None:
    # A lone surrogate is what os.fsdecode makes of a file name that is not UTF-8;
    # exposition is UTF-8, so such a label once failed every scrape of the registry.
    registry = CollectorRegistry()
    exporter = PrometheusExporter(registry=registry, pipeline="files \udcfe")
    cv.Pipeline(range(4)).map(lambda x: x, name="read \udcff").run(metrics=exporter)
    samples = parse(generate_latest(registry).decode())
    assert items(samples, "read \\udcff", "out", "files \\udcfe") == 4
    exporter.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    runs=st.lists(
        st.tuples(st.integers(0, 300), st.integers(1, 3), st.integers(2, 5)), min_size=1, max_size=4
    )
)
def test_the_exported_counters_are_the_sum_of_the_runs_results(
    runs: list[tuple[int, int, int]],
) -> None:
    registry = CollectorRegistry()
    with PrometheusExporter(registry=registry, pipeline="sum") as exporter:
        results = [
            cv.Pipeline(range(n))
            .map(lambda x: x + 1, workers=workers, name="inc")
            .filter(lambda x, k=k: x % k != 0, name="drop")
            .run(metrics=exporter)
            for n, workers, k in runs
        ]
        samples = parse(generate_latest(registry).decode())
    for i, stage in enumerate(("inc", "drop")):
        stats = [r.stats[i] for r in results]
        assert items(samples, stage, "in", "sum") == sum(s.items_in for s in stats)
        assert items(samples, stage, "out", "sum") == sum(s.items_out for s in stats)
        assert items(samples, stage, "filtered", "sum") == sum(s.filtered for s in stats)
        assert histogram_count(samples, stage, "sum") == sum(s.items_in for s in stats)
        assert value(samples, "conveyor_stage_busy_seconds_total", stage, "sum") == pytest.approx(
            sum(s.busy_seconds for s in stats)
        )


def test_iterate_and_arun_take_an_exporter_too() -> None:
    registry = CollectorRegistry()
    exporter = PrometheusExporter(registry=registry, pipeline="p")
    pipeline = cv.Pipeline(range(50)).map(lambda x: x * 2, name="double")
    assert list(pipeline.iterate(metrics=exporter)) == [x * 2 for x in range(50)]
    asyncio.run(pipeline.arun(metrics=exporter))
    samples = parse(generate_latest(registry).decode())
    assert items(samples, "double", "out", "p") == 100
    assert histogram_count(samples, "double", "p") == 100


def test_histogram_buckets_are_cumulative_and_exact_bounds_of_the_latency_histogram() -> None:
    from conveyor.metrics import LATENCY_BUCKETS, latency_bound, latency_bucket
    from conveyor.prometheus import HISTOGRAM_BUCKETS, histogram_buckets

    latency = [0] * LATENCY_BUCKETS
    for seconds in (1e-6, 0.002, 0.002, 0.5, 1e6):
        latency[latency_bucket(seconds)] += 1
    buckets = histogram_buckets(latency)
    assert buckets[-1] == ("+Inf", 5.0)
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)
    bounds = [float(le) for le, _ in buckets[:-1]]
    assert bounds == [pytest.approx(latency_bound(i)) for i in HISTOGRAM_BUCKETS]
    # Each bound counts exactly the items at or below it.
    for le, count in zip(bounds, counts, strict=False):
        assert count == sum(1 for s in (1e-6, 0.002, 0.002, 0.5) if s <= le)


def test_prometheus_client_is_imported_only_when_an_exporter_is_made() -> None:
    code = (
        "import sys, conveyor, conveyor.redis.worker, conveyor.redis.cli\n"
        "conveyor.Pipeline(range(3)).map(str).run()\n"
        "print('prometheus_client' in sys.modules, 'conveyor.prometheus' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert out.stdout.split() == ["False", "False"]
    assert cv.PrometheusExporter is PrometheusExporter  # re-exported, loaded on first use


# ---------------------------------------------------------------------- bad values


@pytest.mark.parametrize("port", [-1, 70000])
def test_a_port_out_of_range_is_refused_naming_it(port: int) -> None:
    with pytest.raises(cv.ConfigurationError, match=r"'port' must be in 0\.\.65535"):
        PrometheusExporter(port=port)


@pytest.mark.parametrize("port", ["9000", True, 9000.0])
def test_a_port_that_is_not_an_int_is_refused(port: Any) -> None:
    with pytest.raises(cv.ConfigurationTypeError, match="'port' must be an int"):
        PrometheusExporter(port=port)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_is_refused_and_leaves_the_registry_as_it_was(busy_port: int) -> None:
    registry = CollectorRegistry()
    with pytest.raises(
        cv.ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{busy_port}"
    ):
        PrometheusExporter(port=busy_port, registry=registry)
    assert generate_latest(registry) == b""


def test_an_address_that_cannot_be_listened_on_is_refused_naming_it() -> None:
    with pytest.raises(
        cv.ConfigurationError, match=r"cannot serve metrics on no-such-host\.invalid"
    ):
        PrometheusExporter(port=0, addr="no-such-host.invalid")
    with pytest.raises(cv.ConfigurationTypeError, match="'addr' must be"):
        PrometheusExporter(port=0, addr=None)  # type: ignore[arg-type]
    with pytest.raises(cv.ConfigurationTypeError, match="'pipeline' must be"):
        PrometheusExporter(pipeline="")


@pytest.mark.timeout(10)
def test_a_registry_of_the_wrong_type_is_refused_at_once_naming_it() -> None:
    with pytest.raises(cv.ConfigurationTypeError, match=r"'registry' must be a prometheus_client"):
        PrometheusExporter(registry=3)  # type: ignore[arg-type]


def test_metrics_must_be_an_exporter_and_stay_on_this_machine(redis_server: RedisServer) -> None:
    pipeline = cv.Pipeline(range(3)).map(str)
    with pytest.raises(cv.ConfigurationTypeError, match=r"run\(\) 'metrics' must be a metrics"):
        pipeline.run(metrics=object())  # type: ignore[arg-type]
    backend = cv.RedisBackend(redis_server.url, namespace=new_namespace())
    exporter = PrometheusExporter(registry=CollectorRegistry())
    with pytest.raises(cv.ConfigurationError, match="conveyor worker --metrics-port"):
        pipeline.run(metrics=exporter, backend=backend)


@pytest.mark.usefixtures("conveyor_logger_kept")
@pytest.mark.parametrize("port", ["-1", "70000"])
def test_the_worker_command_refuses_a_port_out_of_range(port: str) -> None:
    args = ["worker", "redis_helpers:metered", "--redis", "redis://127.0.0.1:1/0"]
    result = CliRunner().invoke(cli, [*args, "--metrics-port", port])
    assert result.exit_code == 2
    assert "Invalid value for '--metrics-port'" in result.stderr
    assert "0<=x<=65535" in result.stderr


@pytest.mark.usefixtures("conveyor_logger_kept")
def test_the_worker_command_refuses_a_port_in_use_before_it_serves(busy_port: int) -> None:
    args = ["worker", "redis_helpers:metered", "--redis", "redis://127.0.0.1:1/0"]
    result = CliRunner().invoke(cli, [*args, "--metrics-port", str(busy_port)])
    assert result.exit_code == 2
    # Binding fails for the port or the address: the message names both options.
    assert "Invalid value for '--metrics-addr' / '--metrics-port'" in result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{busy_port}" in result.stderr


# ---------------------------------------------------------------------- a real worker


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_worker_process_serves_every_stage_moving_during_a_run(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    n, reaching_gate = 200, 150  # keep() drops the multiples of 4
    url, namespace = redis_server.url, new_namespace()
    monkeypatch.setenv(GATE_ENV, f"{url} {namespace}-gate")
    _, entered, release = gate_keys(f"{namespace}-gate")
    target = "redis_helpers:metered"
    client = redis.Redis.from_url(url)
    with worker_processes(target, url, namespace, 1, tmp_path, "--metrics-port", "0"), client:
        port = _served_port(tmp_path)
        handle = metered(n).start(backend=cv.RedisBackend(url, namespace=namespace))
        try:
            # The gate stage holds its first item; the stages before it finish.
            assert client.blpop([entered], timeout=WAIT), worker_logs(tmp_path)
            during = wait_until(
                lambda: (
                    (s := scrape(port))
                    and items(s, "keep", "in", target) == n
                    and value(s, "conveyor_stage_backlog", "gate", target) == reaching_gate
                    and s
                ),
                "the stages before the gate to finish",
            )
            assert items(during, "triple", "in", target) == n
            assert items(during, "keep", "filtered", target) == n - reaching_gate
            assert items(during, "gate", "in", target) == 0
            assert value(during, "conveyor_stage_busy_workers", "gate", target) == 1
            assert value(during, "conveyor_stage_workers", "triple", target) == 2
        finally:
            client.rpush(release, 1)
        result = handle.join(WAIT)
        after = scrape(port)
    assert result.items_out == reaching_gate
    for stage, taken, out in (
        ("triple", n, n),
        ("keep", n, reaching_gate),
        ("gate", *[reaching_gate] * 2),
    ):
        assert items(after, stage, "in", target) == taken
        assert items(after, stage, "out", target) == out
        assert histogram_count(after, stage, target) == taken
        assert value(after, "conveyor_stage_busy_workers", stage, target) == 0
        # The run has ended and left Redis: nothing waits in any stream.
        assert value(after, "conveyor_stage_backlog", stage, target) == 0
        assert value(after, "conveyor_stage_dead_letters_total", stage, target) == 0


@pytest.mark.redis
@pytest.mark.timeout(120)
def test_a_worker_process_counts_the_dead_letters_it_makes(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_TEST_FIXED", raising=False)
    url, namespace = redis_server.url, new_namespace()
    target = "redis_helpers:poisoned"
    backend = cv.RedisBackend(url, namespace=namespace, visibility_timeout=0.2, max_deliveries=2)
    with worker_processes(target, url, namespace, 1, tmp_path, "--metrics-port", "0"):
        port = _served_port(tmp_path)
        with pytest.raises(cv.DeadLettersError):
            poisoned(50).run(backend=backend)
        # The driver may see the dead letter in Redis a moment before the worker counts it.
        samples = wait_until(
            lambda: (
                (s := scrape(port))
                and value(s, "conveyor_stage_dead_letters_total", "fragile", target) == 1
                and s
            ),
            "the dead letter to be counted",
        )
    # Delivered max_deliveries times, raising each time, then dead-lettered.
    assert items(samples, "fragile", "failed", target) == 2
    # Inputs taken: the 49 good items and the 2 deliveries of the poison that raised.
    assert items(samples, "fragile", "in", target) == 51
    assert items(samples, "triple", "in", target) == 49
    # The run waits for a replay: the dead letter is not backlog, nothing else is left.
    assert value(samples, "conveyor_stage_backlog", "fragile", target) == 0


@pytest.mark.redis
def test_a_scrape_while_redis_is_down_serves_the_counters_without_the_backlog(
    redis_server_factory: RedisServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from conveyor.redis import Worker

    server = redis_server_factory()
    registry = CollectorRegistry()
    pipeline = cv.Pipeline(range(20)).map(str, name="text")
    worker = Worker(pipeline, server.url, namespace=new_namespace()).start()
    try:
        exporter = PrometheusExporter(registry=registry, pipeline="down")
        exporter.watch(worker)
        up = parse(generate_latest(registry).decode())
        assert value(up, "conveyor_stage_backlog", "text", "down") == 0
        server.stop()
        down = parse(generate_latest(registry).decode())  # one short retry, then on
        assert items(down, "text", "in", "down") == 0
        assert value(down, "conveyor_stage_busy_workers", "text", "down") == 0
        assert not [k for k in down if k[0] == "conveyor_stage_backlog"]
        assert "metrics: cannot read the backlog from Redis" in caplog.text
    finally:
        worker.stop()
        worker.join(WAIT)


def _served_port(logdir: Path) -> int:
    """The port a worker started with ``--metrics-port 0`` says it serves on."""
    served = re.compile(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics")
    found = wait_until(lambda: served.search(worker_logs(logdir)), "the worker's metrics port")
    return int(found.group(1))
