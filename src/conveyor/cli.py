"""The ``conveyor`` command.

One function per command, registered on the `cli` group. Commands that take
a pipeline find it with `conveyor.loading` (``MODULE:ATTR``, ``--workers
STAGE=N``), library code that knows nothing of click: its errors become usage
errors here, and the group turns the user's code failing while a pipeline
loads into `PipelineCodeError`, for every command. Each command ends with one
of the exit codes below.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import click

from .cliparams import (
    BYTE_SIZE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    JSON_PARTIAL,
    NAME,
    REDIS_URL,
    SECONDS,
    JsonCommand,
    echo_error_document,
)
from .errors import BackendError, BackendUnavailable, ConfigurationError, DeadLettersError

# load_pipeline is in __all__ too: callers of conveyor.cli.load_pipeline keep working.
from .loading import PipelineLoadError, load_pipeline, parse_overrides
from .redis.cli import (
    COMMANDS,
    DEFAULT_CONNECT_TIMEOUT,
    EXIT_PIPELINE_ERROR,
    EXIT_REDIS_UNREACHABLE,
    RedisRefused,
    RedisUnreachable,
    RunCannotGoOn,
    connection_options,
    exit_failed,
    print_exception,
    redis_answer,
    refused_by_redis,
)

if TYPE_CHECKING:
    from .backends import BackgroundRun
    from .metrics import RunResult
    from .pipeline import Pipeline, RunHandle

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PIPELINE_ERROR",
    "EXIT_REDIS_UNREACHABLE",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "PipelineCodeError",
    "apply_overrides",
    "cli",
    "load_pipeline",
    "main",
]

EXIT_OK = 0  # the run finished (items given up on with on_error="skip" are in the report)
# EXIT_PIPELINE_ERROR = 1: a stage or the source raised, the pipeline's module failed to load,
# or a worker's hook (on_start, on_stop) raised
EXIT_USAGE = 2  # bad command line: unknown option, bad MODULE:ATTR, bad override (click's code)
# EXIT_INTERRUPTED = 130: Ctrl-C (SIGINT): 128 + signal 2, what shells report for it
# EXIT_TERMINATED = 143: SIGTERM (docker stop, kill): 128 + signal 15, handled as Ctrl-C is
# EXIT_REDIS_UNREACHABLE = 3: Redis could not be reached, or was lost, for --connect-timeout

INTERRUPT_GRACE = 1.0
"""Seconds Ctrl-C waits for the run to stop and write its report before exiting anyway."""
REDIS_INTERRUPT_GRACE = 3.0
"""As `INTERRUPT_GRACE`, for ``--redis``: the driver also stops its local workers and
reads the run's counters from Redis before its report."""
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
        print_exception(self.error)
        click.echo(f"Error: {self.message}", err=True)


# ---------------------------------------------------------------------- loading pipelines


def _load(target: str) -> Pipeline[Any]:
    """`load_pipeline`, a bad ``MODULE:ATTR`` as a usage error (exit code 2).

    When the user's code raises, `PipelineLoadError` goes up to the group,
    which shows it as a `PipelineCodeError` (exit code 1).
    """
    try:
        return load_pipeline(target)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'MODULE:ATTR'") from None


def _overrides(values: Sequence[str]) -> list[tuple[str, int]]:
    """`parse_overrides`, a malformed ``STAGE=N`` as a usage error (exit code 2)."""
    try:
        return parse_overrides(values)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--workers'") from None


def apply_overrides(pipeline: Pipeline[Any], overrides: Sequence[tuple[str, int]]) -> Pipeline[Any]:
    """Return ``pipeline`` with each named stage's workers changed.

    Raises:
        click.BadParameter: no stage has that name, or the stage refuses the value.
    """
    for stage, workers in overrides:
        if any(s.name == stage and s.kind == "batch" for s in pipeline.stages):
            # with_stage() would refuse the keyword itself, a TypeError.
            raise click.BadParameter(
                f"stage {stage!r} is a batch stage, which has one worker; give the "
                "workers of a map, filter, flat_map or each stage",
                param_hint="'--workers'",
            )
        try:
            pipeline = pipeline.with_stage(stage, workers=workers)
        except ConfigurationError as exc:
            raise click.BadParameter(_about_stage(stage, exc), param_hint="'--workers'") from None
    return pipeline


def _about_stage(stage: str, exc: ConfigurationError) -> str:
    """``with_stage()``'s message as the command line speaks: of the stage, not a method
    the user did not call."""
    message = str(exc).removeprefix("with_stage() 'name': ")
    prefix = f"with_stage({stage!r}) "
    if message.startswith(prefix):
        return f"stage {stage!r}: {message.removeprefix(prefix)}"
    return message


# ---------------------------------------------------------------------- the commands

_EPILOG = """\b
Exit codes:
  0    success (a worker: also stopped by SIGTERM or Ctrl-C, while
       starting too)
  1    the pipeline failed (a stage or the source raised)
  2    usage error (bad option, MODULE:ATTR or override)
  3    Redis could not be reached, or was lost, for --connect-timeout
       (one line naming the URL and the cause; --debug adds the traceback)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
"""


def _version_message() -> str:
    from .channel import ACCELERATED

    accelerator = "on" if ACCELERATED else "off, pure Python"
    return f"%(prog)s %(version)s (Python {sys.version.split()[0]}, C accelerator: {accelerator})"


class _Group(click.Group):
    """The ``conveyor`` group: in any command, user code failing while the
    pipeline loads exits with `EXIT_PIPELINE_ERROR` and its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineLoadError as exc:
            raise PipelineCodeError(str(exc), exc.__cause__ or exc) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.version_option(package_name="conveyor", message=_version_message())
def cli() -> None:
    """conveyor: producer-consumer pipelines over bounded channels.

    Run a pipeline defined in your code, watch it live, and see which stage
    holds it back:

    \b
      conveyor run app.pipelines:etl --workers parse=8 --report run.html
      conveyor demo
    """


@cli.command(
    "run", cls=JsonCommand, epilog=_EPILOG, short_help="Run a pipeline and report on each stage."
)
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
    type=SECONDS,
    metavar="SECONDS",
    help="Log who holds which item, with stacks, when nothing moves for SECONDS.",
)
@click.option(
    "--max-bytes",
    type=BYTE_SIZE,
    metavar="SIZE",
    help="A memory budget for the items in flight, e.g. 256MiB or 1.5GB (the run's "
    "max_bytes=; with --redis, the bytes its streams hold in Redis).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the run's metrics as JSON on stdout instead of the table; also when "
    "the run fails, with its error under 'error' (null on success).",
)
@click.option(
    "--redis",
    "redis_url",
    type=REDIS_URL,
    metavar="URL",
    help="Run on Redis Streams: `conveyor worker` processes anywhere serve the stages.",
)
@click.option(
    "--run-id", type=NAME, metavar="ID", help="With --redis: the run's id (resumes that run)."
)
@click.option(
    "--namespace",
    type=NAME,
    metavar="NAME",
    help="With --redis: the prefix of every Redis key, the workers' --namespace "
    "[default: conveyor].",
)
@click.option(
    "--visibility-timeout",
    type=SECONDS,
    metavar="SECONDS",
    help="With --redis: seconds an entry may stay with one worker before others take it "
    "over; at least the longest stage timeout [default: 30].",
)
@connection_options
def run_command(
    target: str,
    progress: bool,
    report: Path | None,
    workers: tuple[str, ...],
    stall_timeout: float | None,
    max_bytes: int | None,
    as_json: bool,
    redis_url: str | None = None,
    run_id: str | None = None,
    namespace: str | None = None,
    visibility_timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    debug: bool = False,
) -> None:
    """Run the pipeline MODULE:ATTR to the end and print its per-stage report.

    MODULE:ATTR names a conveyor.Pipeline, or a function without arguments
    that returns one, e.g. app.pipelines:etl; the current directory is
    searched first, as with python -m. The report names the stage that
    limits throughput and what would help.
    """
    _log_to_stderr()
    _check_redis_only(
        redis_url, run_id=run_id, namespace=namespace, visibility_timeout=visibility_timeout
    )
    if redis_url is not None and workers:
        # The driver runs no stage: the count would only be shown, never used.
        raise click.UsageError(
            "--workers applies to runs in this process, not with --redis: each "
            "`conveyor worker --workers STAGE=N` sets its own consumers"
        )
    try:
        overrides = _overrides(workers)
        pipeline = apply_overrides(_load(target), overrides)
        _check_report_dir(report)
        if redis_url is not None:
            where = _RedisTarget(
                redis_url,
                run_id,
                namespace or "conveyor",
                connect_timeout,
                debug,
                visibility_timeout,
            )
            result = _run_on_redis(
                pipeline, where, progress, report, stall_timeout, max_bytes, as_json
            )
            click.echo(_json(result) if as_json else result.report().rstrip())
            return
        # Ctrl-C is taken over before the run starts: one pressed as it starts
        # must stop it, not raise KeyboardInterrupt past a run left going.
        with _ctrl_c_stops(as_json=as_json) as ctrl_c:
            handle = _start(pipeline, progress, report, stall_timeout, max_bytes)
            ctrl_c.attach(handle)
            try:
                result = _wait_for(handle)
            except (Exception, SystemExit) as exc:  # SystemExit: a stage's own sys.exit()
                if as_json:  # what the run did before it failed, for the JSON on stdout
                    click.get_current_context().meta[JSON_PARTIAL] = (
                        handle.result_so_far().as_dict()
                    )
                if ctrl_c.interrupted.is_set():
                    _exit_stopped(handle.result_so_far(), as_json, ctrl_c.exit_code)
                _exit_run_failed(exc)
        if ctrl_c.interrupted.is_set():
            _exit_stopped(result, as_json, ctrl_c.exit_code)
    except KeyboardInterrupt:  # before the run started
        click.echo("conveyor: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(_json(result) if as_json else result.report(_output_width()).rstrip())


def _exit_stopped(result: RunResult, as_json: bool, code: int) -> NoReturn:
    """Leave a run that Ctrl-C (or SIGTERM) stopped with ``code``, after saying what it
    did: the report on stdout, as at the end of a run (with ``--json``, the document
    the error handler prints holds it)."""
    if as_json:
        click.get_current_context().meta[JSON_PARTIAL] = result.as_dict()
    else:
        click.echo(result.report(_output_width()).rstrip())  # "stopped before the end"
    sys.exit(code)


def _json(result: RunResult) -> str:
    """``--json``: the run's metrics, and ``"error": null`` (a failed run's document
    has the error there: see `JsonCommand`)."""
    import json

    return json.dumps({**result.as_dict(), "error": None}, indent=2)


def _exit_run_failed(exc: BaseException) -> NoReturn:
    """Show why the run failed (its traceback, then one line) and exit with 1."""
    exit_failed("the run", exc)


def _check_report_dir(report: Path | None) -> None:
    """Refuse a report path that cannot be written, before the run (exit code 2)."""
    if report is None:
        return
    from .report import check_report_path

    try:
        check_report_path(report)
    except ConfigurationError as exc:
        message = str(exc).removeprefix("run() 'report': ")
        raise click.BadParameter(message, param_hint="'--report'") from None


@dataclass(frozen=True)
class _RedisTarget:
    """Where ``conveyor run --redis`` drives its run."""

    url: str
    run_id: str | None
    namespace: str
    connect_timeout: float
    debug: bool
    visibility_timeout: float | None = None


def _check_redis_only(redis_url: str | None, **options: object) -> None:
    """Refuse an option that only means something with --redis, given without it."""
    if redis_url is None:
        for name, value in options.items():
            if value is not None:
                option = "--" + name.replace("_", "-")
                raise click.UsageError(f"{option} applies to runs on Redis: give --redis URL too")


def _run_on_redis(
    pipeline: Pipeline[Any],
    where: _RedisTarget,
    progress: bool,
    report: Path | None,
    stall_timeout: float | None,
    max_bytes: int | None = None,
    as_json: bool = False,
) -> RunResult:
    """``conveyor run --redis``: drive the run; a failed run exits as a local one does,
    Redis unreachable (or lost) for ``connect_timeout`` with `EXIT_REDIS_UNREACHABLE`.
    Ctrl-C or SIGTERM stops it as a local run (its report, then 130 or 143), and
    leaves it in Redis, to be resumed or cancelled."""
    from .redis.cli import start_on_redis

    if stall_timeout is not None:
        raise click.UsageError(
            "--stall-timeout applies to runs in this process, not with --redis: "
            "`conveyor status` shows where a distributed run stands"
        )
    # The driver's end (its local workers, its last reads of Redis) is given time too.
    with _ctrl_c_stops(REDIS_INTERRUPT_GRACE, as_json=as_json) as ctrl_c:
        handle: BackgroundRun[Any] | None = None
        try:
            handle = start_on_redis(
                pipeline,
                where.url,
                run_id=where.run_id,
                namespace=where.namespace,
                progress=progress,
                report=report,
                connect_timeout=where.connect_timeout,
                visibility_timeout=where.visibility_timeout,
                max_bytes=max_bytes,
            )
            ctrl_c.attach(handle)
            result: RunResult = _wait_for(handle)
        except click.ClickException:
            raise
        except ConfigurationError as exc:  # refused before anything started, as a local run is
            raise click.UsageError(str(exc)) from None
        except BaseException as exc:
            if handle is not None and ctrl_c.interrupted.is_set():
                _exit_stopped(handle.result_so_far(), as_json, ctrl_c.exit_code)
            if as_json and handle is not None:  # what the run did before it failed
                click.get_current_context().meta[JSON_PARTIAL] = handle.result_so_far().as_dict()
            _redis_run_failed(exc, where)
    if ctrl_c.interrupted.is_set():
        _exit_stopped(result, as_json, ctrl_c.exit_code)
    return result


def _redis_run_failed(exc: BaseException, where: _RedisTarget) -> NoReturn:
    """Exit for a ``--redis`` run that failed: Redis out of reach or refusing, conveyor's
    own reason in one line, or the user's exception with its traceback."""
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    if isinstance(exc, BackendUnavailable):
        raise RedisUnreachable(exc, where.debug) from exc
    if isinstance(exc, DeadLettersError):  # its cause is the user's exception: its traceback
        if exc.result is not None:  # what the run did before, for the JSON on stdout
            click.get_current_context().meta[JSON_PARTIAL] = exc.result.as_dict()
        _exit_run_failed(exc)
    if isinstance(exc, BackendError):  # conveyor's own reason: its traceback says nothing useful
        answer = redis_answer(exc)
        if answer is not None:
            raise RedisRefused.of(answer, where.url, where.debug) from exc
        raise RunCannotGoOn(exc, where.debug) from exc
    if isinstance(exc, Exception) and refused_by_redis(exc):
        raise RedisRefused.of(exc, where.url, where.debug) from exc
    _exit_run_failed(exc)


def _output_width() -> int:
    """The terminal's width when stdout is one; else wide enough for any table."""
    from .metrics import MIN_REPORT_WIDTH

    columns = shutil.get_terminal_size().columns if sys.stdout.isatty() else 130
    return max(columns, MIN_REPORT_WIDTH)  # a narrow terminal wraps the lines


def _start(
    pipeline: Pipeline[Any],
    progress: bool,
    report: Path | None,
    stall_timeout: float | None,
    max_bytes: int | None = None,
) -> RunHandle:
    try:
        return pipeline.start(
            progress=progress, report=report, stall_timeout=stall_timeout, max_bytes=max_bytes
        )
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None


def _wait_for(handle: RunHandle | BackgroundRun[Any]) -> RunResult:
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
    """What Ctrl-C (or SIGTERM) does while `conveyor run` runs: stop the run, exit
    130 (143).

    A worker stuck in user code cannot be interrupted: if the run has not
    ended within ``grace`` seconds, or at a second signal, the process exits
    at once (its worker threads are daemons that cannot be joined).
    """

    def __init__(self, grace: float, as_json: bool = False) -> None:
        self.interrupted = threading.Event()
        self.as_json = as_json
        self.exit_code = EXIT_INTERRUPTED
        """What the command exits with: that of the first signal received."""
        self.deadline = threading.Timer(grace, self._exit_now)
        self.deadline.daemon = True
        self._handle: RunHandle | BackgroundRun[Any] | None = None

    def _exit_now(self) -> NoReturn:
        _exit_interrupted(self.as_json, self.exit_code)

    def attach(self, handle: RunHandle | BackgroundRun[Any]) -> None:
        """The run to stop, once started; stopped at once if Ctrl-C came first."""
        self._handle = handle
        if self.interrupted.is_set():
            handle.stop()  # the handler may have seen it too: stop() is idempotent

    def on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted.is_set():
            self._exit_now()
        terminated = signum == signal.SIGTERM
        self.exit_code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        self.interrupted.set()
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        click.echo(f"conveyor: {what}, stopping the run", err=True)
        self.deadline.start()
        if self._handle is not None:
            self._handle.stop()


@contextlib.contextmanager
def _ctrl_c_stops(grace: float = INTERRUPT_GRACE, as_json: bool = False) -> Iterator[_CtrlC]:
    """While inside, Ctrl-C (or SIGTERM) stops the attached run instead of raising
    KeyboardInterrupt (or ending the process at once)."""
    ctrl_c = _CtrlC(grace, as_json)
    if threading.current_thread() is not threading.main_thread():
        yield ctrl_c  # signal handlers can only be set from the main thread
        return
    # A signal the parent ignores (nohup, a background job's SIGINT) stays ignored.
    previous = {
        sig: signal.signal(sig, ctrl_c.on_sigint)
        for sig in _STOPPING_SIGNALS
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield ctrl_c
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ctrl_c.deadline.cancel()


_STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_interrupted(as_json: bool = False, code: int = EXIT_INTERRUPTED) -> NoReturn:
    """Leave now with ``code`` (`EXIT_INTERRUPTED`, `EXIT_TERMINATED`), without waiting
    for stuck worker threads (with ``--json``, after the error document: stdout always
    gets one)."""
    if as_json:
        echo_error_document(SystemExit(code), {})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _add_redis_commands() -> None:

    for command in COMMANDS:
        cli.add_command(command)


_add_redis_commands()


@cli.command(short_help="Show conveyor at work, and a bottleneck found.")
def demo() -> None:
    """Show conveyor at work: the classic producer-consumer scenario, then a
    pipeline with a deliberately slow stage and the report naming it."""
    from ._early_stop import release
    from .demo import run_demo

    release(signal.SIGINT)  # Ctrl-C as KeyboardInterrupt: its runs stop and join their workers
    raise SystemExit(run_demo())


# ---------------------------------------------------------------------- helpers


def _log_to_stderr() -> None:
    """Show the library's progress lines and warnings (logger ``conveyor``) on stderr."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF})
"""How writing to stdout fails other than by a broken pipe."""


def main() -> None:
    """Entry point of the ``conveyor`` console script and of ``python -m conveyor``."""
    from ._early_stop import install

    install()  # done already by `python -m conveyor`, before this module's imports
    try:
        cli(prog_name="conveyor")
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        # The report or the JSON could not be written to stdout (a full disk, a closed
        # terminal); click itself turns only a broken pipe into an exit.
        with contextlib.suppress(OSError):
            sys.stderr.write(f"conveyor: cannot write the output: {exc}\n")
            sys.stderr.flush()
        os._exit(EXIT_PIPELINE_ERROR)  # exiting normally would flush stdout again, and fail
