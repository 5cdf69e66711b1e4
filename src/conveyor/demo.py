"""``conveyor demo``: the classic producer-consumer lesson, done right.

The textbook program has producers put random numbers into one shared slot
guarded by two locks, and ends with an in-band ``FINISH`` sentinel that each
consumer must see exactly once. Here several producers and several consumers
share one small bounded `Channel` instead:

* the channel is bounded (capacity 8), so fast producers really block until
  the consumers catch up: memory stays bounded;
* each producer puts through its own producer handle; the channel closes when
  the last handle closes, so no sentinel is needed and any value is data;
* the consumers' ``for number in channel`` loops end by themselves once the
  channel is closed and drained;
* at the end the demo checks that the multiset of numbers consumed equals the
  multiset produced: nothing lost, nothing duplicated.

Then `bottleneck_demo` runs a pipeline with a deliberately slow stage: the
report after the run names it as the bottleneck, with the evidence and a
hint, and a second run that follows the hint shows the difference.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .channel import Channel, ChannelStats, Producer
from .errors import Full
from .metrics import Bottleneck

__all__ = [
    "BottleneckDemoResult",
    "ChannelDemoResult",
    "bottleneck_demo",
    "channel_demo",
    "run_demo",
]

PRODUCERS = 3
CONSUMERS = 2
NUMBERS_PER_PRODUCER = 20
CAPACITY = 8  # small on purpose: the producers must wait for room
MAX_WORK_S = 0.002  # a consumer "processes" each number for up to this long

CHECK_OK = "OK: consumed == produced, nothing lost, nothing duplicated"


@dataclass
class _Side:
    """What one producer or consumer did."""

    name: str
    numbers: list[int] = field(default_factory=list)
    blocked: int = 0  # producers: puts that found the channel full and waited


@dataclass(frozen=True)
class ChannelDemoResult:
    """The outcome of `channel_demo`."""

    ok: bool
    """True when the multiset consumed equals the multiset produced."""
    produced: int
    """How many numbers the producers put."""
    consumed: int
    """How many numbers the consumers took."""
    stats: ChannelStats
    """The channel's statistics after the run."""


def _produce(handle: Producer[int], side: _Side, rng: random.Random) -> None:
    # The handle is closed on the way out, also if this raises: the channel
    # closes when the last producer is done, and the consumers' loops end.
    with handle:
        for _ in range(NUMBERS_PER_PRODUCER):
            number = rng.randint(1, 99)
            try:
                handle.put(number, False)
            except Full:  # the channel is full: wait for a consumer to make room
                side.blocked += 1
                handle.put(number)
            side.numbers.append(number)


def _consume(channel: Channel[int], side: _Side, rng: random.Random) -> None:
    for number in channel:  # ends when the channel is closed and drained
        side.numbers.append(number)
        time.sleep(rng.uniform(0, MAX_WORK_S))  # the work done with each number


def _sides_table(title: str, sides: list[_Side], *, producers: bool) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("name")
    table.add_column("count", justify="right")
    table.add_column("sum", justify="right")
    if producers:
        table.add_column("waited for room", justify="right")
    table.add_column("numbers", overflow="fold")
    for side in sides:
        row = [side.name, str(len(side.numbers)), str(sum(side.numbers))]
        if producers:
            row.append(str(side.blocked))
        row.append(" ".join(map(str, side.numbers)))
        table.add_row(*row)
    return table


def _stats_table(stats: ChannelStats) -> Table:
    table = Table(title="Channel statistics", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    for name, value in (
        ("capacity", stats.capacity),
        ("total put", stats.total_put),
        ("total got", stats.total_got),
        ("size now", stats.size),
        ("closed", stats.closed),
        ("open producer handles", stats.open_producers),
        ("waiting producers", stats.waiting_producers),
        ("waiting consumers", stats.waiting_consumers),
    ):
        table.add_row(name, str(value))
    return table


def channel_demo(console: Console, seed: int | None = None) -> ChannelDemoResult:
    """Run producers and consumers over one bounded channel and show what happened.

    Args:
        console: where to print the tables and the check.
        seed: makes the random numbers and work times repeatable.

    Returns:
        The check's outcome, the counts and the channel's final statistics.
    """
    master = random.Random(seed)
    channel: Channel[int] = Channel(CAPACITY)
    # Every handle is taken before any producer starts: a producer that
    # finished early must not close the channel under the others.
    handles = [channel.producer() for _ in range(PRODUCERS)]
    producers = [_Side(f"producer {i + 1}") for i in range(PRODUCERS)]
    consumers = [_Side(f"consumer {i + 1}") for i in range(CONSUMERS)]
    threads = [
        threading.Thread(
            target=_consume, args=(channel, side, random.Random(master.random())), name=side.name
        )
        for side in consumers
    ] + [
        threading.Thread(
            target=_produce, args=(handle, side, random.Random(master.random())), name=side.name
        )
        for handle, side in zip(handles, producers, strict=True)
    ]
    console.print(
        Panel(
            f"{PRODUCERS} producers put random numbers into ONE channel of capacity "
            f"{CAPACITY}; {CONSUMERS} consumers take them.\n"
            "Each producer closes its own handle when done; the channel closes with the "
            "last one. No sentinel, no shared slot, no hand-held locks.",
            title="conveyor demo: producers and consumers over a Channel",
        )
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    stats = channel.stats()
    console.print(_sides_table("Produced", producers, producers=True))
    console.print(_sides_table("Consumed", consumers, producers=False))
    console.print(_stats_table(stats))

    produced = Counter(n for side in producers for n in side.numbers)
    consumed = Counter(n for side in consumers for n in side.numbers)
    ok = produced == consumed and stats.total_put == stats.total_got
    n_produced, n_consumed = sum(produced.values()), sum(consumed.values())
    if ok:
        total = sum(n * k for n, k in consumed.items())
        console.print(
            Panel(
                f"{CHECK_OK}\nproduced {n_produced} numbers, consumed {n_consumed}, "
                f"same sum {total}, same count of every value",
                title="check",
                border_style="green",
            )
        )
    else:
        lost = produced - consumed
        extra = consumed - produced
        console.print(
            Panel(
                f"MISMATCH: {n_produced} produced, {n_consumed} consumed\n"
                f"lost: {dict(lost)}\nduplicated or invented: {dict(extra)}",
                title="check",
                border_style="red",
            )
        )
    return ChannelDemoResult(ok=ok, produced=n_produced, consumed=n_consumed, stats=stats)


# ---------------------------------------------------------------------- part 2: the bottleneck

RECORDS = 300
ENRICH_S = 0.004  # "enrich" waits this long per record, like a call to a slow service
ENRICH_WORKERS = 2
MORE_WORKERS = 8


@dataclass(frozen=True)
class BottleneckDemoResult:
    """The outcome of `bottleneck_demo`."""

    ok: bool
    """True when every record came out of both runs."""
    bottleneck: Bottleneck | None
    """What the first run named as its bottleneck."""
    seconds: float
    """Wall time of the first run."""
    faster_seconds: float
    """Wall time of the second run, with more workers on the slow stage."""


def _parse(n: int) -> dict[str, int]:
    return {"id": n, "value": n * 37 % 100}


def _enrich(record: dict[str, int]) -> dict[str, int]:
    time.sleep(ENRICH_S)  # the slow part of the work
    return {**record, "score": record["value"] * 2}


def _store(record: dict[str, int]) -> int:
    return record["id"]


def bottleneck_demo(console: Console) -> BottleneckDemoResult:
    """Run a pipeline with a deliberately slow stage, show the report naming it,
    then follow the report's hint and show the difference.

    Args:
        console: where to print the tables (the live progress goes to stderr).

    Returns:
        The bottleneck named, both wall times, and whether every record came out.
    """
    from .pipeline import Pipeline
    from .report import bottleneck_line, report_table

    pipeline = (
        Pipeline(range(RECORDS))
        .map(_parse, workers=2, name="parse")
        .map(_enrich, workers=ENRICH_WORKERS, name="enrich")
        .map(_store, name="store")
    )
    console.print(
        Panel(
            f"{RECORDS} records through parse -> enrich -> store. One stage is slow "
            f"on purpose ({ENRICH_S * 1000:g} ms per record). Which one holds the run back, "
            "and what would help? The report after the run says.",
            title="conveyor demo: finding the bottleneck",
        )
    )
    first = pipeline.run(progress=True)
    console.print(
        report_table(
            first.stats, title=f"Run 1: {first.elapsed_seconds:.2f} s", width=console.width
        )
    )
    console.print(bottleneck_line(first.bottleneck), markup=False, highlight=False)

    faster = pipeline.with_stage("enrich", workers=MORE_WORKERS).run(progress=True)
    console.print(
        report_table(
            faster.stats,
            title=f"Run 2, enrich with {MORE_WORKERS} workers: {faster.elapsed_seconds:.2f} s "
            f"({first.elapsed_seconds / faster.elapsed_seconds:.1f}x faster)",
            width=console.width,
        )
    )
    console.print(bottleneck_line(faster.bottleneck), markup=False, highlight=False)
    ok = first.items_out == faster.items_out == RECORDS
    return BottleneckDemoResult(ok, first.bottleneck, first.elapsed_seconds, faster.elapsed_seconds)


def run_demo() -> int:
    """Run the demo (``conveyor demo``) and return the process exit code.

    Returns:
        0 when every check passed, 1 otherwise.
    """
    console = Console()
    result = channel_demo(console)
    bottleneck = bottleneck_demo(console)
    return 0 if result.ok and bottleneck.ok else 1
