"""nox sessions: conveyor's tests on every supported Python version.

    nox                      # the quick tests on each supported Python found here
    nox -s quick -p 3.12     # one version
    nox -s tests             # the full suite on each supported Python found here

scripts/test.sh runs the `quick` session on every supported version other than
the one of .venv that this machine has (`python noxfile.py VERSION...` prints
those), and the quick tests on the others that scripts/pythons.sh provides
(3.14 and 3.15, in a Debian chroot). The supported versions are those of
pyproject.toml's classifiers. An interpreter this machine lacks is skipped here
with a message, never downloaded. Each session's virtualenv is kept and reused; the project is
reinstalled into it only when pyproject.toml or the C accelerator's source
changes (an editable install compiles it for that session's Python).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYPROJECT_PATH = ROOT / "pyproject.toml"
SPEEDUPS_SOURCE = ROOT / "src" / "conveyor" / "_speedups.c"
PYTHON_VERSIONS: list[str] = nox.project.python_versions(nox.project.load_toml(PYPROJECT_PATH))
# The extras each session installs: the dev tools plus every optional backend,
# as in .venv, so that tests behave the same on every version; the full suite
# also runs the examples (the crawler's HTTP client) and builds the docs site.
EXTRAS = "all,dev"
FULL_EXTRAS = "all,dev,docs,examples"
STAMP_NAME = ".conveyor-install-stamp"

nox.options.sessions = ["quick"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False
if hasattr(nox.options, "download_python"):  # nox >= 2025.10.14
    nox.options.download_python = "never"  # a missing interpreter is skipped, not fetched


def _runs(command: str, env: dict[str, str] | None = None) -> bool:
    """Whether `command -c pass` works (a pyenv shim for an inactive version fails)."""
    try:
        result = subprocess.run(
            [command, "-c", "pass"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _pyenv_current() -> list[str]:
    """The versions pyenv selects now (PYENV_VERSION, .python-version, global)."""
    if os.environ.get("PYENV_VERSION"):
        return os.environ["PYENV_VERSION"].split(":")
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return []
    try:
        out = subprocess.run(
            [pyenv, "version-name"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [v for v in out.strip().split(":") if v]


def _expose_pyenv_versions(versions: list[str]) -> None:
    """Make pyenv's shims answer for every wanted version pyenv has installed.

    pyenv puts a `python3.X` shim on PATH for each installed version, but the
    shim fails unless that version is selected; selecting them all through
    PYENV_VERSION (current version first) lets nox find each of them.
    """
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    installed = root / "versions"
    if not installed.is_dir():
        return
    extra: list[str] = []
    for version in versions:
        if _runs(f"python{version}"):
            continue
        pattern = re.compile(rf"{re.escape(version)}\.(\d+)")
        candidates = sorted(
            (int(m.group(1)), d.name)
            for d in installed.iterdir()
            if (m := pattern.fullmatch(d.name)) and (d / "bin" / f"python{version}").exists()
        )
        if candidates:
            extra.append(candidates[-1][1])
    if not extra:
        return
    current = _pyenv_current()
    selected = current + [v for v in extra if v not in current]
    env = {**os.environ, "PYENV_VERSION": ":".join(selected)}
    if all(_runs(f"python{v.rsplit('.', 1)[0]}", env) for v in extra):
        os.environ["PYENV_VERSION"] = env["PYENV_VERSION"]


def available(versions: list[str]) -> list[str]:
    """The ``versions`` whose ``python3.X`` runs here (pyenv's included)."""
    return [v for v in versions if _runs(f"python{v}")]


def _report_missing(versions: list[str]) -> None:
    found = available(versions)
    missing = [v for v in versions if v not in found]
    if missing:
        names = ", ".join(f"python{v}" for v in missing)
        print(
            f"nox: {names} not found on this machine: their sessions will be skipped"
            " (scripts/pythons.sh runs the quick tests on 3.14 and 3.15 in a Debian chroot).",
            file=sys.stderr,
        )


_expose_pyenv_versions(PYTHON_VERSIONS)
if __name__ == "__main__":  # `python noxfile.py 3.12 3.14`: those of them this machine runs
    print(" ".join(available(sys.argv[1:] or PYTHON_VERSIONS)))
else:
    _report_missing(PYTHON_VERSIONS)


def _install_project(session: nox.Session, extras: str = EXTRAS) -> None:
    """Install conveyor (editable) with ``extras``, unless this venv already has it."""
    location = getattr(session.virtualenv, "location", None)
    stamp = Path(location) / STAMP_NAME if location else None
    key = hashlib.sha256(
        PYPROJECT_PATH.read_bytes() + SPEEDUPS_SOURCE.read_bytes() + extras.encode()
    ).hexdigest()
    if stamp is not None and stamp.is_file() and stamp.read_text().strip() == key:
        session.log(f"conveyor[{extras}] is already installed in this virtualenv")
        return
    session.install("--disable-pip-version-check", "-e", f".[{extras}]")
    if stamp is not None:
        stamp.write_text(key + "\n")


@nox.session(python=PYTHON_VERSIONS, reuse_venv=True)
def quick(session: nox.Session) -> None:
    """The quick tests (pytest -m quick)."""
    _install_project(session)
    session.run("pytest", "-m", "quick", *session.posargs)


@nox.session(python=PYTHON_VERSIONS, reuse_venv=True)
def tests(session: nox.Session) -> None:
    """The full test suite."""
    _install_project(session, FULL_EXTRAS)
    session.run("pytest", *session.posargs)
