"""scripts/pythons.sh, which provides Python 3.14 and 3.15 in a Debian chroot.

Building the chroot is what scripts/test.sh does (and measures) on every run;
these tests pin what it does where it cannot or must not build one: it says
why, skips without failing the suite, and creates nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A copy of scripts/ that any user can read (pytest's own tmp folders are root's only)."""
    base = Path(tempfile.mkdtemp(prefix="conveyor-scripts-"))
    try:
        folder = Path(shutil.copytree(ROOT / "scripts", base / "scripts"))
        for path in (base, folder, *folder.iterdir()):
            path.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base)


def pythons_sh(
    checkout: Path, *args: str, cache: Path, as_user: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run scripts/pythons.sh ARGS with its chroot under ``cache``, as root or not."""
    command = ["bash", str(checkout / "scripts" / "pythons.sh"), *args]
    if as_user and os.geteuid() == 0:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cache),
        "CONVEYOR_CHROOT": str(cache / "forky"),
    }
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=30, check=False, cwd="/"
    )


@pytest.fixture
def cache(checkout: Path) -> Path:
    """An empty cache folder that the unprivileged user can write to."""
    folder = checkout / "cache"
    folder.mkdir()
    if os.geteuid() == 0:
        os.chown(folder, NOBODY, NOBODY)
    return folder


def test_a_version_the_chroot_does_not_provide_is_skipped_with_a_message(
    checkout: Path, cache: Path
) -> None:
    result = pythons_sh(checkout, "quick", "3.9", cache=cache)
    assert result.returncode == 0, result.stderr
    assert (
        "Python 3.9: not on this machine and not provided by the chroot (3.14 3.15): skipped."
        in result.stdout
    )
    assert not (cache / "forky").exists()


def test_without_root_the_quick_tests_of_the_chroot_are_skipped_saying_why(
    checkout: Path, cache: Path
) -> None:
    result = pythons_sh(checkout, "quick", cache=cache, as_user=True)
    assert result.returncode == 0, result.stderr
    assert "Python 3.14 3.15: skipped: building and entering the Debian chroot needs root" in (
        result.stdout
    )
    assert list(cache.iterdir()) == []


def test_without_root_a_shell_in_the_chroot_fails_saying_why(checkout: Path, cache: Path) -> None:
    result = pythons_sh(checkout, "shell", "3.14", "--", "true", cache=cache, as_user=True)
    assert result.returncode == 1
    assert "error: building and entering the Debian chroot needs root" in result.stderr
    assert list(cache.iterdir()) == []


def test_a_shell_on_a_version_the_chroot_does_not_provide_fails_naming_the_versions(
    checkout: Path, cache: Path
) -> None:
    result = pythons_sh(checkout, "shell", "3.12", cache=cache)
    assert result.returncode == 1
    assert "error: Python 3.12 is not one of the chroot's (3.14 3.15)" in result.stderr


def test_an_unknown_command_prints_the_usage_and_fails(checkout: Path, cache: Path) -> None:
    result = pythons_sh(checkout, "frobnicate", cache=cache)
    assert result.returncode == 2
    assert "scripts/pythons.sh shell VERSION [-- COMMAND...]" in result.stderr
