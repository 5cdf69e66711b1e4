"""Checks of the values users give: one function per kind of value.

Every public parameter (stage options, `Pipeline` and its run methods,
`Channel`, `Backoff`, `RedisBackend`) is checked here when it is given,
before anything starts: no thread, process or connection exists yet when a
bad value is refused. Each check raises `ConfigurationTypeError` (a
`TypeError`) for a value of the wrong type and `ConfigurationError` (a
`ValueError`) for one out of range, with a message naming where the value
was given, the parameter, the value and what is accepted::

    map() 'workers' must be an int between 1 and 1024, got 10000000

``where`` is how the message names the place: ``"map()"``, ``"Channel"``,
``"Channel.get_many()"``, ``"RedisBackend"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "BYTES_ACCEPTED",
    "MAX_SECONDS",
    "MAX_TASKS",
    "MAX_WORKERS",
    "NAME_ACCEPTED",
    "check_bool",
    "check_byte_size",
    "check_callable",
    "check_capacity",
    "check_choice",
    "check_int",
    "check_name",
    "check_number",
    "check_optional",
    "check_seconds",
    "check_str",
    "name_problem",
]

MAX_SECONDS = 1_000_000.0
"""The longest time any parameter in seconds accepts (about 11.6 days).

Larger values cannot be waited on by every primitive underneath (a lock's
wait overflows past ``threading.TIMEOUT_MAX``, a Redis timeout in
milliseconds past its integers); "no limit" is ``None`` where it makes sense.
"""

MAX_WORKERS = 1024
"""The most workers a thread or process stage may have.

One thread or one process each: beyond a thousand, a machine spends its
time switching between them. An async stage's workers are coroutines and
may number up to `MAX_TASKS`.
"""

MAX_TASKS = 100_000
"""The most workers (concurrent coroutines) an async stage may have."""


def _value(value: object) -> str:
    """The value as a message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: object) -> bool:
    """An int, and not a bool (True is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_callable(value: object, param: str, where: str) -> None:
    """Raise a clear TypeError when ``value`` is not callable."""
    if not callable(value):
        raise ConfigurationTypeError(
            f"{where} '{param}' must be callable, got {type(value).__name__} {_value(value)}"
        )


def check_int(
    value: object,
    param: str,
    where: str,
    minimum: int,
    maximum: int | None = None,
    *,
    note: str = "",
) -> int:
    """Return ``value`` if it is an int in ``[minimum, maximum]``, else raise a clear error.

    ``note`` is added to what the message says is accepted (a narrower limit elsewhere).
    """
    accepted = f"an int >= {minimum}" if maximum is None else f"an int from {minimum} to {maximum}"
    accepted += note
    if not _is_int(value):
        raise ConfigurationTypeError(
            f"{where} '{param}' must be {accepted}, got {type(value).__name__} {_value(value)}"
        )
    assert isinstance(value, int)
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigurationError(f"{where} '{param}' must be {accepted}, got {value}")
    return value


def check_capacity(value: object, where: str, stage: str) -> int:
    """Return ``value`` if it is a stage's capacity (an int >= 1), else raise a clear error.

    The one check of every place a stage's ``capacity`` is given (the builder
    methods, ``batch()``, ``with_stage()``); the message names the stage.
    """
    return check_int(
        value,
        "capacity",
        f"{where} stage {stage!r}:",
        1,
        note=" (the number of items the channel in front of the stage holds)",
    )


# A size as people write it: a number, then a unit. Decimal prefixes are powers of
# 1000 and binary ones (KiB, MiB...) of 1024, as `ls --si` and `ls -h` tell them apart;
# the B may be left out ("512M"), and case does not matter ("256mib").
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(i)?)?b?\s*", re.IGNORECASE)
_PREFIXES = "kmgtp"

BYTES_ACCEPTED = (
    "an int >= 1, or a size such as '256MiB', '1.5GB' or '512k' "
    "(K, M, G, T: powers of 1000; Ki, Mi, Gi, Ti: of 1024)"
)
"""What `check_byte_size` accepts, as its messages (and the CLI's) say it."""


def check_byte_size(value: object, param: str, where: str) -> int:
    """Return ``value`` as a number of bytes (>= 1), or raise a clear error.

    An int is taken as it is; a float only when it is whole (``2e9``); a string
    as a size with a unit (`BYTES_ACCEPTED`), rounded down to whole bytes.

    Raises:
        ConfigurationTypeError: neither an int, a float nor a string.
        ConfigurationError: a float that is not whole, a string that is no size, or
            a size under one byte.
    """
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigurationError(
                f"{where} '{param}' must be {BYTES_ACCEPTED}, got {_value(value)}"
            )
        value = int(value)
    if isinstance(value, str):
        size = _parse_size(value)
        if size is None:
            raise ConfigurationError(
                f"{where} '{param}' must be {BYTES_ACCEPTED}, got {_value(value)}"
            )
        if size < 1:
            raise ConfigurationError(
                f"{where} '{param}' must be {BYTES_ACCEPTED}, got {_value(value)} ({size} bytes)"
            )
        return size
    if not _is_int(value):
        raise ConfigurationTypeError(
            f"{where} '{param}' must be {BYTES_ACCEPTED}, got {type(value).__name__} "
            f"{_value(value)}"
        )
    assert isinstance(value, int)
    if value < 1:
        raise ConfigurationError(f"{where} '{param}' must be {BYTES_ACCEPTED}, got {value}")
    return value


def _parse_size(text: str) -> int | None:
    """Bytes in a size such as '1.5 GiB' (rounded down); None if ``text`` is none."""
    found = _SIZE.fullmatch(text)
    if found is None:
        return None
    number: str = found[1]
    prefix: str | None = found[2]
    power = 0 if prefix is None else _PREFIXES.index(prefix.lower()) + 1
    unit: int = (1024 if found[3] else 1000) ** power
    whole, _, fraction = number.partition(".")
    # In integers: exact for any size ('0.1TB' is 100000000000 bytes, not a float's).
    scale: int = 10 ** len(fraction)
    return int(whole or 0) * unit + int(fraction or 0) * unit // scale


def check_seconds(
    value: object,
    param: str,
    where: str,
    *,
    optional: bool = True,
    zero: bool = False,
    maximum: float | None = MAX_SECONDS,
) -> float | None:
    """Return ``value`` as float seconds if it is a number in range, else raise.

    Args:
        optional: None is accepted (and returned): "no limit".
        zero: 0 is accepted (a "do not wait" timeout); otherwise it must be > 0.
        maximum: the largest accepted (default `MAX_SECONDS`); None: any, inf included
            (for a wait the caller clamps itself).
    """
    if value is None and optional:
        return None
    accepted = "a non-negative number of seconds" if zero else "a positive number of seconds"
    if maximum is not None:
        accepted += f" up to {maximum:g}"
    if optional:
        accepted += " or None"
    if not _is_number(value):
        raise ConfigurationTypeError(
            f"{where} '{param}' must be {accepted}, got {type(value).__name__} {_value(value)}"
        )
    assert isinstance(value, (int, float))
    seconds = float(value)
    in_range = seconds >= 0 if zero else seconds > 0  # False for NaN
    if not in_range or (maximum is not None and seconds > maximum):
        raise ConfigurationError(f"{where} '{param}' must be {accepted}, got {_value(value)}")
    return seconds


def check_number(
    value: object, param: str, where: str, minimum: float, maximum: float = MAX_SECONDS
) -> float:
    """Return ``value`` as a float if it is a finite number in ``[minimum, maximum]``."""
    accepted = f"a number from {minimum:g} to {maximum:g}"
    if not _is_number(value):
        raise ConfigurationTypeError(
            f"{where} '{param}' must be {accepted}, got {type(value).__name__} {_value(value)}"
        )
    assert isinstance(value, (int, float))
    if not minimum <= value <= maximum:  # refuses NaN too
        raise ConfigurationError(f"{where} '{param}' must be {accepted}, got {_value(value)}")
    return float(value)


def check_choice(value: object, param: str, where: str, choices: tuple[str, ...]) -> None:
    """Raise a clear error when ``value`` is not one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigurationError(f"{where} '{param}' must be one of {allowed}; got {_value(value)}")


def check_bool(value: object, param: str, where: str) -> bool:
    """Return ``value`` if it is a bool (1 and "yes" are not), else raise."""
    if not isinstance(value, bool):
        raise ConfigurationTypeError(
            f"{where} '{param}' must be True or False, got {type(value).__name__} {_value(value)}"
        )
    return value


def check_str(value: object, param: str, where: str, *, optional: bool = False) -> str | None:
    """Return ``value`` if it is a non-empty str (or None when ``optional``), else raise."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        accepted = "a non-empty str" + (" or None" if optional else "")
        raise ConfigurationTypeError(
            f"{where} '{param}' must be {accepted}, got {type(value).__name__} {_value(value)}"
        )
    return value


NAME_ACCEPTED = "a non-empty name without white space"
"""What a name (a Redis namespace, a run id) may be: the library and the command
line accept the same, so any name one makes the other can use."""


def name_problem(text: str) -> str | None:
    """What keeps ``text`` from being a name (see `NAME_ACCEPTED`); None if nothing."""
    if not text:
        return "is empty"
    if any(c.isspace() for c in text):
        return "has white space"
    return None


def check_name(value: object, param: str, where: str, *, optional: bool = False) -> str | None:
    """Return ``value`` if it is a name (or None when ``optional``), else raise."""
    text = check_str(value, param, where, optional=optional)  # None, the type, not empty
    problem = None if text is None else name_problem(text)
    if problem is not None:
        raise ConfigurationError(
            f"{where} '{param}' must be {NAME_ACCEPTED}, got {text!r}, which {problem}"
        )
    return text


def check_optional(check: Callable[..., Any]) -> Callable[..., Any]:
    """``check`` that also accepts None (and returns it)."""

    def optional(value: object, param: str, where: str, *args: Any) -> Any:
        return None if value is None else check(value, param, where, *args)

    return optional
