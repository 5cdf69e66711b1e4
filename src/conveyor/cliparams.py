"""Checked values of the ``conveyor`` command's options (click parameter types).

A bad value is click's usage error naming the option and what it accepts
(exit code 2, no traceback), before any work starts. Shared by `conveyor.cli`
and `conveyor.redis.cli`; library code never imports it.
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit

import click

from .validate import NAME_ACCEPTED, name_problem

__all__ = ["ENTRY_ID", "NAME", "REDIS_URL", "SECONDS", "EntryId", "Name", "RedisUrl", "Seconds"]


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
REDIS_URL = RedisUrl()
NAME = Name()
ENTRY_ID = EntryId()
