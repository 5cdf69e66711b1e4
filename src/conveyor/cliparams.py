"""Checked values of the ``conveyor`` command's options (click parameter types), and
`JsonCommand`, the class of the commands that print JSON.

A bad value is click's usage error naming the option and what it accepts
(exit code 2, no traceback), before any work starts. Shared by `conveyor.cli`
and `conveyor.redis.cli`; library code never imports it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import click

# The exit codes of a signal: defined where the entry point's first handlers (installed
# before click is imported) use them too.
from ._early_stop import EXIT_INTERRUPTED, EXIT_TERMINATED
from .errors import ConfigurationError
from .stage import error_message
from .validate import BYTES_ACCEPTED, NAME_ACCEPTED, check_byte_size, name_problem

__all__ = [
    "BYTE_SIZE",
    "ENTRY_ID",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "JSON_PARTIAL",
    "NAME",
    "REDIS_URL",
    "SECONDS",
    "ByteSize",
    "EntryId",
    "JsonCommand",
    "Name",
    "RedisUrl",
    "Seconds",
    "echo_error_document",
]


class Seconds(click.ParamType[float]):
    """A duration in seconds: a finite number > 0."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} is not a finite number of seconds > 0", param, ctx)
        return seconds


class ByteSize(click.ParamType[int]):
    """A number of bytes: an int >= 1 or a size with a unit ('256MiB', '1.5GB')."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        try:
            return check_byte_size(value, "", "")
        except ConfigurationError:
            self.fail(f"{value!r} is not a size: {BYTES_ACCEPTED}", param, ctx)


class RedisUrl(click.ParamType[str]):
    """A Redis URL: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, ``rediss://`` (TLS)
    or ``unix:///path/to/socket``."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        expected = "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... or unix:///PATH"
        try:
            parts = urlsplit(text)
            port = parts.port  # a bad port raises here
        except ValueError as exc:
            self.fail(f"{text!r} is not a Redis URL ({exc}); expected {expected}", param, ctx)
        if parts.scheme == "unix":
            if not parts.path:
                self.fail(f"{text!r} names no socket path; expected {expected}", param, ctx)
            return text
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            self.fail(f"{text!r} is not a Redis URL; expected {expected}", param, ctx)
        if port == 0:
            self.fail(f"{text!r}: port 0 is not a port; expected {expected}", param, ctx)
        db = parts.path.strip("/")
        if db and not db.isdigit():
            self.fail(f"{text!r}: the database {db!r} is not a number", param, ctx)
        return text


class Name(click.ParamType[str]):
    """A name (namespace, run id, stage): what the library accepts (`check_name`)."""

    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        problem = name_problem(text)
        if problem is not None:
            self.fail(f"{text!r} must be {NAME_ACCEPTED}; it {problem}", param, ctx)
        return text


class EntryId(click.ParamType[str]):
    """A Redis stream entry id: ``MILLISECONDS-SEQUENCE``, as ``conveyor dlq list`` shows."""

    name = "id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        if not re.fullmatch(r"\d+-\d+", text):
            self.fail(f"{text!r} is not an entry id such as 1700000000000-0", param, ctx)
        return text


SECONDS = Seconds()
BYTE_SIZE = ByteSize()
REDIS_URL = RedisUrl()
NAME = Name()
ENTRY_ID = EntryId()


# ---------------------------------------------------------------------- --json

JSON_PARTIAL = "conveyor.json_partial"
"""The key of ``click.Context.meta`` where a `JsonCommand` that fails leaves what it
knows so far (a failed run's statistics, as a dict): its error document adds to it."""


class JsonCommand(click.Command):
    """A command with a ``--json`` flag (its parameter ``as_json``): whatever ends it,
    stdout gets one JSON document, so that a script reading stdout always gets JSON.

    The command prints its own document when it succeeds. When it fails (a bad
    command line, its work failed, Redis out of reach, Ctrl-C), this prints
    ``{"error": {"type", "message", "notes", "exit_code"}}`` on stdout, added to
    what the command left in ``ctx.meta[JSON_PARTIAL]``; the messages on stderr and
    the exit code stay as they are without ``--json``.
    """

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        wants_json = "--json" in args  # the command line is not parsed yet
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            if wants_json:
                echo_error_document(exc, {})
            raise

    def invoke(self, ctx: click.Context) -> Any:
        if not ctx.params.get("as_json"):
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except BaseException as exc:
            if _exit_code(exc) != 0:
                echo_error_document(exc, ctx.meta.get(JSON_PARTIAL, {}))
            raise


def _exit_code(exc: BaseException) -> int:
    """The exit code ``exc`` ends the command with (click's way)."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    if isinstance(exc, (KeyboardInterrupt, click.Abort)):
        return EXIT_INTERRUPTED
    return 1


def echo_error_document(exc: BaseException, partial: dict[str, Any]) -> None:
    """Print on stdout the JSON document of a command that ``exc`` ends: ``partial``
    (what the command knew), and ``"error"``."""
    document = {**partial, "error": {**_described(exc), "exit_code": _exit_code(exc)}}
    click.echo(json.dumps(document, indent=2, default=str))


def _described(exc: BaseException) -> dict[str, Any]:
    """What went wrong, behind the exception that ends the command: the run's own error
    behind ``sys.exit()``, Redis's behind the one-line message, the user's code behind
    a pipeline that did not load."""
    code = _exit_code(exc)
    if code == EXIT_INTERRUPTED:
        return {"type": "KeyboardInterrupt", "message": "interrupted (Ctrl-C)", "notes": []}
    if code == EXIT_TERMINATED:
        return {"type": "SIGTERM", "message": "terminated (SIGTERM)", "notes": []}
    if isinstance(exc, SystemExit) and exc.__context__ is not None:
        return _plain(exc.__context__, error_message(exc.__context__))  # sys.exit() in an except
    if isinstance(exc, click.ClickException):
        error = getattr(exc, "error", None)  # Redis's, or the user's code's
        if isinstance(error, BaseException):
            return _plain(error, exc.format_message())
        return _plain(exc, exc.format_message())
    return _plain(exc.__cause__ or exc, error_message(exc))


def _plain(error: BaseException, message: str) -> dict[str, Any]:
    notes: Sequence[str] = getattr(error, "__notes__", ())
    return {"type": type(error).__name__, "message": message, "notes": list(notes)}
