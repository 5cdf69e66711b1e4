"""The optional C accelerator (conveyor._speedups) and its pure-Python fallback.

`take(q, n)` pops the first n items of a deque into a list; Channel.get_many()
uses it. The C version must behave exactly like the fallback, keep every item
on failure, and leave reference counts as they were. scripts/test.sh also runs
the channel tests with CONVEYOR_PURE_PYTHON=1, and checks that the accelerator
was built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import conveyor.channel as channel_module
from conveyor.channel import _take_python

pytestmark = [pytest.mark.quick, pytest.mark.timeout(60)]

try:
    from conveyor._speedups import take as take_c
except ImportError:  # a build without the accelerator: its tests are skipped
    take_c = None

needs_c = pytest.mark.skipif(take_c is None, reason="conveyor._speedups was not built")
Take = Callable[[deque[Any], int], list[Any]]
TAKES = [pytest.param(_take_python, id="python"), pytest.param(take_c, id="c", marks=needs_c)]


@pytest.mark.parametrize("take", TAKES)
@given(items=st.lists(st.integers()), n=st.integers(-3, 40))
def test_take_pops_the_first_n_items_in_order_at_most_all(
    take: Take, items: list[int], n: int
) -> None:
    q = deque(items)
    got = take(q, n)
    k = max(0, min(n, len(items)))
    assert got == items[:k]
    assert list(q) == items[k:]


@needs_c
def test_c_take_keeps_reference_counts_balanced() -> None:
    assert take_c is not None
    marker = object()
    before = sys.getrefcount(marker)
    q = deque([marker] * 10)
    got = take_c(q, 4)
    assert sys.getrefcount(marker) == before + 10  # 4 in the list, 6 in the deque
    del got, q
    assert sys.getrefcount(marker) == before


class FailingDeque(deque[int]):
    """A deque whose popleft() fails on its k-th call."""

    def __init__(self, items: list[int], fail_at: int) -> None:
        super().__init__(items)
        self.calls = 0
        self.fail_at = fail_at

    def popleft(self) -> int:
        self.calls += 1
        if self.calls == self.fail_at:
            raise MemoryError("injected")
        return super().popleft()


@pytest.mark.parametrize("fail_at", [1, 2, 5])
def test_c_take_puts_items_back_in_order_when_a_pop_fails(fail_at: int) -> None:
    if take_c is None:
        pytest.skip("conveyor._speedups was not built")
    q = FailingDeque(list(range(8)), fail_at)
    with pytest.raises(MemoryError, match="injected"):
        take_c(q, 6)
    assert list(q) == list(range(8))  # nothing lost, nothing reordered


@needs_c
def test_c_take_rejects_bad_arguments_clearly() -> None:
    assert take_c is not None
    with pytest.raises(TypeError, match="2 positional arguments"):
        take_c(deque())  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        take_c(deque([1]), "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        take_c(object(), 1)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        take_c([1, 2], 1)  # type: ignore[arg-type]


def test_the_channel_uses_the_accelerator_when_it_is_built() -> None:
    pure = channel_module.pure_python_wanted()
    expected = take_c is not None and not pure
    assert channel_module.ACCELERATED is expected
    assert (channel_module._take is take_c) is expected


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("value", "accelerated"),
    [("0", True), ("false", True), ("No", True), ("", True), ("yes", False), ("TRUE", False)],
)
def test_conveyor_pure_python_takes_yes_and_no_words(value: str, accelerated: bool) -> None:
    """Repro: CONVEYOR_PURE_PYTHON=false (or no) turned the accelerator off."""
    code = "import conveyor.channel as c; print(c.ACCELERATED)"
    env = {**os.environ, "CONVEYOR_PURE_PYTHON": value}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, timeout=60, capture_output=True
    )
    assert out.stdout.decode().strip() == str(accelerated and take_c is not None)


@pytest.mark.timeout(60)
def test_conveyor_pure_python_refuses_another_value_naming_what_it_takes() -> None:
    env = {**os.environ, "CONVEYOR_PURE_PYTHON": "maybe"}
    out = subprocess.run(
        [sys.executable, "-c", "import conveyor as cv; cv.Channel(1)"],
        env=env,
        timeout=60,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0
    assert "CONVEYOR_PURE_PYTHON environment variable must be 1, true or yes" in out.stderr
    assert "got 'maybe'" in out.stderr


def test_conveyor_pure_python_turns_the_accelerator_off() -> None:
    code = (
        "import conveyor.channel as c; assert not c.ACCELERATED; "
        "ch = c.Channel(8); ch.put_many(range(8)); "
        "assert ch.get_many(3) == [0, 1, 2] and ch.get_many(9) == [3, 4, 5, 6, 7]"
    )
    env = {**os.environ, "CONVEYOR_PURE_PYTHON": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
