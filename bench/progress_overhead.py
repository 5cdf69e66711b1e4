"""What watching a run costs: throughput of run(progress=True) against progress=False.

A cheap 3-stage pipeline (x + 1, 2 workers each) runs with:

* off   run(progress=False): no monitor thread at all;
* live  run(progress=True) with stderr taken for a terminal (TTY_COMPATIBLE=1):
        the rich table is rendered and written (to /dev/null here);
* log   run(progress=True) with stderr not a terminal: a log line every few
        seconds, the monitor still sampling every tick.

Candidates alternate round by round after a warm-up; medians of the rounds.
The cost is 1 - throughput(candidate) / throughput(off); the target is < 2%.

On a shared 2-core machine that ratio moves by several percent from run to
run, more than the cost itself; so the bench also reports the CPU time the
watching takes (the monitor thread, plus the final draw in the caller) as a
share of the run's wall time: what it can take at most from a pipeline whose
threads share one GIL, and a number that noise hardly moves.

Run:  python bench/progress_overhead.py [--rounds 5] [--items 2000000] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from _common import conveyor_src

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(conveyor_src()))  # $CONVEYOR_BENCH_SRC, else ROOT/src

from pipeline import machine, write_section  # noqa: E402  (bench/pipeline.py)

import conveyor as cv  # noqa: E402
from conveyor.progress import Monitor  # noqa: E402

TAG = "progress"


def inc(x: int) -> int:
    return x + 1


def cheap_pipeline(items: int) -> cv.Pipeline[int]:
    return (
        cv.Pipeline(range(items))
        .map(inc, workers=2, name="a")
        .map(inc, workers=2, name="b")
        .map(inc, workers=2, name="c")
    )


@contextlib.contextmanager
def stderr_as(terminal: bool) -> Iterator[None]:
    """Send stderr to /dev/null, presented to rich as a terminal or not."""
    old = os.environ.get("TTY_COMPATIBLE")
    os.environ["TTY_COMPATIBLE"] = "1" if terminal else "0"
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            yield
    finally:
        if old is None:
            del os.environ["TTY_COMPATIBLE"]
        else:
            os.environ["TTY_COMPATIBLE"] = old


class MonitorCpu:
    """Counts the CPU time spent watching: the monitor's thread, and its close()."""

    def __init__(self) -> None:
        self.seconds = 0.0
        loop, close = Monitor._loop, Monitor.close

        def counted_loop(monitor: Monitor) -> None:
            loop(monitor)
            self.seconds += time.thread_time()  # the monitor thread's whole life

        def counted_close(monitor: Monitor) -> None:
            before = time.thread_time()
            close(monitor)
            self.seconds += time.thread_time() - before

        Monitor._loop = counted_loop  # type: ignore[method-assign]
        Monitor.close = counted_close  # type: ignore[method-assign]


CPU = MonitorCpu()
SHARES: dict[str, list[float]] = {"live": [], "log": []}


def candidates(items: int) -> dict[str, Callable[[], float]]:
    """Each candidate runs the pipeline once and returns items per second."""

    def timed(progress: bool, terminal: bool) -> float:
        pipeline = cheap_pipeline(items)
        with stderr_as(terminal):
            CPU.seconds = 0.0
            start = time.perf_counter()
            pipeline.run(progress=progress)
            wall = time.perf_counter() - start
        if progress:
            SHARES["live" if terminal else "log"].append(CPU.seconds / wall)
        return items / wall

    return {
        "off": lambda: timed(False, False),
        "live": lambda: timed(True, True),
        "log": lambda: timed(True, False),
    }


def measure(rounds: int, items: int) -> dict[str, float]:
    runs = candidates(items)
    for run in runs.values():  # warm-up
        run()
    for shares in SHARES.values():
        shares.clear()
    seen: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            seen[name].append(runs[name]())
    return {name: statistics.median(values) for name, values in seen.items()}


def render(rounds: int, items: int, medians: dict[str, float]) -> str:
    base = medians["off"]
    shares = {name: statistics.median(values) for name, values in SHARES.items()}
    lines = [
        "## Progress display overhead",
        "",
        f"Machine: {machine()}. {items:,} items through 3 map stages (x + 1, 2 workers",
        f"each); medians of {rounds} rounds after a warm-up, candidates alternated.",
        "Cost = 1 - throughput / throughput without progress; target < 2%. CPU share =",
        "CPU time spent watching (monitor thread and final draw) / wall time of the run.",
        "Reproduce: `python bench/progress_overhead.py --write`.",
        "",
        "| candidate | items/s | cost | CPU share |",
        "|---|---:|---:|---:|",
    ]
    labels = {
        "off": "run(progress=False)",
        "live": "run(progress=True), terminal (rich live table)",
        "log": "run(progress=True), not a terminal (log lines)",
    }
    for name, value in medians.items():
        cost = "—" if name == "off" else f"{1 - value / base:+.1%}"
        share = f"{shares[name]:.2%}" if name in shares else "—"
        lines.append(f"| {labels[name]} | {value:,.0f} | {cost} | {share} |")
    lines.append("")
    lines.append(
        "Throughput ratios on this shared machine move by several percent from one run to the"
    )
    lines.append(
        "next (a negative cost is such noise); the CPU share is the steadier measure of the cost."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    text = render(args.rounds, args.items, measure(args.rounds, args.items))
    print(text)
    if args.write:
        write_section(text, TAG)


if __name__ == "__main__":
    main()
