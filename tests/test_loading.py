"""Finding a pipeline by name (``conveyor.loading``), and the layers around it.

The library finds a pipeline for the CLI and for workers: its errors are
conveyor's own, and it never imports the command line; the commands turn
them into usage errors (exit code 2) and failures of the user's code (exit
code 1, with the traceback).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import conveyor as cv
import conveyor.cli
from conveyor.loading import PipelineLoadError, load_pipeline, parse_overrides

pytestmark = pytest.mark.quick

MODULE = """
import conveyor as cv

pipeline = cv.Pipeline(range(3)).map(str, name="show")
number = 3


def make():
    return pipeline


def explodes():
    raise RuntimeError("cannot build it")


def refuses():
    return cv.Pipeline(range(3)).map(str, workers=0)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The current directory holds the user's modules; they are forgotten after the test."""
    (tmp_path / "loading_pipes.py").write_text(MODULE)
    (tmp_path / "loading_broken.py").write_text("raise RuntimeError('broken at import')\n")
    # The user's module itself builds a bad stage: conveyor's own error, from user code.
    (tmp_path / "loading_bad_stage.py").write_text(
        "import conveyor as cv\npipeline = cv.Pipeline([1]).map(str, workers=0)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("loading_pipes", "loading_broken", "loading_bad_stage"):
        sys.modules.pop(name, None)


def test_a_pipeline_or_a_function_returning_one_is_found_by_name(project: Path) -> None:
    found = load_pipeline("loading_pipes:pipeline")
    assert isinstance(found, cv.Pipeline)
    assert load_pipeline("loading_pipes:make") is found
    assert [s.name for s in found.stages] == ["show"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("loading_pipes", "expected MODULE:ATTR"),
        ("loading_pipes.py:pipeline", "give a module name, not a file: loading_pipes:pipeline"),
        ("nowhere_at_all:pipeline", "no module named 'nowhere_at_all'"),
        ("loading_pipes:nothing", "has no attribute 'nothing'; pipelines in it: pipeline"),
        ("loading_pipes:number", "loading_pipes:number is an int, not a conveyor.Pipeline"),
    ],
)
def test_a_bad_name_is_a_configuration_error(project: Path, path: str, message: str) -> None:
    with pytest.raises(cv.ConfigurationError, match=message):
        load_pipeline(path)


@pytest.mark.parametrize(
    ("path", "message", "cause"),
    [
        ("loading_pipes:explodes", "loading_pipes:explodes() raised RuntimeError", RuntimeError),
        ("loading_broken:pipeline", "importing 'loading_broken' raised RuntimeError", RuntimeError),
        ("loading_pipes:refuses", "refuses() raised ConfigurationError", cv.ConfigurationError),
        ("loading_bad_stage:pipeline", "importing 'loading_bad_stage' raised", ValueError),
    ],
)
def test_user_code_failing_is_a_load_error_with_the_users_exception_as_cause(
    project: Path, path: str, message: str, cause: type[BaseException]
) -> None:
    with pytest.raises(PipelineLoadError, match=re.escape(message)) as info:
        load_pipeline(path)
    assert isinstance(info.value.__cause__, cause)
    # Not a ConfigurationError itself, even when the user's code raised one:
    # the command line must not take the user's bug for a bad command.
    assert not isinstance(info.value, cv.ConfigurationError)


def test_overrides_are_parsed_or_refused_naming_the_value() -> None:
    assert parse_overrides(["parse=8", "a=b=2"]) == [("parse", 8), ("a=b", 2)]
    for bad, message in [("parse", "expected STAGE=N"), ("parse=0", "N must be a whole number")]:
        with pytest.raises(cv.ConfigurationError, match=message):
            parse_overrides([bad])


def test_an_override_naming_a_stage_twice_is_refused_naming_both_values() -> None:
    # Repro: `--workers parse=2 --workers parse=3` ran with 3, silently.
    message = "stage 'parse' is given twice ('parse=2' and 'parse=3'): give each stage once"
    with pytest.raises(cv.ConfigurationError, match=re.escape(message)):
        parse_overrides(["parse=2", "show=1", "parse=3"])
    result = CliRunner().invoke(
        conveyor.cli.cli, ["run", "x:y", "--workers", "parse=2", "--workers", "parse=3"]
    )
    assert result.exit_code == conveyor.cli.EXIT_USAGE, result.output
    assert message in result.stderr and "Traceback" not in result.stderr


def test_the_cli_re_exports_load_pipeline() -> None:
    assert conveyor.cli.load_pipeline is load_pipeline


def test_the_library_imports_neither_its_command_line_nor_click() -> None:
    code = (
        "import sys, conveyor, conveyor.loading, conveyor.redis\n"
        "cv = conveyor\n"
        "cv.Pipeline(range(3)).map(str).run().report()\n"
        "print(sorted(m for m in sys.modules if m in ('click', 'conveyor.cli', "
        "'conveyor.redis.cli')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_text_report_does_not_need_the_html_report_module() -> None:
    code = (
        "import sys, conveyor.metrics as m\n"
        "r = m.RunResult(stats=[])\n"
        "assert 'bottleneck: none clear' in r.report()\n"
        "print('conveyor.report' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- the commands


@pytest.fixture(autouse=True)
def _logger_kept(conveyor_logger_kept: None) -> None:
    """Every test of this module leaves the ``conveyor`` logger as it found it."""


def test_every_command_shows_user_code_failing_while_loading_with_exit_1(project: Path) -> None:
    # `status` fails before it connects: the port is never used.
    for target in ("loading_broken:pipeline", "loading_pipes:refuses"):
        result = CliRunner().invoke(
            conveyor.cli.cli, ["status", target, "--redis", "redis://127.0.0.1:9"]
        )
        assert result.exit_code == conveyor.cli.EXIT_PIPELINE_ERROR, result.output
        assert "Traceback (most recent call last)" in result.stderr
        assert "Error: " in result.stderr and "raised" in result.stderr


def test_a_bad_name_or_override_in_a_distributed_command_is_a_usage_error(project: Path) -> None:
    for args in (
        ["status", "nowhere_at_all:pipeline"],
        ["worker", "loading_pipes:pipeline", "--workers", "show=none"],
    ):
        result = CliRunner().invoke(conveyor.cli.cli, [*args, "--redis", "redis://127.0.0.1:9"])
        assert result.exit_code == conveyor.cli.EXIT_USAGE, result.output
        assert "Traceback" not in result.stderr
