"""Helpers shared by the pipeline test modules (``test_pipeline_*.py``).

Import what you need: ``from test_pipeline_helpers import ...``. The fixture
``no_thread_left`` is meant to be pulled in with ``pytestmark`` or
``pytest.mark.usefixtures`` after importing it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import pytest

from conveyor.runtime._background import THREAD_NAME as BACKGROUND_THREAD

WAIT = 10.0
"""Upper bound of every wait in these tests: far above what any of them needs."""

PROMPT = 1.0
"""The contract: a run ends within this many seconds after an error or a stop."""


def conveyor_threads() -> list[str]:
    """Names of the live threads conveyor started for runs (all are named ``conveyor-*``):
    not the process runtime's one background thread, which lives as long as the program
    once started (as the forkserver does; see conveyor.runtime._background)."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("conveyor-") and t.name != BACKGROUND_THREAD
    ]


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``predicate()`` is true, or fail the test after ``timeout`` s.

    A bounded poll with a tiny sleep: used only to observe state that nothing
    signals, like live statistics or a thread that ends on its own after a test
    released it.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout} s", pytrace=False)
        time.sleep(0.001)


def must_wait(event: threading.Event, timeout: float = WAIT) -> None:
    """Wait for ``event`` from a test body; fail clearly instead of hanging."""
    if not event.wait(timeout):
        pytest.fail(f"event not set within {timeout} s", pytrace=False)


class CountingSource:
    """An iterable source that counts how many items were pulled from it.

    ``limit`` None means never-ending.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.pulled = 0
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[int]:
        i = 0
        while self.limit is None or i < self.limit:
            with self._lock:
                self.pulled += 1
            yield i
            i += 1


@contextmanager
def conveyor_log(handler: logging.Handler, level: int = logging.INFO) -> Iterator[None]:
    """Send the ``conveyor`` logger's records from ``level`` up to ``handler`` while inside."""
    logger = logging.getLogger("conveyor")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


@pytest.fixture
def no_thread_left() -> Iterator[None]:
    """Fail a test that leaves a conveyor thread behind.

    The contract tests check right after the run; this safety net waits a
    little, for helper threads of timed-out calls that a test released at its
    end and that are now returning on their own.
    """
    yield
    wait_until(lambda: not conveyor_threads(), timeout=5.0)


def identity(x: Any) -> Any:
    """A stage function that returns its item."""
    return x


async def quiet_after(
    n: int, waiting: threading.Event, cleaned: threading.Event
) -> AsyncIterator[int]:
    """An async source giving ``0 .. n-1``, then awaiting an item that never comes
    (a quiet feed): ``waiting`` is set once it awaits, ``cleaned`` once its cleanup ran."""
    try:
        for i in range(n):
            yield i
        waiting.set()
        await asyncio.Event().wait()
        yield n
    finally:
        cleaned.set()


# ---------------------------------------------------------------------- random pipelines


class RandomStage(Protocol):
    """A stage of the property tests' random pipelines (test_pipeline_flow.py,
    contract/test_contract_properties.py): which items fail in it for good, and what it
    gives for the others."""

    def fails(self, x: int) -> bool: ...

    def outputs(self, x: int) -> list[int]: ...


def random_stage_outputs(kind: str, param: int, x: int) -> list[int]:
    """What a random stage gives for one item: a map adds to 3x, a filter keeps what
    ``param`` does not divide, a flat_map gives ``param`` items (0 to 3)."""
    if kind == "map":
        return [x * 3 + param]
    if kind == "filter":
        return [x] if x % param != 0 else []
    return [x * 4 + j for j in range(param)]


def reference_run(
    items: list[int], stages: Sequence[RandomStage]
) -> tuple[list[int], Counter[tuple[str, int]]]:
    """The single-threaded reference of a random pipeline: its outputs, and its
    failures by (stage name ``s<index>``, item)."""
    failures: Counter[tuple[str, int]] = Counter()
    for index, stage in enumerate(stages):
        out: list[int] = []
        for x in items:
            if stage.fails(x):
                failures[(f"s{index}", x)] += 1
            else:
                out.extend(stage.outputs(x))
        items = out
    return items, failures
