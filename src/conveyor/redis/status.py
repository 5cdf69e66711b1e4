"""What ``conveyor status`` shows: per run and stage, the streams, consumers and counters."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from .state import RunInfo, RunState
from .streams import WORKER_GROUP, Keys, Scripts

__all__ = ["ConsumerStatus", "RunStatus", "StageStatus", "find_runs", "render", "run_status"]


@dataclass(frozen=True)
class ConsumerStatus:
    """One consumer of a stage's group."""

    name: str
    """host:pid:stage-n:random."""
    pending: int
    """Entries it holds, not yet handed on."""
    idle_seconds: float
    """Time since it last read or handed on (a large value: dead or stuck)."""


@dataclass(frozen=True)
class StageStatus:
    """One stage of a run."""

    name: str
    stream_length: int
    """Work left in its input stream: entries waiting, or held by a consumer."""
    pending: int
    """Entries held by consumers."""
    limit: int
    """Backlog limit of the stream."""
    acked: int
    """Inputs acknowledged so far."""
    out: int
    """Outputs handed to the next stream."""
    rate: float
    """Inputs acknowledged per second since the run started."""
    redelivered: int
    """Re-executions (deliveries beyond the first)."""
    dead_letters: int
    """Entries in its dead letters."""
    consumers: tuple[ConsumerStatus, ...]


@dataclass(frozen=True)
class RunStatus:
    """One run of the pipeline."""

    run_id: str
    age_seconds: float
    fed: int
    """Items the source added."""
    source_done: bool
    complete: bool
    delivered: int
    """Final-stream entries the driver took."""
    stages: tuple[StageStatus, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return asdict(self)


def find_runs(client: Any, namespace: str, pipeline: str) -> list[str]:
    """Ids of the pipeline's registered runs, sorted."""
    return sorted(m.decode() for m in client.smembers(Keys(namespace, pipeline, "").runs))


def load_info(client: Any, keys: Keys) -> RunInfo | None:
    """The run's settings, or None when it does not exist."""
    meta = client.hgetall(keys.meta)
    return RunInfo.from_meta(keys, meta) if meta else None


def run_status(client: Any, info: RunInfo) -> RunStatus:
    """Everything ``conveyor status`` shows about one run, read now."""
    keys, n = info.keys, len(info.stages)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.counters)
    pipe.hget(keys.meta, "source_done")
    backlog = Scripts(client).backlog
    for i in range(n):
        backlog(keys=[keys.stream(i)], args=[WORKER_GROUP, "1"], client=pipe)
        pipe.xpending(keys.stream(i), WORKER_GROUP)
        pipe.xinfo_consumers(keys.stream(i), WORKER_GROUP)
    replies = pipe.execute(raise_on_error=False)
    state = RunState.read(replies[0], replies[1] == b"1", n)
    age = max(1e-9, time.time() - info.created)
    stages = []
    for i, name in enumerate(info.stages):
        length, pending, consumers = replies[2 + 3 * i : 5 + 3 * i]
        counts = state.stages[i]
        stages.append(
            StageStatus(
                name=name,
                stream_length=length if isinstance(length, int) else 0,
                pending=pending["pending"] if isinstance(pending, dict) else 0,
                limit=info.limits[i],
                acked=counts.acked,
                out=counts.out,
                rate=counts.acked / age,
                redelivered=counts.redelivered,
                dead_letters=counts.dead,
                consumers=tuple(
                    ConsumerStatus(
                        name=_text(c["name"]), pending=c["pending"], idle_seconds=c["idle"] / 1000
                    )
                    for c in (consumers if isinstance(consumers, list) else [])
                ),
            )
        )
    return RunStatus(
        run_id=info.run_id,
        age_seconds=age,
        fed=state.fed,
        source_done=state.source_done,
        complete=state.complete,
        delivered=state.delivered,
        stages=tuple(stages),
    )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def render(statuses: list[RunStatus]) -> str:
    """The runs as text tables (what a terminal shows)."""
    import io

    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    if not statuses:
        console.print("no live run of this pipeline")
    for status in statuses:
        source = "done" if status.source_done else "feeding"
        table = Table(
            title=f"run {status.run_id}: {status.fed:,} items fed (source {source}), "
            f"{status.delivered:,} outputs taken, {status.age_seconds:,.0f} s old",
            title_justify="left",
        )
        for column in ("stage", "stream", "pending", "limit", "in", "out", "in/s"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for column in ("re-run", "dead", "consumers (pending, idle)"):
            table.add_column(column, justify="left" if column.startswith("c") else "right")
        for s in status.stages:
            consumers = ", ".join(
                f"{c.name} ({c.pending}, {c.idle_seconds:.1f} s)" for c in s.consumers
            )
            table.add_row(
                s.name,
                f"{s.stream_length:,}",
                f"{s.pending:,}",
                f"{s.limit:,}",
                f"{s.acked:,}",
                f"{s.out:,}",
                f"{s.rate:,.0f}",
                f"{s.redelivered:,}",
                f"{s.dead_letters:,}",
                consumers or "none",
            )
        console.print(table)
    return out.getvalue()
