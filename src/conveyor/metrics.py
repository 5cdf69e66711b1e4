"""Per-stage counters, their snapshots, and the run's result.

Each worker owns a `WorkerCounters` and is the only one to write it, so
counting costs no lock: a few additions per *batch*, not per item. Readers
(``stats()``, the progress display, the final report) sum the counters of a
stage's workers into a frozen `StageStats`; a value read while a worker
writes may be one batch behind, never torn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Any

from .channel import Channel
from .stage import Failure, Stage

__all__ = ["RunResult", "StageMetrics", "StageStats", "WorkerCounters"]


class WorkerCounters:
    """Counters of one worker, written by that worker only."""

    __slots__ = (
        "batches",
        "busy",
        "current_item",
        "current_since",
        "failed",
        "filtered",
        "items_in",
        "items_out",
        "retried",
        "wait_in",
        "wait_out",
    )

    def __init__(self) -> None:
        self.items_in = 0
        self.items_out = 0
        self.filtered = 0
        self.failed = 0
        self.retried = 0
        self.batches = 0
        self.busy = 0.0
        self.wait_in = 0.0
        self.wait_out = 0.0
        # What the worker holds now, for stall reports: first item of its batch.
        self.current_item: Any = None
        self.current_since: float | None = None


@dataclass(frozen=True)
class StageStats:
    """A snapshot of one stage's counters (all workers summed)."""

    name: str
    """The stage's name."""
    kind: str
    """map, filter, flat_map, batch or each."""
    runtime: str
    """thread, process or async."""
    workers: int
    """Workers the stage runs."""
    items_in: int
    """Input items taken by its workers."""
    items_out: int
    """Outputs handed to the next stage."""
    filtered: int
    """Inputs a filter dropped."""
    failed: int
    """Inputs given up on (``on_error="skip"``) or that stopped the run."""
    retried: int
    """Extra calls made by retries."""
    busy_seconds: float
    """Time its workers spent in the stage function, summed over workers."""
    wait_input_seconds: float
    """Time its workers waited for input, summed over workers."""
    wait_output_seconds: float
    """Time its workers were blocked on a full output channel, summed."""
    elapsed_seconds: float
    """Wall time since the run started (or its total, at the end)."""
    queue_size: int
    """Items waiting in its input channel."""
    queue_capacity: int
    """Capacity of its input channel."""

    @property
    def utilisation(self) -> float:
        """Fraction of the workers' wall time spent busy (0..1)."""
        wall = self.elapsed_seconds * self.workers
        return min(1.0, self.busy_seconds / wall) if wall > 0 else 0.0

    @property
    def throughput(self) -> float:
        """Inputs per second over the run so far."""
        return self.items_in / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def queue_fill(self) -> float:
        """Fill of the input channel (0..1; 0 when unbounded)."""
        return self.queue_size / self.queue_capacity if self.queue_capacity > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain data, with the derived values, for JSON."""
        data = asdict(self)
        data.update(
            utilisation=self.utilisation, throughput=self.throughput, queue_fill=self.queue_fill
        )
        return data


class StageMetrics:
    """The live counters of one stage: one `WorkerCounters` per worker."""

    def __init__(self, stage: Stage, channel: Channel[Any]) -> None:
        self.stage = stage
        self.channel = channel
        self.workers: list[WorkerCounters] = []
        self.started = perf_counter()
        self.finished: float | None = None

    def new_worker(self) -> WorkerCounters:
        """Register and return the counters of a new worker."""
        counters = WorkerCounters()
        self.workers.append(counters)
        return counters

    def snapshot(self) -> StageStats:
        """Sum the workers' counters now."""
        ws = list(self.workers)
        end = self.finished if self.finished is not None else perf_counter()
        return StageStats(
            name=self.stage.name,
            kind=self.stage.kind,
            runtime=self.stage.runtime,
            workers=self.stage.workers,
            items_in=sum(w.items_in for w in ws),
            items_out=sum(w.items_out for w in ws),
            filtered=sum(w.filtered for w in ws),
            failed=sum(w.failed for w in ws),
            retried=sum(w.retried for w in ws),
            busy_seconds=sum(w.busy for w in ws),
            wait_input_seconds=sum(w.wait_in for w in ws),
            wait_output_seconds=sum(w.wait_out for w in ws),
            elapsed_seconds=end - self.started,
            queue_size=self.channel.qsize(),
            queue_capacity=self.channel.maxsize,
        )


@dataclass
class RunResult:
    """What a finished run did: per-stage statistics, failures, outputs."""

    stats: list[StageStats]
    """One snapshot per stage, in pipeline order."""
    failures: list[Failure] = field(default_factory=list)
    """Items given up on by stages with ``on_error="skip"``."""
    elapsed_seconds: float = 0.0
    """Wall time of the run."""
    items_out: int = 0
    """Outputs of the last stage."""
    outputs: list[Any] | None = None
    """The last stage's outputs, when the run was asked to collect them."""
    stopped: bool = False
    """True when the run was stopped before its source was exhausted."""

    def report(self) -> str:
        """Return the per-stage table as text (what a terminal would show)."""
        from .report import render_table

        return render_table(self)

    def to_json(self) -> str:
        """The statistics and failures as a JSON document."""
        return json.dumps(
            {
                "elapsed_seconds": self.elapsed_seconds,
                "items_out": self.items_out,
                "stages": [s.as_dict() for s in self.stats],
                "failures": [
                    {
                        "stage": f.stage,
                        "item": repr(f.item),
                        "error": f"{type(f.error).__name__}: {f.error}",
                        "attempts": f.attempts,
                    }
                    for f in self.failures
                ],
            },
            indent=2,
        )
