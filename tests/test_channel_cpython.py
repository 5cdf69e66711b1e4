"""CPython's own queue.Queue test-suite, run unchanged against conveyor.Channel.

The suite is loaded from the running interpreter's ``test.test_queue`` (it is
not copied here), and its FIFO ``Queue`` tests are pointed at Channel. They
are skipped, with the reason, on an interpreter installed without its tests.
"""

from __future__ import annotations

import queue
import types
import unittest

import pytest

import conveyor

pytestmark = [pytest.mark.quick, pytest.mark.timeout(120)]

try:
    from test import test_queue as cpython_queue_tests
except ImportError:  # pragma: no cover - interpreter without its test package
    cpython_queue_tests = None


class Queue(conveyor.Channel[object]):
    """Channel under the name the suite expects (it keys expected orders by class name)."""


# What the suite reads as `self.queue`: the module under test.
channel_module = types.SimpleNamespace(
    Queue=Queue, Full=queue.Full, Empty=queue.Empty, ShutDown=conveyor.ShutDown
)


def _load_suite() -> unittest.TestSuite:
    assert cpython_queue_tests is not None

    class ChannelQueueTest(cpython_queue_tests.QueueTest, unittest.TestCase):  # type: ignore[name-defined,misc]
        queue = channel_module

    return unittest.defaultTestLoader.loadTestsFromTestCase(ChannelQueueTest)


@pytest.mark.skipif(cpython_queue_tests is None, reason="this Python has no test.test_queue")
def test_cpython_queue_suite_passes_against_channel() -> None:
    suite = _load_suite()
    assert suite.countTestCases() >= 5
    result = unittest.TextTestRunner(verbosity=0).run(suite)
    problems = [f"{test}: {trace}" for test, trace in result.failures + result.errors]
    assert not problems, "\n\n".join(problems)
    assert result.testsRun == suite.countTestCases()
