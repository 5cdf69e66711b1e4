"""Building conveyor's wheel: with the C accelerator, and without it.

The build hook (hatch_build.py) compiles conveyor._speedups when it can, and
otherwise warns and builds a pure-Python wheel: a machine without a C
compiler must still install conveyor. These tests build real wheels with pip
(no build isolation: hatchling and setuptools come with the dev extras).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


def build_wheel(tmp_path: Path, **env: str) -> tuple[Path, str]:
    """Build conveyor's wheel into tmp_path; return it and pip's output."""
    result = subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--disable-pip-version-check", "-v", "-w", str(tmp_path), str(ROOT),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = tmp_path.glob("conveyor-*.whl")
    return wheel, result.stdout + result.stderr


def compiled_modules(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return [n for n in archive.namelist() if n.endswith((".so", ".pyd"))]


def test_the_wheel_carries_the_compiled_accelerator(tmp_path: Path) -> None:
    wheel, _ = build_wheel(tmp_path)
    assert [Path(n).name.split(".")[0] for n in compiled_modules(wheel)] == ["_speedups"]
    assert "-none-any" not in wheel.name  # tagged for this interpreter and platform
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith(".c")]


def test_without_a_compiler_the_wheel_is_pure_python_and_says_why(tmp_path: Path) -> None:
    wheel, output = build_wheel(tmp_path, CC=str(tmp_path / "no-such-compiler"))
    assert wheel.name.endswith("-py3-none-any.whl")
    assert compiled_modules(wheel) == []
    assert "the optional C accelerator was not built" in output
    assert "pure-Python fallback" in output


def test_conveyor_no_extensions_skips_the_build(tmp_path: Path) -> None:
    wheel, output = build_wheel(tmp_path, CONVEYOR_NO_EXTENSIONS="1")
    assert wheel.name.endswith("-py3-none-any.whl")
    assert compiled_modules(wheel) == []
    assert "CONVEYOR_NO_EXTENSIONS is set" in output
