"""What a stage is, and how it turns a batch of input items into outputs.

A `Stage` is an immutable description: its kind (map, filter, flat_map, batch,
each), the user's function, how many workers run it and on which runtime, the
capacity of the channel in front of it, and its policies (ordering, retries
with backoff, per-item timeout, what to do on error).

`process_batch` is the stage's logic, written once: every runtime (threads,
worker processes, the Redis workers) calls it, so a map behaves the same
everywhere. Its hot path is a tight loop over the batch; retries, skips and
timeouts only cost something for the items that need them.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import reprlib
import sys
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal

from .errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "KINDS",
    "ON_ERROR",
    "RUNTIMES",
    "Backoff",
    "BatchOutcome",
    "Failure",
    "Stage",
    "aapply_one",
    "add_note",
    "add_stage_note",
    "apply_one",
    "aprocess_batch",
    "process_batch",
    "timeout_error",
    "worker_state",
]

Kind = Literal["map", "filter", "flat_map", "batch", "each"]
KINDS: tuple[str, ...] = ("map", "filter", "flat_map", "batch", "each")
RuntimeName = Literal["thread", "process", "async"]
RUNTIMES: tuple[str, ...] = ("thread", "process", "async")
OnError = Literal["raise", "skip"]
ON_ERROR: tuple[str, ...] = ("raise", "skip")

DEFAULT_CAPACITY = 1024
_item_repr = reprlib.Repr()
_item_repr.maxstring = 80
_item_repr.maxother = 80


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
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigurationError(f"Backoff '{name}' must be a number >= 0, got {value!r}")
        if not isinstance(self.multiplier, (int, float)) or not self.multiplier >= 1:
            raise ConfigurationError(
                f"Backoff 'multiplier' must be a number >= 1, got {self.multiplier!r}"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        bound = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, bound) if self.jitter else bound


@dataclass(frozen=True)
class Failure:
    """An item a stage gave up on (recorded with ``on_error="skip"``)."""

    stage: str
    """Name of the stage."""
    item: Any
    """The input item that failed."""
    error: BaseException
    """The last exception it raised."""
    attempts: int
    """How many times the function was called on it."""


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

    @property
    def label(self) -> str:
        """How errors and reports name the stage: ``'parse' (map #2)``."""
        return f"'{self.name}' ({self.kind})"

    @property
    def is_async_fn(self) -> bool:
        """True when the function is a coroutine function."""
        return self.fn is not None and _is_coroutine_function(self.fn)


def _is_coroutine_function(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )


# ---------------------------------------------------------------------- validation


def check_callable(value: object, param: str, method: str) -> None:
    """Raise a clear TypeError when ``value`` is not callable."""
    if not callable(value):
        raise ConfigurationTypeError(
            f"{method}() '{param}' must be callable, got {type(value).__name__} {value!r:.60}"
        )


def check_int(value: object, param: str, method: str, minimum: int) -> int:
    """Return ``value`` if it is an int >= minimum, else raise a clear error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationTypeError(
            f"{method}() '{param}' must be an int >= {minimum}, got {type(value).__name__}"
        )
    if value < minimum:
        raise ConfigurationError(f"{method}() '{param}' must be >= {minimum}, got {value}")
    return value


def check_seconds(value: object, param: str, method: str) -> float | None:
    """Return ``value`` if it is None or a positive number of seconds, else raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationTypeError(
            f"{method}() '{param}' must be a number of seconds or None, got {type(value).__name__}"
        )
    if not value > 0:
        raise ConfigurationError(f"{method}() '{param}' must be > 0 seconds, got {value!r}")
    return float(value)


def check_choice(value: object, param: str, method: str, choices: tuple[str, ...]) -> None:
    """Raise a clear error when ``value`` is not one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigurationError(f"{method}() '{param}' must be one of {allowed}; got {value!r}")


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


# ---------------------------------------------------------------------- errors


def add_stage_note(exc: BaseException, stage: Stage, item: Any) -> BaseException:
    """Attach a PEP 678 note naming the stage and the item; return ``exc``.

    Only once per stage: the first note, made where the item is known, wins
    over a later, coarser one (a worker loop knows only its batch).
    """
    prefix = f"conveyor: stage {stage.label} failed on item "
    if any(str(n).startswith(prefix) for n in getattr(exc, "__notes__", ())):
        return exc
    return add_note(exc, prefix + _item_repr.repr(item))


def add_note(exc: BaseException, note: str) -> BaseException:
    """Attach a PEP 678 note to ``exc`` (also on 3.10, as ``__notes__``); return ``exc``."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # 3.10: keep the notes where 3.11+ would, for callers that read them
        notes = getattr(exc, "__notes__", None)
        if notes is None:
            notes = []
            exc.__notes__ = notes  # type: ignore[attr-defined]
        notes.append(note)
    return exc


# ---------------------------------------------------------------------- the stage's logic


@dataclass
class BatchOutcome:
    """What a batch of input items produced."""

    outputs: list[Any]
    """Outputs, in the order of the inputs that produced them."""
    filtered: int = 0
    """Inputs a filter dropped."""
    retried: int = 0
    """Extra calls made by retries."""
    failures: list[Failure] = field(default_factory=list)
    """Items given up on with ``on_error="skip"``."""
    error: BaseException | None = None
    """With ``on_error="raise"``: the exception that stops the run (noted)."""
    error_item: Any = None
    """The item that raised ``error``."""
    processed: int = 0
    """Inputs handled (successfully or not) before ``error``, if any."""
    size_limit: int | None = None
    """A runtime's cap on the size of the worker's next batch (process workers: the
    items whose big buffers fit in one shared-memory message)."""
    busy_seconds: float | None = None
    """The time spent on the batch where the runtime measured it itself (a worker
    process: its time in the stage, not the round trip to it, which also holds
    the wait behind the batch before); None: the time ``execute`` took."""


def _apply_run(
    stage: Stage, batch: list[Any], start: int, out: list[Any]
) -> tuple[int, int, Exception | None]:
    """Apply the stage to ``batch[start:]`` until an item raises.

    Appends outputs to ``out``; returns (index reached, filtered count, the
    exception). The index is ``len(batch)`` when no item raised, else the
    failing item's, whose outputs (none) were not appended.
    """
    fn = stage.fn
    assert fn is not None
    kind = stage.kind
    i = start
    filtered = 0
    n = len(batch)
    try:
        if kind == "map":
            append = out.append
            while i < n:
                append(fn(batch[i]))
                i += 1
        elif kind == "filter":
            append = out.append
            while i < n:
                x = batch[i]
                if fn(x):
                    append(x)
                else:
                    filtered += 1
                i += 1
        elif kind == "flat_map":
            extend = out.extend
            while i < n:
                # Materialise first: a generator that fails halfway adds nothing.
                extend(list(fn(batch[i])))
                i += 1
        else:  # each
            while i < n:
                fn(batch[i])
                i += 1
    except Exception as exc:
        return i, filtered, exc
    except BaseException as exc:  # Ctrl-C, SystemExit: no policy applies, but name the item
        add_stage_note(exc, stage, batch[i])
        raise
    return i, filtered, None


def apply_one(stage: Stage, item: Any) -> tuple[list[Any], bool]:
    """Apply the stage to one item; return (outputs, filtered)."""
    fn = stage.fn
    assert fn is not None
    return _outputs_of(stage.kind, item, fn(item))


async def aapply_one(stage: Stage, item: Any) -> tuple[list[Any], bool]:
    """Apply a coroutine stage to one item within its ``timeout``; return (outputs, filtered).

    Raises:
        TimeoutError: the call took longer than the stage's ``timeout`` (it
            was cancelled).
    """
    fn = stage.fn
    assert fn is not None
    if stage.timeout is None:
        return _outputs_of(stage.kind, item, await fn(item))
    try:
        result = await asyncio.wait_for(fn(item), stage.timeout)
    except asyncio.TimeoutError as exc:
        # wait_for's own timeout is chained to the cancellation it caused; a
        # TimeoutError the function raised itself is not, and goes on untouched.
        if not isinstance(exc.__cause__, asyncio.CancelledError):
            raise
        raise timeout_error(stage) from None
    return _outputs_of(stage.kind, item, result)


def _outputs_of(kind: str, item: Any, result: Any) -> tuple[list[Any], bool]:
    """What a call that returned ``result`` on ``item`` sends on: (outputs, filtered)."""
    if kind == "map":
        return [result], False
    if kind == "filter":
        return ([item], False) if result else ([], True)
    if kind == "flat_map":
        return list(result), False
    return [], False


def timeout_error(stage: Stage) -> TimeoutError:
    """The error of a call that exceeded the stage's per-item ``timeout``."""
    return TimeoutError(
        f"stage {stage.label} took longer than its timeout of {stage.timeout} s on one item"
    )


def _retry_delay(stage: Stage, attempts: int) -> float | None:
    """Seconds to wait before calling an item again after ``attempts`` failed calls.

    None when the item is out of retries: then `_give_up` applies ``on_error``.
    """
    return stage.backoff.delay(attempts) if attempts <= stage.retries else None


def _give_up(
    stage: Stage, outcome: BatchOutcome, item: Any, error: Exception, attempts: int, index: int
) -> bool:
    """Apply ``on_error`` to ``batch[index]``, out of retries; True when the batch ends there."""
    if stage.on_error == "skip":
        outcome.failures.append(Failure(stage.name, item, error, attempts))
        return False
    outcome.error = add_stage_note(error, stage, item)
    outcome.error_item = item
    outcome.processed = index
    return True


def process_batch(
    stage: Stage,
    batch: list[Any],
    call: Callable[[Stage, Any], tuple[list[Any], bool]] | None = None,
    sleep: Callable[[float], bool] | None = None,
) -> BatchOutcome:
    """Run ``batch`` through ``stage`` with its retry and error policies.

    Args:
        stage: the stage (not a ``batch`` stage: those accumulate instead).
        batch: the input items.
        call: how to apply the stage to one item, for items that need the
            slow path (a failure, or a per-item timeout). Defaults to a plain
            call; the thread runtime passes one that enforces ``timeout``.
        sleep: waits between retries; returns False when the run was stopped
            meanwhile: then the batch ends there, without an error or a
            failure (the item did not fail, the stop cut its retries short).

    Returns:
        The outcome. With ``on_error="raise"``, the first item that exhausts
        its retries ends the batch: ``error`` is its exception, noted with the
        stage and the item, and ``processed`` says how far the batch got.
    """
    out: list[Any] = []
    outcome = BatchOutcome(out)
    n = len(batch)
    i = 0
    slow = call is not None and stage.timeout is not None
    one = call or apply_one
    while i < n:
        error: Exception | None = None
        if not slow:
            i, filtered, error = _apply_run(stage, batch, i, out)
            outcome.filtered += filtered
            if i == n:
                break
        item = batch[i]
        attempts = 1
        while True:
            if error is None:
                try:
                    outputs, was_filtered = one(stage, item)
                except Exception as exc:
                    error = exc
                except BaseException as exc:  # as in _apply_run
                    add_stage_note(exc, stage, item)
                    raise
                else:
                    out.extend(outputs)
                    outcome.filtered += was_filtered
                    break
            delay = _retry_delay(stage, attempts)
            if delay is None:
                if _give_up(stage, outcome, item, error, attempts, i):
                    return outcome
                break
            if sleep is not None and not sleep(delay):
                # Stopped while waiting: reporting the error would turn a stop() into a failure.
                outcome.processed = i
                return outcome
            outcome.retried += 1
            attempts += 1
            error = None
        i += 1
    outcome.processed = n
    return outcome


async def aprocess_batch(stage: Stage, batch: list[Any]) -> BatchOutcome:
    """`process_batch` for a coroutine stage: the same policies, awaited.

    Items run one after the other (a stage's concurrency is its number of
    worker coroutines); retries wait with `asyncio.sleep` and ``timeout``
    cancels the call (see `aapply_one`). A stop cancels the worker, so a
    `asyncio.CancelledError` from the call or the wait goes through.

    Returns:
        The outcome, as `process_batch` returns it.
    """
    out: list[Any] = []
    outcome = BatchOutcome(out)
    for i, item in enumerate(batch):
        attempts = 1
        while True:
            error: Exception | None = None
            try:
                outputs, was_filtered = await aapply_one(stage, item)
            except Exception as exc:
                error = exc
            except BaseException as exc:  # as in _apply_run; a cancellation is the run's stop
                if not isinstance(exc, asyncio.CancelledError):
                    add_stage_note(exc, stage, item)
                raise
            else:
                out.extend(outputs)
                outcome.filtered += was_filtered
                break
            delay = _retry_delay(stage, attempts)
            if delay is None:
                if _give_up(stage, outcome, item, error, attempts, i):
                    return outcome
                break
            await asyncio.sleep(delay)
            outcome.retried += 1
            attempts += 1
    outcome.processed = len(batch)
    return outcome


def iter_outputs(stage: Stage, item: Any) -> Iterable[Any]:
    """The outputs of one item (used by the reference, single-threaded path)."""
    return apply_one(stage, item)[0]


def now() -> float:
    """The clock stage timings use."""
    return perf_counter()
