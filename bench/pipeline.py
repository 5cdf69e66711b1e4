"""Thread pipelines: conveyor against the ways people write them by hand, in one run.

Scenarios (each candidate runs in the same process, alternated round by round,
medians reported; ratios are against the hand-written queue.Queue pipeline):

* overhead  100k items through 3 trivial map stages (x + 1), 4 workers each;
* io        2000 items through 2 stages that sleep 5 ms, 32 workers each;
            efficiency = ideal / measured, ideal from the measured sleep;
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
import concurrent.futures as cf
import json
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


def measured_sleep(seconds: float) -> float:
    samples = []
    for _ in range(50):
        t = time.perf_counter()
        time.sleep(seconds)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def io_bound(
    rounds: int, n: int = 2000, workers: int = 32, reference_only: bool = False
) -> tuple[Rows, Samples]:
    pause = 0.005

    def slow(x: int) -> int:
        time.sleep(pause)
        return x

    fns = [slow, slow]
    names = [
        "conveyor ordered",
        "conveyor unordered",
        "queue.Queue + threads + sentinels",
        "chained ThreadPoolExecutor.map",
        "pypeln thread",
    ]
    names = keep(names, reference_only)

    def once(name: str) -> float:
        s = measured_sleep(pause)
        ideal = (n / workers + 1) * s  # steady state, plus one item's trip through stage 2
        t = time.perf_counter()
        out = CANDIDATES[name](range(n), fns, workers)
        dt = time.perf_counter() - t
        if sorted(out) != list(range(n)):
            raise AssertionError(f"{name} lost or invented items")
        return ideal / dt

    res = rounds_of(names, rounds, once)
    med = {k: statistics.median(v) for k, v in res.items()}
    ref = med[HANDWRITTEN]
    return [(k, med[k], med[k] / ref) for k in names], res


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
    io: Rows | None,
    mem: list[tuple[str, int, float, float]] | None,
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
            "### I/O-bound: 2000 items, 2 stages sleeping 5 ms, 32 workers each",
            "",
            "Efficiency = ideal time / measured time, ideal = (items / workers + 1) x the",
            "measured length of `time.sleep(0.005)`.",
            "",
            "| candidate | efficiency | vs hand-written |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {v:.3f} | {r:.2f}x |" for k, v, r in io]
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
    io, io_s = io_bound(args.rounds, reference_only=only) if "io" in args.scenario else (None, {})
    mem = memory(args.memory_items, args.executor_items) if "memory" in args.scenario else None
    text = render(args.rounds, over, io, mem)
    print(text)
    if args.write:
        write_section(text, "pipeline")
    if args.json:
        write_json(args.json, workloads(over, over_s, io, io_s))


def workloads(over: Rows | None, over_s: Samples, io: Rows | None, io_s: Samples) -> dict[str, Any]:
    """conveyor's rows against the hand-written pipeline, for --json (memory has no peer)."""
    out = {}
    for scenario, rows, samples, unit in (
        ("overhead", over, over_s, "items/s"),
        ("io", io, io_s, "efficiency"),
    ):
        med = {name: value for name, value, _ in rows or ()}
        for name, value in med.items():
            if name.startswith("conveyor"):
                out[f"{scenario}/{name}"] = workload(
                    value, unit, HANDWRITTEN, med[HANDWRITTEN], samples[name], samples[HANDWRITTEN]
                )
    return out


if __name__ == "__main__":
    main()
