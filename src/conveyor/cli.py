"""The ``conveyor`` command.

One function per command, registered on the `cli` group. Commands that take
a pipeline share `load_pipeline` (find it by ``MODULE:ATTR``) and
`apply_overrides` (``--workers STAGE=N``), and end with one of the exit
codes below.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from .metrics import RunResult
    from .pipeline import Pipeline, RunHandle

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PIPELINE_ERROR",
    "EXIT_USAGE",
    "PipelineCodeError",
    "apply_overrides",
    "cli",
    "load_pipeline",
    "main",
]

EXIT_OK = 0  # the run finished (items given up on with on_error="skip" are in the report)
EXIT_PIPELINE_ERROR = 1  # a stage or the source raised, or the pipeline's module failed to load
EXIT_USAGE = 2  # bad command line: unknown option, bad MODULE:ATTR, bad override (click's code)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + signal 2, what shells report for it

INTERRUPT_GRACE = 1.0
"""Seconds Ctrl-C waits for the run to stop and write its report before exiting anyway."""
SIGNAL_CHECK = 0.05
"""Seconds between two looks for a pending Ctrl-C while the command waits for a run."""

log = logging.getLogger("conveyor")


class PipelineCodeError(click.ClickException):
    """Raised when the user's code fails while the pipeline is being loaded.

    Importing its module, or calling the function that builds it, raised.
    Shown with the original traceback; exits with `EXIT_PIPELINE_ERROR`.
    """

    exit_code = EXIT_PIPELINE_ERROR

    def __init__(self, message: str, error: BaseException) -> None:
        super().__init__(message)
        self.error = error

    def show(self, file: Any = None) -> None:
        _print_exception(self.error)
        click.echo(f"Error: {self.message}", err=True)


# ---------------------------------------------------------------------- loading pipelines


def load_pipeline(path: str) -> Pipeline[Any]:
    """Return the pipeline named by ``path``, ``MODULE:ATTR``, as a user wrote it.

    ``ATTR`` (dots allowed: ``obj.attr``) is a `conveyor.Pipeline`, or a
    function that takes no argument and returns one. The current directory
    comes first on ``sys.path``, as with ``python -m``.

    Raises:
        click.BadParameter: ``path`` is malformed, the module does not exist,
            the attribute is missing or is not a pipeline (exit code 2).
        PipelineCodeError: importing the module or calling the function
            raised (exit code 1).
    """
    from .pipeline import Pipeline

    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise _bad_target(f"expected MODULE:ATTR, for example app.pipelines:etl; got {path!r}")
    if module_name.endswith(".py"):
        suggestion = module_name[:-3].replace("/", ".").replace(os.sep, ".")
        raise _bad_target(f"give a module name, not a file: {suggestion}:{attr_path}")
    module = _import(module_name)
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise _bad_target(_missing_attribute(module, module_name, attr_path)) from None
    if isinstance(target, Pipeline):
        return target
    if not callable(target):
        raise _bad_target(
            f"{path} is {_a_type(target)}, not a conveyor.Pipeline or a function returning one"
        )
    _check_no_arguments(target, path)
    try:
        made = target()
    except Exception as exc:
        raise PipelineCodeError(f"{path}() raised {type(exc).__name__}: {exc}", exc) from exc
    if not isinstance(made, Pipeline):
        raise _bad_target(f"{path}() returned {_a_type(made)}, not a conveyor.Pipeline")
    return made


def _a_type(value: object) -> str:
    """``an int``, ``a str``: the type of ``value`` with its article."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _bad_target(message: str) -> click.BadParameter:
    return click.BadParameter(message, param_hint="'MODULE:ATTR'")


def _import(module_name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise _bad_target(
                f"no module named {missing!r} (looked in {cwd} and on sys.path)"
            ) from None
        raise PipelineCodeError(f"importing {module_name!r} failed: {exc}", exc) from exc
    except Exception as exc:
        raise PipelineCodeError(
            f"importing {module_name!r} raised {type(exc).__name__}: {exc}", exc
        ) from exc


def _missing_attribute(module: ModuleType, module_name: str, attr_path: str) -> str:
    from .pipeline import Pipeline

    found = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, Pipeline) and not name.startswith("_")
    )
    hint = f"; pipelines in it: {', '.join(found)}" if found else ""
    return f"module {module_name!r} has no attribute {attr_path!r}{hint}"


def _check_no_arguments(fn: Any, path: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: let the call tell
    required = [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise _bad_target(
            f"{path} needs arguments ({', '.join(required)}); conveyor calls it with none"
        )


def parse_overrides(values: Sequence[str]) -> list[tuple[str, int]]:
    """Parse ``STAGE=N`` options into (stage, workers) pairs.

    Raises:
        click.BadParameter: a value is not ``STAGE=N`` with N a whole number >= 1.
    """
    pairs = []
    for value in values:
        stage, sep, number = value.rpartition("=")
        if not sep or not stage:
            raise click.BadParameter(f"expected STAGE=N, got {value!r}", param_hint="'--workers'")
        try:
            workers = int(number)
        except ValueError:
            workers = 0
        if workers < 1:
            raise click.BadParameter(
                f"N must be a whole number >= 1, got {value!r}", param_hint="'--workers'"
            )
        pairs.append((stage, workers))
    return pairs


def apply_overrides(pipeline: Pipeline[Any], overrides: Sequence[tuple[str, int]]) -> Pipeline[Any]:
    """Return ``pipeline`` with each named stage's workers changed.

    Raises:
        click.BadParameter: no stage has that name, or the stage refuses the value.
    """
    from .errors import ConfigurationError

    for stage, workers in overrides:
        try:
            pipeline = pipeline.with_stage(stage, workers=workers)
        except ConfigurationError as exc:
            raise click.BadParameter(str(exc), param_hint="'--workers'") from None
    return pipeline


# ---------------------------------------------------------------------- the commands

_EPILOG = """\b
Exit codes:
  0    success
  1    the pipeline failed (a stage or the source raised)
  2    usage error (bad option, MODULE:ATTR or override)
  130  interrupted (Ctrl-C)
"""


def _version_message() -> str:
    from .channel import ACCELERATED

    accelerator = "on" if ACCELERATED else "off, pure Python"
    return f"%(prog)s %(version)s (Python {sys.version.split()[0]}, C accelerator: {accelerator})"


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.version_option(package_name="conveyor", message=_version_message())
def cli() -> None:
    """conveyor: producer-consumer pipelines over bounded channels.

    Run a pipeline defined in your code, watch it live, and see which stage
    holds it back:

    \b
      conveyor run app.pipelines:etl --workers parse=8 --report run.html
      conveyor demo
    """


@cli.command("run", epilog=_EPILOG, short_help="Run a pipeline and report on each stage.")
@click.argument("target", metavar="MODULE:ATTR")
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Live per-stage table on stderr (on a terminal; log lines elsewhere).",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write a self-contained HTML report (charts, bottleneck, errors) to FILE.",
)
@click.option(
    "--workers",
    "-w",
    multiple=True,
    metavar="STAGE=N",
    help="Run stage STAGE with N workers instead of its own setting. Repeatable.",
)
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Log who holds which item, with stacks, when nothing moves for SECONDS.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the run's metrics as JSON on stdout instead of the table.",
)
@click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    help="Run on Redis Streams: `conveyor worker` processes anywhere serve the stages.",
)
@click.option("--run-id", metavar="ID", help="With --redis: the run's id (resumes that run).")
def run_command(
    target: str,
    progress: bool,
    report: Path | None,
    workers: tuple[str, ...],
    stall_timeout: float | None,
    as_json: bool,
    redis_url: str | None = None,
    run_id: str | None = None,
) -> None:
    """Run the pipeline MODULE:ATTR to the end and print its per-stage report.

    MODULE:ATTR names a conveyor.Pipeline, or a function without arguments
    that returns one, e.g. app.pipelines:etl; the current directory is
    searched first, as with python -m. The report names the stage that
    limits throughput and what would help.
    """
    _log_to_stderr()
    try:
        overrides = parse_overrides(workers)
        pipeline = apply_overrides(load_pipeline(target), overrides)
        _check_report_dir(report)
        if redis_url is not None:
            result = _run_on_redis(pipeline, redis_url, run_id, progress, report, stall_timeout)
            click.echo(result.to_json() if as_json else result.report().rstrip())
            return
        # Ctrl-C is taken over before the run starts: one pressed as it starts
        # must stop it, not raise KeyboardInterrupt past a run left going.
        with _ctrl_c_stops() as ctrl_c:
            handle = _start(pipeline, progress, report, stall_timeout)
            ctrl_c.attach(handle)
            try:
                result = _wait_for(handle)
            except Exception as exc:
                if ctrl_c.interrupted.is_set():
                    sys.exit(EXIT_INTERRUPTED)
                _exit_run_failed(exc)
        if ctrl_c.interrupted.is_set():
            sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # before the run started
        click.echo("conveyor: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(result.to_json() if as_json else result.report(_output_width()).rstrip())


def _exit_run_failed(exc: BaseException) -> NoReturn:
    """Show why the run failed (its traceback, then one line) and exit with 1."""
    _print_exception(exc)
    click.echo(f"conveyor: the run failed: {type(exc).__name__}: {exc}", err=True)
    sys.exit(EXIT_PIPELINE_ERROR)


def _check_report_dir(report: Path | None) -> None:
    if report is not None and not report.parent.is_dir():
        raise click.BadParameter(
            f"the directory {report.parent} does not exist", param_hint="'--report'"
        )


def _run_on_redis(
    pipeline: Pipeline[Any],
    url: str,
    run_id: str | None,
    progress: bool,
    report: Path | None,
    stall_timeout: float | None,
) -> RunResult:
    """``conveyor run --redis``: drive the run; a failed run exits as a local one does."""
    from .redis.cli import run_on_redis

    if stall_timeout is not None:
        raise click.UsageError(
            "--stall-timeout applies to runs in this process, not with --redis: "
            "`conveyor status` shows where a distributed run stands"
        )
    try:
        result: RunResult = run_on_redis(
            pipeline, url, run_id=run_id, progress=progress, report=report
        )
    except (click.ClickException, KeyboardInterrupt):
        raise
    except Exception as exc:
        _exit_run_failed(exc)
    return result


def _output_width() -> int:
    """The terminal's width when stdout is one; else wide enough for any table."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else 130


def _start(
    pipeline: Pipeline[Any], progress: bool, report: Path | None, stall_timeout: float | None
) -> RunHandle:
    from .errors import ConfigurationError

    try:
        return pipeline.start(progress=progress, report=report, stall_timeout=stall_timeout)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None


def _wait_for(handle: RunHandle) -> RunResult:
    """``handle.join()``, in short steps so that Ctrl-C is always seen promptly.

    The kernel may deliver SIGINT to any thread; Python runs the handler in
    the main thread only when that thread wakes up, which a wait without a
    timeout may never do.
    """
    while True:
        try:
            return handle.join(SIGNAL_CHECK)
        except TimeoutError:
            continue


class _CtrlC:
    """What Ctrl-C does while `conveyor run` runs: stop the run, exit 130.

    A worker stuck in user code cannot be interrupted: if the run has not
    ended within ``grace`` seconds, or at a second Ctrl-C, the process exits
    at once (its worker threads are daemons that cannot be joined).
    """

    def __init__(self, grace: float) -> None:
        self.interrupted = threading.Event()
        self.deadline = threading.Timer(grace, _exit_interrupted)
        self.deadline.daemon = True
        self._handle: RunHandle | None = None

    def attach(self, handle: RunHandle) -> None:
        """The run to stop, once started; stopped at once if Ctrl-C came first."""
        self._handle = handle
        if self.interrupted.is_set():
            handle.stop()  # the handler may have seen it too: stop() is idempotent

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted.is_set():
            _exit_interrupted()
        self.interrupted.set()
        click.echo("conveyor: interrupted, stopping the run", err=True)
        self.deadline.start()
        if self._handle is not None:
            self._handle.stop()


@contextlib.contextmanager
def _ctrl_c_stops(grace: float = INTERRUPT_GRACE) -> Iterator[_CtrlC]:
    """While inside, Ctrl-C stops the attached run instead of raising KeyboardInterrupt."""
    ctrl_c = _CtrlC(grace)
    if threading.current_thread() is not threading.main_thread():
        yield ctrl_c  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGINT, ctrl_c.on_sigint)
    try:
        yield ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)
        ctrl_c.deadline.cancel()


def _exit_interrupted() -> NoReturn:
    """Leave now with `EXIT_INTERRUPTED`, without waiting for stuck worker threads."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _add_redis_commands() -> None:
    from .redis.cli import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_add_redis_commands()


@cli.command(short_help="Show conveyor at work, and a bottleneck found.")
def demo() -> None:
    """Show conveyor at work: the classic producer-consumer scenario, then a
    pipeline with a deliberately slow stage and the report naming it."""
    from .demo import run_demo

    raise SystemExit(run_demo())


# ---------------------------------------------------------------------- helpers


def _log_to_stderr() -> None:
    """Show the library's progress lines and warnings (logger ``conveyor``) on stderr."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def _print_exception(exc: BaseException) -> None:
    click.echo("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), err=True)


def main() -> None:
    """Entry point of the ``conveyor`` console script and of ``python -m conveyor``."""
    cli(prog_name="conveyor")
