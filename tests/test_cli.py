"""The ``conveyor`` command, driven as a user drives it: in a subprocess, and in a terminal."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conveyor.cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPELINE_ERROR,
    EXIT_TERMINATED,
    EXIT_USAGE,
    INTERRUPT_GRACE,
)
from test_pipeline_helpers import WAIT
from test_progress import run_in_pty

PIPELINES = """
import itertools
import sys
import threading
import time

import conveyor as cv


def slow(x):
    time.sleep(0.002)  # the stage's work
    return x


def check(x):
    if x == 7:
        raise ValueError("seven is not allowed")
    return x


pipeline = (
    cv.Pipeline(range(200))
    .map(lambda x: x + 1, name="read")
    .map(slow, name="parse")
    .each(lambda x: None, name="write")
)


def make():
    return pipeline


failing = cv.Pipeline(range(20)).map(check, name="check")


def leave(x):
    if x == 2:
        raise SystemExit(3)
    return x


quits = cv.Pipeline(range(5)).map(leave)


def explain(x):
    if x == 1:
        raise ValueError("row 1 is malformed:\\n  a,b,,c\\n  expected 4 fields")
    return x


explains = cv.Pipeline(range(3)).map(explain)


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("its str broke")


def reject_unprintably(x):
    raise Unprintable


unprintable = cv.Pipeline(range(3)).map(reject_unprintably, name="reject")
number = 3


def needs_args(a, b):
    return pipeline


def returns_int():
    return 5


def explodes():
    raise RuntimeError("cannot build it")


_announced = threading.Event()


def announce_then_work(x):
    if not _announced.is_set():
        _announced.set()
        print("running", file=sys.stderr, flush=True)
    time.sleep(0.001)  # the stage's work
    return x


endless = cv.Pipeline(itertools.count()).map(announce_then_work, name="work")

_never = threading.Event()


def announce_then_hang(x):
    print("running", file=sys.stderr, flush=True)
    _never.wait()
    return x


stuck = cv.Pipeline(range(10)).map(announce_then_hang, name="hang")


class Counted:  # 200 items of 64 KiB; at the end, the most pulled and not yet consumed
    def __init__(self):
        self.given = self.consumed = self.peak = 0

    def __iter__(self):
        for i in range(200):
            self.given += 1
            self.peak = max(self.peak, self.given - self.consumed)
            yield bytes(64 * 1024)
        print("peak", self.peak, file=sys.stderr, flush=True)

    def consume(self, item):
        self.consumed += 1


counted = Counted()
budgeted = cv.Pipeline(counted).each(counted.consume, name="consume")
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory holding the user's pipelines module, ``pipes.py``."""
    (tmp_path / "pipes.py").write_text(PIPELINES)
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken at import')\n")
    (tmp_path / "needs_dep.py").write_text("import a_dependency_that_is_not_installed\n")
    return tmp_path


def conveyor(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m conveyor ARGS`` in ``cwd`` and wait for it."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ---------------------------------------------------------------------- help


@pytest.mark.quick
def test_version_says_whether_the_c_accelerator_is_on(tmp_path: Path) -> None:
    from conveyor.channel import ACCELERATED

    result = conveyor("--version", cwd=tmp_path)
    assert result.returncode == EXIT_OK
    assert result.stdout.startswith("conveyor ")
    state = "on" if ACCELERATED else "off, pure Python"
    assert f"C accelerator: {state}" in result.stdout


@pytest.mark.quick
def test_help_lists_the_commands_and_the_exit_codes(tmp_path: Path) -> None:
    result = conveyor("--help", cwd=tmp_path)
    assert result.returncode == EXIT_OK
    out = result.stdout
    assert "Usage: conveyor [OPTIONS] COMMAND" in out
    assert "run " in out and "demo " in out
    assert "conveyor run app.pipelines:etl" in out
    for line in (
        "0    success",
        "1    the pipeline failed",
        "2    usage error",
        "130  interrupted",
    ):
        assert line in out


@pytest.mark.quick
def test_run_help_explains_the_target_and_every_option(tmp_path: Path) -> None:
    out = conveyor("run", "--help", cwd=tmp_path).stdout
    assert "Usage: conveyor run [OPTIONS] MODULE:ATTR" in out
    for option in ("--progress / --no-progress", "--report FILE", "-w, --workers STAGE=N"):
        assert option in out
    for option in ("--stall-timeout SECONDS", "--max-bytes SIZE", "--json", "130  interrupted"):
        assert option in out


@pytest.mark.quick
def test_the_console_script_is_the_same_command(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "conveyor"
    result = subprocess.run(
        [str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == EXIT_OK
    assert result.stdout == conveyor("--help", cwd=tmp_path).stdout


# ---------------------------------------------------------------------- run


def test_run_prints_the_report_naming_the_bottleneck(project: Path) -> None:
    result = conveyor("run", "pipes:pipeline", cwd=project)
    assert result.returncode == EXIT_OK, result.stderr
    assert "200 outputs" not in result.stdout  # the sink outputs nothing
    for name in ("read", "parse", "write"):
        assert name in result.stdout
    words = " ".join(result.stdout.split())
    assert "bottleneck: stage 'parse': 1 worker at" in words
    assert "more workers would help" in words
    assert "(done)" in result.stderr  # progress, as log lines: stderr is not a terminal


def test_run_takes_a_function_that_returns_the_pipeline_and_overrides_workers(
    project: Path,
) -> None:
    result = conveyor("run", "pipes:make", "-w", "parse=3", "--json", "--no-progress", cwd=project)
    assert result.returncode == EXIT_OK, result.stderr
    data = json.loads(result.stdout)
    assert [(s["name"], s["workers"]) for s in data["stages"]] == [
        ("read", 1),
        ("parse", 3),
        ("write", 1),
    ]
    assert data["stages"][2]["items_in"] == 200
    assert result.stderr == ""


def test_run_writes_the_html_report(project: Path) -> None:
    result = conveyor("run", "pipes:pipeline", "--report", "out.html", "--no-progress", cwd=project)
    assert result.returncode == EXIT_OK, result.stderr
    html = (project / "out.html").read_text(encoding="utf-8")
    assert html.count("<svg") == 3 and "parse" in html


def test_a_stage_raising_system_exit_fails_the_run_with_its_traceback_and_one_line(
    project: Path,
) -> None:
    # The repro: `conveyor run` exited with the stage's code (3) without a word.
    result = conveyor("run", "pipes:quits", "--no-progress", cwd=project)
    assert result.returncode == EXIT_PIPELINE_ERROR, result.stderr
    assert "raise SystemExit(3)" in result.stderr
    assert "stage 'leave' (map) failed on item 2" in result.stderr
    assert result.stderr.rstrip().endswith("conveyor: the run failed: SystemExit: 3")


def test_a_failure_with_a_message_of_several_lines_ends_with_its_first_line_only(
    project: Path,
) -> None:
    # The repro: the last line repeated the whole message (on Redis, a DeadLettersError
    # with the worker's traceback in it) after the traceback had shown it.
    result = conveyor("run", "pipes:explains", "--no-progress", cwd=project)
    assert result.returncode == EXIT_PIPELINE_ERROR, result.stderr
    assert "  expected 4 fields\n" in result.stderr  # the traceback shows it whole
    last = result.stderr.rstrip().splitlines()[-1]
    assert last == "conveyor: the run failed: ValueError: row 1 is malformed: (more above)"


def test_a_report_path_that_cannot_be_written_is_a_usage_error_before_the_run(
    project: Path,
) -> None:
    # The repro: the whole run went on, then "the run failed: PermissionError"
    # with a traceback, for a report it could never write. /proc takes no new file,
    # not even root's (/sys/run.html could be written as root in a chroot without
    # /sys mounted); a path under a regular file was said to be in a directory that
    # "does not exist".
    (project / "a-file").write_text("")
    for path, said in (
        ("/proc/run.html", "/proc/run.html cannot be written"),
        (str(project / "a-file" / "run.html"), f"{project / 'a-file'} is a file, not a directory"),
    ):
        result = conveyor("run", "pipes:pipeline", "--report", path, cwd=project)
        assert result.returncode == EXIT_USAGE
        assert "Invalid value for '--report'" in result.stderr
        assert said in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--json"], []])
def test_output_that_cannot_be_written_is_one_line_not_a_traceback(
    project: Path, args: list[str]
) -> None:
    # The repro: `conveyor run ... > /dev/full` ended with click's echo raising
    # OSError: [Errno 28] No space left on device, as a raw traceback.
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "conveyor", "run", "pipes:pipeline", "--no-progress", *args],
            cwd=project,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == EXIT_PIPELINE_ERROR
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "conveyor: cannot write the output: [Errno 28] No space left on device"
    )


def test_a_failing_pipeline_exits_1_with_the_traceback_and_the_stage(project: Path) -> None:
    result = conveyor("run", "pipes:failing", cwd=project)
    assert result.returncode == EXIT_PIPELINE_ERROR
    assert "Traceback (most recent call last)" in result.stderr
    assert 'raise ValueError("seven is not allowed")' in result.stderr
    assert "conveyor: the run failed: ValueError: seven is not allowed" in result.stderr
    assert "stage 'check' (map) failed on item 7" in result.stderr  # the note, under the traceback
    assert result.stdout == ""


def test_a_failing_run_with_json_prints_its_metrics_and_error_on_stdout(project: Path) -> None:
    """Regression: ``conveyor run --json`` printed nothing on stdout when the run failed."""
    result = conveyor("run", "pipes:failing", "--json", "--no-progress", cwd=project)
    assert result.returncode == EXIT_PIPELINE_ERROR
    data = json.loads(result.stdout)
    assert data["error"] == {
        "type": "ValueError",
        "message": "seven is not allowed",
        "notes": ["conveyor: stage 'check' (map) failed on item 7"],
        "exit_code": EXIT_PIPELINE_ERROR,
    }
    (stage,) = data["stages"]  # what the run did before it failed
    assert (stage["name"], stage["failed"]) == ("check", 1)
    # stderr says what it says without --json: the traceback, then one line.
    assert "conveyor: the run failed: ValueError: seven is not allowed" in result.stderr


def test_a_failure_whose_str_raises_is_still_named_on_stderr_and_in_json(project: Path) -> None:
    # The repro: the command itself died of the user's broken __str__ ("RuntimeError:
    # its str broke" as the error, and no "the run failed" line).
    result = conveyor("run", "pipes:unprintable", "--json", "--no-progress", cwd=project)
    assert result.returncode == EXIT_PIPELINE_ERROR, result.stderr
    error = json.loads(result.stdout)["error"]
    assert (error["type"], error["message"]) == ("Unprintable", "<exception str() failed>")
    last = result.stderr.rstrip().splitlines()[-1]
    assert last == "conveyor: the run failed: Unprintable: <exception str() failed>"
    assert "its str broke" not in result.stderr


def test_a_run_that_succeeds_with_json_says_error_null(project: Path) -> None:
    result = conveyor("run", "pipes:pipeline", "--json", "--no-progress", cwd=project)
    assert result.returncode == EXIT_OK, result.stderr
    data = json.loads(result.stdout)
    assert data["error"] is None
    assert [s["name"] for s in data["stages"]] == ["read", "parse", "write"]


@pytest.mark.parametrize(
    ("args", "code", "kind"),
    [
        (["pipes:nothing"], EXIT_USAGE, "BadParameter"),
        (["pipes:pipeline", "-w", "parse=0"], EXIT_USAGE, "BadParameter"),
        (["pipes:pipeline", "--frobnicate"], EXIT_USAGE, "NoSuchOption"),
        (["pipes:pipeline", "--stall-timeout", "0"], EXIT_USAGE, "BadParameter"),
        (["pipes:explodes"], EXIT_PIPELINE_ERROR, "RuntimeError"),
        (["broken:pipeline"], EXIT_PIPELINE_ERROR, "RuntimeError"),
        (["pipes:quits"], EXIT_PIPELINE_ERROR, "SystemExit"),
    ],
)
def test_json_output_is_a_json_document_whatever_ends_the_command(
    project: Path, args: list[str], code: int, kind: str
) -> None:
    result = conveyor("run", *args, "--json", "--no-progress", cwd=project)
    assert result.returncode == code, result.stderr
    error = json.loads(result.stdout)["error"]
    assert (error["type"], error["exit_code"]) == (kind, code)
    assert error["message"]
    assert "Traceback" not in result.stdout


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("pipes:explodes", "pipes:explodes() raised RuntimeError: cannot build it"),
        ("broken:pipeline", "importing 'broken' raised RuntimeError: broken at import"),
        ("needs_dep:pipeline", "importing 'needs_dep' failed: No module named"),
    ],
)
def test_user_code_failing_while_loading_exits_1_with_its_traceback(
    project: Path, target: str, message: str
) -> None:
    result = conveyor("run", target, cwd=project)
    assert result.returncode == EXIT_PIPELINE_ERROR
    assert "Traceback (most recent call last)" in result.stderr
    assert f"Error: {message}" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pipes"], "expected MODULE:ATTR, for example app.pipelines:etl; got 'pipes'"),
        (["pipes.py:pipeline"], "give a module name, not a file: pipes:pipeline"),
        (["nowhere:pipeline"], "no module named 'nowhere'"),
        (["pipes:nothing"], "module 'pipes' has no attribute 'nothing'; pipelines in it: "),
        (["pipes:number"], "pipes:number is an int, not a conveyor.Pipeline"),
        (["pipes:needs_args"], "pipes:needs_args needs arguments (a, b)"),
        (["pipes:returns_int"], "pipes:returns_int() returned an int, not a conveyor.Pipeline"),
        (["pipes:pipeline", "-w", "parse"], "expected STAGE=N, got 'parse'"),
        (["pipes:pipeline", "-w", "parse=0"], "N must be a whole number >= 1"),
        (["pipes:pipeline", "-w", "parse=many"], "N must be a whole number >= 1"),
        (["pipes:pipeline", "-w", "nope=2"], "no stage named 'nope'; stages: 'read', 'parse'"),
        (
            ["pipes:pipeline", "-w", "parse=2000"],
            "'--workers': stage 'parse': 'workers' must be at most 1024 with runtime='thread'",
        ),
        (["pipes:pipeline", "--report", "no/such/dir/r.html"], "the directory no/such/dir does"),
        (["pipes:pipeline", "--stall-timeout", "0"], "--stall-timeout"),
        (["pipes:pipeline", "--max-bytes", "12 pc"], "'--max-bytes': '12 pc' is not a size"),
        (["pipes:pipeline", "--max-bytes", "0"], "'--max-bytes': '0' is not a size"),
        (["pipes:pipeline", "--frobnicate"], "No such option"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(
    project: Path, args: list[str], message: str
) -> None:
    result = conveyor("run", *args, cwd=project)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert "Try 'conveyor run --help' for help." in result.stderr


def test_max_bytes_gives_the_run_its_byte_budget(project: Path) -> None:
    # 256KiB over two channels (the sink's input, the output): 128 KiB, two items
    # of 64 KiB each, plus the sink's batch and the feeder's pulled item.
    result = conveyor(
        "run", "pipes:budgeted", "--no-progress", "--max-bytes", "256KiB", cwd=project
    )
    assert result.returncode == 0, result.stderr
    peak = int(result.stderr.split("peak ")[1].split()[0])
    assert peak <= 2 * 2 + 2 + 1


# ---------------------------------------------------------------------- Ctrl-C


IGNORE_SIGINT_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def start_and_wait_until_running(
    target: str, cwd: Path, *options: str, ignore_sigint: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``conveyor run TARGET [OPTIONS]`` and return once its stage said "running"
    (with ``ignore_sigint``, started as ``nohup`` starts it: SIGINT ignored)."""
    command = [sys.executable, "-m", "conveyor", "run", target, "--no-progress", *options]
    if ignore_sigint:  # a parent that ignores SIGINT, then execs
        command[1:1] = ["-c", IGNORE_SIGINT_THEN_EXEC]
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + WAIT
    while b"running" not in seen:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
        if not chunk:
            proc.kill()
            proc.communicate()
            pytest.fail(f"the run did not start: {seen!r}")
        seen += chunk
    return proc


@pytest.mark.parametrize(
    ("target", "bound"),
    [
        ("pipes:endless", 1.0),  # workers stop at once
        ("pipes:stuck", INTERRUPT_GRACE + 1.0),  # a worker never returns: exit after the grace
    ],
)
def test_sigint_exits_130_promptly(project: Path, target: str, bound: float) -> None:
    proc = start_and_wait_until_running(target, project)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT)
    took = time.monotonic() - sent
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert b"conveyor: interrupted" in err
    assert took < bound, f"took {took:.2f} s"


@pytest.mark.timeout(60)
def test_a_run_started_with_sigint_ignored_leaves_it_ignored(project: Path) -> None:
    """Regression: `conveyor run` under ``nohup`` (SIGINT ignored by its parent) put
    its own Ctrl-C handler in, so a SIGINT meant for others stopped the run."""
    proc = start_and_wait_until_running("pipes:endless", project, ignore_sigint=True)
    proc.send_signal(signal.SIGINT)  # ignored: the SIGTERM after it is what stops the run
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == EXIT_TERMINATED, err
    assert b"interrupted" not in err
    assert b"terminated (SIGTERM)" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_run_still_prints_its_report_of_what_it_did(project: Path, sig: int) -> None:
    """Regression: `conveyor run` stopped by Ctrl-C or SIGTERM printed nothing on stdout,
    where ``--json`` gives what the run did: the text report comes too, saying the run
    was stopped before the end."""
    proc = start_and_wait_until_running("pipes:endless", project)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=WAIT)
    code = EXIT_INTERRUPTED if sig == signal.SIGINT else EXIT_TERMINATED
    assert proc.returncode == code, err
    text = out.decode()
    assert "work" in text  # the stage's row
    assert "stopped before the end" in text
    assert b"Traceback" not in err


@pytest.mark.parametrize("target", ["pipes:endless", "pipes:stuck"])
def test_sigint_with_json_still_prints_a_json_document_naming_the_interruption(
    project: Path, target: str
) -> None:
    """Regression: ``--json`` printed nothing on stdout when the run ended otherwise
    than well, the stuck run's exit after the grace included."""
    proc = start_and_wait_until_running(target, project, "--json")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == EXIT_INTERRUPTED, err
    data = json.loads(out)
    assert data["error"]["type"] == "KeyboardInterrupt"
    assert data["error"]["exit_code"] == EXIT_INTERRUPTED
    if target == "pipes:endless":  # stopped in time: what the run did comes with it
        assert [s["name"] for s in data["stages"]] == ["work"]
        assert data["stopped"] is True


@pytest.mark.parametrize("target", ["pipes:endless", "pipes:stuck"])
def test_sigterm_stops_the_run_writes_its_report_and_json_and_exits_143(
    project: Path, target: str, tmp_path: Path
) -> None:
    """Regression: SIGTERM (`docker stop`, `kill`) ended `conveyor run` at once: no
    report, no JSON on stdout, whatever the docs promise for "whatever ends it"."""
    report = tmp_path / "run.html"
    proc = start_and_wait_until_running(target, project, "--json", "--report", str(report))
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=WAIT)
    assert time.monotonic() - sent < INTERRUPT_GRACE + 1.0
    assert proc.returncode == EXIT_TERMINATED, err
    assert b"conveyor: terminated (SIGTERM), stopping the run" in err
    error = json.loads(out)["error"]
    assert (error["type"], error["exit_code"]) == ("SIGTERM", EXIT_TERMINATED)
    if target == "pipes:endless":  # stopped in time: its report and what it did
        assert report.exists()
        assert json.loads(out)["stopped"] is True


def test_ctrl_c_before_the_run_is_attached_still_stops_it() -> None:
    """Regression: a Ctrl-C between the run's start and the handler's install
    raised KeyboardInterrupt and left the run going (the exit then waited for
    its stuck worker); the handler is now installed before the run starts."""
    from conveyor.cli import _ctrl_c_stops

    stopped = threading.Event()

    class Handle:
        def stop(self) -> None:
            stopped.set()

    with _ctrl_c_stops(grace=600) as ctrl_c:  # a grace that never ends this test
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler)
        handler(signal.SIGINT, None)  # Ctrl-C, before the run is attached
        assert ctrl_c.interrupted.is_set() and not stopped.is_set()
        ctrl_c.attach(Handle())  # type: ignore[arg-type]
        assert stopped.is_set()
    assert signal.getsignal(signal.SIGINT) is not handler  # the previous handler is back


# ---------------------------------------------------------------------- a terminal


def test_run_in_a_terminal_draws_the_live_table(project: Path) -> None:
    code, out = run_in_pty(
        [sys.executable, "-m", "conveyor", "run", "pipes:pipeline"], project, timeout=WAIT * 3
    )
    assert code == EXIT_OK, out
    assert "\x1b[?25l" in out  # a rich live display
    assert "stage  workers" in out and "items/s" in out
    for name in ("read", "parse", "write"):
        assert name in out
    assert "200/200 items in (100%)" in out
    assert "bottleneck: stage 'parse'" in " ".join(out.split())  # the report after the table


# ---------------------------------------------------------------------- demo


def test_the_demo_runs_quickly_and_names_the_bottleneck(tmp_path: Path) -> None:
    started = time.monotonic()
    result = conveyor("demo", cwd=tmp_path)
    took = time.monotonic() - started
    assert result.returncode == EXIT_OK, result.stderr
    assert "bottleneck: stage " in result.stdout
    assert took < 5.0, f"the demo took {took:.1f} s"
