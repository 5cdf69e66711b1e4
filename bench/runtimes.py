"""Process stages against multiprocessing and its wrappers, in one run.

Scenarios (one function each; candidates run in this process, alternated
round by round after a warm-up round; medians of --rounds; start-up of the
worker processes included everywhere):

* cpu    2000 items of ~2 ms of pure-Python work, 2 worker processes:
         speed-up over a single thread; conveyor with no chunk size given,
         against Pool.imap (chunksize 1 and 16), mpire and pypeln;
* small  100k ints, x + 1, one process stage (default options: 1 worker;
         and 2 workers), against Pool().imap over chunk sizes 1 to 256;
* large  1 MiB NumPy arrays through a process stage and back (identity), in
         MiB/s, against the same round trip pickled through
         multiprocessing.Queue, and as a fraction of memcpy measured here.

The peers use multiprocessing's default start method (fork on Linux up to
Python 3.13); conveyor uses its own default (forkserver on Linux), whose
server is started once per program by the warm-up round.

Run:  python bench/runtimes.py [--rounds 5] [--scenario cpu small large] [--write]
                               [--json PATH] [--reference-only]

--write replaces this script's section of docs/benchmarks.md
(``<!-- runtimes:begin -->`` to ``<!-- runtimes:end -->``); inside it each
scenario has a block of its own, so running one scenario keeps the others.

--json PATH writes, per workload, conveyor's throughput and its ratio to
multiprocessing.Pool (cpu: Pool(2).imap chunksize 16; small: the best
Pool().imap of the run) or to the pickled multiprocessing.Queue round trip
(large). CONVEYOR_BENCH_SRC chooses the conveyor to import (see
bench/_common.py). --reference-only runs only conveyor, those peers and what
the tables are computed from (single thread, memcpy): for bench/ab.py.
"""

from __future__ import annotations

# Worker processes run this module again (as __mp_main__), start-up included in
# what is measured: its top level imports only what a worker needs anyway; the
# rest is imported where it is used.
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# $CONVEYOR_BENCH_SRC, else this checkout's src (see bench/_common.py); the
# environment variable reaches the worker processes too.
sys.path.insert(0, os.environ.get("CONVEYOR_BENCH_SRC") or str(BENCH.parent / "src"))

import conveyor as cv  # noqa: E402

try:  # as a NumPy program would: conveyor then preloads it for its workers
    import numpy
except ImportError:  # the large-payload scenario needs it; the others do not
    numpy = None

SECTION = "runtimes"

# What --json writes: filled in by the scenarios, see `record`.
WORKLOADS: dict[str, dict[str, Any]] = {}
# --reference-only: `measure` runs only the candidates its ``keep`` names.
REFERENCE_ONLY = False


def record(name: str, ours: str, peer: str, times: dict[str, list[float]], work: float) -> None:
    """Keep conveyor's candidate ``ours`` against ``peer`` (``work`` items or MiB per run)."""
    from _common import workload  # bench/_common.py, on sys.path once main() runs

    unit = "MiB/s" if name.startswith("large") else "items/s"
    WORKLOADS[name] = workload(
        work / median(times[ours]),
        unit,
        peer,
        work / median(times[peer]),
        [work / t for t in times[ours]],
        [work / t for t in times[peer]],
    )


# ---------------------------------------------------------------------- measuring

Candidate = Callable[[], Any]


def measure(
    candidates: dict[str, Candidate], rounds: int, keep: tuple[str, ...] = ()
) -> dict[str, list[float]]:
    """Seconds per run of each candidate: one warm-up round, then ``rounds`` rounds.

    The order rotates from round to round, so that no candidate always runs
    right after the same neighbour. With --reference-only, only the
    candidates named in ``keep`` run.
    """
    from _common import settle  # bench/_common.py, on sys.path once main() runs

    names = [name for name in candidates if not REFERENCE_ONLY or name in keep]
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            candidates[name]()
            elapsed = time.perf_counter() - started
            settle()  # a standby worker a conveyor run's end starts: not during the next
            if round_:  # round 0 is the warm-up
                times[name].append(elapsed)
        print(f"  round {round_}/{rounds} done", file=sys.stderr)
    return times


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def spread(values: list[float]) -> str:
    """Min-max of the runs, as a percentage around the median."""
    m = median(values)
    return f"{100 * (min(values) - m) / m:+.0f}/{100 * (max(values) - m) / m:+.0f}%"


# ---------------------------------------------------------------------- cpu


def burn(n: int) -> int:
    """Pure-Python work: n multiply-adds (the item says how many)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def calibrate(seconds: float) -> int:
    """The n for which burn(n) takes about ``seconds`` here."""
    n = 20_000
    while True:
        started = time.perf_counter()
        burn(n)
        took = time.perf_counter() - started
        if took > 0.05:
            return max(1, int(n * seconds / took))
        n *= 2


CPU_OURS = "conveyor, process stage, 2 workers"


def cpu_bound(rounds: int) -> str:
    items = [calibrate(0.002)] * 2000
    expected = [burn(items[0])] * len(items)

    def check(out: list[int]) -> None:
        assert out == expected

    def single_thread() -> None:
        check([burn(x) for x in items])

    def conveyor_processes() -> None:
        check(list(cv.Pipeline(items).map(burn, workers=2, runtime="process")))

    def pool(chunksize: int) -> Candidate:
        def run() -> None:
            with multiprocessing.Pool(2) as p:
                check(list(p.imap(burn, items, chunksize=chunksize)))

        return run

    def mpire_pool() -> None:
        from mpire import WorkerPool

        with WorkerPool(n_jobs=2) as p:
            check(p.map(burn, items))

    def pypeln_process() -> None:
        import pypeln

        check(sorted(pypeln.process.map(burn, items, workers=2)))

    times = measure(
        {
            "single thread": single_thread,
            CPU_OURS: conveyor_processes,
            "Pool(2).imap, chunksize=1": pool(1),
            "Pool(2).imap, chunksize=16": pool(16),
            "mpire WorkerPool(2).map": mpire_pool,
            "pypeln process.map, 2 workers": pypeln_process,
        },
        rounds,
        keep=("single thread", CPU_OURS, "Pool(2).imap, chunksize=16"),
    )
    record("cpu/conveyor 2 workers", CPU_OURS, "Pool(2).imap, chunksize=16", times, len(items))
    base = median(times["single thread"])
    rows = [
        f"| {name} | {median(t):.2f} s | {spread(t)} | {base / median(t):.2f}x |"
        for name, t in times.items()
    ]
    return "\n".join(
        [
            f"CPU-bound: {len(items)} items of {1000 * base / len(items):.2f} ms of pure-Python "
            "work each, 2 worker processes, start-up included. Speed-up over a single thread "
            "(ideal: 2x; the machine has 2 cores).",
            "",
            "| candidate | median | runs (min/max) | speed-up |",
            "|---|---|---|---|",
            *rows,
        ]
    )


# ---------------------------------------------------------------------- small


def inc(x: int) -> int:
    return x + 1


SMALL_CHUNKSIZES = (1, 4, 16, 64, 256)


def small_items(rounds: int) -> str:
    n = 100_000
    expected = list(range(1, n + 1))

    def conveyor_processes(workers: int) -> Candidate:
        def run() -> None:
            pipeline = cv.Pipeline(range(n)).map(inc, workers=workers, runtime="process")
            assert list(pipeline) == expected

        return run

    def pool(chunksize: int, method: str | None = None) -> Candidate:
        def run() -> None:
            with multiprocessing.get_context(method).Pool() as p:
                assert list(p.imap(inc, range(n), chunksize=chunksize)) == expected

        return run

    default = "conveyor, `map(inc, runtime='process')` (1 worker: no tuning)"
    candidates: dict[str, Candidate] = {
        default: conveyor_processes(1),
        "conveyor, 2 workers": conveyor_processes(2),
    }
    for chunksize in SMALL_CHUNKSIZES:
        candidates[f"Pool().imap, chunksize={chunksize}"] = pool(chunksize)
    candidates["Pool().imap, chunksize=256, forkserver"] = pool(256, "forkserver")
    times = measure(
        candidates, rounds, keep=(default, "conveyor, 2 workers", "Pool().imap, chunksize=256")
    )
    best_pool = min(
        (median(times[f"Pool().imap, chunksize={c}"]), c)
        for c in SMALL_CHUNKSIZES
        if f"Pool().imap, chunksize={c}" in times
    )
    best_name = f"Pool().imap, chunksize={best_pool[1]}"
    record("small/conveyor 1 worker", default, best_name, times, n)
    record("small/conveyor 2 workers", "conveyor, 2 workers", best_name, times, n)
    rows = [
        f"| {name} | {1000 * median(t):.0f} ms | {spread(t)} | {n / median(t) / 1e6:.2f} M/s |"
        for name, t in times.items()
    ]
    ratios = [
        f"{label}: {best_pool[0] / median(times[name]):.2f}x"
        for label, name in (("1 worker, no tuning", default), ("2 workers", "conveyor, 2 workers"))
    ]
    return "\n".join(
        [
            f"Small items: {n // 1000}k ints through `x + 1` in worker processes, start-up "
            f"included. `Pool()` has {os.cpu_count()} processes.",
            "",
            "| candidate | median | runs (min/max) | items/s |",
            "|---|---|---|---|",
            *rows,
            "",
            f"conveyor's throughput against the best Pool().imap "
            f"(chunksize={best_pool[1]}): {'; '.join(ratios)}. Pool starts its workers "
            "with fork (the default on Linux up to Python 3.13), conveyor through a "
            "forkserver, which is safe with threads running but takes longer: about 8 ms of "
            "a run here. The last row is Pool with the same start method.",
        ]
    )


# ---------------------------------------------------------------------- large


def identity(x: Any) -> Any:
    return x


def fresh_copy(x: Any) -> Any:
    return x.copy()


def _queue_child(inq: Any, outq: Any) -> None:
    while (x := inq.get()) is not None:
        outq.put(identity(x))
    outq.put(None)


def _until_none(get: Callable[[], Any]) -> Iterator[Any]:
    # Not iter(get, None): that compares each array with None using ==.
    while (x := get()) is not None:
        yield x


def _queue_sink(inq: Any, done: Any) -> None:
    count = 0
    while inq.get() is not None:
        count += 1
    done.put(count)


OURS = "conveyor, process stage (there and back)"
COPYING = "conveyor, the stage returns a new array (`a.copy()`)"
PICKLED = "multiprocessing.Queue, pickled (there and back)"
MEMCPY = "memcpy (np.copyto, source and destination in main memory)"


def large_payloads(rounds: int) -> str:
    if numpy is None:
        return "Large payloads: skipped (NumPy is not installed)."
    np = numpy

    mib = 1 << 20
    count, distinct = 512, 64
    # 64 distinct arrays (64 MiB, more than the caches) taken in turn.
    arrays = [np.random.default_rng(i).random(mib // 8) for i in range(distinct)]
    firsts = [a[0] for a in arrays]

    def source() -> Iterator[Any]:
        return (arrays[i % distinct] for i in range(count))

    def check(out: Iterator[Any]) -> None:
        n = 0
        for i, a in enumerate(out):
            assert a.nbytes == mib and a[0] == firsts[i % distinct]
            n += 1
        assert n == count

    def conveyor_process(fn: Callable[[Any], Any]) -> Candidate:
        def run() -> None:
            check(iter(cv.Pipeline(source()).map(fn, runtime="process")))

        return run

    def queue_round_trip() -> None:
        inq: Any = multiprocessing.Queue(8)
        outq: Any = multiprocessing.Queue(8)
        child = multiprocessing.Process(target=_queue_child, args=(inq, outq), daemon=True)
        child.start()

        def feed() -> None:
            for a in source():
                inq.put(a)
            inq.put(None)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        check(_until_none(outq.get))
        feeder.join()
        child.join()

    def queue_one_way() -> None:
        inq: Any = multiprocessing.Queue(8)
        done: Any = multiprocessing.Queue()
        child = multiprocessing.Process(target=_queue_sink, args=(inq, done), daemon=True)
        child.start()
        for a in source():
            inq.put(a)
        inq.put(None)
        assert done.get() == count
        child.join()

    # memcpy as usually quoted, source and destination beyond the caches: each array
    # into the next of as many destinations as there are distinct sources.
    targets = [np.ones(mib // 8) for _ in range(distinct)]

    def memcpy() -> None:
        for i, a in enumerate(source()):
            np.copyto(targets[(i + 1) % distinct], a)

    times = measure(
        {
            OURS: conveyor_process(identity),
            COPYING: conveyor_process(fresh_copy),
            PICKLED: queue_round_trip,
            "multiprocessing.Queue, pickled (one way)": queue_one_way,
            MEMCPY: memcpy,
        },
        rounds,
        keep=(OURS, COPYING, PICKLED, MEMCPY),
    )
    rate = {name: count / median(t) for name, t in times.items()}
    record("large/conveyor there and back", OURS, PICKLED, times, count)
    record("large/conveyor returns a.copy()", COPYING, PICKLED, times, count)
    ours = rate[OURS]
    pickled = rate[PICKLED]
    copy = rate[MEMCPY]
    rows = [
        f"| {name} | {1000 * median(times[name]):.0f} ms | {spread(times[name])} | "
        f"{rate[name]:,.0f} MiB/s |"
        for name in times
    ]
    return "\n".join(
        [
            f"Large payloads: {count} NumPy arrays of 1 MiB ({distinct} distinct ones in turn) "
            "through a process stage of 1 worker that returns them, start-up included.",
            "",
            "| candidate | median | runs (min/max) | MiB/s |",
            "|---|---|---|---|",
            *rows,
            "",
            f"conveyor: {ours / pickled:.1f}x the pickled round trip, "
            f"{100 * ours / copy:.0f}% of memcpy bandwidth. Each array is copied once, into "
            "shared memory; the worker builds it there, and since the stage returns it as "
            "it got it, the answer points back there. An array the stage creates is "
            "allocated right in the answer's shared memory (second conveyor row), so it is "
            "not copied again either. Results stay in shared memory until the caller drops "
            "them. memcpy copies each array into the next of as many destination arrays: "
            "both beyond the caches (until 2026-12-04 the reference copied into one array, "
            "which stays in the caches, 1.4-1.7x faster: see bench/payloads.py).",
        ]
    )


# ---------------------------------------------------------------------- report

SCENARIOS: dict[str, Callable[[int], str]] = {
    "cpu": cpu_bound,
    "small": small_items,
    "large": large_payloads,
}


def merge_blocks(blocks: dict[str, str]) -> str:
    """The whole section: fresh blocks for the scenarios run, the others as they were."""
    path = BENCH.parent / "docs" / "benchmarks.md"
    old = path.read_text() if path.exists() else ""
    merged = dict.fromkeys(SCENARIOS, "")
    for name in SCENARIOS:
        begin, end = f"<!-- {SECTION}/{name}:begin -->", f"<!-- {SECTION}/{name}:end -->"
        if name in blocks:
            merged[name] = f"{begin}\n{blocks[name]}\n{end}"
        elif begin in old and end in old:
            merged[name] = begin + old.split(begin, 1)[1].split(end, 1)[0] + end
    parts = [
        "## Runtimes: worker processes",
        "",
        "Reproduce: `python bench/runtimes.py --write` (or `--scenario cpu|small|large`). "
        "Ratios are measured within one run; absolute times move by 10-25% between runs.",
    ]
    return "\n\n".join(parts[:1] + parts[2:] + [b for b in merged.values() if b])


def main() -> None:
    import argparse

    sys.path.insert(0, str(BENCH))
    from pipeline import machine, write_section  # bench/pipeline.py

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scenario", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--json", metavar="PATH", help="write conveyor's figures as JSON")
    parser.add_argument(
        "--reference-only",
        action="store_true",
        help="only conveyor and the peers its ratios are taken against",
    )
    args = parser.parse_args()
    if args.write and args.reference_only:
        parser.error("--reference-only leaves rows out: not for --write")
    global REFERENCE_ONLY
    REFERENCE_ONLY = args.reference_only
    blocks = {}
    for name in args.scenario:
        print(f"{name}:", file=sys.stderr)
        load = os.getloadavg()[0]  # other work on the machine skews the figures
        text = SCENARIOS[name](args.rounds)
        blocks[name] = (
            f"{text}\n\nMachine: {machine()}; load average {load:.1f} at the start; "
            f"{time.strftime('%Y-%m-%d')}."
        )
        print(blocks[name] + "\n")
    if args.write:
        write_section(merge_blocks(blocks), SECTION)
    if args.json:
        from _common import write_json

        write_json(args.json, WORKLOADS)


if __name__ == "__main__":
    main()
