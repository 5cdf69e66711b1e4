"""How the examples compare themselves with the plain-Python way (``--compare``),
and the command-line checks they share (`positive_int`, `new_file`).

Each example has a conveyor function and a plain-Python function doing the same
job on the same input. ``--compare`` runs them alternately, ``rounds`` times
each after a warm-up round, and prints the median wall-clock time of each and
the lines of code of each function (non-blank lines that are not comments or
docstrings), so the figures in the docs can be measured again with one command.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import statistics
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1 (a count, a size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number, at least 1, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def new_file(text: str) -> Path:
    """An argparse ``type``: a file path whose folder exists (the file is created)."""
    path = Path(text)
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {str(folder)!r} does not exist")
    return path


def code_lines(fn: Callable[..., Any]) -> int:
    """Lines of ``fn``'s source that hold code: no blank lines, comments or docstring."""
    source = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(source)
    docstring_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(node):
            first = node.body[0]
            docstring_lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return sum(
        1
        for number, line in enumerate(source.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and number not in docstring_lines
    )


def compare(candidates: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Median seconds of each candidate, run alternately after one warm-up round each."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def print_comparison(
    times: dict[str, float], code: dict[str, list[Callable[..., Any]]], what: str
) -> None:
    """One line per candidate: median time, speed relative to the first, lines of code.

    ``code`` lists, for each candidate, the functions written for it alone
    (the parts both share, such as parsing, are not counted).
    """
    base = next(iter(times.values()))
    print(f"{what} (median of the rounds; speed relative to the first):")
    for name, seconds in times.items():
        lines = sum(code_lines(fn) for fn in code[name])
        print(f"  {name:<16} {seconds:8.3f} s  {base / seconds:5.2f}x  {lines:3d} lines")
