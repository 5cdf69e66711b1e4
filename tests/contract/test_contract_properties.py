"""Random pipelines on every runtime x backend match the plain-Python reference.

The property tests of tests/test_pipeline_flow.py cover random map, filter and
flat_map stages on threads, on one machine. These draw the same kind of
pipelines, plus a batch stage at the end, and run them through the ``runner``
fixture (conftest.py), with failures injected by item value: some items raise
on every attempt (skipped and recorded), some only on their first attempt
(retried, then through), and on the process runtime some kill their worker
instead of raising, on every attempt or on the first only. Nothing may be lost
or duplicated, order is kept where every stage asks for it, and exactly the
items that fail on every attempt are recorded, with their stage, error and
attempts.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runners import Runner

import conveyor as cv
from test_pipeline_helpers import random_stage_outputs, reference_run

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Injected(Exception):
    """The failure injected by item value."""


def first_attempt(marks: Path, key: str) -> bool:
    """True the first time ``key`` is asked about, in any process: a file made at once."""
    try:
        os.close(os.open(marks / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@dataclass(frozen=True)
class StageSpec:
    """One random stage, and which of its items fail and how."""

    kind: str  # map, filter or flat_map
    param: int  # map: added constant; filter: modulus; flat_map: fan-out 0-3
    workers: int
    capacity: int
    ordered: bool
    fail_mod: int | None  # items with x % fail_mod == 1 fail
    transient: bool  # ... on their first attempt only (then retries >= 1)
    retries: int
    dies: bool  # ... by killing their worker process, not by raising

    def fails(self, x: int) -> bool:
        """Whether ``x`` fails on every attempt (the reference's failures)."""
        return self.fail_mod is not None and x % self.fail_mod == 1 and not self.transient

    def outputs(self, x: int) -> list[int]:
        return random_stage_outputs(self.kind, self.param, x)

    def function(self, marks: Path, name: str) -> Callable[[int], Any]:
        """The stage function: the reference, plus the failures."""
        kind, param, fail_mod, transient, dies = (
            self.kind,
            self.param,
            self.fail_mod,
            self.transient,
            self.dies,
        )

        def fn(x: int) -> Any:
            failing = fail_mod is not None and x % fail_mod == 1
            if failing and (not transient or first_attempt(marks, f"{name}-{x}")):
                if dies:
                    os._exit(7)
                raise Injected(x)
            if kind == "map":
                return x * 3 + param
            if kind == "filter":
                return x % param != 0
            return [x * 4 + j for j in range(param)]

        return fn


def _consistent(spec: StageSpec) -> StageSpec:
    # A value may recur in a stage's input: a transient failure is then one per
    # value, not per item, so it needs a retry to leave the reference unchanged.
    if spec.transient and spec.retries == 0:
        spec = replace(spec, retries=1)
    return spec


stage_specs = st.builds(
    StageSpec,
    kind=st.sampled_from(["map", "filter", "flat_map"]),
    param=st.integers(2, 3),
    workers=st.integers(1, 4),
    capacity=st.integers(1, 16),
    ordered=st.booleans(),
    fail_mod=st.one_of(st.none(), st.sampled_from([3, 5, 7])),
    transient=st.booleans(),
    retries=st.integers(0, 2),
    dies=st.booleans(),
).map(_consistent)


def reference(
    items: list[int], specs: list[StageSpec], batch: int | None
) -> tuple[list[Any], Counter[tuple[str, int]]]:
    """The single-threaded reference: outputs, and the (stage, item) failures."""
    items, failures = reference_run(items, specs)
    if batch is None:
        return list(items), failures
    return [items[i : i + batch] for i in range(0, len(items), batch)], failures


@settings(
    deadline=None,
    max_examples=20,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.lists(st.integers(-60, 60), max_size=40),
    specs=st.lists(stage_specs, min_size=1, max_size=3),
    batch=st.one_of(st.none(), st.integers(1, 5)),
)
def test_a_random_pipeline_with_injected_failures_matches_the_reference(
    runner: Runner,
    tmp_path_factory: pytest.TempPathFactory,
    items: list[int],
    specs: list[StageSpec],
    batch: int | None,
) -> None:
    if runner.runtime != "process":  # only a worker process can die and be replaced
        specs = [replace(s, dies=False) for s in specs]
    marks = tmp_path_factory.mktemp("marks")
    run = uuid.uuid4().hex[:8]  # the marks of one example
    expected, expected_failures = reference(items, specs, batch)
    pipeline: cv.Pipeline[Any] = cv.Pipeline(items)
    for index, spec in enumerate(specs):
        pipeline = getattr(pipeline, spec.kind)(
            runner.fn(spec.function(marks, f"{run}-s{index}")),
            workers=spec.workers,
            capacity=spec.capacity,
            ordered=spec.ordered,
            on_error="skip",
            retries=spec.retries,
            backoff=cv.Backoff(initial=0.0),
            runtime=runner.runtime,
            name=f"s{index}",
        )
    if batch is not None:
        pipeline = pipeline.batch(batch)
    result = runner.run(pipeline, collect=True)
    outputs = result.outputs
    assert outputs is not None
    if all(s.ordered for s in specs):
        assert outputs == expected
    elif batch is None:
        assert Counter(outputs) == Counter(expected)
    else:  # the same items, grouped as they came: full groups but the last
        assert Counter(x for group in outputs for x in group) == Counter(
            x for group in expected for x in group
        )
        assert [len(group) for group in outputs] == [len(group) for group in expected]
    assert Counter((f.stage, f.item) for f in result.failures) == expected_failures
    for failure in result.failures:
        spec = specs[int(failure.stage[1:])]
        assert isinstance(failure.error, cv.WorkerCrashed if spec.dies else Injected)
        assert failure.attempts == spec.retries + 1
    assert result.items_out == len(expected)
