"""What a stage is, and how it turns a batch of input items into outputs.

A `Stage` is an immutable description: its kind (map, filter, flat_map, batch,
each), the user's function, how many workers run it and on which runtime, the
capacity of the channel in front of it, and its policies (ordering, retries
with backoff, per-item timeout, what to do on error).

How a stage turns a batch into outputs (its policies applied) lives in
`conveyor.policy`, written once for every runtime and backend.
"""

from __future__ import annotations

import functools
import inspect
import random
import reprlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigurationError
from .validate import check_bool, check_choice, check_number, check_seconds

__all__ = [
    "DEFAULT_STOP_TIMEOUT",
    "FAILURES_KEPT",
    "KINDS",
    "ON_ERROR",
    "RUNTIMES",
    "Backoff",
    "Failure",
    "Stage",
    "error_message",
    "error_text",
    "gathered",
    "is_coroutine_function",
    "item_repr",
    "set_worker_state",
    "worker_state",
]

Kind = Literal["map", "filter", "flat_map", "batch", "each"]
KINDS: tuple[str, ...] = ("map", "filter", "flat_map", "batch", "each")
RuntimeName = Literal["thread", "process", "async", "interpreter"]
RUNTIMES: tuple[str, ...] = ("thread", "process", "async", "interpreter")
INTERPRETER_PYTHON = (3, 14)
"""The Python ``runtime="interpreter"`` needs (`concurrent.interpreters`, PEP 734)."""
OnError = Literal["raise", "skip"]
ON_ERROR: tuple[str, ...] = ("raise", "skip")

DEFAULT_CAPACITY = 1024
MAX_MULTIPLIER = 1000.0
"""The largest `Backoff.multiplier` accepted."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter between retries of one item.

    The n-th retry (n = 1, 2, ...) waits a random time in
    ``[0, min(maximum, initial * multiplier ** (n - 1))]``.
    """

    initial: float = 0.05
    """Upper bound of the first wait, in seconds."""
    maximum: float = 5.0
    """Cap on any single wait, in seconds."""
    multiplier: float = 2.0
    """Growth of the bound from one retry to the next."""
    jitter: bool = True
    """Draw the wait at random below the bound (True) or wait the bound itself."""

    def __post_init__(self) -> None:
        for name in ("initial", "maximum"):
            check_seconds(getattr(self, name), name, "Backoff", optional=False, zero=True)
        check_number(self.multiplier, "multiplier", "Backoff", 1, MAX_MULTIPLIER)
        check_bool(self.jitter, "jitter", "Backoff")
        if self.initial > self.maximum:  # every wait would be capped: not what was asked
            raise ConfigurationError(
                f"Backoff: 'initial' ({self.initial} s) is more than 'maximum' "
                f"({self.maximum} s), which caps every wait; give initial <= maximum "
                f"(defaults: {type(self).initial} s and {type(self).maximum} s)"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        try:
            bound = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        except OverflowError:  # a late retry of many: the bound has long reached the cap
            bound = self.maximum
        return random.uniform(0.0, bound) if self.jitter else bound


def item_repr(item: Any, limit: int = 80) -> str:
    """How notes, errors and reports show an item: a repr of at most about ``limit`` characters.

    Never raises: an item whose own repr raises is shown by its type and id.
    """
    shorten = reprlib.Repr()
    shorten.maxstring = shorten.maxother = limit
    return shorten.repr(item)


def error_message(error: BaseException) -> str:
    """``str(error)``; never raises: when the exception's own str raises, what
    Python's tracebacks then show, ``<exception str() failed>``."""
    try:
        return str(error)
    except Exception:
        return "<exception str() failed>"


def error_text(error: BaseException, limit: int = 1000) -> str:
    """How reports show an exception: ``Type: message``, the message cut to ``limit`` characters.

    Never raises (see `error_message`).
    """
    message = error_message(error)
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(error).__name__}: {message}"


FAILURES_KEPT = 10_000
"""The most failures a run records in ``result.failures`` (the first ones, on every
backend): a run where every item fails must not hold them all in memory (or in Redis).
The stages' ``failed`` counts every one; ``result.failures_not_kept`` says how many
were counted and not recorded."""


@dataclass(frozen=True)
class Failure:
    """An item a stage gave up on (recorded with ``on_error="skip"``).

    Its ``error`` keeps its traceback, which prints whole, but the frames' local
    variables are cleared once it is recorded: a failure does not keep alive what
    the stage held (a decoded file, a model's batch), as on the process runtime,
    whose errors come back without frames.
    """

    stage: str
    """Name of the stage."""
    item: Any
    """The input item that failed."""
    error: BaseException
    """The last exception it raised."""
    attempts: int
    """How many times the function was called on it: ``retries + 1`` once its retries
    are used up. On a process or interpreter stage, a call in a batch whose worker died
    is not counted: the batch's items are then called again one at a time, to find the
    one that killed it."""


DEFAULT_STOP_TIMEOUT = 5.0
"""Seconds a worker's ``on_stop`` may take by default (a stage's ``stop_timeout``)."""


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: a function applied by workers to items.

    Built by `Pipeline.map` and friends, which validate every parameter; see
    there for their meaning.
    """

    kind: Kind
    fn: Callable[..., Any] | None
    name: str
    workers: int = 1
    runtime: RuntimeName = "thread"
    capacity: int = DEFAULT_CAPACITY
    ordered: bool = True
    retries: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    timeout: float | None = None
    on_error: OnError = "raise"
    on_start: Callable[[], Any] | None = None
    on_stop: Callable[[Any], Any] | None = None
    batch_size: int = 0
    interval: float | None = None
    max_items_per_worker: int | None = None
    stop_timeout: float = DEFAULT_STOP_TIMEOUT

    @property
    def label(self) -> str:
        """How errors and reports name the stage: ``'parse' (map #2)``."""
        return f"'{self.name}' ({self.kind})"

    @property
    def is_async_fn(self) -> bool:
        """True when the function is a coroutine function."""
        return self.fn is not None and is_coroutine_function(self.fn)


def is_coroutine_function(fn: Callable[..., Any]) -> bool:
    """True when calling ``fn`` returns a coroutine (an ``async def``, or an object
    whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )


def gathered(fn: Callable[[Any], AsyncIterator[Any]]) -> Callable[[Any], Awaitable[list[Any]]]:
    """An async generator function as the coroutine function an async ``flat_map``
    awaits: what it yields for an item, gathered whole (as a plain ``flat_map``'s
    iterable is read whole, so a retried item never sends duplicates)."""

    @functools.wraps(fn)
    async def gather(item: Any) -> list[Any]:
        return [x async for x in fn(item)]

    return gather


def check_runtime(value: object, param: str, where: str) -> None:
    """Raise a clear error when ``value`` is not a runtime this Python can run."""
    check_choice(value, param, where, RUNTIMES)
    if value == "interpreter" and sys.version_info < INTERPRETER_PYTHON:
        raise ConfigurationError(
            f"{where} '{param}' 'interpreter' needs Python 3.14 or newer "
            f"(concurrent.interpreters, PEP 734); this is Python "
            f"{sys.version_info.major}.{sys.version_info.minor}: use runtime='process' here"
        )


# ---------------------------------------------------------------------- per-worker state

# A context variable rather than a thread-local: each thread starts with a
# context of its own, and so does each asyncio task, so the many worker
# coroutines of an async stage on one event loop each see their own state.
_worker_state: ContextVar[Any] = ContextVar("conveyor_worker_state", default=None)


def worker_state() -> Any:
    """Return what the current stage's ``on_start`` hook returned in this worker.

    Call it from inside a stage function, for example to reach the database
    connection that ``on_start`` opened once per worker. Returns None when
    the stage has no ``on_start``.
    """
    return _worker_state.get()


def set_worker_state(state: Any) -> None:
    """Make ``state`` what `worker_state()` returns in the calling thread or asyncio task."""
    _worker_state.set(state)
