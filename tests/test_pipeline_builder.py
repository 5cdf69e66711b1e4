"""The pipeline builder: chaining, stage names, and every bad parameter at construction."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import conveyor as cv
from conveyor.stage import Stage
from test_pipeline_helpers import identity, no_thread_left  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("no_thread_left")


async def coroutine_fn(x: int) -> int:
    return x


def test_each_builder_method_adds_one_stage_of_its_kind() -> None:
    p = (
        cv.Pipeline(range(10))
        .map(identity)
        .filter(bool)
        .flat_map(lambda x: [x])
        .batch(3)
        .each(print)
    )
    assert [s.kind for s in p.stages] == ["map", "filter", "flat_map", "batch", "each"]
    assert all(isinstance(s, Stage) for s in p.stages)


def test_chaining_returns_a_new_pipeline_and_leaves_the_original_unchanged() -> None:
    base = cv.Pipeline(range(5)).map(lambda x: x + 1)
    doubled = base.map(lambda x: x * 2)
    negated = base.map(lambda x: -x)
    assert doubled is not base
    assert len(base.stages) == 1
    assert list(base) == [1, 2, 3, 4, 5]
    assert list(doubled) == [2, 4, 6, 8, 10]
    assert list(negated) == [-1, -2, -3, -4, -5]


def test_a_pipeline_over_a_reiterable_source_runs_several_times() -> None:
    p = cv.Pipeline([3, 1, 2]).map(lambda x: x * 10, workers=2)
    assert list(p) == [30, 10, 20]
    assert p.run(collect=True).outputs == [30, 10, 20]


def test_stage_names_default_to_the_function_name_else_the_kind() -> None:
    p = cv.Pipeline([1]).map(identity).filter(lambda x: True).map(str).batch(2)
    assert [s.name for s in p.stages] == ["identity", "filter", "str", "batch"]


def test_a_callable_without_a_name_gives_the_kind_as_default_name() -> None:
    class Scale:
        def __call__(self, x: int) -> int:
            return x * 2

    p = cv.Pipeline([1]).map(functools.partial(pow, 2)).map(Scale()).filter(str.isdigit)
    assert [s.name for s in p.stages] == ["map", "map-2", "isdigit"]


def test_default_names_are_made_unique_with_a_suffix() -> None:
    p = (
        cv.Pipeline([1])
        .map(lambda x: x)
        .map(lambda x: x)
        .map(lambda x: x)
        .map(identity)
        .map(identity)
        .batch(1)
        .batch(1)
    )
    names = [s.name for s in p.stages]
    assert names == ["map", "map-2", "map-3", "identity", "identity-2", "batch", "batch-2"]
    assert len(set(names)) == len(names)


def test_an_explicit_name_is_used_and_a_default_name_avoids_it() -> None:
    p = cv.Pipeline([1]).map(lambda x: x, name="map").map(lambda x: x)
    assert [s.name for s in p.stages] == ["map", "map-2"]


@pytest.mark.parametrize("method", ["map", "filter", "flat_map", "each"])
def test_a_duplicate_explicit_name_is_refused(method: str) -> None:
    p = cv.Pipeline([1]).map(identity, name="parse")
    with pytest.raises(cv.ConfigurationError, match=r"'parse'.*unique"):
        getattr(p, method)(identity, name="parse")


def test_a_duplicate_explicit_batch_name_is_refused() -> None:
    p = cv.Pipeline([1]).map(identity, name="group")
    with pytest.raises(cv.ConfigurationError, match=r"'group'.*unique"):
        p.batch(2, name="group")


def test_stage_options_are_kept_on_the_stage() -> None:
    backoff = cv.Backoff(initial=0.001)
    p = cv.Pipeline([1]).map(
        identity,
        workers=3,
        capacity=7,
        ordered=False,
        retries=2,
        backoff=backoff,
        timeout=1.5,
        on_error="skip",
        name="s",
    )
    stage = p.stages[0]
    assert (stage.workers, stage.capacity, stage.ordered) == (3, 7, False)
    assert (stage.retries, stage.backoff, stage.timeout) == (2, backoff, 1.5)
    assert (stage.on_error, stage.name, stage.runtime) == ("skip", "s", "thread")
    batch = cv.Pipeline([1]).batch(4, interval=0.5, capacity=9).stages[0]
    assert (batch.batch_size, batch.interval, batch.capacity) == (4, 0.5, 9)


# ---------------------------------------------------------------------- bad parameters

STAGE_METHODS = ["map", "filter", "flat_map", "each"]
FN_PARAM = {"map": "fn", "filter": "pred", "flat_map": "fn", "each": "fn"}

BAD_OPTIONS: list[tuple[str, Any, type[Exception]]] = [
    ("workers", 0, cv.ConfigurationError),
    ("workers", -3, cv.ConfigurationError),
    ("workers", 2.0, cv.ConfigurationTypeError),
    ("workers", True, cv.ConfigurationTypeError),
    ("capacity", 0, cv.ConfigurationError),
    ("capacity", "10", cv.ConfigurationTypeError),
    ("runtime", "gpu", cv.ConfigurationError),
    ("on_error", "ignore", cv.ConfigurationError),
    ("retries", -1, cv.ConfigurationError),
    ("retries", 1.5, cv.ConfigurationTypeError),
    ("timeout", 0, cv.ConfigurationError),
    ("timeout", -1.0, cv.ConfigurationError),
    ("timeout", "1", cv.ConfigurationTypeError),
    ("ordered", "yes", cv.ConfigurationTypeError),
    ("backoff", 0.1, cv.ConfigurationTypeError),
    ("on_start", "setup", cv.ConfigurationTypeError),
    ("on_stop", 42, cv.ConfigurationTypeError),
    ("name", 5, cv.ConfigurationTypeError),
]


@pytest.mark.quick
@pytest.mark.parametrize("method", STAGE_METHODS)
@pytest.mark.parametrize(("param", "value", "error"), BAD_OPTIONS)
def test_a_bad_stage_option_is_refused_at_construction_naming_parameter_and_method(
    method: str, param: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        getattr(cv.Pipeline([1]), method)(identity, **{param: value})
    message = str(info.value)
    assert f"'{param}'" in message
    assert f"{method}()" in message


@pytest.mark.quick
@pytest.mark.parametrize("method", STAGE_METHODS)
def test_a_function_that_is_not_callable_is_a_type_error_naming_the_parameter(
    method: str,
) -> None:
    with pytest.raises(cv.ConfigurationTypeError) as info:
        getattr(cv.Pipeline([1]), method)("not a function")
    assert isinstance(info.value, TypeError)
    assert f"{method}() '{FN_PARAM[method]}' must be callable" in str(info.value)


@pytest.mark.quick
@pytest.mark.parametrize("method", STAGE_METHODS)
def test_a_coroutine_function_needs_runtime_async(method: str) -> None:
    with pytest.raises(cv.ConfigurationError) as info:
        getattr(cv.Pipeline([1]), method)(coroutine_fn)
    message = str(info.value)
    assert f"{method}()" in message
    assert "coroutine" in message
    assert "runtime='async'" in message


def twice(x: int) -> Iterator[int]:
    yield x
    yield x


async def atwice(x: int) -> AsyncIterator[int]:
    yield x
    yield x


@pytest.mark.quick
@pytest.mark.parametrize("method", ["map", "filter", "each"])
def test_a_generator_function_is_refused_outside_flat_map_with_a_hint_to_use_it(
    method: str,
) -> None:
    # Repro: each(f) with a stray `yield` in f ran the run to its end without once
    # running f's body; filter kept every item (a generator is true); map sent the
    # generators on unread (and failed to pickle them from a worker process).
    sink: list[int] = []

    def save(x: int) -> Iterator[None]:
        sink.append(x)
        yield None

    fn = save if method == "each" else twice
    with pytest.raises(cv.ConfigurationError) as info:
        getattr(cv.Pipeline([1]), method)(fn)
    message = str(info.value)
    param = "pred" if method == "filter" else "fn"  # as the method's signature names it
    assert message.startswith(
        f"{method}() stage '{fn.__name__}': '{param}' is a generator function"
    )
    assert "flat_map" in message
    assert list(cv.Pipeline([1, 2]).flat_map(twice)) == [1, 1, 2, 2]  # its place


@pytest.mark.quick
def test_an_async_generator_function_on_threads_is_named_as_such() -> None:
    # Repro: flat_map(atwice) said "'fn' is a coroutine function".
    with pytest.raises(cv.ConfigurationError) as info:
        cv.Pipeline([1]).flat_map(atwice)
    message = str(info.value)
    assert "'fn' is an async generator function" in message
    assert "runtime='async'" in message
    assert list(cv.Pipeline([1]).flat_map(atwice, runtime="async")) == [1, 1]


@pytest.mark.quick
@pytest.mark.timeout(10)
def test_filter_errors_name_its_predicate_pred_as_its_signature_does() -> None:
    # Repro: filter(a_coroutine_function) said "'fn' is a coroutine function".
    async def keep(x: int) -> bool:
        return True

    with pytest.raises(cv.ConfigurationError, match="'pred' is a coroutine function"):
        cv.Pipeline([1]).filter(keep)
    with pytest.raises(cv.ConfigurationTypeError, match="'pred' must be callable"):
        cv.Pipeline([1]).filter(3)  # type: ignore[arg-type]


@pytest.mark.quick
def test_configuration_errors_are_value_errors_and_type_errors() -> None:
    with pytest.raises(ValueError):
        cv.Pipeline([1]).map(identity, workers=0)
    with pytest.raises(TypeError):
        cv.Pipeline([1]).map(identity, workers="2")  # type: ignore[arg-type]


@pytest.mark.quick
@pytest.mark.parametrize(
    ("kwargs", "param", "error"),
    [
        ({"size": 0}, "size", cv.ConfigurationError),
        ({"size": 2.5}, "size", cv.ConfigurationTypeError),
        ({"size": 3, "interval": 0}, "interval", cv.ConfigurationError),
        ({"size": 3, "interval": "1"}, "interval", cv.ConfigurationTypeError),
        ({"size": 3, "capacity": 0}, "capacity", cv.ConfigurationError),
        ({"size": 3, "name": ""}, "name", cv.ConfigurationTypeError),
        ({"size": 3, "name": 7}, "name", cv.ConfigurationTypeError),
    ],
)
def test_a_bad_batch_parameter_is_refused_naming_it(
    kwargs: dict[str, Any], param: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        cv.Pipeline([1]).batch(**kwargs)
    assert f"'{param}'" in str(info.value)
    assert str(info.value).startswith("batch() ")


@pytest.mark.quick
@pytest.mark.parametrize("source", [42, None, object()])
def test_a_source_that_is_not_iterable_is_refused(source: Any) -> None:
    with pytest.raises(cv.ConfigurationTypeError, match=re.escape("Pipeline 'source'")):
        cv.Pipeline(source)


@pytest.mark.quick
@pytest.mark.parametrize("method", ["map", "filter", "flat_map", "each", "batch"])
def test_a_stage_after_each_is_refused_naming_the_sink(method: str) -> None:
    # The repro: .each(save).map(f) was accepted and the run gave [] without a word.
    sink = cv.Pipeline(range(3)).each(print, name="save")
    add = getattr(sink, method)
    with pytest.raises(cv.ConfigurationError) as info:
        add(2) if method == "batch" else add(identity)
    message = str(info.value)
    assert message.startswith(f"{method}(): the pipeline ends with each() stage 'save'")
    assert "would never get an item" in message


def test_an_empty_pipeline_cannot_run_and_says_so() -> None:
    p = cv.Pipeline([1, 2])
    with pytest.raises(cv.ConfigurationError, match=r"run\(\).*no stage"):
        p.run()
    with pytest.raises(cv.ConfigurationError, match="no stage"):
        list(p)
    with pytest.raises(cv.ConfigurationError, match=r"start\(\).*no stage"):
        p.start()


def test_a_runtime_of_the_right_name_but_wrong_case_is_refused() -> None:
    with pytest.raises(cv.ConfigurationError, match="'runtime'"):
        cv.Pipeline([1]).map(identity, runtime="Thread")  # type: ignore[call-overload]
