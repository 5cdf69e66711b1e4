"""The item type flows through a pipeline's chain, for mypy.

Each ``assert_type`` below is checked by mypy (the last test runs mypy on this
file) and is a no-op at run time, where the same pipelines also run, so the
types are those of real, working code.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import assert_type

from mypy import api as mypy_api

import conveyor as cv

ROOT = Path(__file__).resolve().parents[2]


def digits(x: int) -> list[str]:
    return list(str(x))


def test_a_pipeline_has_the_item_type_of_its_source() -> None:
    assert_type(cv.Pipeline(range(3)), cv.Pipeline[int])
    assert_type(cv.Pipeline(["a", "b"]), cv.Pipeline[str])


def test_map_gives_a_pipeline_of_what_the_function_returns() -> None:
    p = cv.Pipeline(range(3)).map(str)
    assert_type(p, cv.Pipeline[str])
    assert list(p) == ["0", "1", "2"]
    q = p.map(len, workers=2)
    assert_type(q, cv.Pipeline[int])


def test_filter_keeps_the_item_type() -> None:
    p = cv.Pipeline(range(5)).filter(lambda x: x % 2 == 0)
    assert_type(p, cv.Pipeline[int])
    assert list(p) == [0, 2, 4]


def test_flat_map_unwraps_the_iterable_the_function_returns() -> None:
    p = cv.Pipeline([12, 3]).flat_map(digits)
    assert_type(p, cv.Pipeline[str])
    assert list(p) == ["1", "2", "3"]


def test_an_async_flat_map_unwraps_what_its_coroutines_give() -> None:
    # Repro: mypy refused both, documented as working with runtime="async"
    # ("expected Callable[[int], Iterable[Never]]"), and typed the pipeline Any.
    async def letters(x: int) -> AsyncIterator[str]:
        for letter in str(x):
            yield letter

    async def halves(x: int) -> list[float]:
        return [x / 2, x / 4]

    p = cv.Pipeline([12]).flat_map(letters, runtime="async")
    assert_type(p, cv.Pipeline[str])
    assert list(p) == ["1", "2"]
    q = cv.Pipeline([2]).flat_map(halves, runtime="async", workers=2)
    assert_type(q, cv.Pipeline[float])
    assert list(q) == [1.0, 0.5]


def test_batch_gives_lists_of_the_item_type() -> None:
    p = cv.Pipeline(range(3)).map(float).batch(2)
    assert_type(p, cv.Pipeline[list[float]])
    assert list(p) == [[0.0, 1.0], [2.0]]


def test_each_gives_a_pipeline_of_none() -> None:
    seen: list[int] = []
    p = cv.Pipeline(range(3)).each(seen.append)
    assert_type(p, cv.Pipeline[None])
    assert list(p) == []
    assert sorted(seen) == [0, 1, 2]


def test_iterating_yields_the_item_type() -> None:
    for x in cv.Pipeline(range(2)).map(float):
        assert_type(x, float)


def test_an_async_source_gives_its_item_type() -> None:
    async def numbers() -> AsyncIterator[int]:
        yield 1

    p = cv.Pipeline(numbers())
    assert_type(p, cv.Pipeline[int])
    assert list(p.map(str)) == ["1"]


def test_running_returns_a_result_and_starting_a_handle() -> None:
    p = cv.Pipeline(range(3)).map(str)
    assert_type(p.run(), cv.RunResult[str])
    handle = p.start()
    assert_type(handle, cv.RunHandle[str])
    assert_type(handle.join(), cv.RunResult[str])
    assert_type(handle.result_so_far(), cv.RunResult[str])


def test_a_backend_run_handle_has_the_item_type() -> None:
    # Repro: BackgroundRun was not generic: join() of start(backend=...) gave a
    # RunResult[Any], whatever the pipeline's outputs.
    p = cv.Pipeline(range(3)).map(str)
    handle = p.start(backend=cv.LocalBackend(), collect=True)
    assert_type(handle, cv.RunHandle[str] | cv.BackgroundRun[str])
    result = handle.join()
    assert_type(result, cv.RunResult[str])
    assert_type(handle.result_so_far(), cv.RunResult[str])
    assert result.outputs == ["0", "1", "2"]


def test_the_collected_outputs_have_the_item_type() -> None:
    # Repro: RunResult was not generic: result.outputs was list[Any] | None.
    result = cv.Pipeline(range(3)).map(str).run(collect=True)
    assert_type(result.outputs, list[str] | None)
    assert result.outputs == ["0", "1", "2"]


def test_an_unparametrised_result_or_handle_is_still_a_valid_annotation() -> None:
    # Code written before they were generic keeps passing mypy --strict.
    def finished(p: cv.Pipeline[int]) -> cv.RunResult:
        handle: cv.RunHandle = p.start()
        return handle.join()

    assert finished(cv.Pipeline(range(2)).map(abs)).items_out == 2


WRONG = textwrap.dedent(
    """\
    import conveyor as cv

    def shout(s: str) -> str:
        return s.upper()

    def same(x: int) -> int:
        return x

    cv.Pipeline(range(3)).map(shout)  # line 9: str function on ints
    cv.Pipeline(range(3)).flat_map(same)  # line 10: not an iterable
    cv.Pipeline(["a"]).filter(same)  # line 11: int predicate on strs
    cv.Pipeline(range(3)).map(str).map(same)  # line 12: the type flowed to str
    cv.Pipeline(range(3)).batch(2).map(same)  # line 13: batches are lists
    """
)


def test_mypy_accepts_this_file_and_rejects_a_wrong_stage_function(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_stages.py"
    wrong.write_text(WRONG)
    stdout, stderr, _ = mypy_api.run(
        [
            str(Path(__file__).resolve()),
            str(wrong),
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--no-error-summary",
            "--show-error-codes",
        ]
    )
    assert stderr == ""
    # Only these two files: errors in conveyor's own source are the mypy gate's business.
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if "test_pipeline_types.py" in e], stdout
    wrong_errors = [e for e in errors if "wrong_stages.py" in e]
    assert {int(e.split(":")[1]) for e in wrong_errors} == {9, 10, 11, 12, 13}, stdout
    assert all("[arg-type]" in e or "[call-overload]" in e for e in wrong_errors), stdout
