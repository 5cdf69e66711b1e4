"""The stage options (`conveyor.pipeline.StageOptions`) are typed, for mypy.

`map`, `filter`, `flat_map` and `each` take ``**options:
Unpack[StageOptions]``: mypy checks each option's type and refuses an
unknown one, and a function that passes options on can be typed the same
way. At run time an unknown keyword is a `TypeError` naming the method.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Unpack, assert_type

import pytest
from mypy import api as mypy_api

import conveyor as cv
from conveyor.pipeline import StageOptions

ROOT = Path(__file__).resolve().parents[2]


def parsed(p: cv.Pipeline[str], **options: Unpack[StageOptions]) -> cv.Pipeline[int]:
    """A helper of the user's that passes the options on, typed once."""
    return p.map(int, **options)


def test_options_pass_through_a_typed_helper() -> None:
    p = parsed(cv.Pipeline(["1", "2"]), workers=2, name="parse", retries=1)
    assert_type(p, cv.Pipeline[int])
    assert sorted(p) == [1, 2]
    assert p.stages[0].workers == 2


@pytest.mark.parametrize("method", ["map", "filter", "flat_map", "each"])
def test_an_unknown_option_is_a_type_error_naming_the_method_and_the_keyword(
    method: str,
) -> None:
    expected = rf"^{method}\(\) got an unexpected keyword argument 'wokers'"
    with pytest.raises(TypeError, match=expected):
        getattr(cv.Pipeline([1]), method)(lambda x: [x], wokers=2)


@pytest.mark.parametrize("method", ["map", "filter", "flat_map", "each"])
def test_an_unknown_option_with_no_close_match_lists_the_options_the_method_takes(
    method: str,
) -> None:
    with pytest.raises(TypeError) as caught:
        getattr(cv.Pipeline([1]), method)(lambda x: [x], batch_size=3)
    message = str(caught.value)
    assert message.startswith(f"{method}() got an unexpected keyword argument 'batch_size'; ")
    assert "did you mean" not in message
    listed = message.split("; it takes ", 1)[1].split(", ")
    assert {"workers", "runtime", "on_error", "timeout"} <= set(listed)
    assert ("max_items_per_worker" in listed) == (method == "map")


def test_only_map_takes_max_items_per_worker() -> None:
    assert cv.Pipeline([1]).map(str, max_items_per_worker=5).stages[0].max_items_per_worker == 5
    with pytest.raises(TypeError, match="max_items_per_worker"):
        cv.Pipeline([1]).each(str, max_items_per_worker=5)  # type: ignore[call-arg]


WRONG = textwrap.dedent(
    """\
    import conveyor as cv

    p = cv.Pipeline(range(3))
    p.map(str, workers="2")  # line 4: not an int
    p.filter(bool, on_error="ignore")  # line 5: not "raise" or "skip"
    p.each(print, wokers=2)  # line 6: no such option
    p.flat_map(lambda x: [x], runtime="gpu")  # line 7: no such runtime
    p.each(print, max_items_per_worker=3)  # line 8: map only
    p.map(str, runtime="process", timeout=1.5, on_start=lambda: None)  # fine
    """
)


def test_mypy_checks_each_option_and_refuses_unknown_ones(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_options.py"
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
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert not [e for e in errors if "test_stage_options_types.py" in e], stdout
    wrong_errors = [e for e in errors if "wrong_options.py" in e]
    assert {int(e.split(":")[1]) for e in wrong_errors} == {4, 5, 6, 7, 8}, stdout
