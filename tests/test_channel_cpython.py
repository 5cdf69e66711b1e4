"""CPython's own queue.Queue test-suite, run unchanged against conveyor.Channel.

The suite is loaded from the running interpreter's ``test.test_queue`` (it is
not copied here). Its FIFO ``Queue`` tests run against Channel; its
``FailingQueue`` tests subclass Channel and override the ``_put``/``_get``
storage hooks to make them raise; its ``LifoQueue`` and ``PriorityQueue``
tests run against Channel subclasses that keep items through the same four
hooks as the standard library's ``LifoQueue`` and ``PriorityQueue``. They are
skipped, with the reason, on an interpreter installed without its tests.
"""

from __future__ import annotations

import heapq
import queue
import types
import unittest
from typing import Any

import pytest

import conveyor

pytestmark = [pytest.mark.quick, pytest.mark.timeout(120)]

try:
    from test import test_queue as cpython_queue_tests
except ImportError:  # pragma: no cover - interpreter without its test package
    cpython_queue_tests = None


class Queue(conveyor.Channel[object]):
    """Channel under the name the suite expects (it keys expected orders by class name)."""


class LifoQueue(conveyor.Channel[object]):
    """Last in, first out, through queue.Queue's storage hooks (as queue.LifoQueue)."""

    def _init(self, maxsize: int) -> None:
        self.queue: list[Any] = []

    def _qsize(self) -> int:
        return len(self.queue)

    def _put(self, item: Any) -> None:
        self.queue.append(item)

    def _get(self) -> Any:
        return self.queue.pop()


class PriorityQueue(conveyor.Channel[object]):
    """Lowest first, through queue.Queue's storage hooks (as queue.PriorityQueue)."""

    def _init(self, maxsize: int) -> None:
        self.queue: list[Any] = []

    def _qsize(self) -> int:
        return len(self.queue)

    def _put(self, item: Any) -> None:
        heapq.heappush(self.queue, item)

    def _get(self) -> Any:
        return heapq.heappop(self.queue)


# What the suite reads as `self.queue`: the module under test.
channel_module = types.SimpleNamespace(
    Queue=Queue,
    LifoQueue=LifoQueue,
    PriorityQueue=PriorityQueue,
    Full=queue.Full,
    Empty=queue.Empty,
    ShutDown=conveyor.ShutDown,
)

SUITES = ["QueueTest", "FailingQueueTest", "LifoQueueTest", "PriorityQueueTest"]


def _load_suite(name: str) -> unittest.TestSuite:
    assert cpython_queue_tests is not None
    mixin = getattr(cpython_queue_tests, name)
    case = type(f"Channel{name}", (mixin, unittest.TestCase), {"queue": channel_module})
    return unittest.defaultTestLoader.loadTestsFromTestCase(case)


@pytest.mark.skipif(cpython_queue_tests is None, reason="this Python has no test.test_queue")
@pytest.mark.parametrize("name", SUITES)
def test_cpython_queue_suite_passes_against_channel(name: str) -> None:
    suite = _load_suite(name)
    assert suite.countTestCases() >= 1
    result = unittest.TextTestRunner(verbosity=0).run(suite)
    problems = [f"{test}: {trace}" for test, trace in result.failures + result.errors]
    assert not problems, "\n\n".join(problems)
    assert result.testsRun == suite.countTestCases()
    assert not result.skipped


def test_only_subclasses_that_override_a_storage_hook_go_through_the_hooks() -> None:
    class Plain(conveyor.Channel[int]):
        def extra(self) -> int:
            return 1

    assert not conveyor.Channel._hooked
    assert not Plain._hooked
    assert LifoQueue._hooked and PriorityQueue._hooked
    plain = Plain(4)
    assert plain._items is plain.queue  # the deque itself: the fast paths
