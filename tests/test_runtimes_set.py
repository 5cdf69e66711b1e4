"""`conveyor.runtime.base.Runtimes`: the set of runtimes one run (or one Redis worker) uses."""

from __future__ import annotations

import pytest

from conveyor.runtime.base import Runtimes
from conveyor.runtime.threads import ThreadRuntime

pytestmark = pytest.mark.timeout(30)


class ClosingWhileJoined(ThreadRuntime):
    """A runtime whose join lets the set be closed meanwhile, as a run's driver thread does
    while the pipeline's context manager joins the run from the caller's thread."""

    runtimes: Runtimes

    def join(self, timeout: float) -> list[str]:
        self.runtimes.close()
        return []


def test_joining_while_the_set_is_closed_and_cleared_does_not_fail() -> None:
    # Repro: "RuntimeError: dictionary changed size during iteration" from Runtimes.join
    # (test_the_pipeline_context_manager_stops_and_joins_its_runs_on_exit, once in a run).
    runtimes = Runtimes()
    first, second = ClosingWhileJoined(), ThreadRuntime()
    first.runtimes = runtimes
    runtimes._by_name.update({"first": first, "second": second})
    assert runtimes.join(None) == []
    with pytest.raises(KeyError):
        runtimes["first"]
