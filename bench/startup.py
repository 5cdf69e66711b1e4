"""Start-up: what `import conveyor` and `conveyor --help` cost a fresh interpreter.

Every measurement is a fresh interpreter (``--runs`` of each, 10 at least),
the candidates alternated run by run so the machine's load falls on all alike:

* ``import conveyor``: the import alone, timed inside the child with
  ``time.perf_counter`` around the statement;
* ``import conveyor; conveyor.Pipeline``: the import and the first use of the
  builder, which loads the engine (no run);
* ``conveyor --help``: the whole command (``python -m conveyor --help``), wall
  time of the child process, and the same less a bare ``python -c pass``
  measured in the same runs (the interpreter's own start-up).

Bytecode: by default the children write and read their bytecode cache (under
a temporary ``PYTHONPYCACHEPREFIX``, warmed before timing), as an installed
package does. ``--no-bytecode-cache`` compiles the sources on every import
instead (``PYTHONDONTWRITEBYTECODE=1``, as a development checkout set up that
way does), which costs a few tens of ms more.

``--compare SRC`` adds the same candidates importing conveyor from another
``src`` directory (a checkout of an earlier revision), paired run by run.

After the timed runs, ``--importtime-runs`` more children per candidate run
under ``python -X importtime``; the modules that take the most (self time,
median over those runs) are listed, with the cumulative time of ``conveyor``.

Run:  python bench/startup.py [--runs 15] [--compare ../main/src] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from _common import conveyor_src, machine, write_section

SECTION = "startup"
TIMED_IMPORT = "import time\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"


@dataclass(frozen=True)
class Candidate:
    """One thing to time in fresh interpreters."""

    label: str
    src: Path | None  # where conveyor is imported from (None: the bare interpreter)
    argv: tuple[str, ...]  # after the interpreter
    timed_inside: bool  # True: the child prints its own timing; False: wall time of the child


def candidates(src: Path, tag: str) -> list[Candidate]:
    """The candidates importing conveyor from ``src``, labelled with ``tag``."""
    suffix = f" [{tag}]" if tag else ""
    return [
        Candidate(
            f"import conveyor{suffix}",
            src,
            ("-c", TIMED_IMPORT.format(code="import conveyor")),
            True,
        ),
        Candidate(
            f"import conveyor; conveyor.Pipeline{suffix}",
            src,
            ("-c", TIMED_IMPORT.format(code="import conveyor\nconveyor.Pipeline")),
            True,
        ),
        Candidate(f"conveyor --help{suffix}", src, ("-m", "conveyor", "--help"), False),
    ]


BARE = Candidate("python -c pass (the interpreter alone)", None, ("-c", "pass"), False)


def child_env(src: Path | None, pycache: Path | None) -> dict[str, str]:
    """The environment of a child: conveyor from ``src``, and the bytecode cache chosen."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if src is not None:
        env["PYTHONPATH"] = str(src)
        env["CONVEYOR_BENCH_SRC"] = str(src)
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def run_once(c: Candidate, pycache: Path | None, importtime: bool = False) -> tuple[float, str]:
    """Run ``c`` in a fresh interpreter: (seconds, its stderr)."""
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), *c.argv]
    started = time.perf_counter()
    proc = subprocess.run(
        argv,
        env=child_env(c.src, pycache),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode:
        raise SystemExit(f"{c.label} failed ({c.src}):\n{proc.stderr}")
    wall = time.perf_counter() - started
    seconds = float(proc.stdout.splitlines()[-1]) if c.timed_inside else wall
    return seconds, proc.stderr


def measure(cands: list[Candidate], runs: int, pycache: Path | None) -> dict[str, list[float]]:
    """``runs`` fresh interpreters per candidate, the order rotating run by run."""
    for c in cands:  # warm-up: fills the bytecode cache, pages the files in
        run_once(c, pycache)
    times: dict[str, list[float]] = defaultdict(list)
    for r in range(runs):
        shift = r % len(cands)
        for c in cands[shift:] + cands[:shift]:
            times[c.label].append(run_once(c, pycache)[0])
    return times


def parse_importtime(stderr: str) -> dict[str, tuple[int, int]]:
    """``-X importtime`` lines -> module: (self us, cumulative us)."""
    modules: dict[str, tuple[int, int]] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = line[len("import time:") :].split("|")
        modules[name.strip()] = (int(self_us), int(cumulative))
    return modules


def importtime_breakdown(
    c: Candidate, runs: int, pycache: Path | None, top: int
) -> tuple[float, list[tuple[str, float, float]]]:
    """Median cumulative ms of the ``conveyor`` row, and the ``top`` modules by median self ms.

    Only what the command imports after the interpreter is up counts: the
    modules ``site`` imports (and ``site`` itself) are left out.
    """
    samples: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for _ in range(runs):
        stderr = run_once(c, pycache, importtime=True)[1]
        before_site = True
        for name, value in parse_importtime(stderr).items():
            if before_site:
                before_site = name != "site"
                continue
            samples[name].append(value)
    rows = [
        (
            name,
            statistics.median(s for s, _ in values) / 1000,
            statistics.median(cum for _, cum in values) / 1000,
        )
        for name, values in samples.items()
    ]
    rows.sort(key=lambda row: -row[1])
    conveyor_ms = statistics.median(cum for _, cum in samples.get("conveyor", [(0, 0)])) / 1000
    return conveyor_ms, rows[:top]


def stats_row(label: str, values: list[float], bare: float | None) -> str:
    ms = [v * 1000 for v in values]
    net = "" if bare is None else f"{statistics.median(ms) - bare:.1f}"
    return f"| {label} | {statistics.median(ms):.1f} | {min(ms):.1f} - {max(ms):.1f} | {net} |"


def render(
    times: dict[str, list[float]],
    breakdowns: dict[str, tuple[float, list[tuple[str, float, float]]]],
    args: argparse.Namespace,
    load_at_start: str,
) -> str:
    bare_ms = statistics.median(times[BARE.label]) * 1000
    cache = (
        "compiled on every import (`PYTHONDONTWRITEBYTECODE=1`)"
        if args.no_bytecode_cache
        else "read from the bytecode cache (warmed first), as an installed package"
    )
    lines = [
        "## Start-up (bench/startup.py)"
        + (", no bytecode cache" if args.no_bytecode_cache else ""),
        "",
        f"Machine: {machine()}; load average at the start: {load_at_start}.",
        "",
        f"`python bench/startup.py --runs {args.runs}"
        + (" --no-bytecode-cache" if args.no_bytecode_cache else "")
        + (" --compare SRC" if args.compare else "")
        + "`: each figure is the median of "
        f"{args.runs} fresh interpreters, candidates alternated run by run; conveyor's "
        f"modules {cache}. `import ...` rows are timed inside the child around the "
        "statement; `conveyor --help` and `python -c pass` are the wall time of the child "
        "process, and *less the interpreter* subtracts the median of `python -c pass`."
        + (f" Rows marked [base] import conveyor from `{args.compare}`." if args.compare else ""),
        "",
        "| candidate | ms (median) | min - max | less the interpreter |",
        "|---|---:|---:|---:|",
    ]
    for label, values in times.items():
        wall = label.startswith(("conveyor --help", "python -c pass"))
        lines.append(stats_row(label, values, bare_ms if wall and label != BARE.label else None))
    for label, (conveyor_ms, rows) in breakdowns.items():
        lines += [
            "",
            f"### `python -X importtime`: {label}",
            "",
            f"Medians of {args.importtime_runs} runs; `conveyor` cumulative: "
            f"{conveyor_ms:.1f} ms. The modules that take the most time of their own "
            "(modules `site` loads at start-up are not counted):",
            "",
            "| module | self ms | cumulative ms |",
            "|---|---:|---:|",
            *(f"| {name} | {self_ms:.2f} | {cum:.2f} |" for name, self_ms, cum in rows),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="fresh interpreters (>= 10)")
    parser.add_argument("--importtime-runs", type=int, default=5, help="-X importtime runs")
    parser.add_argument("--top", type=int, default=10, help="modules listed per breakdown")
    parser.add_argument("--compare", type=Path, help="another src directory, paired [base]")
    parser.add_argument("--no-bytecode-cache", action="store_true", help="compile every time")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    if args.runs < 10:
        parser.error("--runs: give 10 or more (medians of fewer move too much)")
    load_at_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Machine: {machine()}; load average {load_at_start}", flush=True)
    cands = [BARE, *candidates(conveyor_src(), "")]
    if args.compare:
        cands += candidates(args.compare.resolve(), "base")
    with tempfile.TemporaryDirectory(prefix="conveyor-pycache-") as tmp:
        pycache = None if args.no_bytecode_cache else Path(tmp)
        times = measure(cands, args.runs, pycache)
        breakdowns = {
            c.label: importtime_breakdown(c, args.importtime_runs, pycache, args.top)
            for c in cands
            if c is not BARE
        }
    page = render(times, breakdowns, args, load_at_start)
    print(page)
    if args.write:
        tag = SECTION + ("-compiled" if args.no_bytecode_cache else "")
        path = write_section(page, tag)
        print(f"wrote the '{tag}' section of {path}")


if __name__ == "__main__":
    main()
