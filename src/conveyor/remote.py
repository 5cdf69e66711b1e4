"""Exceptions that cross to another process or machine as plain data.

A stage's exception must reach the caller as itself (its class, its
attributes, its PEP 678 notes), with the worker's traceback as its cause.
Pickling does that when the exception survives a round trip, but many do
not (an ``__init__`` with other arguments than ``args``), and a Redis run's
codec may be JSON or msgpack. So an exception travels as an
`ExceptionRecord`: where its class lives, its ``args`` and ``__dict__`` (when
the codec can carry them), its message, notes and traceback text. The
receiver rebuilds it without calling ``__init__`` (as pickle does), from a
class it has already imported: a record never makes the receiver import or
run anything. When the class is not there, or is not an exception, the
receiver gets a `RemoteError` with the same text.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any

from .errors import RemoteError, RemoteTraceback

__all__ = ["ExceptionRecord", "capture", "parts", "rebuild", "restore"]


@dataclass
class ExceptionRecord:
    """An exception as plain data (see the module docstring)."""

    type: str
    """``module:qualname`` of its class."""
    message: str
    """``str()`` of the exception."""
    traceback: str = ""
    """The formatted traceback, as the worker saw it."""
    notes: list[str] = field(default_factory=list)
    """Its PEP 678 notes."""
    args: list[Any] | None = None
    """Its ``args``, when they are plain data."""
    attrs: dict[str, Any] | None = None
    """Its ``__dict__`` (notes aside): the attributes that are plain data."""
    group: list[dict[str, Any]] | None = None
    """An exception group's exceptions, as records (`as_dict`); then ``args`` holds
    only its message."""

    def as_dict(self) -> dict[str, Any]:
        """The record as a dict of plain values."""
        return {
            "type": self.type,
            "message": self.message,
            "traceback": self.traceback,
            "notes": self.notes,
            "args": self.args,
            "attrs": self.attrs,
            "group": self.group,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExceptionRecord:
        """The record back from `as_dict` (missing fields default)."""
        return cls(
            type=str(data.get("type", "")),
            message=str(data.get("message", "")),
            traceback=str(data.get("traceback", "")),
            notes=[str(n) for n in data.get("notes") or ()],
            args=data.get("args"),
            attrs=data.get("attrs"),
            group=data.get("group"),
        )


def capture(exc: BaseException, plain: Any = None) -> ExceptionRecord:
    """The record of ``exc``.

    Args:
        exc: the exception.
        plain: a function that raises when a value cannot be carried (for
            instance the codec's ``dumps``); ``args`` and ``attrs`` are kept
            only if it accepts them. None: kept as they are.
    """
    cls, made_of, attrs = parts(exc)
    text = "".join(traceback.format_exception(cls, exc, exc.__traceback__))
    attrs = {k: v for k, v in attrs.items() if k != "__notes__"}
    args: list[Any] | None = list(made_of)
    group = None
    if isinstance(exc, BaseExceptionGroup):
        # Its exceptions travel as records of their own (a codec carries no exception).
        group = [capture(e, plain).as_dict() for e in exc.exceptions]
        args = [exc.message]
    kept: dict[str, Any] | None = attrs
    if plain is not None:
        args = _if_plain(plain, args)
        # Attribute by attribute: one that cannot travel (a lock, a connection)
        # must not cost the others.
        kept = {k: v for k, v in attrs.items() if _if_plain(plain, [v]) is not None}
    return ExceptionRecord(
        type=f"{cls.__module__}:{cls.__qualname__}",
        message=str(exc),
        traceback=text,
        notes=[str(n) for n in getattr(exc, "__notes__", ())],
        args=args,
        attrs=kept,
        group=group,
    )


def parts(exc: BaseException) -> tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]:
    """What `restore` makes ``exc`` again from: its class, its arguments and its attributes."""
    args = exc.args
    if isinstance(exc, OSError) and (exc.filename is not None or exc.filename2 is not None):
        # Its args leave the file names out; OSError(errno, strerror, filename,
        # winerror, filename2) sets them again.
        args = (exc.errno, exc.strerror, exc.filename, None, exc.filename2)
    return type(exc), args, dict(vars(exc)) if _has_dict(exc) else {}


def restore(cls: type[BaseException], args: Any, attrs: dict[str, Any] | None) -> BaseException:
    """An exception of ``cls`` with these ``args`` and attributes, made without calling
    an ``__init__`` written in Python: one that takes other arguments than its
    ``args`` (``BadRow(row)`` whose ``args`` hold a message) would take the message
    for a row. Pickling an exception calls it (``cls(*args)``); this is the way back
    that does not. A builtin's ``__init__`` is called: it only derives its attributes
    from ``args`` (``SystemExit.code``, ``OSError.errno``, ``StopIteration.value``)."""
    exc = cls.__new__(cls, *args)  # BaseExceptionGroup.__new__ checks its two arguments
    if not _builtin_init(exc, args):
        exc.args = tuple(args)
    if attrs:
        exc.__dict__.update(attrs)
    return exc


def _builtin_init(exc: BaseException, args: Any) -> bool:
    """Call ``exc``'s ``__init__`` with ``args`` if a builtin's (it sets ``args`` too,
    an OSError's without its file names); False if written in Python, or if it
    would not take them."""
    init = type(exc).__init__
    if isinstance(init, FunctionType):
        return False
    try:
        init(exc, *args)
    except (TypeError, ValueError):
        return False
    return True


def rebuild(record: ExceptionRecord) -> BaseException:
    """The exception of ``record``: its own class if loaded here, else a `RemoteError`."""
    cls = _loaded_class(record.type)
    exc: BaseException
    if cls is None or record.args is None:
        exc = RemoteError(f"{_short_type(record.type)}: {record.message}")
    else:
        args = list(record.args)
        if record.group is not None:
            args.append([rebuild(ExceptionRecord.from_dict(g)) for g in record.group])
        try:
            exc = restore(cls, args, record.attrs)
        except Exception:
            exc = RemoteError(f"{_short_type(record.type)}: {record.message}")
    if record.notes:
        exc.__notes__ = list(record.notes)
    if record.traceback:
        exc.__cause__ = RemoteTraceback(record.traceback)
    return exc


def _loaded_class(path: str) -> type[BaseException] | None:
    """The exception class at ``module:qualname`` if that module is imported already."""
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None or part == "<locals>":
            return None
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None


def _short_type(path: str) -> str:
    module, _, qualname = path.partition(":")
    return qualname if module == "builtins" else f"{module}.{qualname}"


def _has_dict(exc: BaseException) -> bool:
    try:
        vars(exc)
    except TypeError:
        return False
    return True


def _if_plain(dumps: Any, value: Any) -> Any:
    try:
        dumps(value)
    except Exception:
        return None
    return value
