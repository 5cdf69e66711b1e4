"""The on-error policy: how a stage turns a batch of input items into a `BatchOutcome`.

Every runtime and every port goes through here, so a stage behaves the same
on threads, in worker processes, on an event loop and behind Redis:

- the stage's function applied to each item (map, filter, flat_map, each);
- ``retries`` with `Backoff` between attempts of one item;
- ``on_error``: ``"raise"`` ends the batch at the item (its exception noted
  with the stage and the item, PEP 678), ``"skip"`` records a `Failure` and
  goes on;
- per-item ``timeout``: through the ``call`` a runtime passes (a helper
  thread, a killed child process, `asyncio.wait_for`).

A `BatchOutcome` says what the batch produced and, when the port asks for it
(``track=True``), which input produced which outputs: a Redis port
acknowledges each input entry with its own outputs, and an ordered Redis run
numbers the outputs of each input.

The hot path is a tight loop over the batch; retries, skips and timeouts
only cost something for the items that need them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any

from .errors import SerializationError
from .stage import Failure, Stage, item_repr

__all__ = [
    "ITEM_LOOPS",
    "BatchOutcome",
    "aapply_one",
    "add_note",
    "add_stage_note",
    "apply_one",
    "aprocess_batch",
    "cancels_this_task",
    "coroutine_returned",
    "drop_unsendable",
    "flat_outputs",
    "forget_locals",
    "give_up",
    "item_repr",
    "outputs_of",
    "process_batch",
    "retry_delay",
    "timeout_error",
    "type_name",
]

# ---------------------------------------------------------------------- notes


def add_stage_note(
    exc: BaseException, stage: Stage, item: Any, *, holding: bool = True
) -> BaseException:
    """Attach a PEP 678 note naming the stage and the item; return ``exc``.

    Only once per stage: the first note, made where the item is known, wins
    over a later, coarser one (a worker loop knows only its batch). With
    ``holding=False`` the worker held no item (it failed waiting for one, or
    handing outputs on): the note says so rather than name ``item``.
    """
    prefix = f"conveyor: stage {stage.label} failed "
    if any(str(n).startswith(prefix) for n in getattr(exc, "__notes__", ())):
        return exc
    if not holding:
        return add_note(exc, prefix + "while it held no item")
    return add_note(exc, prefix + "on item " + item_repr(item))


def add_note(exc: BaseException, note: str) -> BaseException:
    """Attach a PEP 678 note to ``exc``; return ``exc``."""
    exc.add_note(note)
    return exc


def forget_locals(error: BaseException) -> None:
    """Clear the local variables of the frames in ``error``'s traceback, and in those of
    the exceptions chained to it: the traceback still prints (its lines are kept), but no
    longer keeps alive what the code held. A frame still running is left as it is."""
    import traceback

    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        pending += (exc.__cause__, exc.__context__)


def cancels_this_task(exc: BaseException) -> bool:
    """True when ``exc`` is the `asyncio.CancelledError` of the task running this code
    being cancelled (the run stopping its worker or feeder, or the caller's loop
    shutting down); False for any other exception, and for a CancelledError raised by
    the user's code (a stage or an async source) while nobody cancelled the task:
    awaiting a future that something else cancelled, say. That one is the user's
    error, as a ``KeyboardInterrupt`` it raised would be; taken for a stop, it ended
    the run as if complete and lost the items after it."""
    asyncio = sys.modules.get("asyncio")  # not loaded: nothing can be cancelled
    if asyncio is None or not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no loop runs here (a feeder thread after asyncio.run)
        return False
    return task is not None and task.cancelling() > 0


# ---------------------------------------------------------------------- the outcome


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
    failed_at: list[int] = field(default_factory=list)
    """The batch index of each of ``failures``."""
    error: BaseException | None = None
    """With ``on_error="raise"``: the exception that stops the batch (noted)."""
    error_item: Any = None
    """The item that raised ``error``."""
    processed: int = 0
    """Inputs handled (successfully or not) before ``error``, if any: the batch
    index of the item that raised it."""
    counts: list[int] | None = None
    """With ``track=True``: how many outputs each of the first ``processed``
    inputs produced (0 for a filtered or skipped one), so that the outputs of
    input ``i`` are ``outputs[sum(counts[:i]):sum(counts[:i + 1])]``."""
    size_limit: int | None = None
    """A runtime's cap on the size of the worker's next batch (process workers: the
    items whose big buffers fit in one shared-memory message)."""
    busy_seconds: float | None = None
    """The time spent on the batch where the runtime measured it itself (a worker
    process: its time in the stage, not the round trip to it, which also holds
    the wait behind the batch before); None: the time ``execute`` took."""

    def fail(self, stage: Stage, error: BaseException, item: Any, index: int) -> None:
        """End the outcome with ``error`` (noted with the stage and item) at batch[index]."""
        self.error = add_stage_note(error, stage, item)
        self.error_item = item
        self.processed = index

    def add(self, outputs: list[Any], filtered: bool) -> None:
        """Count one input's outputs (the slow path: one item at a time)."""
        self.outputs.extend(outputs)
        self.filtered += filtered
        if self.counts is not None:
            self.counts.append(len(outputs))

    def per_input(self) -> list[list[Any]]:
        """The outputs of each processed input, in input order (needs ``counts``)."""
        assert self.counts is not None, "per_input() needs an outcome made with track=True"
        result: list[list[Any]] = []
        at = 0
        outputs = self.outputs
        for n in self.counts:
            result.append(outputs[at : at + n])
            at += n
        return result


# ---------------------------------------------------------------------- one item


def apply_one(stage: Stage, item: Any) -> tuple[list[Any], bool]:
    """Apply the stage to one item; return (outputs, filtered).

    Raises:
        TypeError: the function returned a coroutine (see `coroutine_returned`).
    """
    fn = stage.fn
    assert fn is not None
    result = fn(item)
    if type(result) is CoroutineType:
        raise coroutine_returned(stage, result)
    return outputs_of(stage.kind, item, result)


def coroutine_returned(stage: Stage, coroutine: CoroutineType[Any, Any, Any]) -> TypeError:
    """The error of a call on a thread, process or interpreter worker that returned a
    coroutine (a lambda calling an ``async def``, say): nothing there awaits it, so it
    would go on as an item and warn "never awaited" when collected. It is closed here,
    and the call is an item error like any other (``retries`` and ``on_error`` apply).

    The check is one ``type(result) is CoroutineType`` per call on the hot path."""
    coroutine.close()
    return TypeError(
        f"stage {stage.label} returned a coroutine ({coroutine.__qualname__}) on "
        f"runtime={stage.runtime!r}, which calls functions and does not await what "
        f'they return: give the stage an async def with runtime="async" (or make '
        f"the function return its value)"
    )


async def aapply_one(stage: Stage, item: Any) -> tuple[list[Any], bool]:
    """Apply a coroutine stage to one item within its ``timeout``; return (outputs, filtered).

    Raises:
        TimeoutError: the call took longer than the stage's ``timeout`` (it
            was cancelled), however it ended after that.
    """
    fn = stage.fn
    assert fn is not None
    if stage.timeout is None:
        return outputs_of(stage.kind, item, await fn(item))
    import asyncio  # loaded by then: a coroutine is running

    deadline = asyncio.timeout(stage.timeout)
    try:
        async with deadline:
            result = await fn(item)
    except Exception:
        # A TimeoutError the function raised itself, in time, goes on untouched.
        if not deadline.expired():
            raise
    if deadline.expired():
        # Past its timeout, a call is a timeout however it ends: one that swallowed
        # the cancellation and returned (or raised) is one too, as on the thread and
        # process runtimes, which give up on the call at the deadline.
        raise timeout_error(stage) from None
    return outputs_of(stage.kind, item, result)


def outputs_of(kind: str, item: Any, result: Any) -> tuple[list[Any], bool]:
    """What a call of a ``kind`` stage that returned ``result`` on ``item`` sends on:
    (outputs, filtered)."""
    if kind == "map":
        return [result], False
    if kind == "filter":
        return ([item], False) if result else ([], True)
    if kind == "flat_map":
        return flat_outputs(result), False
    return [], False


def flat_outputs(result: Any) -> list[Any]:
    """The outputs a ``flat_map`` function's ``result`` holds, read whole; a result that
    is no iterable is a TypeError saying what the function must return."""
    try:
        return list(result)
    except TypeError:
        if hasattr(result, "__iter__") or hasattr(result, "__getitem__"):
            raise  # raised while iterating: the function's own error
        raise TypeError(
            "a flat_map function must return an iterable of the item's outputs (a list, "
            f"a tuple, a generator), got {type(result).__name__}"
        ) from None


def timeout_error(stage: Stage) -> TimeoutError:
    """The error of a call that exceeded the stage's per-item ``timeout``."""
    return TimeoutError(
        f"stage {stage.label} took longer than its timeout of {stage.timeout} s on one item"
    )


# ---------------------------------------------------------------------- the policy


def retry_delay(stage: Stage, attempts: int) -> float | None:
    """Seconds to wait before calling an item again after ``attempts`` failed calls.

    None when the item is out of retries: then `give_up` applies ``on_error``.
    """
    return stage.backoff.delay(attempts) if attempts <= stage.retries else None


def give_up(
    stage: Stage, outcome: BatchOutcome, item: Any, error: BaseException, attempts: int, index: int
) -> bool:
    """Apply ``on_error`` to ``batch[index]``, out of retries; True when the batch ends there.

    ``"skip"`` records a `Failure` (and, when tracked, no outputs for the
    item); ``"raise"`` ends the outcome with the noted error.
    """
    if stage.on_error == "skip":
        outcome.failures.append(Failure(stage.name, item, error, attempts))
        outcome.failed_at.append(index)
        if outcome.counts is not None:
            outcome.counts.append(0)
        return False
    outcome.fail(stage, error, item, index)
    return True


def drop_unsendable(
    stage: Stage,
    batch: list[Any],
    outcome: BatchOutcome,
    first_bad: Callable[[list[Any]], tuple[int, Exception] | None],
    cannot: str,
) -> BatchOutcome:
    """The outcome again, each input with an output that cannot go on turned into a
    failure of that input: ``on_error`` applies (skip it, or end the batch there).

    The slow path after a tracked outcome's outputs failed to go on as a whole:
    ``first_bad`` finds the first output of a list that cannot (its index and
    error), and the input's error is a `SerializationError` naming the stage and
    saying it ``cannot`` (say, "be sent back from the worker process").
    """
    assert outcome.counts is not None
    fixed = BatchOutcome([], outcome.filtered, outcome.retried, counts=[])
    fixed.busy_seconds = outcome.busy_seconds
    failed = dict(zip(outcome.failed_at, outcome.failures, strict=True))
    for index, outputs in enumerate(outcome.per_input()):
        if index in failed:
            fixed.failures.append(failed[index])
            fixed.failed_at.append(index)
            fixed.counts.append(0)  # type: ignore[union-attr]
            continue
        bad = first_bad(outputs)
        if bad is None:
            fixed.outputs.extend(outputs)
            fixed.counts.append(len(outputs))  # type: ignore[union-attr]
            continue
        error = SerializationError(
            f"stage {stage.label}: a result of type {type_name(outputs[bad[0]])} cannot "
            f"{cannot}: {bad[1]}"
        )
        error.__cause__ = bad[1]
        if give_up(stage, fixed, batch[index], error, 1, index):
            return fixed
    if outcome.error is not None:
        fixed.error, fixed.error_item = outcome.error, outcome.error_item
    fixed.processed = outcome.processed
    return fixed


def type_name(obj: Any) -> str:
    """How errors name the type of ``obj``: its qualified name, with the module's
    unless a builtin."""
    kind = type(obj)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _apply_run(
    stage: Stage, batch: list[Any], start: int, out: list[Any], counts: list[int] | None
) -> tuple[int, int, Exception | None]:
    """Apply the stage to ``batch[start:]`` until an item raises.

    Appends outputs to ``out`` (and, with ``counts``, each input's number of
    outputs); returns (index reached, filtered count, the exception). The
    index is ``len(batch)`` when no item raised, else the failing item's,
    whose outputs (none) were not appended.
    """
    fn = stage.fn
    assert fn is not None
    kind = stage.kind
    i = start
    filtered = 0
    n = len(batch)
    kind_of, coroutine = type, CoroutineType  # locals: the check below runs per call
    try:
        # Each call's result is checked for a coroutine (`coroutine_returned`): one
        # type comparison, the only cost this check adds to the loop.
        if kind == "map":
            append = out.append
            while i < n:
                result = fn(batch[i])
                if kind_of(result) is coroutine:
                    raise coroutine_returned(stage, result)
                append(result)
                i += 1
            if counts is not None:
                counts.extend([1] * (n - start))
        elif kind == "filter":
            append = out.append
            while i < n:
                x = batch[i]
                result = fn(x)
                if kind_of(result) is coroutine:
                    raise coroutine_returned(stage, result)
                if result:
                    append(x)
                    if counts is not None:
                        counts.append(1)
                else:
                    filtered += 1
                    if counts is not None:
                        counts.append(0)
                i += 1
        elif kind == "flat_map":
            extend = out.extend
            while i < n:
                result = fn(batch[i])
                if kind_of(result) is coroutine:
                    raise coroutine_returned(stage, result)
                # Materialise first: a generator that fails halfway adds nothing.
                outputs = flat_outputs(result)
                extend(outputs)
                if counts is not None:
                    counts.append(len(outputs))
                i += 1
        else:  # each
            while i < n:
                result = fn(batch[i])
                if kind_of(result) is coroutine:
                    raise coroutine_returned(stage, result)
                i += 1
            if counts is not None:
                counts.extend([0] * (n - start))
    except Exception as exc:
        if counts is not None and kind in ("map", "each"):
            # The bulk extend above did not run: count the items done before the failure.
            counts.extend([1 if kind == "map" else 0] * (i - start))
        return i, filtered, exc
    except BaseException as exc:  # Ctrl-C, SystemExit: no policy applies, but name the item
        add_stage_note(exc, stage, batch[i])
        raise
    return i, filtered, None


def process_batch(
    stage: Stage,
    batch: list[Any],
    call: Callable[[Stage, Any], tuple[list[Any], bool]] | None = None,
    sleep: Callable[[float], bool] | None = None,
    track: bool = False,
    first_error: Exception | None = None,
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
        track: record which input produced which outputs (`BatchOutcome.counts`).
        first_error: what the first call of ``batch[0]`` raised, when the caller
            made that call itself (a worker's single-item path): the policy
            takes over from there, without calling that item again.

    Returns:
        The outcome. With ``on_error="raise"``, the first item that exhausts
        its retries ends the batch: ``error`` is its exception, noted with the
        stage and the item, and ``processed`` says how far the batch got.
    """
    out: list[Any] = []
    counts: list[int] | None = [] if track else None
    outcome = BatchOutcome(out, counts=counts)
    n = len(batch)
    i = 0
    slow = call is not None and stage.timeout is not None
    one = call or apply_one
    while i < n:
        error, first_error = first_error, None
        if error is None and not slow:
            i, filtered, error = _apply_run(stage, batch, i, out, counts)
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
                    outcome.add(outputs, was_filtered)
                    break
            delay = retry_delay(stage, attempts)
            if delay is None:
                if give_up(stage, outcome, item, error, attempts, i):
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


async def aprocess_batch(
    stage: Stage, batch: list[Any], track: bool = False, first_error: Exception | None = None
) -> BatchOutcome:
    """`process_batch` for a coroutine stage: the same policies, awaited.

    Items run one after the other (a stage's concurrency is its number of
    worker coroutines); retries wait with `asyncio.sleep` and ``timeout``
    cancels the call (see `aapply_one`). A stop cancels the worker, so a
    `asyncio.CancelledError` from the call or the wait goes through.
    ``first_error``: as in `process_batch`, what the caller's own first call
    of ``batch[0]`` raised.

    Returns:
        The outcome, as `process_batch` returns it.
    """
    import asyncio  # loaded by then: a coroutine is running

    outcome = BatchOutcome([], counts=[] if track else None)
    for i, item in enumerate(batch):
        attempts = 1
        error, first_error = first_error, None
        while True:
            if error is None:
                try:
                    outputs, was_filtered = await aapply_one(stage, item)
                except Exception as exc:
                    error = exc
                except BaseException as exc:  # as in _apply_run; a cancellation is the run's stop
                    if not cancels_this_task(exc):
                        add_stage_note(exc, stage, item)
                    raise
                else:
                    outcome.add(outputs, was_filtered)
                    break
            delay = retry_delay(stage, attempts)
            if delay is None:
                if give_up(stage, outcome, item, error, attempts, i):
                    return outcome
                break
            await asyncio.sleep(delay)
            outcome.retried += 1
            attempts += 1
            error = None
    outcome.processed = len(batch)
    return outcome


ITEM_LOOPS = frozenset({_apply_run.__code__, process_batch.__code__})
"""The code of the loops that call a stage function item by item: a frame running one
holds the batch (``batch``) and the index of the item it is on (``i``). What a worker
process's probe looks for on its main thread's stack (`conveyor.runtime._child`)."""
