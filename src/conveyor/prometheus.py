"""Prometheus metrics of runs and Redis workers, read from conveyor's own counters.

::

    workers --(a few additions per batch)--> WorkerCounters      (conveyor.metrics)
                                                   |
    Prometheus --GET /metrics--> HTTP server --> registry --> _Collector.collect()
                                                   |   at the scrape only:
                                                   +-- source.readings()  live runs / a worker
                                                   +-- totals of the runs that have ended

Nothing is counted twice and nothing is added to the workers' path: the
collector reads the per-worker counters that `stats()` reads, when Prometheus
asks, and turns them into metric families. ``prometheus_client`` is imported
only when an exporter is made (the ``metrics`` extra), never by ``import
conveyor``.

Counters stay monotonic across runs: when a watched run has ended, its final
counts are folded into the exporter's totals and the run is let go, so a
process that runs one pipeline after another exports one growing series per
stage, and holds only the runs still going. The labels are ``pipeline`` (the
exporter's name for what it watches) and ``stage``; never a run id, whose
values would grow without bound.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigurationError, ConfigurationTypeError
from .metrics import LATENCY_BUCKETS, MetricsSource, StageReading, latency_bound, printable

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = ["DEFAULT_ADDR", "HISTOGRAM_BUCKETS", "PrometheusExporter", "histogram_buckets"]

log = logging.getLogger("conveyor")

DEFAULT_ADDR = "127.0.0.1"
"""Where the metrics server listens by default: this machine only. A Prometheus
server on another machine needs ``addr="0.0.0.0"`` (or the host's address):
the endpoint has no authentication, so exposing it is a deliberate choice."""

_EVERY = 4  # one exported bucket per 4 internal ones: bounds double (2**(4/4))
_FIRST = 20  # internal bucket 20 ends at 1e-7 * 2**5 = 3.2 us
HISTOGRAM_BUCKETS: tuple[int, ...] = tuple(range(_FIRST, LATENCY_BUCKETS - 1, _EVERY))
"""Internal latency buckets whose upper bounds are the exported ``le`` values:
3.2 us doubling up to 215 s (27 buckets, and +Inf). They are bounds of conveyor's own
histogram, so the exported counts are exact, not re-estimated."""


def histogram_buckets(latency: Sequence[int]) -> list[tuple[str, float]]:
    """A latency histogram as Prometheus's cumulative ``(le, count)`` buckets, +Inf last."""
    buckets: list[tuple[str, float]] = []
    seen = 0
    start = 0
    for i in HISTOGRAM_BUCKETS:
        seen += sum(latency[start : i + 1])
        start = i + 1
        buckets.append((_float_text(latency_bound(i)), float(seen)))
    buckets.append(("+Inf", float(seen + sum(latency[start:]))))
    return buckets


def _float_text(value: float) -> str:
    return repr(round(value, 9))


# ---------------------------------------------------------------------- totals


@dataclass
class _Totals:
    """One stage's counters over the runs an exporter has seen end."""

    items_in: int = 0
    items_out: int = 0
    failed: int = 0
    filtered: int = 0
    retried: int = 0
    dead_letters: int = 0
    busy_seconds: float = 0.0
    latency: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)

    def add(self, r: StageReading) -> None:
        st = r.stats
        self.items_in += st.items_in
        self.items_out += st.items_out
        self.failed += st.failed
        self.filtered += st.filtered
        self.retried += st.retried
        self.dead_letters += r.dead_letters
        self.busy_seconds += st.busy_seconds
        for i, count in enumerate(r.latency):
            self.latency[i] += count


@dataclass
class _Gauges:
    """One stage's instantaneous values, summed over the live sources."""

    workers: int = 0
    busy_workers: int = 0
    backlog: int | None = 0
    """None when a source could not tell (Redis unreachable at the scrape)."""

    def add(self, r: StageReading) -> None:
        self.workers += r.stats.workers
        self.busy_workers += r.busy_workers
        if r.backlog is None or self.backlog is None:
            self.backlog = None
        else:
            self.backlog += r.backlog


# ---------------------------------------------------------------------- the exporter


class PrometheusExporter:
    """Serves the counters of runs (and Redis workers) as Prometheus metrics.

    Pass it to a run, ``pipeline.run(metrics=exporter)`` (also ``iterate``,
    ``start`` and ``arun``), as many runs as you like; ``conveyor worker
    --metrics-port`` makes one for its worker. Runs watched by one exporter
    add up, stage by stage. Each scrape reads the counters the workers
    already keep: watching costs the workers nothing.

    Args:
        port: serve ``http://addr:port/metrics`` from a thread of its own (0: a
            free port, see `port`); None: serve nothing, only register the
            collector on ``registry`` (your own server exposes it).
        addr: the address to listen on (default: this machine only, see
            `DEFAULT_ADDR`).
        registry: the ``prometheus_client.CollectorRegistry`` to register the
            collector on (default: a registry of the exporter's own, so that
            several exporters can live in one process).
        pipeline: the value of the ``pipeline`` label on every series.

    Raises:
        ConfigurationError: a port outside 0..65535, or one that cannot be
            listened on (in use, not permitted, an unknown address);
            prometheus-client not installed.
        ConfigurationTypeError: a port, address, registry or pipeline of the wrong type.

    Example:
        >>> from conveyor.prometheus import PrometheusExporter  # doctest: +SKIP
        >>> with PrometheusExporter(port=9000, pipeline="etl") as exporter:  # doctest: +SKIP
        ...     pipeline.run(metrics=exporter)
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        addr: str = DEFAULT_ADDR,
        registry: CollectorRegistry | None = None,
        pipeline: str = "default",
    ) -> None:
        prometheus_client = _import_client()
        _check_port(port)
        if not isinstance(addr, str) or not addr:
            raise ConfigurationTypeError(
                f"PrometheusExporter 'addr' must be a host name or address (a str), got {addr!r}"
            )
        if not isinstance(pipeline, str) or not pipeline:
            raise ConfigurationTypeError(
                f"PrometheusExporter 'pipeline' must be a non-empty str, got {pipeline!r}"
            )
        if registry is not None and not isinstance(
            registry, prometheus_client.registry.CollectorRegistry
        ):
            raise ConfigurationTypeError(
                "PrometheusExporter 'registry' must be a prometheus_client.CollectorRegistry "
                f"or None (a registry of the exporter's own), got {type(registry).__name__} "
                f"{registry!r:.60}"
            )
        self.pipeline = pipeline
        self.registry: CollectorRegistry = (
            prometheus_client.CollectorRegistry() if registry is None else registry
        )
        self._lock = threading.Lock()  # guards _live and _totals (scrapes vs watch)
        self._live: list[MetricsSource] = []
        self._totals: dict[str, _Totals] = {}
        self._collector = _Collector.join(self)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        """The port served on (the one chosen, with ``port=0``); None without a server."""
        if port is not None:
            self._serve(prometheus_client, port, addr)

    def _serve(self, prometheus_client: Any, port: int, addr: str) -> None:
        try:
            self._server, self._thread = prometheus_client.start_http_server(
                port, addr=addr, registry=self.registry
            )
        except (OSError, ValueError) as exc:  # in use, not permitted, no such address
            self._collector.leave(self)
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigurationError(
                f"PrometheusExporter: cannot serve metrics on {addr}:{port}: {reason}"
            ) from exc
        self.port = self._server.server_port

    def watch(self, source: MetricsSource) -> None:
        """Read ``source``'s stages at every scrape until it ends, then keep its totals."""
        if not isinstance(source, MetricsSource):
            raise ConfigurationTypeError(
                f"PrometheusExporter.watch() needs a run or a Redis worker (an object with "
                f"readings() and ended()), got {type(source).__name__}"
            )
        with self._lock:
            self._fold_ended()  # so a process that never gets scraped holds no old runs
            self._live.append(source)

    def _fold_ended(self) -> None:
        """Move the runs that have ended into the totals (with the lock held)."""
        still = []
        for source in self._live:
            if source.ended():
                for r in source.readings():
                    self._totals.setdefault(r.stats.name, _Totals()).add(r)
            else:
                still.append(source)
        self._live = still

    def _read(self) -> tuple[dict[str, _Totals], dict[str, _Gauges]]:
        """Counters (ended runs plus live ones) and gauges (live ones) per stage, now."""
        with self._lock:
            self._fold_ended()
            counters = {n: replace(t, latency=list(t.latency)) for n, t in self._totals.items()}
            gauges: dict[str, _Gauges] = {}
            for source in self._live:
                for r in source.readings():
                    counters.setdefault(r.stats.name, _Totals()).add(r)
                    gauges.setdefault(r.stats.name, _Gauges()).add(r)
        return counters, gauges

    def close(self) -> None:
        """Stop serving and take the collector off its registry."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = None
        self._collector.leave(self)  # nothing if closed before

    def __enter__(self) -> PrometheusExporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _import_client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            "Prometheus metrics need prometheus-client: pip install 'conveyor[metrics]'"
        ) from exc
    return prometheus_client


def _check_port(port: object) -> None:
    if port is None:
        return
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigurationTypeError(
            f"PrometheusExporter 'port' must be an int (0..65535, 0: any free port) or None, "
            f"got {port!r}"
        )
    if not 0 <= port <= 65535:
        raise ConfigurationError(
            f"PrometheusExporter 'port' must be in 0..65535 (0: any free port), got {port}"
        )


# ---------------------------------------------------------------------- the collector

_LABELS = ("pipeline", "stage")


_Readings = list[tuple[str, dict[str, "_Totals"], dict[str, "_Gauges"]]]


class _Collector:
    """Turns the readings of a registry's exporters into metric families, at each scrape.

    One per registry: a registry refuses two collectors of the same metric
    names, so the exporters of several pipelines on one registry (an
    application's ``prometheus_client.REGISTRY``) share it, their series
    told apart by the ``pipeline`` label.
    """

    # id(registry) -> its collector, until its last exporter is closed (the
    # collector holds the registry, so the id cannot be reused meanwhile).
    _by_registry: ClassVar[dict[int, _Collector]] = {}
    _joining = threading.Lock()  # guards _by_registry and every collector's _exporters

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._exporters: list[PrometheusExporter] = []

    @classmethod
    def join(cls, exporter: PrometheusExporter) -> _Collector:
        """The collector of ``exporter.registry``, registered there, with ``exporter`` in it.

        Raises:
            ConfigurationError: an exporter of the same ``pipeline`` is on that registry.
        """
        with cls._joining:
            collector = cls._by_registry.get(id(exporter.registry))
            if collector is None:
                collector = cls(exporter.registry)
                exporter.registry.register(collector)  # raises if the names are taken
                cls._by_registry[id(exporter.registry)] = collector
            elif any(e.pipeline == exporter.pipeline for e in collector._exporters):
                raise ConfigurationError(
                    f"PrometheusExporter 'pipeline' {exporter.pipeline!r}: an exporter of that "
                    f"pipeline is already on this registry (close it first, or give each "
                    f"pipeline its own name)"
                )
            collector._exporters.append(exporter)
            return collector

    def leave(self, exporter: PrometheusExporter) -> None:
        """Take ``exporter`` out; the last one out takes the collector off its registry."""
        with self._joining:
            if exporter not in self._exporters:
                return  # closed before
            self._exporters.remove(exporter)
            if not self._exporters:
                self._registry.unregister(self)
                del self._by_registry[id(self._registry)]

    def describe(self) -> list[Metric]:
        # The registry asks for the names when the collector is registered; an
        # empty reading gives them without reading any run.
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        with self._joining:
            exporters = list(self._exporters)
        yield from self._families([(e.pipeline, *e._read()) for e in exporters])

    def _families(self, readings: _Readings) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        items = CounterMetricFamily(
            "conveyor_stage_items",
            "Items per stage: taken (in), handed on (out), given up on or that stopped "
            "the run (failed), dropped by a filter (filtered).",
            labels=(*_LABELS, "outcome"),
        )
        retries = _counter("conveyor_stage_retries", "Extra calls made by retries.")
        dead = _counter(
            "conveyor_stage_dead_letters", "Entries the stage's workers moved to dead letters."
        )
        busy = _counter(
            "conveyor_stage_busy_seconds",
            "Time the stage's workers spent in the stage function, summed over workers.",
        )
        latency = HistogramMetricFamily(
            "conveyor_stage_item_seconds",
            "Time the stage function took per item (a batch of n items that took t "
            "counts n items of t/n).",
            labels=_LABELS,
        )
        for pipeline, counters, _ in readings:
            for stage, t in counters.items():
                labels = _label_values(pipeline, stage)
                for outcome, value in (
                    ("in", t.items_in),
                    ("out", t.items_out),
                    ("failed", t.failed),
                    ("filtered", t.filtered),
                ):
                    items.add_metric([*labels, outcome], value)
                retries.add_metric(labels, t.retried)
                dead.add_metric(labels, t.dead_letters)
                busy.add_metric(labels, t.busy_seconds)
                latency.add_metric(labels, histogram_buckets(t.latency), t.busy_seconds)
        yield from (items, retries, dead, busy, latency)

        workers = GaugeMetricFamily(
            "conveyor_stage_workers", "Workers serving the stage now.", labels=_LABELS
        )
        busy_now = GaugeMetricFamily(
            "conveyor_stage_busy_workers",
            "Workers inside the stage function now.",
            labels=_LABELS,
        )
        backlog = GaugeMetricFamily(
            "conveyor_stage_backlog",
            "Items waiting for the stage now: its input channel; on Redis, its streams "
            "over every live run (waiting, or held by a worker).",
            labels=_LABELS,
        )
        for pipeline, counters, gauges in readings:
            for stage in counters:  # every stage seen: 0 once its runs have ended
                g = gauges.get(stage, _Gauges())
                labels = _label_values(pipeline, stage)
                workers.add_metric(labels, g.workers)
                busy_now.add_metric(labels, g.busy_workers)
                if g.backlog is not None:  # None: Redis could not be read at this scrape
                    backlog.add_metric(labels, g.backlog)
        yield from (workers, busy_now, backlog)


def _label_values(pipeline: str, stage: str) -> list[str]:
    return [printable(pipeline), printable(stage)]  # exposition is UTF-8


def _counter(name: str, documentation: str) -> Any:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, documentation, labels=_LABELS)
