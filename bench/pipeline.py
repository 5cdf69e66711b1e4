"""Thread pipelines: conveyor against the ways people write them by hand, in one run.

Scenarios (each candidate runs in the same process, alternated round by round,
medians reported; ratios are against the hand-written queue.Queue pipeline):

* overhead  100k items through 3 trivial map stages (x + 1), 4 workers each;
* io        2000 items through 2 stages whose items wait 5 ms, 32 workers each:
            on threads (time.sleep), on conveyor's own event loop (run()) and on
            the caller's (async for), ordered and unordered, each against the
            hand-written pipeline of its kind (queue.Queue + threads, asyncio.Queue
            + tasks); efficiency = ideal / measured, ideal from the measured wait,
            with the lowest round and the load average;
* memory    peak memory growth of a run through a slow sink, each candidate
            in a fresh subprocess (VmHWM after resetting it).

Run:  python bench/pipeline.py [--rounds 5] [--scenario overhead io memory] [--write]
                               [--json PATH] [--reference-only]

--reference-only runs only conveyor and the hand-written pipeline (the other
peers take most of the time: for bench/ab.py's regression checks).
--json PATH writes conveyor's figures and their ratios to the hand-written
pipeline (overhead, io) as JSON; CONVEYOR_BENCH_SRC chooses the conveyor to
import (see bench/_common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import inspect
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from _common import (  # re-exported for the other scripts
    conveyor_src,
    machine,
    workload,
    write_json,
    write_section,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(conveyor_src()))  # $CONVEYOR_BENCH_SRC, else ROOT/src

import conveyor as cv  # noqa: E402

# ---------------------------------------------------------------------- machine


# ---------------------------------------------------------------------- candidates


def inc(x: int) -> int:
    return x + 1


def handwritten(source: Iterable[Any], fns: list[Callable[[Any], Any]], workers: int) -> list[Any]:
    """The textbook pipeline: queue.Queue(1024) between stages, threads, sentinels."""
    sentinel = object()
    queues = [queue.Queue[Any](1024) for _ in range(len(fns) + 1)]
    out: list[Any] = []

    def stage(i: int, fn: Callable[[Any], Any], left: list[int], lock: threading.Lock) -> None:
        inq, outq = queues[i], queues[i + 1]
        while True:
            x = inq.get()
            if x is sentinel:
                break
            outq.put(fn(x))
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:  # the last worker of the stage tells every worker downstream
            for _ in range(workers if i + 1 < len(fns) else 1):
                outq.put(sentinel)

    threads = []
    for i, fn in enumerate(fns):
        left, lock = [workers], threading.Lock()
        threads += [
            threading.Thread(target=stage, args=(i, fn, left, lock)) for _ in range(workers)
        ]
    for t in threads:
        t.start()

    def feed() -> None:
        for x in source:
            queues[0].put(x)
        for _ in range(workers):
            queues[0].put(sentinel)

    feeder = threading.Thread(target=feed)
    feeder.start()
    while (x := queues[-1].get()) is not sentinel:
        out.append(x)
    feeder.join()
    for t in threads:
        t.join()
    return out


def executor_chain(
    source: Iterable[Any], fns: list[Callable[[Any], Any]], workers: int
) -> list[Any]:
    """Chained ThreadPoolExecutor.map: each map submits its whole input up front."""
    pools = [cf.ThreadPoolExecutor(workers) for _ in fns]
    try:
        it: Iterable[Any] = source
        for pool, fn in zip(pools, fns, strict=True):
            it = pool.map(fn, it)
        return list(it)
    finally:
        for pool in pools:
            pool.shutdown()


def pypeln_thread(
    source: Iterable[Any], fns: list[Callable[[Any], Any]], workers: int
) -> list[Any]:
    """pypeln's thread mode, maxsize 1024 per stage."""
    import pypeln as pl

    stage: Any = source
    for fn in fns:
        stage = pl.thread.map(fn, stage, workers=workers, maxsize=1024)
    return list(stage)


def conveyor_run(ordered: bool) -> Callable[[Iterable[Any], list[Callable[[Any], Any]], int], Any]:
    def run(source: Iterable[Any], fns: list[Callable[[Any], Any]], workers: int) -> list[Any]:
        p: cv.Pipeline[Any] = cv.Pipeline(source)
        for fn in fns:
            p = p.map(fn, workers=workers, ordered=ordered)
        return list(p)

    return run


def plain_loop(source: Iterable[Any], fns: list[Callable[[Any], Any]], workers: int) -> list[Any]:
    out = []
    for item in source:
        value = item
        for fn in fns:
            value = fn(value)
        out.append(value)
    return out


CANDIDATES: dict[str, Callable[..., list[Any]]] = {
    "conveyor ordered": conveyor_run(True),
    "conveyor unordered": conveyor_run(False),
    "queue.Queue + threads + sentinels": handwritten,
    "chained ThreadPoolExecutor.map": executor_chain,
    "pypeln thread": pypeln_thread,
    "plain loop (no threads)": plain_loop,
}


def rounds_of(
    names: list[str], rounds: int, once: Callable[[str], float]
) -> dict[str, list[float]]:
    """Warm up each candidate, then time them alternately ``rounds`` times."""
    results: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        once(name)
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for name in order:
            results[name].append(once(name))
    return results


# ---------------------------------------------------------------------- scenarios


Rows = list[tuple[str, float, float]]
Samples = dict[str, list[float]]
HANDWRITTEN = "queue.Queue + threads + sentinels"


def keep(names: list[str], reference_only: bool) -> list[str]:
    """All of ``names``, or only conveyor's and the hand-written pipeline."""
    if not reference_only:
        return names
    return [n for n in names if n.startswith("conveyor") or n == HANDWRITTEN]


def overhead(rounds: int, n: int = 100_000, reference_only: bool = False) -> tuple[Rows, Samples]:
    fns = [inc, inc, inc]
    expected = [x + 3 for x in range(n)]

    def once(name: str) -> float:
        t = time.perf_counter()
        out = CANDIDATES[name](range(n), fns, 4)
        dt = time.perf_counter() - t
        if sorted(out) != expected:
            raise AssertionError(f"{name} lost or invented items")
        return n / dt

    names = keep(list(CANDIDATES), reference_only)
    res = rounds_of(names, rounds, once)
    med = {k: statistics.median(v) for k, v in res.items()}
    ref = med[HANDWRITTEN]
    return [(k, med[k], med[k] / ref) for k in names], res


# ---------------------------------------------------------------------- I/O-bound
# 2000 items through 2 stages of 32 workers whose items wait 5 ms: conveyor on
# threads, on its own event loop (run()), and on the caller's loop (async for),
# each against the hand-written pipeline of its kind in the same rounds.

PAUSE = 0.005
THREADS, OWN_LOOP, CALLER_LOOP = "threads", "conveyor's own loop", "caller's loop (asyncio's)"
ASYNC_HANDWRITTEN = "asyncio.Queue + tasks + sentinels"


def slow(x: int) -> int:
    time.sleep(PAUSE)
    return x


async def aslow(x: int) -> int:
    await asyncio.sleep(PAUSE)
    return x


async def handwritten_async(n: int, workers: int) -> list[Any]:
    """The textbook asyncio pipeline: asyncio.Queue(1024) between stages, tasks, sentinels."""
    sentinel = object()
    queues = [asyncio.Queue[Any](1024) for _ in range(3)]
    left = [workers, workers]

    async def stage(i: int) -> None:
        inq, outq = queues[i], queues[i + 1]
        while (x := await inq.get()) is not sentinel:
            await outq.put(await aslow(x))
        left[i] -= 1
        if not left[i]:  # the last worker of the stage tells every worker downstream
            for _ in range(workers if i == 0 else 1):
                await outq.put(sentinel)

    async def feed() -> None:
        for x in range(n):
            await queues[0].put(x)
        for _ in range(workers):
            await queues[0].put(sentinel)

    tasks = [asyncio.create_task(stage(i)) for i in range(2) for _ in range(workers)]
    tasks.append(asyncio.create_task(feed()))
    out = []
    while (x := await queues[2].get()) is not sentinel:
        out.append(x)
    await asyncio.gather(*tasks)
    return out


def conveyor_async(ordered: bool) -> Callable[[int, int], list[Any]]:
    """conveyor's async stages iterated from plain code: its own loop, in a thread."""

    def run(n: int, workers: int) -> list[Any]:
        p = cv.Pipeline(range(n))
        for _ in range(2):
            p = p.map(aslow, workers=workers, runtime="async", ordered=ordered)
        return list(p)

    return run


def conveyor_async_for(ordered: bool) -> Callable[[int, int], Any]:
    """conveyor's async stages iterated with ``async for``: they run on the caller's loop."""

    async def run(n: int, workers: int) -> list[Any]:
        p = cv.Pipeline(range(n))
        for _ in range(2):
            p = p.map(aslow, workers=workers, runtime="async", ordered=ordered)
        return [x async for x in p]

    return run


def threads_of(fn: Callable[..., list[Any]]) -> Callable[[int, int], list[Any]]:
    return lambda n, workers: fn(range(n), [slow, slow], workers)


IO_CANDIDATES: dict[str, tuple[str, Callable[[int, int], Any]]] = {
    "conveyor ordered": (THREADS, threads_of(conveyor_run(True))),
    "conveyor unordered": (THREADS, threads_of(conveyor_run(False))),
    HANDWRITTEN: (THREADS, threads_of(handwritten)),
    "chained ThreadPoolExecutor.map": (THREADS, threads_of(executor_chain)),
    "pypeln thread": (THREADS, threads_of(pypeln_thread)),
    "conveyor async ordered": (OWN_LOOP, conveyor_async(True)),
    "conveyor async unordered": (OWN_LOOP, conveyor_async(False)),
    f"{ASYNC_HANDWRITTEN} (on conveyor's loop)": (OWN_LOOP, handwritten_async),
    "conveyor async for, ordered (caller's loop: cv.new_event_loop())": (
        OWN_LOOP,
        conveyor_async_for(True),
    ),
    "conveyor async for, unordered (caller's loop: cv.new_event_loop())": (
        OWN_LOOP,
        conveyor_async_for(False),
    ),
    "conveyor async for, ordered": (CALLER_LOOP, conveyor_async_for(True)),
    "conveyor async for, unordered": (CALLER_LOOP, conveyor_async_for(False)),
    ASYNC_HANDWRITTEN: (CALLER_LOOP, handwritten_async),
}
"""name -> (where the waits run, how to run it with (items, workers))."""
IO_PEERS = {
    THREADS: HANDWRITTEN,
    OWN_LOOP: f"{ASYNC_HANDWRITTEN} (on conveyor's loop)",
    CALLER_LOOP: ASYNC_HANDWRITTEN,
}
"""The hand-written pipeline each row is compared with: the same kind of waits."""


def own_loop() -> asyncio.AbstractEventLoop:
    """``cv.new_event_loop()``; where an older conveyor (bench/ab.py's base) lacks it, the same
    function from its async runtime."""
    factory = getattr(cv, "new_event_loop", None)
    if factory is None:
        from conveyor.runtime.aio import new_event_loop as factory
    loop: asyncio.AbstractEventLoop = factory()
    return loop


def on_loop(where: str, coroutine: Any) -> Any:
    """Run ``coroutine`` on a fresh loop: conveyor's for OWN_LOOP, asyncio's default otherwise."""
    loop = own_loop() if where == OWN_LOOP else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def measured_sleep(where: str) -> float:
    """Median length of one 5 ms wait alone, as the candidate's workers wait."""

    def sample() -> float:
        t = time.perf_counter()
        time.sleep(PAUSE)
        return time.perf_counter() - t

    async def asample() -> list[float]:
        out = []
        for _ in range(30):
            t = time.perf_counter()
            await asyncio.sleep(PAUSE)
            out.append(time.perf_counter() - t)
        return out

    if where == THREADS:
        return statistics.median(sample() for _ in range(30))
    return statistics.median(on_loop(where, asample()))


IoRows = list[tuple[str, str, float, float, float]]
"""(name, where its waits run, median efficiency, lowest round, median vs its peer)."""


def io_bound(
    rounds: int, n: int = 2000, workers: int = 32, reference_only: bool = False
) -> tuple[IoRows, Samples]:
    names = list(IO_CANDIDATES)
    if reference_only:
        names = [k for k in names if k.startswith("conveyor") or k in IO_PEERS.values()]

    def once(name: str) -> float:
        where, run = IO_CANDIDATES[name]
        ideal = (n / workers + 1) * measured_sleep(where)  # plus one item's trip through stage 2
        t = time.perf_counter()
        result = run(n, workers)
        # conveyor's async for runs on the caller's loop: a fresh one, timed with it.
        out = on_loop(where, result) if inspect.iscoroutine(result) else result
        dt = time.perf_counter() - t
        if sorted(out) != list(range(n)):
            raise AssertionError(f"{name} lost or invented items")
        return ideal / dt

    res = rounds_of(names, rounds, once)
    med = {k: statistics.median(v) for k, v in res.items()}
    rows = []
    for name in names:
        where = IO_CANDIDATES[name][0]
        peer = med[IO_PEERS[where]]
        rows.append((name, where, med[name], min(res[name]), med[name] / peer))
    return rows, res


MEMORY_CHILD = r"""
import sys, time, json, concurrent.futures as cf
sys.path.insert(0, sys.argv[3])
name, n = sys.argv[1], int(sys.argv[2])
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def ident(x):
    return x
def slow_sink(x):
    # A sink slower than the producer: a little arithmetic per item.
    s = 0
    for i in range(20):
        s += i
    return s
import conveyor as cv
base = rss_kib(); reset_peak()
t = time.perf_counter()
if name == "conveyor":
    count = 0
    for x in cv.Pipeline(range(n)).map(ident, workers=4):
        slow_sink(x); count += 1
elif name == "ThreadPoolExecutor.map":
    count = 0
    with cf.ThreadPoolExecutor(4) as ex:
        for x in ex.map(ident, range(n)):
            slow_sink(x); count += 1
assert count == n
print(json.dumps({"growth_kib": peak_kib() - base, "seconds": time.perf_counter() - t}))
"""


def memory(conveyor_items: int, executor_items: int) -> list[tuple[str, int, float, float]]:
    rows = []
    for name, n in (("conveyor", conveyor_items), ("ThreadPoolExecutor.map", executor_items)):
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, name, str(n), str(conveyor_src())],
            capture_output=True,
            text=True,
            check=True,
        )
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((name, n, data["growth_kib"] / 1024, data["seconds"]))
    return rows


# ---------------------------------------------------------------------- output


def render(
    rounds: int,
    over: Rows | None,
    io: IoRows | None,
    mem: list[tuple[str, int, float, float]] | None,
    load: tuple[float, float] = (0.0, 0.0),
) -> str:
    lines = [
        "## Thread pipelines",
        "",
        f"Machine: {machine()}. Medians of {rounds} rounds after a warm-up, candidates",
        "alternated round by round. Reproduce: `python bench/pipeline.py --write`.",
        "",
    ]
    if over:
        lines += [
            "### Overhead: 100k items, 3 map stages (x + 1), 4 workers each",
            "",
            "| candidate | items/s | vs hand-written |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {v:,.0f} | {r:.2f}x |" for k, v, r in over]
        lines.append("")
    if io:
        lines += [
            "### I/O-bound: 2000 items, 2 stages waiting 5 ms, 32 workers each",
            "",
            "Efficiency = ideal time / measured time, ideal = (items / workers + 1) x the",
            "measured length of one wait alone (`time.sleep(0.005)` on threads,",
            "`asyncio.sleep(0.005)` on a fresh loop of the same kind), in the same round.",
            "Each row is compared with the hand-written pipeline whose waits run the same",
            "way. On the caller's loop, conveyor's async stages run on the loop of",
            "`async for`: asyncio's default loop, which rounds every timer wait up to",
            "1 ms (conveyor makes it wait to the microsecond while the run is on it; the",
            "hand-written pipeline's waits keep the rounding), or one made by",
            "`cv.new_event_loop()` (conveyor's own kind, which `run()` and plain",
            "iteration use).",
            "",
            f"Load average (1 min) at the start: {load[0]:.2f}, at the end: {load[1]:.2f}.",
            "",
            "| candidate | waits on | efficiency | lowest round | vs hand-written |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [f"| {k} | {w} | {v:.3f} | {lo:.3f} | {r:.2f}x |" for k, w, v, lo, r in io]
        lines.append("")
    if mem:
        lines += [
            "### Memory: peak growth through a slow sink (fresh process each)",
            "",
            "| candidate | items | peak growth | seconds |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {k} | {n:,} | {g:,.1f} MiB | {s:.1f} |" for k, n, g, s in mem]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--scenario",
        nargs="+",
        default=["overhead", "io", "memory"],
        choices=["overhead", "io", "memory"],
    )
    parser.add_argument("--memory-items", type=int, default=10_000_000)
    parser.add_argument("--executor-items", type=int, default=1_000_000)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--json", metavar="PATH", help="write conveyor's figures as JSON")
    parser.add_argument(
        "--reference-only",
        action="store_true",
        help="only conveyor and the hand-written pipeline (overhead, io)",
    )
    args = parser.parse_args()
    if args.write and args.reference_only:
        parser.error("--reference-only leaves rows out: not for --write")
    only = args.reference_only
    over, over_s = (
        overhead(args.rounds, reference_only=only) if "overhead" in args.scenario else (None, {})
    )
    load_before = os.getloadavg()[0]
    io, io_s = io_bound(args.rounds, reference_only=only) if "io" in args.scenario else (None, {})
    load = (load_before, os.getloadavg()[0])
    mem = memory(args.memory_items, args.executor_items) if "memory" in args.scenario else None
    text = render(args.rounds, over, io, mem, load)
    print(text)
    if args.write:
        write_section(text, "pipeline")
    if args.json:
        write_json(args.json, workloads(over, over_s, io, io_s))


def workloads(
    over: Rows | None, over_s: Samples, io: IoRows | None, io_s: Samples
) -> dict[str, Any]:
    """conveyor's rows against their hand-written peers, for --json (memory has no peer)."""
    out = {}
    med = {name: value for name, value, _ in over or ()}
    for name, value in med.items():
        if name.startswith("conveyor"):
            out[f"overhead/{name}"] = workload(
                value, "items/s", HANDWRITTEN, med[HANDWRITTEN], over_s[name], over_s[HANDWRITTEN]
            )
    io_med = {name: value for name, _, value, _, _ in io or ()}
    for name, where, value, _, _ in io or ():
        if name.startswith("conveyor"):
            peer = IO_PEERS[where]
            out[f"io/{name}"] = workload(
                value, "efficiency", peer, io_med[peer], io_s[name], io_s[peer]
            )
    return out


if __name__ == "__main__":
    main()
