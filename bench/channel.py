"""Thread channels: conveyor.Channel against queue.Queue and its peers, in one run.

Each candidate moves 200k ints from P producer threads to C consumer threads
through one bounded channel, for P x C in {1 x 1, 4 x 4} and capacities 1024
and 16:

* conveyor.Channel, put()/get(), closed by producer handles (no sentinel);
* conveyor.Channel, put_many()/get_many() in lists of 64, with the C
  accelerator (when built) and on its pure-Python fallback;
* queue.Queue, one item per put, one sentinel per consumer;
* queue.Queue carrying lists of 64 (maxsize = capacity // 64 lists, at least
  1, so it holds about as many items as the others);
* queue.SimpleQueue (C, unbounded: a reference, not a peer);
* janus and culsans, sync side;
* a hand-written deque + two Conditions, the textbook bounded queue.

The payloads (ints, and the lists of 64 for the batched candidates) are built
before the timed region; the timed region runs from the moment every thread
is released by a barrier until the last consumer has finished, with the
garbage collector paused. Candidates are alternated round by round (their
order rotates), a warm-up round is discarded, and the medians of ``--rounds``
rounds are reported. The ratio to queue.Queue (single items) is taken round by
round, each candidate against queue.Queue in the same round (seconds apart),
and its median reported: on a shared machine the load drifts between rounds,
and a ratio of two medians taken in different moments carries that drift.
Compare ratios, not absolute figures across runs.

Run:  python bench/channel.py [--rounds 7] [--items 200000] [--write]
          [--shapes 1x1 4x4] [--capacities 1024 16] [--reference-only] [--json PATH]

--reference-only runs only conveyor's candidates and queue.Queue; --json
writes, per scenario, conveyor's rates and their ratio to queue.Queue of the
same round (for bench/ab.py), and the one-thread CPU costs.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import conveyor_src, machine, workload, write_json, write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(conveyor_src()))  # $CONVEYOR_BENCH_SRC, else ROOT/src

import conveyor as cv  # noqa: E402
import conveyor.channel as channel_module  # noqa: E402

BATCH = 64
STOP = object()  # the sentinel of the candidates that need one
SECTION = "channel"
BASELINE = "queue.Queue"


# ---------------------------------------------------------------------- machine


def load() -> str:
    """The 1-minute load average: other work on the machine skews every candidate."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------- a hand-written queue


class CondQueue:
    """The textbook bounded queue: a deque, one lock, two conditions."""

    def __init__(self, maxsize: int) -> None:
        self.items: deque[Any] = deque()
        self.maxsize = maxsize
        lock = threading.Lock()
        self.not_empty = threading.Condition(lock)
        self.not_full = threading.Condition(lock)

    def put(self, item: Any) -> None:
        with self.not_full:
            while len(self.items) >= self.maxsize:
                self.not_full.wait()
            self.items.append(item)
            self.not_empty.notify()

    def get(self) -> Any:
        with self.not_empty:
            while not self.items:
                self.not_empty.wait()
            item = self.items.popleft()
            self.not_full.notify()
            return item


# ---------------------------------------------------------------------- candidates


@dataclass
class Plumbing:
    """One run's channel: what producers, consumers and the main thread call."""

    produce: Callable[[int, list[Any]], None]  # (producer index, its payload)
    consume: Callable[[], int]  # returns how many items it took
    after_producers: Callable[[], None]  # e.g. send the sentinels


@dataclass(frozen=True)
class Candidate:
    name: str
    batched: bool  # producers get lists of BATCH ints instead of ints
    setup: Callable[[int, int, int], Plumbing]  # (capacity, producers, consumers)
    pure_python: bool = False  # run conveyor without its C accelerator


@contextmanager
def pure_python(on: bool) -> Iterator[None]:
    """Run conveyor.Channel on its pure-Python fallback while inside (if ``on``)."""
    saved = channel_module._take
    if on:
        channel_module._take = channel_module._take_python
    try:
        yield
    finally:
        channel_module._take = saved


def _nothing() -> None:
    pass


def conveyor_single(capacity: int, n_producers: int, n_consumers: int) -> Plumbing:
    ch: cv.Channel[int] = cv.Channel(capacity)
    handles = [ch.producer() for _ in range(n_producers)]

    def produce(i: int, payload: list[Any]) -> None:
        with handles[i] as handle:
            put = handle.put
            for x in payload:
                put(x)

    def consume() -> int:
        get, n = ch.get, 0
        try:
            while True:
                get()
                n += 1
        except cv.ShutDown:
            return n

    return Plumbing(produce, consume, _nothing)


def conveyor_batched(capacity: int, n_producers: int, n_consumers: int) -> Plumbing:
    ch: cv.Channel[int] = cv.Channel(capacity)
    handles = [ch.producer() for _ in range(n_producers)]

    def produce(i: int, payload: list[Any]) -> None:
        with handles[i] as handle:
            put_many = handle.put_many
            for batch in payload:
                put_many(batch)

    def consume() -> int:
        get_many, n = ch.get_many, 0
        try:
            while True:
                n += len(get_many(BATCH))
        except cv.ShutDown:
            return n

    return Plumbing(produce, consume, _nothing)


def with_sentinels(make: Callable[[int], Any], *, lists: bool = False) -> Callable[..., Plumbing]:
    """A candidate with put()/get() methods, ended by one sentinel per consumer."""

    def setup(capacity: int, n_producers: int, n_consumers: int) -> Plumbing:
        q = make(capacity)

        def produce(i: int, payload: list[Any]) -> None:
            put = q.put
            for x in payload:
                put(x)

        def consume() -> int:
            get, n = q.get, 0
            while True:
                x = get()
                if x is STOP:
                    return n
                n += len(x) if lists else 1

        def after_producers() -> None:
            for _ in range(n_consumers):
                q.put(STOP)

        return Plumbing(produce, consume, after_producers)

    return setup


def _janus(capacity: int) -> Any:
    import janus

    return janus.Queue(capacity).sync_q


def _culsans(capacity: int) -> Any:
    import culsans

    return culsans.Queue(capacity).sync_q


CANDIDATES = [
    Candidate("conveyor.Channel", False, conveyor_single),
    Candidate(
        f"conveyor.Channel put_many/get_many x{BATCH}"
        + (", C accelerator" if channel_module.ACCELERATED else " (accelerator not built)"),
        True,
        conveyor_batched,
    ),
    Candidate(
        f"conveyor.Channel put_many/get_many x{BATCH}, pure Python",
        True,
        conveyor_batched,
        pure_python=True,
    ),
    Candidate(BASELINE, False, with_sentinels(queue.Queue)),
    Candidate(
        f"queue.Queue of lists of {BATCH}",
        True,
        with_sentinels(lambda c: queue.Queue(max(1, c // BATCH)), lists=True),
    ),
    Candidate(
        "queue.SimpleQueue (unbounded)", False, with_sentinels(lambda c: queue.SimpleQueue())
    ),
    Candidate("janus (sync side)", False, with_sentinels(_janus)),
    Candidate("culsans (sync side)", False, with_sentinels(_culsans)),
    Candidate("deque + Condition", False, with_sentinels(CondQueue)),
]


# ---------------------------------------------------------------------- measuring


def payloads(n_items: int, n_producers: int) -> tuple[list[list[Any]], list[list[Any]]]:
    """Each producer's ints, and the same ints as lists of BATCH (built once)."""
    share = [list(range(p, n_items, n_producers)) for p in range(n_producers)]
    batches = [[ints[i : i + BATCH] for i in range(0, len(ints), BATCH)] for ints in share]
    return share, batches


def run_once(
    candidate: Candidate,
    capacity: int,
    n_producers: int,
    n_consumers: int,
    work: list[list[Any]],
    n_items: int,
) -> float:
    """One timed run; returns items per second."""
    with pure_python(candidate.pure_python):
        plumbing = candidate.setup(capacity, n_producers, n_consumers)
        counts = [0] * n_consumers
        barrier = threading.Barrier(n_producers + n_consumers + 1)

        def producer(i: int) -> None:
            barrier.wait()
            plumbing.produce(i, work[i])

        def consumer(j: int) -> None:
            barrier.wait()
            counts[j] = plumbing.consume()

        producers = [threading.Thread(target=producer, args=(i,)) for i in range(n_producers)]
        consumers = [threading.Thread(target=consumer, args=(j,)) for j in range(n_consumers)]
        for t in consumers + producers:
            t.start()
        gc.collect()
        gc.disable()
        try:
            barrier.wait()
            start = time.perf_counter()
            for t in producers:
                t.join()
            plumbing.after_producers()
            for t in consumers:
                t.join()
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        if sum(counts) != n_items:
            raise AssertionError(f"{candidate.name}: {sum(counts)} items out of {n_items}")
        return n_items / elapsed


@dataclass
class Result:
    scenario: str
    name: str
    rates: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def ratios(self, base: Result) -> list[float]:
        """This candidate's rate over the baseline's, round by round."""
        return [mine / theirs for mine, theirs in zip(self.rates, base.rates, strict=True)]


def measure(
    n_items: int,
    rounds: int,
    shapes: list[tuple[int, int]],
    capacities: list[int],
    candidates: list[Candidate] = CANDIDATES,
) -> list[Result]:
    results: list[Result] = []
    for n_producers, n_consumers in shapes:
        share, batches = payloads(n_items, n_producers)
        for capacity in capacities:
            scenario = (
                f"{n_producers} producer{'s' * (n_producers > 1)} -> "
                f"{n_consumers} consumer{'s' * (n_consumers > 1)}, capacity {capacity}"
            )
            rates: dict[str, list[float]] = {c.name: [] for c in candidates}
            for r in range(rounds + 1):  # round 0 is the warm-up
                k = r % len(candidates)
                for candidate in candidates[k:] + candidates[:k]:
                    work = batches if candidate.batched else share
                    rate = run_once(candidate, capacity, n_producers, n_consumers, work, n_items)
                    if r:
                        rates[candidate.name].append(rate)
            scenario_results = [Result(scenario, c.name, rates[c.name]) for c in candidates]
            print(render_scenario(scenario_results), flush=True)
            results += scenario_results
    return results


# ---------------------------------------------------------------------- one thread: CPU per item

CYCLE = 1024  # items per cycle: one channel-full, put then taken
COST_REPEATS = 9


def cpu_costs(repeats: int) -> list[tuple[str, float]]:
    """CPU cost per item of moving a channel-full through, in one thread (ns).

    No thread hand-off is involved, so these figures are steady where the
    threaded ones are not: they show what each design costs by itself.
    """
    batches = [list(range(i, i + BATCH)) for i in range(0, CYCLE, BATCH)]
    ints = list(range(CYCLE))

    def conveyor_batches() -> None:
        ch: cv.Channel[int] = cv.Channel(CYCLE)
        for batch in batches:
            ch.put_many(batch)
        for _ in batches:
            ch.get_many(BATCH)

    def conveyor_single() -> None:
        ch: cv.Channel[int] = cv.Channel(CYCLE)
        for x in ints:
            ch.put(x)
        for _ in ints:
            ch.get()

    def queue_single() -> None:
        q: queue.Queue[int] = queue.Queue(CYCLE)
        for x in ints:
            q.put(x)
        for _ in ints:
            q.get()

    def queue_lists() -> None:
        q: queue.Queue[list[int]] = queue.Queue(CYCLE // BATCH)
        for batch in batches:
            q.put(batch)
        for _ in batches:
            q.get()

    candidates: list[tuple[str, Callable[[], None], bool]] = [
        ("conveyor.Channel put()/get()", conveyor_single, False),
        (f"conveyor.Channel put_many/get_many x{BATCH}, C accelerator", conveyor_batches, False),
        (f"conveyor.Channel put_many/get_many x{BATCH}, pure Python", conveyor_batches, True),
        ("queue.Queue put()/get()", queue_single, False),
        (f"queue.Queue of lists of {BATCH}", queue_lists, False),
    ]
    if not channel_module.ACCELERATED:
        candidates.pop(1)
    costs = []
    for name, fn, pure in candidates:
        with pure_python(pure):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(20):
                    fn()
                times.append((time.perf_counter() - start) / (20 * CYCLE))
        costs.append((name, statistics.median(times) * 1e9))
    return costs


def render_costs(costs: list[tuple[str, float]], repeats: int) -> str:
    lines = [
        f"### CPU per item, one thread (a channel-full of {CYCLE} put, then taken)",
        "",
        f"Median of {repeats} repeats of 20 cycles each; no thread hand-off, so these "
        "are steady where the threaded figures above are not.",
        "",
        "| candidate | ns per item |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ns:.0f} |" for name, ns in costs]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- reporting


def render_scenario(results: list[Result]) -> str:
    base = next(r for r in results if r.name == BASELINE)
    lines = [
        f"### {results[0].scenario}",
        "",
        "| candidate | M items/s (median) | min - max | vs queue.Queue (median) | its range |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        ratios = r.ratios(base)
        lines.append(
            f"| {r.name} | {r.median / 1e6:.2f} | {min(r.rates) / 1e6:.2f} - "
            f"{max(r.rates) / 1e6:.2f} | {statistics.median(ratios):.2f}x | "
            f"{min(ratios):.2f} - {max(ratios):.2f} |"
        )
    return "\n".join(lines) + "\n"


def render(
    results: list[Result],
    costs: list[tuple[str, float]],
    n_items: int,
    rounds: int,
    took: float,
    load_at_start: str,
) -> str:
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    parts = [
        "## Channel",
        "",
        f"`python bench/channel.py --rounds {rounds}`: {n_items:,} ints from producer threads "
        "to consumer threads through one bounded channel. Medians of "
        f"{rounds} rounds after a warm-up, candidates alternated round by round. "
        "Ratios against `queue.Queue` (one item per put) are taken round by round, against "
        "`queue.Queue` in the same round, and their median and range reported. "
        "Payloads (and the lists of 64) are built outside the timed region; the GC is "
        f"paused while timing. Whole run: {took:.0f} s.",
        "",
        f"Machine: {machine()}; load average at the start: {load_at_start}.",
        "",
        "`queue.Queue` of lists holds `capacity // 64` lists, about as many items as the "
        "others (but at least one list: 64 items at capacity 16); "
        "`queue.SimpleQueue` is unbounded (a reference, not a peer). "
        "Every candidate but conveyor ends with one sentinel per consumer; "
        "conveyor's channel is closed by its producer handles. "
        "conveyor's C accelerator (`conveyor._speedups`, optional) only changes "
        "`get_many()` from a channel holding more than the batch asked for: single-item "
        "`put()`/`get()` and `put_many()` are the same Python code with or without it, "
        "so the batched rows are measured both ways.",
        "",
    ]
    for scenario in scenarios:
        parts.append(render_scenario([r for r in results if r.scenario == scenario]))
    parts.append(render_costs(costs, COST_REPEATS))
    return "\n".join(parts)


def json_workloads(
    results: list[Result], costs: list[tuple[str, float]]
) -> dict[str, dict[str, Any]]:
    """Per scenario, each conveyor candidate against queue.Queue; and the one-thread costs."""
    out: dict[str, dict[str, Any]] = {}
    for scenario in dict.fromkeys(r.scenario for r in results):
        rows = [r for r in results if r.scenario == scenario]
        base = next(r for r in rows if r.name == BASELINE)
        for r in rows:
            if r.name.startswith("conveyor"):
                out[f"{scenario}/{r.name}"] = workload(
                    r.median, "items/s", BASELINE, base.median, r.rates, base.rates
                )
                out[f"{scenario}/{r.name}"]["ratio"] = statistics.median(r.ratios(base))
    reference = dict(costs)["queue.Queue put()/get()"]
    for name, ns in costs:
        if name.startswith("conveyor"):
            out[f"one thread/{name}"] = workload(
                1e9 / ns, "items/s", "queue.Queue", 1e9 / reference
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (default 7)")
    parser.add_argument("--items", type=int, default=200_000, help="ints per run")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument(
        "--shapes", nargs="+", default=["1x1", "4x4"], help="PRODUCERSxCONSUMERS (1x1 4x4)"
    )
    parser.add_argument("--capacities", type=int, nargs="+", default=[1024, 16])
    parser.add_argument(
        "--reference-only", action="store_true", help="conveyor and queue.Queue only"
    )
    parser.add_argument("--json", help="write conveyor's ratios to queue.Queue here")
    args = parser.parse_args()
    shapes = [(int(p), int(c)) for p, c in (shape.split("x") for shape in args.shapes)]
    candidates = [
        c
        for c in CANDIDATES
        if not args.reference_only or c.name.startswith("conveyor") or c.name == BASELINE
    ]
    load_at_start = load()
    print(f"Machine: {machine()}; load average {load_at_start}\n", flush=True)
    started = time.monotonic()
    results = measure(args.items, args.rounds, shapes, args.capacities, candidates)
    costs = cpu_costs(COST_REPEATS)
    print(render_costs(costs, COST_REPEATS))
    took = time.monotonic() - started
    print(f"whole run: {took:.0f} s")
    if args.json:
        write_json(args.json, json_workloads(results, costs))
    if args.write:
        page = render(results, costs, args.items, args.rounds, took, load_at_start)
        path = write_section(page, SECTION)
        print(f"wrote the '{SECTION}' section of {path}")


if __name__ == "__main__":
    main()
