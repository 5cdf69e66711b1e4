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

The Redis row runs the same pipeline with ``backend=RedisBackend(url)`` on a
redis-server of its own (loopback, no persistence), served by one worker
process (``Worker(pipeline, url).run_forever()`` in a forked child: the
stages, the sink included, run there); the driver's process only feeds the
source and reads the final stream. Measured: the peak of the run's streams'
``MEMORY USAGE`` summed (sampled every 20 ms by a thread of the driver), the
growth of the driver's peak resident memory, and the worker process's.

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
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import conveyor_src, machine, write_section

SECTION = "memory-budget"
MIB = 1024 * 1024
RUNTIMES = ("thread", "process", "async")
CHILDREN = (*RUNTIMES, "redis")
HERE = os.path.dirname(os.path.abspath(__file__))


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def passed_on(item: bytes) -> bytes:
    return item


def large_items(args: argparse.Namespace) -> Iterator[bytes]:
    """``--items`` items of ``--size-mib`` MiB, filled (every page resident)."""
    size = args.size_mib * MIB
    for i in range(args.items):
        yield bytes([i % 251 + 1]) * size


def slow_sink_of(args: argparse.Namespace) -> Callable[[bytes], None]:
    """A sink that takes ``--sink-ms`` per item."""
    pause = args.sink_ms / 1000

    def slow_sink(item: bytes) -> None:
        time.sleep(pause)

    return slow_sink


def child(args: argparse.Namespace) -> None:
    """One run, in this fresh interpreter; prints its figures as JSON."""
    sys.path.insert(0, str(conveyor_src()))
    if args.child == "redis":
        redis_child(args)
        return
    import psutil

    import conveyor as cv

    n = args.items

    stage: Any = passed_on
    if args.child == "async":

        async def passed_on_async(item: bytes) -> bytes:
            return item

        stage = passed_on_async
    pipeline = (
        cv.Pipeline(large_items(args)).map(stage, runtime=args.child).each(slow_sink_of(args))
    )
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


def redis_child(args: argparse.Namespace) -> None:
    """The Redis row: a driver here, the stages in a forked worker process."""
    # bench/redis.py would shadow redis-py: keep this folder off sys.path.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    import psutil

    import conveyor as cv
    from conveyor.redis import Worker

    n = args.items

    pipeline = cv.Pipeline(large_items(args)).map(passed_on).each(slow_sink_of(args))
    with local_redis() as url:
        worker_pid = os.fork()
        if worker_pid == 0:  # the worker process: serves until SIGTERM
            try:
                Worker(pipeline, url).run_forever()
            finally:
                os._exit(0)
        try:
            figures = drive_on_redis(
                pipeline, url, args.budget_mib * MIB, psutil.Process(worker_pid)
            )
        finally:
            os.kill(worker_pid, signal.SIGTERM)
            os.waitpid(worker_pid, 0)
    assert figures.pop("items") == n, figures
    print(json.dumps(figures))


def drive_on_redis(pipeline: Any, url: str, budget: int, worker: Any) -> dict[str, float]:
    """Run ``pipeline`` through Redis with ``max_bytes=budget``; the figures of the run."""
    import redis

    from conveyor.redis import RedisBackend

    backend = RedisBackend(url, run_id="budget")
    keys = backend.keys(pipeline, "budget")
    streams = [keys.stream(i) for i in range(len(pipeline.stages) + 1)]
    peaks = {"streams": 0, "worker": 0}
    stop = threading.Event()

    def watch() -> None:
        client = redis.Redis.from_url(url)
        while not stop.wait(0.02):  # bounded by the run: stops when it ends
            used = sum(client.memory_usage(k, samples=0) or 0 for k in streams)
            peaks["streams"] = max(peaks["streams"], used)
            peaks["worker"] = max(peaks["worker"], worker.memory_info().rss)
        client.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kib("VmRSS")
    started = time.perf_counter()
    result = pipeline.run(backend=backend, max_bytes=budget)
    took = time.perf_counter() - started
    stop.set()
    watcher.join()
    return {
        "growth_mib": (status_kib("VmHWM") - before) / 1024,
        "seconds": took,
        "worker_mib": peaks["worker"] / MIB,
        "streams_mib": peaks["streams"] / MIB,
        "items": result.stats[-1].items_in,
    }


@contextmanager
def local_redis() -> Iterator[str]:
    """A redis-server of its own on a free loopback port, without persistence: its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as workdir:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(500):  # until it answers (bounded: 10 s)
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--size-mib", type=int, default=4)
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--sink-ms", type=float, default=1.0)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    load = f"{os.getloadavg()[0]:.1f}"
    print(f"Machine: {machine()}; load average {load}", flush=True)
    rows = []
    for runtime in CHILDREN:
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
        "for the process runtime, the largest resident memory of a worker process too. "
        "On Redis (thread stages in one worker process, the driver feeding and reading): "
        "three streams of a third of the budget each; the peak of the streams' `MEMORY "
        "USAGE` summed, the driver's peak growth, the worker process's largest resident "
        "memory.",
        "",
        "| runtime | peak growth MiB | worker process MiB | streams' peak MiB | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for runtime, f in rows:
        worker = f"{f['worker_mib']:.0f}" if runtime in ("process", "redis") else "-"
        streams = f"{f['streams_mib']:.0f}" if "streams_mib" in f else "-"
        lines.append(
            f"| {runtime} | {f['growth_mib']:.0f} | {worker} | {streams} | {f['seconds']:.1f} |"
        )
    page = "\n".join(lines)
    print(page)
    if args.write:
        path = write_section(page, SECTION)
        print(f"wrote the '{SECTION}' section of {path}")


if __name__ == "__main__":
    main()
