"""The public face of the package: `__all__` lists exactly the public names, sorted."""

from __future__ import annotations
import __future__

import queue
import subprocess
import sys

import pytest

import conveyor

pytestmark = pytest.mark.quick


def test_all_lists_every_public_name_and_nothing_else() -> None:
    public = {
        name
        for name in vars(conveyor)
        if not name.startswith("_")
        and not isinstance(getattr(conveyor, name), (type(sys), __future__._Feature))
    }
    lazy = set(getattr(conveyor, "_LAZY", {}))
    assert set(conveyor.__all__) - {"__version__"} == public | lazy


def test_all_is_sorted() -> None:
    assert conveyor.__all__ == sorted(conveyor.__all__)


def test_every_public_name_has_a_docstring() -> None:
    missing = [
        name
        for name in conveyor.__all__
        if name != "__version__" and not (getattr(conveyor, name).__doc__ or "").strip()
    ]
    assert not missing


def test_the_queue_exceptions_are_the_standard_ones() -> None:
    assert conveyor.Empty is queue.Empty
    assert conveyor.Full is queue.Full


def test_python_dash_m_conveyor_shows_the_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "run" in proc.stdout and "demo" in proc.stdout
