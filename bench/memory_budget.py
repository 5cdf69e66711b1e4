"""A run's byte budget: peak memory of large items through a slow sink, with ``max_bytes=``.

For each runtime (thread, process, async), a fresh interpreter runs
``Pipeline(source).map(passed_on, runtime=R).each(slow_sink).run(max_bytes=B)``:
``--items`` items of ``--size-mib`` MiB each (bytes, filled, so every page
is resident), a sink that takes ``--sink-ms`` per item, so the stages run
ahead of it and the channels fill up to their share of the budget. Measured:
the growth of the parent's peak resident memory over the run (VmHWM, reset
with /proc/self/clear_refs before it, read from /proc/self/status: ru_maxrss
would carry the peak of whatever ran before), and, for the process runtime,
the largest resident memory of a worker process (sampled every 50 ms).

Without a budget the same run would hold up to each channel's capacity
(1,024 items: 4 GiB of 4 MiB items per channel); it is not run, on a shared
machine.

Run:  python bench/memory_budget.py [--items 2000] [--size-mib 4] [--budget-mib 256]
          [--sink-ms 1] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import conveyor_src, machine, write_section

SECTION = "memory-budget"
MIB = 1024 * 1024
RUNTIMES = ("thread", "process", "async")


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def passed_on(item: bytes) -> bytes:
    return item


def child(args: argparse.Namespace) -> None:
    """One run, in this fresh interpreter; prints its figures as JSON."""
    sys.path.insert(0, str(conveyor_src()))
    import psutil

    import conveyor as cv

    size, n, pause = args.size_mib * MIB, args.items, args.sink_ms / 1000

    def source() -> Any:
        for i in range(n):
            yield bytes([i % 251 + 1]) * size

    def slow_sink(item: bytes) -> None:
        time.sleep(pause)

    stage: Any = passed_on
    if args.child == "async":

        async def passed_on_async(item: bytes) -> bytes:
            return item

        stage = passed_on_async
    pipeline = cv.Pipeline(source()).map(stage, runtime=args.child).each(slow_sink)
    worker_peak = 0
    stop = threading.Event()

    def watch_children() -> None:
        nonlocal worker_peak
        me = psutil.Process()
        while not stop.wait(0.05):  # bounded by the run: stops when it ends
            for c in me.children(recursive=True):
                try:
                    worker_peak = max(worker_peak, c.memory_info().rss)
                except psutil.Error:
                    pass

    watcher = threading.Thread(target=watch_children, daemon=True)
    watcher.start()
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kib("VmRSS")
    started = time.perf_counter()
    result = pipeline.run(max_bytes=args.budget_mib * MIB)
    took = time.perf_counter() - started
    stop.set()
    watcher.join()
    growth = (status_kib("VmHWM") - before) / 1024
    assert result.stats[-1].items_in == n, result.stats
    print(json.dumps({"growth_mib": growth, "seconds": took, "worker_mib": worker_peak / MIB}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--size-mib", type=int, default=4)
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--sink-ms", type=float, default=1.0)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--child", choices=RUNTIMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    load = f"{os.getloadavg()[0]:.1f}"
    print(f"Machine: {machine()}; load average {load}", flush=True)
    rows = []
    for runtime in RUNTIMES:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", runtime, *sys.argv[1:]],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )
        figures = json.loads(proc.stdout.splitlines()[-1])
        print(runtime, figures, flush=True)
        rows.append((runtime, figures))
    lines = [
        "## A run's byte budget (bench/memory_budget.py)",
        "",
        f"Machine: {machine()}; load average at the start: {load}.",
        "",
        f"`python bench/memory_budget.py --items {args.items} --size-mib {args.size_mib} "
        f"--budget-mib {args.budget_mib} --sink-ms {args.sink_ms:g}`: {args.items:,} items "
        f"of {args.size_mib} MiB (filled bytes) through `map(passed_on)` on each runtime and "
        f"a sink taking {args.sink_ms:g} ms per item, `run(max_bytes={args.budget_mib} MiB)`: "
        "three channels of a third of the budget each. Peak growth of the parent's resident "
        "memory over the run (VmHWM after clear_refs), one fresh interpreter per runtime; "
        "for the process runtime, the largest resident memory of a worker process too.",
        "",
        "| runtime | peak growth MiB | worker process MiB | seconds |",
        "|---|---:|---:|---:|",
    ]
    for runtime, f in rows:
        worker = f"{f['worker_mib']:.0f}" if runtime == "process" else "-"
        lines.append(f"| {runtime} | {f['growth_mib']:.0f} | {worker} | {f['seconds']:.1f} |")
    page = "\n".join(lines)
    print(page)
    if args.write:
        path = write_section(page, SECTION)
        print(f"wrote the '{SECTION}' section of {path}")


if __name__ == "__main__":
    main()
