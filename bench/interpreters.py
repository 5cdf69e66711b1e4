"""Interpreter stages against process stages and multiprocessing.Pool, in one run (Python 3.14+).

The CPU workload of bench/runtimes.py (its ``burn``, calibrated to about 2 ms
an item, 2000 items, 2 workers), run by:

* conveyor, ``runtime="interpreter"`` (subinterpreters of this process);
* conveyor, ``runtime="process"`` (forkserver worker processes);
* ``multiprocessing.Pool(2).imap`` with chunk sizes 1 and 16 (the default
  start method: forkserver on Linux from Python 3.14);
* a single thread, the baseline of the speed-ups.

Each run of a candidate gives two figures: its whole time, start-up of its
workers included (speed-up over the single thread), and its steady rate,
the items after the first tenth over the time they took (items/s). A third
scenario times the start-up alone: a run of 2 trivial items on 2 workers
(workers started, items through, workers stopped).

Candidates alternate round by round after a warm-up round (which also
starts the forkserver); figures are medians of --rounds.

Run:  python bench/interpreters.py [--rounds 5] [--write]

--write replaces this script's section of docs/benchmarks.md
(``<!-- interpreters:begin -->`` to ``<!-- interpreters:end -->``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("CONVEYOR_BENCH_SRC") or str(BENCH.parent / "src"))

import cloudpickle  # noqa: E402
import runtimes  # noqa: E402  (bench/runtimes.py: the workload)
from runtimes import burn  # noqa: E402

import conveyor as cv  # noqa: E402

SECTION = "interpreters"
ITEMS = 2000
WORKERS = 2
STEADY_FROM = ITEMS // 10
"""The steady rate counts the items after this many outputs."""

# conveyor sends stage functions with cloudpickle: by value, a worker interpreter
# need not import bench/runtimes.py (nor NumPy, which it tries and which refuses
# subinterpreters). Pool pickles by reference: its workers import it.
cloudpickle.register_pickle_by_value(runtimes)


class Timing:
    """One run of a candidate: when it started, when output STEADY_FROM came, when it ended."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.mark = self.start

    def consume(self, outputs: Iterable[Any], expected: list[Any]) -> tuple[float, float]:
        """Take every output, check them; return (whole seconds, steady items/s)."""
        got = []
        for x in outputs:
            got.append(x)
            if len(got) == STEADY_FROM:
                self.mark = time.perf_counter()
        end = time.perf_counter()
        assert got == expected, "wrong outputs"
        return end - self.start, (len(got) - STEADY_FROM) / (end - self.mark)


Candidate = Callable[[], tuple[float, float]]


def measure(candidates: dict[str, Candidate], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(whole seconds, steady rate) per run of each candidate, after a warm-up round; the
    order rotates from round to round."""
    names = list(candidates)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            figures = candidates[name]()
            if round_:
                results[name].append(figures)
        print(f"  round {round_}/{rounds} done", file=sys.stderr)
    return results


def calibrate(seconds: float) -> int:
    """The n for which burn(n) takes about ``seconds`` of CPU here (CPU time, not wall
    time: others' load on the machine would make the items too short)."""
    n = 20_000
    while True:
        started = time.thread_time()
        burn(n)
        took = time.thread_time() - started
        if took > 0.1:
            return max(1, int(n * seconds / took))
        n *= 2


def load() -> str:
    """The load averages over 1, 5 and 15 minutes (others' work on the machine)."""
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu(rounds: int) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
    items = [calibrate(0.002)] * ITEMS
    expected = [burn(items[0])] * ITEMS

    def single_thread() -> tuple[float, float]:
        return Timing().consume(map(burn, items), expected)

    def conveyor(runtime: Any) -> Candidate:
        def run() -> tuple[float, float]:
            timing = Timing()
            return timing.consume(
                cv.Pipeline(items).map(burn, workers=WORKERS, runtime=runtime), expected
            )

        return run

    def pool(chunksize: int) -> Candidate:
        def run() -> tuple[float, float]:
            timing = Timing()
            with multiprocessing.Pool(WORKERS) as p:
                return timing.consume(p.imap(burn, items, chunksize=chunksize), expected)

        return run

    candidates = {
        "single thread": single_thread,
        "conveyor, runtime='interpreter'": conveyor("interpreter"),
        "conveyor, runtime='process'": conveyor("process"),
        "Pool(2).imap, chunksize=1": pool(1),
        "Pool(2).imap, chunksize=16": pool(16),
    }
    results = measure(candidates, rounds)
    base = statistics.median(whole for whole, _ in results["single thread"])
    rows = []
    for name, runs in results.items():
        whole = [w for w, _ in runs]
        steady = statistics.median(s for _, s in runs)
        rows.append(
            f"| {name} | {statistics.median(whole):.2f} s | {runtimes.spread(whole)} | "
            f"{base / statistics.median(whole):.2f}x | {steady:,.0f} items/s |"
        )
    lines = [
        f"CPU-bound: {ITEMS} items of {1000 * base / ITEMS:.2f} ms of pure-Python work each "
        f"(bench/runtimes.py's `burn`), {WORKERS} workers. Speed-up: the whole run, start-up "
        f"of the workers included, over a single thread (ideal: {WORKERS}x). Steady: items "
        f"after the first {STEADY_FROM} outputs, over the time they took.",
        "",
        "| candidate | median | runs (min/max) | speed-up | steady |",
        "|---|---|---|---|---|",
        *rows,
    ]
    return lines, results


def startup(rounds: int) -> list[str]:
    def conveyor(runtime: Any) -> Candidate:
        def run() -> tuple[float, float]:
            timing = Timing()
            return timing.consume(
                cv.Pipeline([1, 2]).map(abs, workers=WORKERS, runtime=runtime), [1, 2]
            )

        return run

    def pool() -> tuple[float, float]:
        timing = Timing()
        with multiprocessing.Pool(WORKERS) as p:
            return timing.consume(p.imap(abs, [1, 2]), [1, 2])

    results = measure(
        {
            "conveyor, runtime='interpreter'": conveyor("interpreter"),
            "conveyor, runtime='process'": conveyor("process"),
            "Pool(2).imap": pool,
        },
        rounds,
    )
    rows = [
        f"| {name} | {1000 * statistics.median(w for w, _ in runs):.0f} ms | "
        f"{runtimes.spread([w for w, _ in runs])} |"
        for name, runs in results.items()
    ]
    return [
        f"Start-up: a run of 2 trivial items on {WORKERS} workers (started, used, stopped).",
        "",
        "| candidate | median | runs (min/max) |",
        "|---|---|---|",
        *rows,
    ]


def main() -> None:
    if sys.version_info < (3, 14):
        sys.exit("bench/interpreters.py needs Python 3.14+ (concurrent.interpreters)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH))
    from _common import machine, write_section

    started, load_before = time.strftime("%Y-%m-%d %H:%M"), load()
    cpu_lines, _ = cpu(args.rounds)
    startup_lines = startup(args.rounds)
    text = "\n".join(
        [
            "## Interpreter runtime (Python 3.14+)",
            "",
            f"`python bench/interpreters.py --rounds {args.rounds}` on {started}: {machine()}, "
            f"start method {multiprocessing.get_start_method()} for the processes. Medians of "
            f"{args.rounds} rounds, the candidates alternated round by round after a warm-up. "
            f"Load average (1/5/15 min) {load_before} at the start, {load()} at the end: "
            "others' work shares the cores.",
            "",
            *cpu_lines,
            "",
            *startup_lines,
        ]
    )
    print(text)
    if args.write:
        print(f"wrote {write_section(text, SECTION)}", file=sys.stderr)


if __name__ == "__main__":
    main()
