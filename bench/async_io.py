"""Async I/O: conveyor's async runtime against the ways people bound concurrency in asyncio.

5000 items, each awaiting ``asyncio.sleep(0.01)``, 200 at a time, through one
async map stage. Efficiency = ideal time / measured time, where ideal =
5000 / 200 x the measured length of one ``asyncio.sleep(0.01)`` on the loop
the candidate runs on (measured alone, each round). Every candidate runs in
this process, warmed up, then alternated round by round (reversed every other
round); medians are reported. Candidates:

* conveyor ``run()``: the stage on conveyor's own loop, in a thread of its own,
  ordered (the default) and unordered;
* conveyor ``await arun()``: the stage on the caller's loop (asyncio's default);
* ``asyncio.gather`` over every item under an ``asyncio.Semaphore(200)``;
* aiostream's ``stream.map(..., task_limit=200)``;
* for reference: 200 hand-written worker coroutines sharing one iterator (the
  least work asyncio can do here) on either loop, and gather + Semaphore on
  conveyor's loop (what the loop alone changes).

Run:  python bench/async_io.py [--rounds 5] [--items 5000] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import conveyor_src, machine, write_section  # bench/_common.py

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(conveyor_src()))  # $CONVEYOR_BENCH_SRC, else ROOT/src

import conveyor as cv  # noqa: E402
from conveyor.runtime.aio import new_event_loop  # noqa: E402

CONCURRENCY = 200
PAUSE = 0.01
DEFAULT_LOOP = "asyncio default"
CONVEYOR_LOOP = "conveyor's own"


async def io_call(x: int) -> int:
    await asyncio.sleep(PAUSE)
    return x


# ---------------------------------------------------------------------- candidates
# Each takes the items and returns the outputs; the async ones run inside a loop.


def conveyor_run(ordered: bool) -> Callable[[int], list[Any]]:
    def run(n: int) -> list[Any]:
        pipeline = cv.Pipeline(range(n)).map(
            io_call, workers=CONCURRENCY, runtime="async", ordered=ordered
        )
        outputs = pipeline.run(collect=True).outputs
        assert outputs is not None
        return outputs

    return run


async def conveyor_arun(n: int) -> list[Any]:
    pipeline = cv.Pipeline(range(n)).map(io_call, workers=CONCURRENCY, runtime="async")
    outputs = (await pipeline.arun(collect=True)).outputs
    assert outputs is not None
    return outputs


async def gather_semaphore(n: int) -> list[Any]:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(x: int) -> int:
        async with limit:
            return await io_call(x)

    return list(await asyncio.gather(*(one(x) for x in range(n))))


async def aiostream_map(n: int) -> list[Any]:
    from aiostream import stream

    mapped = stream.map(stream.iterate(range(n)), io_call, task_limit=CONCURRENCY)
    async with mapped.stream() as outputs:
        return [x async for x in outputs]


async def worker_coroutines(n: int) -> list[Any]:
    items = iter(range(n))
    out: list[int] = []

    async def worker() -> None:
        for x in items:
            out.append(await io_call(x))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return out


Candidate = tuple[str, str, Callable[[int], Any]]
"""(name, the loop it runs on, how to run it)."""

CANDIDATES: list[Candidate] = [
    ("conveyor run(), ordered", CONVEYOR_LOOP, conveyor_run(True)),
    ("conveyor run(), unordered", CONVEYOR_LOOP, conveyor_run(False)),
    ("conveyor await arun(), ordered", DEFAULT_LOOP, conveyor_arun),
    ("asyncio.gather + Semaphore", DEFAULT_LOOP, gather_semaphore),
    ("aiostream stream.map(task_limit)", DEFAULT_LOOP, aiostream_map),
    ("reference: 200 worker coroutines", DEFAULT_LOOP, worker_coroutines),
    ("reference: 200 worker coroutines", CONVEYOR_LOOP, worker_coroutines),
    ("reference: gather + Semaphore", CONVEYOR_LOOP, gather_semaphore),
]
REFERENCE = "asyncio.gather + Semaphore"


# ---------------------------------------------------------------------- measuring


def on_loop(loop_name: str, coroutine: Awaitable[Any]) -> Any:
    """Run ``coroutine`` to completion on a fresh loop of the named kind."""
    loop = new_event_loop() if loop_name == CONVEYOR_LOOP else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


async def lone_sleep(samples: int = 30) -> float:
    """Median length of one ``asyncio.sleep(PAUSE)`` with nothing else on the loop."""
    lengths = []
    for _ in range(samples):
        t = time.perf_counter()
        await asyncio.sleep(PAUSE)
        lengths.append(time.perf_counter() - t)
    return statistics.median(lengths)


def once(candidate: Candidate, n: int) -> tuple[float, float]:
    """Run a candidate once; return (seconds, efficiency)."""
    name, loop_name, run = candidate
    sleep = on_loop(loop_name, lone_sleep())
    t = time.perf_counter()
    # conveyor's run() owns its loop; the others run on a fresh loop of their kind.
    outputs = on_loop(loop_name, run(n)) if inspect.iscoroutinefunction(run) else run(n)
    seconds = time.perf_counter() - t
    if sorted(outputs) != list(range(n)):
        raise AssertionError(f"{name} lost or invented items")
    ideal = n / CONCURRENCY * sleep
    return seconds, ideal / seconds


def measure(rounds: int, n: int) -> list[tuple[str, str, float, float, float]]:
    """Rows of (name, loop, median seconds, median efficiency, efficiency vs the reference)."""
    for candidate in CANDIDATES:
        once(candidate, n)  # warm-up
    seconds: dict[tuple[str, str], list[float]] = {c[:2]: [] for c in CANDIDATES}
    efficiency: dict[tuple[str, str], list[float]] = {c[:2]: [] for c in CANDIDATES}
    for r in range(rounds):
        order = CANDIDATES if r % 2 == 0 else CANDIDATES[::-1]
        for candidate in order:
            s, e = once(candidate, n)
            seconds[candidate[:2]].append(s)
            efficiency[candidate[:2]].append(e)
    med_e = {k: statistics.median(v) for k, v in efficiency.items()}
    ref = med_e[REFERENCE, DEFAULT_LOOP]
    return [
        (*key, statistics.median(seconds[key]), med_e[key], med_e[key] / ref)
        for key in (c[:2] for c in CANDIDATES)
    ]


def render(
    rounds: int, n: int, load: float, rows: list[tuple[str, str, float, float, float]]
) -> str:
    lines = [
        "## Async I/O (bench/async_io.py)",
        "",
        f"Machine: {machine()}; load average at the start: {load:.1f}.",
        "",
        f"{n} items awaiting `asyncio.sleep({PAUSE})`, "
        f"{CONCURRENCY} at a time, through one async map stage.",
        f"Medians of {rounds} rounds after a warm-up, candidates alternated round by round.",
        "Efficiency = ideal / measured, ideal = items / concurrency x the length of one",
        "`asyncio.sleep(0.01)` measured alone on the same kind of loop in the same round.",
        "Reproduce: `python bench/async_io.py --write`.",
        "",
        "| candidate | event loop | seconds | efficiency | vs gather + Semaphore |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {k} | {loop} | {s:.3f} | {e:.3f} | {r:.2f}x |" for k, loop, s, e, r in rows]
    lines += [
        "",
        "conveyor's own loop (used by `run()`, iteration and `start()`) waits with",
        "microsecond precision; asyncio's default epoll loop rounds every wait up to a",
        "whole millisecond, which costs its timers up to 1 ms per wake-up when many",
        "coroutines sleep (the two reference rows show the effect on plain asyncio).",
        "With `arun()` the stage runs on the caller's loop; while it does, conveyor makes",
        "asyncio's default loop wait to the microsecond as well.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    text = render(args.rounds, args.items, load, measure(args.rounds, args.items))
    print(text)
    if args.write:
        write_section(text, "async")


if __name__ == "__main__":
    main()
