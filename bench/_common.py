"""What every benchmark script shares: naming the machine, writing its section of the docs.

Which conveyor is measured: every script imports conveyor from the ``src``
directory named by the environment variable ``CONVEYOR_BENCH_SRC`` when it is
set, else from this checkout's ``src`` (see `conveyor_src`). An environment
variable reaches every process a benchmark starts (spawn, forkserver and
subprocess children alike), so workers import the same tree as the script.
bench/ab.py uses it to run the scripts of this checkout against the code of
another revision.

Machine-readable results: pipeline.py, runtimes.py and redis.py take
``--json PATH`` and write there, per workload, conveyor's throughput and its
ratio to the reference peer of the same run (`write_json`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
SRC_ENV = "CONVEYOR_BENCH_SRC"


def conveyor_src() -> Path:
    """The ``src`` directory to import conveyor from: ``$CONVEYOR_BENCH_SRC``, else ROOT/src."""
    return Path(os.environ.get(SRC_ENV) or ROOT / "src").resolve()


_HEADER = (
    "# Benchmarks\n\n"
    "Measured by the scripts in `bench/`; each script rewrites only its own "
    "section (between its `<!-- name:begin -->` / `<!-- name:end -->` markers) "
    "with `--write`. Runs move by about ±10% from one run to the next: compare "
    "the ratios measured within one run, not absolute figures across runs.\n\n"
)


def machine() -> str:
    """CPU model, cores and Python version, for the report."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()} on {sys.platform}"
    )


def write_section(text: str, tag: str) -> Path:
    """Replace the ``tag`` section of docs/benchmarks.md; other sections stay."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else _HEADER
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        tail = rest.split(end, 1)[1]
        new = head + block + tail.lstrip("\n")
    else:
        new = current.rstrip("\n") + "\n\n" + block
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    BENCHMARKS_MD.write_text(new)
    return BENCHMARKS_MD


def workload(
    throughput: float,
    unit: str,
    peer: str,
    peer_throughput: float,
    samples: list[float] | None = None,
    peer_samples: list[float] | None = None,
) -> dict[str, Any]:
    """One workload of a ``--json`` file: conveyor's figure, the peer's, and their ratio.

    ``ratio`` is conveyor's figure over the peer's, both medians of the same
    run (the ratio the script prints); ``samples`` are the per-round figures.
    """
    return {
        "throughput": throughput,
        "unit": unit,
        "peer": peer,
        "peer_throughput": peer_throughput,
        "ratio": throughput / peer_throughput,
        "samples": samples or [],
        "peer_samples": peer_samples or [],
    }


def write_json(path: str, workloads: dict[str, dict[str, Any]]) -> None:
    """Write a run's workloads, with where conveyor was imported from, to ``path``."""
    import conveyor
    import conveyor.channel

    data = {
        "script": Path(sys.argv[0]).name,
        "argv": sys.argv[1:],
        "conveyor": str(Path(conveyor.__file__).resolve().parent),
        "accelerated": getattr(conveyor.channel, "ACCELERATED", None),
        "python": platform.python_version(),
        "workloads": workloads,
    }
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def settle() -> None:
    """Wait for what a run of process stages leaves going in the background: its worker
    processes finishing their exit, then the start of standby worker processes
    (conveyor.runtime.processes.settle), a few milliseconds of another core's time after
    the run's end. A benchmark calls it after each conveyor run, before
    timing a reference or a peer, which that work would otherwise slow down. (A conveyor
    from before standbys has nothing to wait for.)"""
    processes = sys.modules.get("conveyor.runtime.processes")
    if processes is not None and hasattr(processes, "settle"):
        processes.settle()
