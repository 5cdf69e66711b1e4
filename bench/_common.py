"""What every benchmark script shares: naming the machine, writing its section of the docs."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"

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
