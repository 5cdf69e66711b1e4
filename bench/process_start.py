"""A short run of a process stage, again and again: what its start costs, per start method.

A program that runs a small pipeline of worker processes every now and then
(a service answering requests, a loop over files, a notebook) pays each
run's start: starting the worker processes, then stopping them. Measured
here: 8 items through ``map(square, runtime="process")`` (one worker), run
after run with a pause of ``--pause`` seconds between runs (the program doing
something else), on each start method given (``--methods``):

* conveyor, as it is: from a program's second run on, the end of a run
  starts a *standby* worker in the background for the next run to take;
* conveyor without standbys (``processes.STANDBY_PROCESSES = 0``): every run
  starts its worker;
* ``multiprocessing`` ``Pool(1)`` of the same start method, made for the run
  and closed after it (``with ... as pool: pool.map(...)``, the reference):
  what a program does that does not keep a pool between runs.

Each candidate makes ``--runs`` runs in a row (the first, a warm-up, not
counted), in a fresh interpreter of its own (standbys, forkserver and imports
belong to a process) that runs this script as its main module, where the
stage's function is, as in a script; the median run time of each is reported, then medians
over ``--rounds`` rounds with the candidates alternated, and each one's ratio
to the reference of the same round (lower is better).

Run:  python bench/process_start.py [--rounds 3] [--runs 12] [--pause 0.2]
      [--methods forkserver spawn] [--write] [--json PATH]

``--json`` writes, per start method and conveyor candidate, runs per second against
``Pool(1)``'s (``bench/ab.py`` compares two revisions with it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import conveyor_src, machine, settle, workload, write_json, write_section

sys.path.insert(0, str(conveyor_src()))  # $CONVEYOR_BENCH_SRC, else ROOT/src

SECTION = "process-start"
CANDIDATES = ("conveyor", "conveyor, no standbys", "multiprocessing Pool(1)")
REFERENCE = "multiprocessing Pool(1)"
ITEMS = 8


def square(x: int) -> int:
    return x * x


def one_run(candidate: str, method: str) -> float:
    """Seconds of one run of ``candidate`` (in the candidate's own interpreter)."""
    import multiprocessing

    import conveyor as cv

    start = time.perf_counter()
    if candidate == REFERENCE:
        with multiprocessing.get_context(method).Pool(1) as pool:
            out = pool.map(square, range(ITEMS))
    else:
        out = list(cv.Pipeline(range(ITEMS)).map(square, runtime="process"))
    seconds = time.perf_counter() - start
    assert out == [x * x for x in range(ITEMS)]
    return seconds


def runs(candidate: str, method: str, count: int, pause: float) -> list[float]:
    """``count`` runs in a row, a pause between them; the first (a warm-up) left out."""
    from conveyor.runtime import processes

    processes.START_METHOD = method
    if candidate == "conveyor, no standbys":
        processes.STANDBY_PROCESSES = 0
    times = []
    for _ in range(count):
        times.append(one_run(candidate, method))
        settle()
        time.sleep(pause)  # the program at other work: a standby boots meanwhile
    return times[1:]


def measure_in_a_fresh_interpreter(candidate: str, method: str, count: int, pause: float) -> float:
    """The median run time of ``candidate``, measured by a fresh interpreter running this
    script (``--child``): the stage's function is the main module's, as in a script."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", candidate, method, str(count), str(pause)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return statistics.median(json.loads(done.stdout.splitlines()[-1]))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # one candidate's runs, in this fresh interpreter
        candidate, method, count, pause = sys.argv[2:6]
        print(json.dumps(runs(candidate, method, int(count), float(pause))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=12, help="runs per candidate and round")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between runs")
    parser.add_argument("--methods", nargs="+", default=["forkserver", "spawn"])
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--json", metavar="PATH", help="write conveyor's figures as JSON")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    rows = []
    figures: dict[str, dict[str, object]] = {}
    for method in args.methods:
        times: dict[str, list[float]] = {c: [] for c in CANDIDATES}
        for round_ in range(args.rounds):
            shift = round_ % len(CANDIDATES)
            for candidate in CANDIDATES[shift:] + CANDIDATES[:shift]:
                times[candidate].append(
                    measure_in_a_fresh_interpreter(candidate, method, args.runs, args.pause)
                )
            print(f"  {method}: round {round_ + 1}/{args.rounds} done", file=sys.stderr)
        figures.update(json_figures(method, times))
        for candidate in CANDIDATES:
            ratios = [a / b for a, b in zip(times[candidate], times[REFERENCE], strict=True)]
            rows.append(
                f"| {method} | {candidate} | {statistics.median(times[candidate]) * 1e3:.1f} | "
                f"{min(times[candidate]) * 1e3:.1f} - {max(times[candidate]) * 1e3:.1f} | "
                f"{statistics.median(ratios):.3f}x |"
            )
    text = page(args, rows, load, started)
    print(text)
    if args.write:
        print(f"wrote the {SECTION!r} section of {write_section(text, SECTION)}", file=sys.stderr)
    if args.json:
        write_json(args.json, figures)


def json_figures(method: str, times: dict[str, list[float]]) -> dict[str, dict[str, object]]:
    """``--json``'s workloads of one start method: each conveyor candidate's runs per
    second (from its median run per round) against `REFERENCE`'s."""
    rates = {candidate: [1 / t for t in seconds] for candidate, seconds in times.items()}
    peer = rates[REFERENCE]
    return {
        f"{method}/{candidate}": workload(
            statistics.median(rates[candidate]),
            "runs/s",
            f"{REFERENCE} ({method})",
            statistics.median(peer),
            rates[candidate],
            peer,
        )
        for candidate in CANDIDATES
        if candidate != REFERENCE
    }


def page(args: argparse.Namespace, rows: list[str], load: float, started: str) -> str:
    """The section of docs/benchmarks.md: how it was measured, then the table."""
    how = (
        f"`python bench/process_start.py --rounds {args.rounds} --runs {args.runs} "
        f"--pause {args.pause} --methods {' '.join(args.methods)}`: {ITEMS} items through "
        '`map(square, runtime="process")` (one worker), run after run with a pause of '
        f"{args.pause} s between runs; each candidate in a fresh interpreter per round, "
        f"{args.runs - 1} runs counted (the first is a warm-up); the median run, then "
        "medians over the rounds, candidates alternated; the ratio to `Pool(1)` of the "
        "same start method, made and closed per run, in the same round (lower is better)."
    )
    header = "| start method | candidate | run (ms, median) | range over rounds | vs Pool(1) |"
    return "\n\n".join(
        [
            "## A short run of a process stage, again and again (bench/process_start.py)",
            f"Machine: {machine()}; load average at the start: {load:.1f}; {started} UTC.",
            how,
            "\n".join([header, "|---|---|---:|---:|---:|", *rows]),
        ]
    )


if __name__ == "__main__":
    main()
