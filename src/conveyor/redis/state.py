"""A run's settings (its ``meta`` hash) and its progress (its ``counters`` hash).

Completion needs no sentinel: every hand-off updates the counters in the
same atomic step that moves the entries, so one ``HGETALL`` is a consistent
snapshot, and stage ``i`` is finished exactly when the source is finished
and, for every stage up to ``i``, the inputs acknowledged equal the entries
its predecessor produced (the source's items for stage 0). Filters and
flat_map need nothing special: what counts is entries produced and consumed.
A batch stage's input also holds the tombstones that the stages before it
send there (``tomb:<i>``): they are entries produced into it too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..metrics import StageStats
from .budget import share_of
from .streams import DRIVER_GROUP, WORKER_GROUP, Keys, Retrier

if TYPE_CHECKING:
    from ..stage import Stage

__all__ = [
    "LEFT",
    "RunInfo",
    "RunState",
    "StageCounts",
    "clear_refusal",
    "find_runs",
    "load_info",
    "mark_left",
    "read_state",
    "refuse_run",
    "stage_stats",
    "text",
]


def text(value: Any) -> str:
    """A value of a Redis reply (bytes, or a number) as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class RunInfo:
    """What the driver decided for a run, shared with every worker through ``meta``."""

    keys: Keys
    stages: tuple[str, ...]
    """Stage names, in order."""
    codec: str = "msgpack"
    key_check: str = ""
    """Fingerprint of the pickle codec's secret key ('' without one)."""
    ordered: bool = False
    """The driver releases the outputs in source order."""
    paths: bool = False
    """Entries carry sequence paths (every run a driver feeds; not long-lived runs):
    a worker refuses an entry without one, the driver decides completion by them."""
    visibility_ms: int = 30_000
    """Idle time after which another worker may take over a pending entry."""
    max_deliveries: int = 5
    """Deliveries after which an entry moves to the dead letters."""
    limits: tuple[int, ...] = ()
    """Backlog limit of each stream (one per stage, plus the final stream)."""
    batch: int = 100
    """Largest number of entries a worker reads at once."""
    tombstones_to: tuple[int, ...] = ()
    """Per stage, the stream its tombstones go to: the input of the next batch stage
    (which reorders by path and must tell a gap from a late item), else the final
    stream (also when empty: a run written before batch stages reordered)."""
    max_bytes: int | None = None
    """The run's byte budget (``max_bytes=``), split evenly between its streams (None:
    none; see redis/budget.py)."""
    created: float = field(default_factory=time.time)

    @property
    def long_lived(self) -> bool:
        """A long-lived run (``RedisBackend.open``/``submit``): producers submit to it
        until it is closed, no driver feeds it (its entries carry no paths)."""
        return not self.paths

    @property
    def share(self) -> int | None:
        """Each stream's share of `max_bytes` (None: no budget)."""
        return None if self.max_bytes is None else share_of(self.max_bytes, len(self.stages))

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.keys.run

    def to_meta(self) -> dict[str, str]:
        """The fields of the ``meta`` hash."""
        return {
            "stages": json.dumps(list(self.stages)),
            "codec": self.codec,
            "key_check": self.key_check,
            "ordered": "1" if self.ordered else "0",
            "paths": "1" if self.paths else "0",
            "visibility_ms": str(self.visibility_ms),
            "max_deliveries": str(self.max_deliveries),
            "limits": json.dumps(list(self.limits)),
            "batch": str(self.batch),
            "tombstones_to": json.dumps(list(self.tombstones_to)),
            "max_bytes": "" if self.max_bytes is None else str(self.max_bytes),
            "created": repr(self.created),
            "source_done": "0",
        }

    def reader(self, stream: int) -> tuple[str, str]:
        """Stream ``stream``'s consumer group, and whether the entries it has read and not
        acknowledged count as backlog ('1'): not where they are held to be reordered
        (the driver's final stream, a batch stage's input), or a missing item could
        never get past a full stream ('0')."""
        if stream == len(self.stages):
            return DRIVER_GROUP, "0"
        return WORKER_GROUP, "0" if stream in self.tombstones_to else "1"

    def room_reader(self, stream: int) -> tuple[str, str]:
        """Stream ``stream``'s consumer group, and whether that consumer holds entries
        to put them in order ('1': an ordered run's driver on the final stream, a batch
        stage on its input), as the byte budget's room check takes them (streams.ROOM)."""
        group, _ = self.reader(stream)
        reorders = self.ordered if stream == len(self.stages) else stream in self.tombstones_to
        return group, "1" if reorders else "0"

    def tombstone_stream(self, index: int) -> int:
        """Where stage ``index``'s tombstones go (see `tombstones_to`)."""
        return self.tombstones_to[index] if self.tombstones_to else len(self.stages)

    @classmethod
    def from_meta(cls, keys: Keys, meta: dict[Any, Any]) -> RunInfo:
        """Read the ``meta`` hash back."""
        m = {text(k): text(v) for k, v in meta.items()}
        return cls(
            keys=keys,
            stages=tuple(json.loads(m["stages"])),
            codec=m["codec"],
            key_check=m.get("key_check", ""),
            ordered=m.get("ordered") == "1",
            paths=m.get("paths") == "1",
            visibility_ms=int(m["visibility_ms"]),
            max_deliveries=int(m["max_deliveries"]),
            limits=tuple(json.loads(m["limits"])),
            batch=int(m.get("batch", "100")),
            tombstones_to=tuple(json.loads(m.get("tombstones_to", "[]"))),
            max_bytes=int(m["max_bytes"]) if m.get("max_bytes") else None,
            created=float(m.get("created", "0")),
        )


@dataclass(frozen=True)
class StageCounts:
    """One stage's counters in Redis."""

    acked: int = 0
    """Input entries acknowledged (handed on, filtered, skipped or purged)."""
    out: int = 0
    """Entries added to the next stream."""
    dead: int = 0
    """Entries in its dead letters now."""
    purged: int = 0
    """Dead letters dropped by ``dlq purge``."""
    filtered: int = 0
    failed: int = 0
    """Items given up on with ``on_error="skip"``."""
    retried: int = 0
    """Extra calls made by in-worker retries."""
    redelivered: int = 0
    """Deliveries beyond the first of the entries acknowledged: re-executions."""
    stale: int = 0
    """Hand-offs refused because another worker had taken the entry over meanwhile."""
    busy_seconds: float = 0.0


@dataclass(frozen=True)
class RunState:
    """A consistent snapshot of a run's counters."""

    fed: int
    """Items the source has added to the first stream."""
    source_done: bool
    """The source is exhausted (``fed`` is final)."""
    stages: tuple[StageCounts, ...]
    tombstones: int
    """Entries added to the final stream only to mark sequence paths finished."""
    delivered: int
    """Final-stream entries the driver has acknowledged."""
    released: int = 0
    """Ordered runs: source items whose outputs the driver has released, in order."""
    gaps: tuple[int, ...] = ()
    """Per stage: tombstones sent to its input by the stages before it (a batch stage's)."""
    refused: str = ""
    """Why a worker cannot serve the run (it lacks the pickle codec's key); '' if none did."""

    @classmethod
    def read(cls, counters: dict[Any, Any], source_done: bool, n: int) -> RunState:
        """Build from the ``counters`` hash."""
        c = {text(k): int(v) for k, v in counters.items()}
        stages = tuple(
            StageCounts(
                acked=c.get(f"in:{i}", 0),
                out=c.get(f"out:{i}", 0),
                dead=c.get(f"dead:{i}", 0),
                purged=c.get(f"purged:{i}", 0),
                filtered=c.get(f"filtered:{i}", 0),
                failed=c.get(f"failed:{i}", 0),
                retried=c.get(f"retried:{i}", 0),
                redelivered=c.get(f"redelivered:{i}", 0),
                stale=c.get(f"stale:{i}", 0),
                busy_seconds=c.get(f"busy_us:{i}", 0) / 1e6,
            )
            for i in range(n)
        )
        return cls(
            fed=c.get("fed", 0),
            source_done=source_done,
            stages=stages,
            tombstones=c.get("tomb", 0),
            delivered=c.get("delivered", 0),
            released=c.get("released", 0),
            gaps=tuple(c.get(f"tomb:{i}", 0) for i in range(n)),
        )

    def produced(self, index: int) -> int:
        """Entries added to stage ``index``'s input so far (tombstones included)."""
        made = self.fed if index == 0 else self.stages[index - 1].out
        return made + (self.gaps[index] if self.gaps else 0)

    def through(self, index: int) -> bool:
        """Every entry added to stage ``index``'s input is handed on or dead-lettered (>=:
        an entry the run did not make, dead-lettered, counts beside the run's own)."""
        counts = self.stages[index]
        return counts.acked + counts.dead >= self.produced(index)

    def backlog(self, index: int) -> int:
        """Entries in stage ``index``'s stream not yet handed on: waiting, or held by a worker."""
        counts = self.stages[index]
        return max(0, self.produced(index) - counts.acked - counts.dead)

    def final_entries(self) -> int:
        """Entries added to the final stream so far (outputs and tombstones)."""
        return self.stages[-1].out + self.tombstones

    @property
    def complete(self) -> bool:
        """Every item went through every stage, and the driver has every output."""
        return (
            self.source_done
            and all(s.acked == self.produced(i) for i, s in enumerate(self.stages))
            and self.delivered == self.final_entries()
        )

    @property
    def dead(self) -> int:
        """Entries in dead letters, over all stages."""
        return sum(s.dead for s in self.stages)

    def stalled(self, reordering: Sequence[int] = ()) -> bool:
        """Nothing is left to do but entries sit in dead letters: the run waits for a replay.

        A stage in ``reordering`` (a batch stage) may hold entries behind a dead
        letter's place: once every stage before it is through, what it holds
        waits for the replay too. (Whether the driver has read the final stream
        to its end is for the driver to add, for the same reason.)
        """
        done = [s.acked + s.dead == self.produced(i) for i, s in enumerate(self.stages)]
        return (
            self.dead > 0
            and self.source_done
            and all(d or (i in reordering and all(done[:i])) for i, d in enumerate(done))
        )

    @property
    def redelivered(self) -> int:
        """Re-executions over all stages."""
        return sum(s.redelivered for s in self.stages)


def stage_stats(
    stages: Sequence[Stage],
    state: RunState,
    limits: Sequence[int],
    elapsed: float,
    consumers: Sequence[int] | None = None,
    rates: Sequence[float] | None = None,
) -> list[StageStats]:
    """A run's counters as the per-stage snapshots local runs are shown with.

    Args:
        stages: the pipeline's stages.
        state: the run's counters.
        limits: backlog limit of each stage's input stream.
        elapsed: seconds since the driver started.
        consumers: consumers of each stage's group, shown as its workers
            (None: the stages' own ``workers``).
        rates: inputs per second of each stage lately (None: the overall rate).

    Returns:
        One `StageStats` per stage: ``failed`` counts the items given up on
        and the entries in dead letters; ``queue_size`` is the work left in
        the stage's stream (waiting, or held by a worker).
    """
    stats = []
    for i, (stage, counts) in enumerate(zip(stages, state.stages, strict=True)):
        workers = stage.workers if consumers is None else consumers[i]
        overall = counts.acked / elapsed if elapsed > 0 else 0.0
        stats.append(
            StageStats(
                name=stage.name,
                kind=stage.kind,
                runtime=stage.runtime,
                workers=workers,
                items_in=counts.acked - (state.gaps[i] if state.gaps else 0),
                items_out=counts.out,
                filtered=counts.filtered,
                failed=counts.failed + counts.dead,
                retried=counts.retried,
                busy_seconds=counts.busy_seconds,
                wait_input_seconds=None,  # not measured: workers wait inside Redis's reads
                wait_output_seconds=None,
                elapsed_seconds=elapsed,
                queue_size=state.backlog(i),
                queue_capacity=limits[i],
                latency_p50=None,  # not measured: workers count time per batch
                latency_p99=None,
                rate_now=overall if rates is None else rates[i],
            )
        )
    return stats


def read_state(client: Any, retry: Retrier, keys: Keys, n: int) -> tuple[RunState, bool]:
    """A run's counters (one consistent snapshot), and whether its ``meta`` hash exists
    (it always holds ``source_done``, so a missing field means the run's keys are gone)."""

    def read() -> list[Any]:
        pipe = client.pipeline(transaction=True)
        pipe.hgetall(keys.counters)
        pipe.hmget(keys.meta, "source_done", REFUSED)
        replies: list[Any] = pipe.execute()
        return replies

    counters, (done, refused) = retry(read)
    state = RunState.read(counters, done == b"1", n)
    if refused is not None:
        state = replace(state, refused=text(refused))
    return state, done is not None


REFUSED = "refused"
"""The field of a run's ``meta`` hash where a worker says why it cannot serve the run."""
LEFT = "left"
"""The field of a run's ``meta`` hash where its driver says how it left the run in
Redis (stopped, or ended by an error): nothing feeds it until a driver resumes it."""

# Only while the run exists: a ``meta`` hash made anew would hold no settings.
_SET_IF_RUN = (
    "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end"
)


def refuse_run(client: Any, keys: Keys, why: str) -> None:
    """Say in the run's state why this worker cannot serve it: the driver, which may
    wait for workers for ever, ends the run with it."""
    client.eval(_SET_IF_RUN, 1, keys.meta, REFUSED, why)


def mark_left(client: Any, keys: Keys, how: str) -> None:
    """Say in the run's state that its driver left it, and how (see `LEFT`)."""
    client.eval(_SET_IF_RUN, 1, keys.meta, LEFT, how)


def clear_refusal(client: Any, keys: Keys) -> None:
    """Forget a worker's refusal (said once to the driver that saw it: a run resumed
    after a fix starts without it)."""
    client.hdel(keys.meta, REFUSED)


def find_runs(client: Any, namespace: str, pipeline: str) -> list[str]:
    """Ids of the pipeline's registered runs, sorted."""
    return sorted(m.decode() for m in client.smembers(Keys(namespace, pipeline, "").runs))


def load_info(client: Any, keys: Keys) -> RunInfo | None:
    """The run's settings, or None when it does not exist."""
    meta = client.hgetall(keys.meta)
    return RunInfo.from_meta(keys, meta) if meta else None
