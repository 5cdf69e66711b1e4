"""Hand-off latency: how long a consumer waits for its next item; queue.Queue, asyncio.Queue.

The method is SPDL's ``benchmark_thread_output_queue``: a producer stage
turns a source of ints into items as fast as it can; the consumer takes them
one by one and, after each, is busy for W ms (W in ``--work``, 0 1 10 30 by
default). The time the consumer spends in the call that gives it the next
item is recorded. With W > 0 the stage has the next item ready long before
the consumer asks, so that time is the hand-off itself (lock, wake-up,
buffering); with W = 0 the consumer is always waiting, and the time includes
the stage's own pace. At W = 0 the item is also the time its stage produced
it (``time.perf_counter()``, which works across threads of one process), so
the delay from the stage returning the item to the consumer holding it is
recorded as well ("stage -> consumer").

Candidates, one stage and its consumer each:

threads (the consumer is the main thread; busy = a spin loop, CPU work that
holds the GIL as Python code does):

* conveyor: ``for x in Pipeline(source).map(stamp)``, a thread stage;
* conveyor.Channel: a producer thread ``put()``-ing, the consumer ``get()``;
* queue.Queue: the same with ``queue.Queue`` (the reference), a sentinel at the end;

asyncio (the consumer is a coroutine; busy = ``await asyncio.sleep(W)``, an
async consumer's I/O, which leaves the loop to the others):

* conveyor async: ``async for x in Pipeline(source).map(astamp, runtime="async")``
  (the stage runs on the caller's loop);
* conveyor.Channel async: a producer task ``aput()``-ing, the consumer ``aget()``;
* asyncio.Queue: the same with ``asyncio.Queue`` (the reference).

Every buffer holds ``--capacity`` items (conveyor's default, 1024: the
pipeline's output channel). Items per run: as many as fit in about
``--seconds`` of consumer work (at least 120, so a p99 means something; the
first 20 are a warm-up and not counted). Candidates alternate within each
round; the round's p50 and p99 of each candidate, and its ratio to the
reference of the same round, are reported as medians over ``--rounds``
rounds. The garbage collector is paused during a run.

Run:  python bench/latency.py [--rounds 5] [--work 0 1 10 30] [--write] [--json PATH]

``--work`` with no value leaves the busy-consumer scenarios out (only the paced
stage is measured). ``--json PATH`` writes, per scenario and family, the
conveyor pipeline's p50 and p99 as figures where higher is better (the
reference's latency over conveyor's, per round), for bench/ab.py to pair.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import conveyor_src, machine, workload, write_json, write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(conveyor_src()))  # $CONVEYOR_BENCH_SRC, else ROOT/src

import conveyor as cv  # noqa: E402

SECTION = "latency"
WARMUP = 20
MIN_ITEMS = 120
MAX_ITEMS = 20_000
STOP = object()
perf_counter = time.perf_counter


@dataclass
class Sample:
    """One run of one candidate: seconds per hand-off, and stage -> consumer delays."""

    gets: list[float] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)


def spin(seconds: float) -> None:
    """Busy for ``seconds``: CPU work that holds the GIL, as Python code does."""
    end = perf_counter() + seconds
    while perf_counter() < end:
        pass


def stamp(pace: float) -> Callable[[object], float]:
    """The stage's function: its item is the moment it returns, after ``pace`` seconds."""

    def make(_: object) -> float:
        if pace:
            time.sleep(pace)
        return perf_counter()

    return make


def astamp(pace: float) -> Callable[[object], Awaitable[float]]:
    """`stamp` for a coroutine stage."""

    async def make(_: object) -> float:
        if pace:
            await asyncio.sleep(pace)
        return perf_counter()

    return make


def record(sample: Sample, started: float, item: float) -> None:
    now = perf_counter()
    sample.gets.append(now - started)
    sample.delays.append(now - item)


# ---------------------------------------------------------------------- thread candidates


def conveyor_threads(n: int, work: float, capacity: int, pace: float) -> Sample:
    sample = Sample()
    pipeline = cv.Pipeline(range(n)).map(stamp(pace), capacity=capacity)
    started = perf_counter()
    for item in pipeline:
        record(sample, started, item)
        spin(work)
        started = perf_counter()
    return sample


def channel_threads(n: int, work: float, capacity: int, pace: float) -> Sample:
    channel: cv.Channel[float] = cv.Channel(capacity)
    handle = channel.producer()

    make = stamp(pace)

    def produce() -> None:
        with handle:
            for i in range(n):
                handle.put(make(i))

    sample = Sample()
    thread = threading.Thread(target=produce)
    thread.start()
    started = perf_counter()
    for item in channel:
        record(sample, started, item)
        spin(work)
        started = perf_counter()
    thread.join()
    return sample


def queue_threads(n: int, work: float, capacity: int, pace: float) -> Sample:
    q: queue.Queue[object] = queue.Queue(capacity)

    make = stamp(pace)

    def produce() -> None:
        for i in range(n):
            q.put(make(i))
        q.put(STOP)

    sample = Sample()
    thread = threading.Thread(target=produce)
    thread.start()
    while True:
        started = perf_counter()
        item = q.get()
        if item is STOP:
            break
        assert isinstance(item, float)
        record(sample, started, item)
        spin(work)
    thread.join()
    return sample


# ---------------------------------------------------------------------- asyncio candidates


async def busy(work: float) -> None:
    if work:
        await asyncio.sleep(work)


async def aconveyor(n: int, work: float, capacity: int, pace: float) -> Sample:
    sample = Sample()
    pipeline = cv.Pipeline(range(n)).map(astamp(pace), runtime="async", capacity=capacity)
    started = perf_counter()
    async for item in pipeline:
        record(sample, started, item)
        await busy(work)
        started = perf_counter()
    return sample


async def achannel(n: int, work: float, capacity: int, pace: float) -> Sample:
    channel: cv.Channel[float] = cv.Channel(capacity)
    handle = channel.producer()

    make = astamp(pace)

    async def produce() -> None:
        with handle:
            for i in range(n):
                await handle.aput(await make(i))

    sample = Sample()
    task = asyncio.create_task(produce())
    started = perf_counter()
    async for item in channel:
        record(sample, started, item)
        await busy(work)
        started = perf_counter()
    await task
    return sample


async def aqueue(n: int, work: float, capacity: int, pace: float) -> Sample:
    q: asyncio.Queue[object] = asyncio.Queue(capacity)

    make = astamp(pace)

    async def produce() -> None:
        for i in range(n):
            await q.put(await make(i))
        await q.put(STOP)

    sample = Sample()
    task = asyncio.create_task(produce())
    while True:
        started = perf_counter()
        item = await q.get()
        if item is STOP:
            break
        assert isinstance(item, float)
        record(sample, started, item)
        await busy(work)
    await task
    return sample


def on_a_loop(
    coro_fn: Callable[[int, float, int, float], Coroutine[None, None, Sample]],
) -> Callable[[int, float, int, float], Sample]:
    """A coroutine candidate as a function: each run on a fresh event loop."""

    def run(n: int, work: float, capacity: int, pace: float) -> Sample:
        return asyncio.run(coro_fn(n, work, capacity, pace))

    return run


@dataclass(frozen=True)
class Candidate:
    name: str
    family: str  # "threads" or "asyncio"
    run: Callable[[int, float, int, float], Sample]
    reference: bool = False


CANDIDATES = [
    Candidate("conveyor (thread stage, for x in pipeline)", "threads", conveyor_threads),
    Candidate("conveyor.Channel (put / get)", "threads", channel_threads),
    Candidate("queue.Queue (put / get)", "threads", queue_threads, reference=True),
    Candidate(
        "conveyor async (async stage, async for x in pipeline)", "asyncio", on_a_loop(aconveyor)
    ),
    Candidate("conveyor.Channel async (aput / aget)", "asyncio", on_a_loop(achannel)),
    Candidate("asyncio.Queue (put / get)", "asyncio", on_a_loop(aqueue), reference=True),
]


# ---------------------------------------------------------------------- measuring


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass(frozen=True)
class Scenario:
    """One row group: the consumer's work and the stage's pace per item, in seconds."""

    work: float
    pace: float

    @property
    def label(self) -> str:
        if self.pace:
            return f"stage {self.pace * 1000:g} ms/item"
        return f"{self.work * 1000:g} ms"


@dataclass
class Figures:
    """Per round: p50 and p99 (us) of what the scenario measures."""

    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)


def items_for(s: Scenario, seconds: float) -> int:
    per_item = max(s.work, s.pace)
    if per_item == 0:
        return MAX_ITEMS
    return max(MIN_ITEMS, min(MAX_ITEMS, int(seconds / per_item)))


def measure_once(c: Candidate, n: int, s: Scenario, capacity: int) -> list[float]:
    """One run: the hand-off times, or (paced stage) the stage -> consumer delays."""
    gc.collect()
    gc.disable()
    try:
        sample = c.run(n, s.work, capacity, s.pace)
    finally:
        gc.enable()
    if len(sample.gets) != n:
        raise AssertionError(f"{c.name}: {len(sample.gets)} items received, expected {n}")
    return (sample.delays if s.pace else sample.gets)[WARMUP:]


def measure(
    scenarios: list[Scenario], rounds: int, capacity: int, seconds: float
) -> dict[tuple[Scenario, str], Figures]:
    figures: dict[tuple[Scenario, str], Figures] = {}
    for s in scenarios:
        n = items_for(s, seconds)
        for c in CANDIDATES:  # warm-up round, not counted
            measure_once(c, min(n, WARMUP + 100), s, capacity)
        for r in range(rounds):
            shift = r % len(CANDIDATES)
            for c in CANDIDATES[shift:] + CANDIDATES[:shift]:
                values = measure_once(c, n, s, capacity)
                f = figures.setdefault((s, c.name), Figures())
                f.p50.append(percentile(values, 0.5) * 1e6)
                f.p99.append(percentile(values, 0.99) * 1e6)
            print(f"  {s.label}: round {r + 1}/{rounds} done", flush=True)
    return figures


# ---------------------------------------------------------------------- report


def ratio(mine: list[float], ref: list[float]) -> str:
    """Median of the per-round ratios (same round, seconds apart)."""
    pairs = [a / b for a, b in zip(mine, ref, strict=True) if b > 0]
    return f"{statistics.median(pairs):.2f}x" if pairs else "-"


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f}"


def render_table(
    family: str,
    first_column: str,
    scenarios: list[Scenario],
    figures: dict[tuple[Scenario, str], Figures],
) -> list[str]:
    cands = [c for c in CANDIDATES if c.family == family]
    ref = next(c for c in cands if c.reference)
    lines = [
        f"| {first_column} | candidate | p50 us | p99 us | p50 vs ref | p99 vs ref |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for s in scenarios:
        r = figures[(s, ref.name)]
        for c in cands:
            f = figures[(s, c.name)]
            lines.append(
                f"| {s.label} | {c.name} | {fmt(f.p50)} | {fmt(f.p99)} | "
                f"{ratio(f.p50, r.p50)} | {ratio(f.p99, r.p99)} |"
            )
    return lines


def render(
    figures: dict[tuple[Scenario, str], Figures],
    handoff: list[Scenario],
    paced: list[Scenario],
    args: argparse.Namespace,
    load: str,
    took: float,
) -> str:
    lines = [
        "## Hand-off latency (bench/latency.py)",
        "",
        f"Machine: {machine()}; load average at the start: {load}.",
        "",
        f"`python bench/latency.py --rounds {args.rounds} --work "
        f"{' '.join(f'{w:g}' for w in args.work)} --pace {args.pace:g}`. Buffers of "
        f"{args.capacity} items; about {args.seconds:g} s per run (at least {MIN_ITEMS} "
        f"items, the first {WARMUP} not counted). p50 and p99 of each run; medians of "
        f"{args.rounds} rounds, candidates alternated; ratios are taken round by round "
        "against the reference (queue.Queue, asyncio.Queue) of the same round: lower is "
        f"better. Whole run: {took:.0f} s.",
        "",
        "*Hand-off* (SPDL's method, `benchmark_thread_output_queue`): one stage produces "
        "items as fast as it can, the consumer takes them one by one and is busy for the "
        "given time after each; the time spent in the call that hands over the next item "
        "is recorded. With a busy consumer the item is ready by then, so the figure is the "
        "hand-off itself; at 0 ms the consumer waits for the stage.",
        "",
        f"*Stage -> consumer*: the stage makes one item every {args.pace:g} ms (it sleeps), "
        "the consumer waits for each; the delay from the stage returning the item "
        "(`time.perf_counter()` is the item) to the consumer holding it: the wake-up.",
        "",
        "### Threads (a busy consumer spins: CPU work holding the GIL)",
        "",
        *render_table("threads", "consumer busy", handoff, figures),
        "",
        *render_table("threads", "stage -> consumer", paced, figures),
        "",
        "### asyncio (a busy consumer awaits `asyncio.sleep`: the loop stays free)",
        "",
        *render_table("asyncio", "consumer busy", handoff, figures),
        "",
        *render_table("asyncio", "stage -> consumer", paced, figures),
    ]
    return "\n".join(lines)


def workloads(
    figures: dict[tuple[Scenario, str], Figures], scenarios: list[Scenario]
) -> dict[str, dict[str, Any]]:
    """The pipelines' p50 and p99 per scenario, for --json, as rates (higher is better).

    bench/ab.py reads a workload's "ratio" as conveyor's figure over the
    peer's, faster above 1: here the reference's latency over conveyor's,
    taken round by round (median), and "throughput" is 1 / latency in
    seconds.
    """
    out: dict[str, dict[str, Any]] = {}
    for family in ("threads", "asyncio"):
        cands = [c for c in CANDIDATES if c.family == family]
        ref = next(c for c in cands if c.reference)
        mine = cands[0]  # the pipeline
        for s in scenarios:
            f, r = figures[(s, mine.name)], figures[(s, ref.name)]
            for q, ours, theirs in (("p50", f.p50, r.p50), ("p99", f.p99, r.p99)):
                rates = [1e6 / v for v in ours]
                peer_rates = [1e6 / v for v in theirs]
                entry = workload(
                    statistics.median(rates),
                    "1/s",
                    ref.name,
                    statistics.median(peer_rates),
                    rates,
                    peer_rates,
                )
                entry["ratio"] = statistics.median(b / a for a, b in zip(ours, theirs, strict=True))
                out[f"{family} {s.label} {q}"] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument(
        "--work", type=float, nargs="*", default=[0, 1, 10, 30], help="ms busy per item"
    )
    parser.add_argument("--pace", type=float, default=1.0, help="ms per item of a paced stage")
    parser.add_argument("--capacity", type=int, default=1024, help="items per buffer")
    parser.add_argument("--seconds", type=float, default=1.5, help="consumer work per run")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--json", metavar="PATH", help="write the pipelines' figures as JSON")
    args = parser.parse_args()
    if not args.work and args.pace <= 0:
        parser.error("nothing to measure: give --work values or a --pace above 0")
    load = f"{os.getloadavg()[0]:.1f}"
    print(f"Machine: {machine()}; load average {load}", flush=True)
    started = time.monotonic()
    handoff = [Scenario(work=w / 1000, pace=0.0) for w in args.work]
    paced = [Scenario(work=0.0, pace=args.pace / 1000)] if args.pace > 0 else []
    figures = measure(handoff + paced, args.rounds, args.capacity, args.seconds)
    page = render(figures, handoff, paced, args, load, time.monotonic() - started)
    print(page)
    if args.json:
        write_json(args.json, workloads(figures, handoff + paced))
    if args.write:
        path = write_section(page, SECTION)
        print(f"wrote the '{SECTION}' section of {path}")


if __name__ == "__main__":
    main()
