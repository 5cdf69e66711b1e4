"""The distributed commands: ``conveyor worker``, ``status``, ``dlq ...``, ``cancel``.

Registered on the main ``conveyor`` group by `conveyor.cli`; ``conveyor run
--redis URL`` drives a run through `run_on_redis`. Pipelines are found with
`conveyor.loading` (never through `conveyor.cli`, which imports this module).
The pickle codec's key comes from the ``CONVEYOR_SECRET_KEY`` environment
variable, never from the command line (where ``ps`` would show it).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from .. import loading
from ..cliparams import ENTRY_ID, NAME, REDIS_URL, SECONDS, JsonCommand
from ..errors import BackendError, BackendUnavailable, ConfigurationError
from ..stage import error_message

__all__ = [
    "COMMANDS",
    "DEFAULT_CONNECT_TIMEOUT",
    "EXIT_PIPELINE_ERROR",
    "EXIT_REDIS_UNREACHABLE",
    "RedisRefused",
    "RedisUnreachable",
    "RunCannotGoOn",
    "cancel_command",
    "dlq_group",
    "exit_failed",
    "load_pipeline",
    "print_exception",
    "redis_answer",
    "refused_by_redis",
    "run_on_redis",
    "start_on_redis",
    "status_command",
    "worker_command",
]

F = TypeVar("F", bound=Callable[..., Any])

EXIT_PIPELINE_ERROR = 1  # the user's code raised (the run's stages or source, a worker's hooks)
EXIT_REDIS_UNREACHABLE = 3  # Redis could not be reached, or was lost, for --connect-timeout
DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds a command waits for an unreachable (or lost) Redis before it gives up."""


class _RedisProblem(click.ClickException):
    """One line on stderr saying what Redis did; ``--debug`` shows the traceback too."""

    def __init__(self, error: BaseException, debug: bool = False, message: str = "") -> None:
        super().__init__(message or str(error))
        self.error = error
        self.debug = debug

    def show(self, file: Any = None) -> None:
        if self.debug:
            text = traceback.format_exception(
                type(self.error), self.error, self.error.__traceback__
            )
            click.echo("".join(text).rstrip(), err=True)
        click.echo(f"conveyor: {self.message}", err=True)


class RedisUnreachable(_RedisProblem):
    """Raised when Redis cannot be reached within ``--connect-timeout``: one line on
    stderr naming the URL (password masked) and the cause, exit code
    `EXIT_REDIS_UNREACHABLE`; ``--debug`` shows the traceback too."""

    exit_code = EXIT_REDIS_UNREACHABLE


class RedisRefused(_RedisProblem):
    """Raised when Redis answers a command with an error (a database number out of
    range, a read-only replica, out of memory): one line naming the URL (password
    masked) and Redis's answer, exit code `EXIT_PIPELINE_ERROR`; ``--debug`` shows
    the traceback too."""

    exit_code = EXIT_PIPELINE_ERROR

    @classmethod
    def of(cls, error: BaseException, url: str, debug: bool) -> RedisRefused:
        """``error``, Redis's answer to a command sent to ``url``, as one line (Redis out
        of memory said as a run says it, with what to change)."""
        from redis.exceptions import OutOfMemoryError

        from .streams import out_of_memory, redact

        if isinstance(error, OutOfMemoryError):
            return cls(error, debug, str(out_of_memory(url, "serving runs", error)))
        return cls(error, debug, f"Redis at {redact(url)} answered {type(error).__name__}: {error}")


class RunCannotGoOn(_RedisProblem):
    """Raised when a run on Redis ends for a reason of conveyor's own, not the user's
    code (its keys were deleted or lost, Redis refused the credentials): one line,
    ``conveyor: the run failed: TYPE: message``, exit code `EXIT_PIPELINE_ERROR`;
    ``--debug`` shows the traceback too."""

    exit_code = EXIT_PIPELINE_ERROR

    def __init__(self, error: BaseException, debug: bool = False) -> None:
        super().__init__(error, debug, f"the run failed: {type(error).__name__}: {error}")


def refused_by_redis(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis's error answer to a command (not Redis out of reach)."""
    redis = sys.modules.get("redis.exceptions")
    return redis is not None and isinstance(exc, redis.RedisError) and not _lost_redis(exc)


def redis_answer(exc: BaseException) -> BaseException | None:
    """Redis's error answer behind ``exc``: ``exc`` itself, or the cause of the
    `BackendError` that refuses a connection Redis answered with an error (a database
    number it does not have); None if neither."""
    for candidate in (exc, exc.__cause__ if isinstance(exc, BackendError) else None):
        if candidate is not None and refused_by_redis(candidate):
            return candidate
    return None


def unreachable(error: BaseException, url: str, timeout: float | None) -> BackendUnavailable:
    """``error`` (Redis unreachable or lost) as a `BackendUnavailable` naming ``url``."""
    from .streams import Retrier

    if isinstance(error, BackendUnavailable):
        return error
    return Retrier("command", timeout, url=url).unavailable(error)


def _redis_errors(fn: F) -> F:
    """Around a command: Redis unreachable or lost is `RedisUnreachable` (one line)."""

    @functools.wraps(fn)
    def command(*args: Any, debug: bool, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if refused_by_redis(exc):
                raise RedisRefused.of(exc, kwargs["url"], debug) from exc
            if not _lost_redis(exc):
                raise
            error = unreachable(exc, kwargs["url"], kwargs["connect_timeout"])
            raise RedisUnreachable(error, debug) from exc

    return command  # type: ignore[return-value]


def _lost_redis(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis could not be reached (redis-py is imported only then)."""
    if isinstance(exc, BackendUnavailable):
        return True
    redis = sys.modules.get("redis.exceptions")
    return redis is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


def _connect(url: str, timeout: float) -> Any:
    """A client for ``url``, trying for ``timeout`` seconds at most."""
    from .streams import Retrier, connect

    try:
        return Retrier("connecting", timeout, url=url)(connect, url, timeout=timeout)
    except BackendError as exc:
        answer = redis_answer(exc)
        if answer is None:
            raise
        raise answer from None  # one line, by _redis_errors, as for any command


def load_pipeline(target: str) -> Any:
    """The pipeline named ``MODULE:ATTR`` (as ``conveyor run`` finds it).

    A bad name is a usage error (exit code 2); the user's code failing while
    it loads (`PipelineLoadError`) goes up to the ``conveyor`` group, which
    shows its traceback and exits with 1.
    """
    try:
        return loading.load_pipeline(target)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'MODULE:ATTR'") from None


def connection_options(fn: F) -> F:
    """``--connect-timeout`` and ``--debug``, for every command that talks to Redis."""
    fn = click.option(
        "--debug", is_flag=True, help="Show the traceback of an error, not only its line."
    )(fn)
    return click.option(
        "--connect-timeout",
        type=SECONDS,
        default=DEFAULT_CONNECT_TIMEOUT,
        show_default=True,
        metavar="SECONDS",
        help=f"Give up (exit {EXIT_REDIS_UNREACHABLE}) when Redis cannot be reached, or is "
        "lost, for SECONDS.",
    )(fn)


def _redis_options(fn: F) -> F:
    fn = _redis_errors(fn)
    fn = connection_options(fn)
    fn = click.option(
        "--namespace",
        default="conveyor",
        show_default=True,
        type=NAME,
        help="Prefix of every Redis key (the driver and the workers must agree).",
    )(fn)
    return click.option(
        "--redis",
        "url",
        required=True,
        envvar="CONVEYOR_REDIS_URL",
        type=REDIS_URL,
        metavar="URL",
        help="redis://[[USER]:PASSWORD@]HOST:PORT/DB, or rediss://... for TLS "
        "(env: CONVEYOR_REDIS_URL).",
    )(fn)


def _fail(exc: BaseException) -> click.ClickException:
    """A conveyor error as a one-line message and exit code 1 (Redis unreachable: 3)."""
    params = click.get_current_context().params
    debug = bool(params.get("debug"))
    if isinstance(exc, BackendUnavailable):
        return RedisUnreachable(exc, debug)
    answer = redis_answer(exc)
    if answer is not None:
        return RedisRefused.of(answer, params["url"], debug)
    return click.ClickException(f"{type(exc).__name__}: {exc}")


def print_exception(exc: BaseException) -> None:
    """Print ``exc`` with its traceback (and cause, notes) on stderr."""
    click.echo("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), err=True)


def exit_failed(what: str, exc: BaseException) -> NoReturn:
    """Show why ``what`` failed (the user's traceback, then one line) and exit with 1."""
    print_exception(exc)
    # One line: a message of several (a DeadLettersError holds a worker's traceback)
    # has been shown whole with the traceback just above.
    first, more, _ = error_message(exc).partition("\n")
    line = f"{first} (more above)" if more else first
    click.echo(f"conveyor: {what} failed: {type(exc).__name__}: {line}", err=True)
    sys.exit(EXIT_PIPELINE_ERROR)


def _log_to_stderr() -> None:
    logger = logging.getLogger("conveyor")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# ---------------------------------------------------------------------- worker


def _parse_workers(values: tuple[str, ...]) -> int | dict[str, int] | None:
    """``--workers N`` (every served stage) or ``--workers STAGE=N`` (repeatable)."""
    if not values:
        return None
    counts = [value for value in values if "=" not in value]
    if counts and len(values) > 1:
        raise click.BadParameter(
            f"give N once (every served stage) or STAGE=N for each stage, not both: "
            f"got {counts[0]!r} among {len(values)} values",
            param_hint="'--workers'",
        )
    if counts:
        n = int(counts[0]) if counts[0].isdigit() else 0
        if n < 1:
            raise click.BadParameter(
                f"N must be a whole number >= 1 (or STAGE=N), got {counts[0]!r}",
                param_hint="'--workers'",
            )
        return n
    try:
        return dict(loading.parse_overrides(values))
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--workers'") from None


def _metrics_options(fn: F) -> F:
    fn = click.option(
        "--metrics-addr",
        default="127.0.0.1",
        show_default=True,
        envvar="CONVEYOR_METRICS_ADDR",
        metavar="ADDR",
        help="Address the metrics server listens on: this machine only by default; "
        "0.0.0.0 for a Prometheus server elsewhere (env: CONVEYOR_METRICS_ADDR).",
    )(fn)
    return click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        envvar="CONVEYOR_METRICS_PORT",
        metavar="PORT",
        help="Serve Prometheus metrics on http://ADDR:PORT/metrics (0: any free port; "
        "needs conveyor[metrics]; env: CONVEYOR_METRICS_PORT).",
    )(fn)


@contextmanager
def _serve_metrics(worker: Any, target: str, port: int | None, addr: str) -> Iterator[None]:
    """Serve ``worker``'s metrics while the block runs (nothing when ``port`` is None)."""
    if port is None:
        yield
        return
    from ..prometheus import PrometheusExporter

    try:
        exporter = PrometheusExporter(port, addr=addr, pipeline=target)
    except ConfigurationError as exc:
        # The port in use, or an address this machine does not have: the message says which.
        hint = "'--metrics-addr' / '--metrics-port'"
        raise click.BadParameter(str(exc), param_hint=hint) from None
    logging.getLogger("conveyor").info(
        "conveyor: serving metrics on http://%s:%d/metrics", addr, exporter.port
    )
    with exporter:
        exporter.watch(worker)
        yield


@click.command("worker")
@click.argument("target", metavar="MODULE:ATTR")
@_redis_options
@click.option(
    "--stage",
    "stages",
    multiple=True,
    type=NAME,
    metavar="NAME",
    help="Serve only this stage (repeatable; default: every stage).",
)
@click.option(
    "--workers",
    "-w",
    multiple=True,
    metavar="N|STAGE=N",
    help="Consumers per served stage, or for one stage (repeatable); "
    "default: each stage's own workers.",
)
@_metrics_options
def worker_command(
    target: str,
    url: str,
    namespace: str,
    connect_timeout: float,
    stages: tuple[str, ...],
    workers: tuple[str, ...],
    metrics_port: int | None,
    metrics_addr: str,
) -> None:
    """Serve the stages of the pipeline MODULE:ATTR from Redis, for every run, until stopped.

    Start as many as you like, on any machine: they share the work through
    consumer groups. SIGTERM or Ctrl-C finishes the batches in hand and
    exits; a worker killed outright loses nothing (its entries are taken
    over after the run's visibility timeout).
    """
    from .worker import Worker

    _log_to_stderr()
    pipeline = load_pipeline(target)
    counts = _parse_workers(workers)
    names = [s.name for s in pipeline.stages]
    _check_stage_names(stages, names, "--stage", "stages")
    if isinstance(counts, dict):
        # A misspelt stage would otherwise keep its own count without a word.
        _check_stage_names(list(counts), list(stages) or names, "--workers", "served stages")
    try:
        worker = Worker(
            pipeline,
            url,
            stages=stages or None,
            workers=counts,
            namespace=namespace,
            unavailable_timeout=connect_timeout,
        )
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    except BackendError as exc:
        raise _fail(exc) from None
    # Listening first: a port in use stops the worker before it takes any entry.
    with _serve_metrics(worker, target, metrics_port, metrics_addr):
        try:
            worker.run_forever()
        except (BackendError, ConfigurationError) as exc:
            raise _fail(exc) from None
        except Exception as exc:  # the user's code: a stage's on_start or on_stop raised
            if refused_by_redis(exc):
                raise  # one line, by _redis_errors
            exit_failed("the worker", exc)
        except SystemExit as exc:  # a stage's own sys.exit(): said, not a silent exit
            exit_failed("the worker", exc)


# ---------------------------------------------------------------------- run


def start_on_redis(
    pipeline: Any,
    url: str,
    *,
    run_id: str | None = None,
    namespace: str = "conveyor",
    progress: bool = False,
    report: Path | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    visibility_timeout: float | None = None,
    max_bytes: int | None = None,
) -> Any:
    """Start one run of ``pipeline`` through Redis, driven in a thread (``conveyor run
    --redis``): its `BackgroundRun`, to stop (the run stays in Redis, resumable) or
    join; ``visibility_timeout`` None is `RedisBackend`'s default."""
    from .backend import RedisBackend

    extra: dict[str, Any] = {}
    if visibility_timeout is not None:
        extra["visibility_timeout"] = visibility_timeout
    backend = RedisBackend(
        url, run_id=run_id, namespace=namespace, unavailable_timeout=connect_timeout, **extra
    )
    return pipeline.start(backend=backend, progress=progress, report=report, max_bytes=max_bytes)


def run_on_redis(pipeline: Any, url: str, **options: Any) -> Any:
    """Drive one run of ``pipeline`` through Redis to its end (`start_on_redis`, joined)."""
    return start_on_redis(pipeline, url, **options).join()


# ---------------------------------------------------------------------- status


def _runs(client: Any, namespace: str, pipeline: Any, run_id: str | None) -> list[Any]:
    from .state import find_runs, load_info
    from .streams import Keys, pipeline_id

    pid = pipeline_id(pipeline.stages)
    ids = [run_id] if run_id else find_runs(client, namespace, pid)
    infos = []
    for rid in ids:
        info = load_info(client, Keys(namespace, pid, rid))
        if info is None:
            if run_id:
                raise click.ClickException(f"no run {run_id!r} of this pipeline in Redis")
            continue
        infos.append(info)
    return infos


@click.command("status", cls=JsonCommand)
@click.argument("target", metavar="MODULE:ATTR")
@_redis_options
@click.option(
    "--run", "run_id", type=NAME, metavar="ID", help="Only this run (default: every live run)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status_command(
    target: str, url: str, namespace: str, connect_timeout: float, run_id: str | None, as_json: bool
) -> None:
    """Show the live runs of MODULE:ATTR: per stage, stream length, pending entries,
    consumers and their idle time, rates, re-executions and dead letters."""
    from .status import render, run_status

    pipeline = load_pipeline(target)
    try:
        client = _connect(url, connect_timeout)
        statuses = [run_status(client, info) for info in _runs(client, namespace, pipeline, run_id)]
    except BackendError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in statuses], indent=2))
    else:
        click.echo(render(statuses).rstrip())


@click.command("cancel")
@click.argument("target", metavar="MODULE:ATTR")
@_redis_options
@click.option("--run", "run_id", required=True, type=NAME, metavar="ID", help="The run to delete.")
def cancel_command(
    target: str, url: str, namespace: str, connect_timeout: float, run_id: str
) -> None:
    """Delete a run of MODULE:ATTR from Redis: its items, outputs and dead letters."""
    from .backend import RedisBackend

    pipeline = load_pipeline(target)
    try:
        with RedisBackend(url, namespace=namespace, unavailable_timeout=connect_timeout) as backend:
            existed = backend.cancel(pipeline, run_id)
    except BackendError as exc:
        raise _fail(exc) from None
    if not existed:
        raise click.ClickException(f"no run {run_id!r} of this pipeline in Redis")
    click.echo(f"deleted run {run_id}")


# ---------------------------------------------------------------------- dlq


@click.group("dlq")
def dlq_group() -> None:
    """List, replay or purge the dead letters of a pipeline's runs."""


def _dlq_options(fn: F) -> F:
    fn = click.option(
        "--id",
        "ids",
        multiple=True,
        type=ENTRY_ID,
        metavar="ID",
        help="Only this dead letter (repeatable). Ids are per run: one that several runs "
        "have needs --run (replay and purge refuse it, exit 2).",
    )(fn)
    fn = click.option("--stage", type=NAME, metavar="NAME", help="Only this stage's dead letters.")(
        fn
    )
    fn = click.option(
        "--run", "run_id", type=NAME, metavar="ID", help="Only this run (default: all)."
    )(fn)
    fn = _redis_options(fn)
    return click.argument("target", metavar="MODULE:ATTR")(fn)


def _dlq_pipeline(target: str, stage: str | None) -> Any:
    """The pipeline of a ``dlq`` command; a ``--stage`` it does not have is a usage error
    (with no run in Redis, a misspelt stage would find no dead letters without a word)."""
    pipeline = load_pipeline(target)
    if stage is not None:
        _check_stage_names([stage], [s.name for s in pipeline.stages], "--stage", "stages")
    return pipeline


def _check_stage_names(given: Sequence[str], names: Sequence[str], option: str, what: str) -> None:
    """A name in ``given`` that is not in ``names`` (the ``what`` it may name) is a usage
    error naming ``option``."""
    unknown = [n for n in given if n not in names]
    if unknown:
        raise click.BadParameter(
            f"no stage named {', '.join(map(repr, unknown))}; {what}: "
            f"{', '.join(map(repr, names))}",
            param_hint=f"'{option}'",
        )


@dlq_group.command("list", cls=JsonCommand)
@_dlq_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dlq_list(
    target: str,
    url: str,
    namespace: str,
    connect_timeout: float,
    run_id: str | None,
    stage: str | None,
    ids: tuple[str, ...],
    as_json: bool,
) -> None:
    """List dead letters: stage, id, deliveries, the item and its last error.

    With --json, a list of objects: run_id, stage, entry_id, source_id, deliveries,
    error, item (as JSON when JSON carries it, else its repr), item_format ("json",
    "repr", or "none": not decoded, see item_error) and item_error.
    """
    from .codec import get_codec, secret_from
    from .dlq import list_dead

    pipeline = _dlq_pipeline(target, stage)
    try:
        client = _connect(url, connect_timeout)
        letters = []
        for info in _runs(client, namespace, pipeline, run_id):
            try:
                codec = get_codec(info.codec, secret_from(None))
            except ConfigurationError:
                codec = None
            letters += [
                d for d in list_dead(client, info, codec, stage) if not ids or d.entry_id in ids
            ]
    except (BackendError, ConfigurationError) as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps([d.as_json() for d in letters], indent=2))
        return
    if not letters:
        click.echo("no dead letters")
    for d in letters:
        item = f"(not decoded: {d.item_error})" if d.item_error else repr(d.item)
        click.echo(
            f"run {d.run_id} stage {d.stage!r} id {d.entry_id} "
            f"(was {d.source_id}, delivered {d.deliveries} times)\n"
            f"  item: {item[:200]}\n  error: " + d.error.strip().replace("\n", "\n    ")
        )


def _move(
    mode: str,
    target: str,
    url: str,
    namespace: str,
    connect_timeout: float,
    run_id: str | None,
    stage: str | None,
    ids: tuple[str, ...],
) -> None:
    from .dlq import move_dead, present_ids

    pipeline = _dlq_pipeline(target, stage)
    try:
        client = _connect(url, connect_timeout)
        runs = _runs(client, namespace, pipeline, run_id)
        chosen: dict[str, list[str] | None] = {info.run_id: None for info in runs}
        if ids:
            # Ids are per run: two runs' dead letters can have the same one.
            chosen = {
                info.run_id: sorted(present_ids(client, info, list(ids), stage)) for info in runs
            }
            found = {i for present in chosen.values() for i in present or ()}
            _refuse_unknown_ids([i for i in ids if i not in found], run_id, stage)
            _refuse_ambiguous_ids(ids, chosen)
        moved = sum(
            move_dead(client, info, mode, stage, chosen[info.run_id])
            for info in runs
            if chosen[info.run_id] != []
        )
    except (BackendError, ConfigurationError) as exc:
        raise _fail(exc) from None
    click.echo(f"{'replayed' if mode == 'replay' else 'purged'} {moved} dead letters")


def _refuse_ambiguous_ids(ids: Sequence[str], chosen: dict[str, list[str] | None]) -> None:
    """An ``--id`` that names dead letters of several runs (ids are made per run, from
    the time in milliseconds) is refused, before anything moves: ``--run`` says which."""
    for entry_id in ids:
        runs = [run for run, present in chosen.items() if present and entry_id in present]
        if len(runs) > 1:
            raise click.UsageError(
                f"dead letter id {entry_id} is in {len(runs)} runs "
                f"({', '.join(map(repr, runs))}): give --run ID to say which; nothing was moved"
            )


def _refuse_unknown_ids(unknown: list[str], run_id: str | None, stage: str | None) -> None:
    """A ``--id`` that names no dead letter is a mistake to say, not "moved 0": nothing
    is moved, not even the ids that are there."""
    if not unknown:
        return
    where = f" in run {run_id!r}" if run_id else " in any run"
    if stage is not None:
        where += f" (stage {stage!r})"
    raise click.ClickException(
        f"no dead letter with id {', '.join(unknown)}{where}; `conveyor dlq list` shows them"
    )


@dlq_group.command("replay")
@_dlq_options
def dlq_replay(
    target: str,
    url: str,
    namespace: str,
    connect_timeout: float,
    run_id: str | None,
    stage: str | None,
    ids: tuple[str, ...],
) -> None:
    """Put dead letters back into their stage's stream (after fixing the stage)."""
    _move("replay", target, url, namespace, connect_timeout, run_id, stage, ids)


@dlq_group.command("purge")
@_dlq_options
def dlq_purge(
    target: str,
    url: str,
    namespace: str,
    connect_timeout: float,
    run_id: str | None,
    stage: str | None,
    ids: tuple[str, ...],
) -> None:
    """Drop dead letters; the run counts them as handled and can finish without them."""
    _move("purge", target, url, namespace, connect_timeout, run_id, stage, ids)


COMMANDS = (worker_command, status_command, dlq_group, cancel_command)
"""What `conveyor.cli` registers on the main group."""
