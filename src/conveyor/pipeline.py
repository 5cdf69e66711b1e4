"""The pipeline builder users write, and the handle of a run in the background.

A `Pipeline` is an immutable description: a source and a tuple of stages.
Each builder method returns a new pipeline with one more stage, so a
pipeline can be kept, extended and run several times (as long as its source
can be iterated again). Running it creates a `conveyor.engine.Run`.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import aclosing
from functools import partial
from os import PathLike
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar, Unpack, overload

from .backends import (
    Backend,
    BackgroundRun,
    LocalBackend,
    budget_option,
    check_backend,
    run_options,
)
from .channel import Channel, check_max_bytes
from .engine import JOIN_TIMEOUT, AsyncOutputs, Run, wait_interruptibly
from .errors import ConfigurationError, ConfigurationTypeError
from .metrics import MetricsExporter, OutputT, RunResult, StageStats
from .stage import (
    DEFAULT_CAPACITY,
    ON_ERROR,
    Backoff,
    Kind,
    OnError,
    RuntimeName,
    Stage,
    check_runtime,
    gathered,
    is_coroutine_function,
)
from .validate import (
    MAX_TASKS,
    MAX_WORKERS,
    check_bool,
    check_callable,
    check_capacity,
    check_choice,
    check_int,
    check_seconds,
    check_str,
)

if TYPE_CHECKING:
    import asyncio
    from pathlib import Path

    from .progress import Monitor

__all__ = ["Pipeline", "RunHandle", "StageOptions"]

T = TypeVar("T")
U = TypeVar("U")


# ---------------------------------------------------------------------- stage options


class _Options(TypedDict, total=False):
    """`StageOptions` but ``runtime``, which `Pipeline.map` takes as a parameter
    of its own: it decides the type of the outputs."""

    workers: int
    capacity: int
    ordered: bool
    retries: int
    backoff: Backoff | None
    timeout: float | None
    on_error: OnError
    name: str | None
    on_start: Callable[[], Any] | None
    on_stop: Callable[[Any], Any] | None
    stop_timeout: float


class StageOptions(_Options, total=False):
    """The keyword-only options of a stage that calls a function.

    `Pipeline.map`, `~Pipeline.filter`, `~Pipeline.flat_map` and
    `~Pipeline.each` take them all, each optional (``**options:
    Unpack[StageOptions]``); a function that passes them on can be typed
    the same way. Each is checked when the stage is added: a bad value
    raises `ConfigurationError` or `ConfigurationTypeError` naming the
    option and the method, an unknown name a `TypeError`.

    Keys:
        workers: how many workers call the function in parallel (>= 1;
            default 1): at most 1024 threads, processes or interpreters
            (`conveyor.validate.MAX_WORKERS`), 100 000 coroutines.
        runtime: ``"thread"`` (default), ``"process"`` (CPU-bound Python),
            ``"async"`` (a coroutine function; ``workers`` is the
            concurrency) or ``"interpreter"`` (CPU-bound Python in
            subinterpreters of this process; Python 3.14+).
        capacity: the size of the channel in front of the stage (>= 1;
            default 1024).
        ordered: keep input order across workers (default), or let results
            go on as they complete (``False``: faster).
        retries: extra attempts for an item that raises (>= 0; default 0).
        backoff: waits between retries, a `conveyor.Backoff` (default:
            exponential with jitter, from 50 ms, at most 5 s).
        timeout: seconds one call may take before it counts as failed with
            `TimeoutError` (then ``retries`` and ``on_error`` apply); > 0 and
            at most 1 000 000 (`conveyor.validate.MAX_SECONDS`); default
            None, no limit. The overrunning call: a coroutine is
            cancelled, a worker process killed; a thread or an interpreter
            cannot be stopped, so the call is given up and finishes in the
            background.
        on_error: ``"raise"`` (default) stops the run with the error;
            ``"skip"`` records the item in ``result.failures`` and goes on.
        name: the stage's name in errors and reports, unique in the
            pipeline (default: the function's name).
        on_start: called once in each worker before its first item; what it
            returns is `conveyor.worker_state()` inside the function. (An
            async stage starts its worker tasks as work comes, up to
            ``workers``: once per task started.)
        on_stop: called once in each worker after its last item, with what
            ``on_start`` returned.
        stop_timeout: seconds ``on_stop`` may take (> 0, at most 1 000 000;
            default 5): past them, a worker process is killed, a thread or
            interpreter left to finish on its own while the run goes on, and
            a warning says so. Give a flush that takes longer the time it needs.

    `Pipeline.map` also takes ``max_items_per_worker`` (>= 1, default None:
    never): a worker starts afresh after this many items, for code that
    leaks. A process or interpreter worker is replaced by a new one; a thread
    worker runs ``on_stop`` then ``on_start`` again (a new
    `conveyor.worker_state()`). Refused with ``runtime="async"``.
    """

    runtime: RuntimeName


class _MapOptions(_Options, total=False):
    """What `Pipeline.map` takes beside ``runtime``: see `StageOptions`."""

    max_items_per_worker: int | None


_STAGE_KEYS = StageOptions.__optional_keys__
_MAP_KEYS = _STAGE_KEYS | _MapOptions.__optional_keys__


class Pipeline(Generic[T]):
    """Items from a source through stages of workers, over bounded channels.

    Args:
        source: any iterable or async iterable. It is pulled lazily: never
            more than the first stage's ``capacity`` items ahead.

    Example:
        >>> import conveyor as cv
        >>> p = cv.Pipeline(range(5)).map(lambda x: x * x, workers=2).filter(lambda x: x % 2)
        >>> list(p)
        [1, 9]
    """

    def __init__(self, source: Iterable[T] | AsyncIterable[T]) -> None:
        if not isinstance(source, (Iterable, AsyncIterable)):
            raise _not_a_source(source)
        self._source: Iterable[Any] | AsyncIterable[Any] = source
        self._stages: tuple[Stage, ...] = ()
        self._runs: list[Run] = []
        # Shared by every pipeline built from this one (they share the source):
        # how many runs have pulled it, so a one-shot iterator is not run twice.
        self._source_runs: list[int] = [0]
        # True for the copy that `_admit` hands to a backend: its one run is counted.
        self._admitted = False
        # The MODULE:ATTR that built it, when `conveyor.loading` did: messages that tell
        # the user to start workers name it.
        self._target: str | None = None

    def _copy(self, stages: tuple[Stage, ...], admitted: bool = False) -> Pipeline[Any]:
        """This pipeline with other stages, over the same source (and its count of
        runs). An admitted copy stands for one counted run of this pipeline, whose
        `_runs` it shares so that leaving ``with pipeline:`` stops that run too."""
        new: Pipeline[Any] = Pipeline.__new__(Pipeline)
        new._source = self._source
        new._stages = stages
        new._runs = self._runs if admitted else []
        new._source_runs = self._source_runs
        new._admitted = admitted
        # The same stages by kind and name (a copy to run, a worker count changed): the
        # same pipeline for the workers that load the target; other stages are another.
        same = [(s.kind, s.name) for s in stages] == [(s.kind, s.name) for s in self._stages]
        new._target = self._target if same else None
        return new

    @property
    def target(self) -> str | None:
        """``MODULE:ATTR``, when the pipeline was found by that name (``conveyor run``, a
        worker); None when code built it (then only that code knows its name)."""
        return self._target

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages, in order."""
        return self._stages

    @property
    def source(self) -> Iterable[Any] | AsyncIterable[Any]:
        """The source the pipeline pulls."""
        return self._source

    def _with(self, stage: Stage) -> Pipeline[Any]:
        if self._stages and self._stages[-1].kind == "each":
            sink = self._stages[-1].name
            raise ConfigurationError(
                f"{stage.kind}(): the pipeline ends with each() stage {sink!r}, its sink, "
                f"which passes nothing on: a stage after it would never get an item. Add "
                f"{stage.kind}() before each(), or make {sink!r} a map() to pass items on"
            )
        names = {s.name for s in self._stages}
        if stage.name in names:
            raise _duplicate_name(stage.name)
        return self._copy((*self._stages, stage))

    def with_stage(self, name: str, /, **changes: Any) -> Pipeline[T]:
        """Return a copy where the stage ``name`` has some options changed.

        Used by ``conveyor run --workers STAGE=N``; the changes are validated
        as the builder methods validate them. ``changes`` are stage options
        (`StageOptions`, ``max_items_per_worker``), or ``batch_size`` and
        ``interval`` for a batch stage; ``name=`` among them renames the
        stage (``name`` itself is positional only, so that it can).

        Raises:
            ConfigurationError: no stage has that name, or a value is invalid.
            ConfigurationTypeError: a value has the wrong type.
            TypeError: a name that is not a stage option.
        """
        from dataclasses import replace

        found = [s for s in self._stages if s.name == name]
        if not found:
            known = ", ".join(repr(s.name) for s in self._stages) or "none"
            raise ConfigurationError(
                f"with_stage() 'name': no stage named {name!r}; stages: {known}"
            )
        method = f"with_stage({name!r})"
        stage = found[0]
        allowed = _BATCH_CHANGES if stage.kind == "batch" else _STAGE_CHANGES[stage.kind == "map"]
        _check_keywords("with_stage", changes, allowed)
        checked = {key: _CHECKS[key](value, key, method) for key, value in changes.items()}
        new_name = checked.pop("name", None) or name
        if "capacity" in checked:
            checked["capacity"] = check_capacity(checked["capacity"], method, new_name)
        if new_name != name and new_name in {s.name for s in self._stages}:
            raise _duplicate_name(new_name)
        checked["name"] = new_name
        changed = replace(stage, **checked)
        if changed.kind != "batch":
            _check_combination(changed, method)
        return self._copy(tuple(changed if s.name == name else s for s in self._stages))

    # ------------------------------------------------------------------ stages

    def _stage(
        self,
        kind: Kind,
        fn: Callable[..., Any] | None,
        options: Mapping[str, Any],
        allowed: frozenset[str],
        fn_param: str = "fn",
    ) -> Pipeline[Any]:
        """A copy with a stage of ``kind`` added; ``allowed``: the option names it takes."""
        method = f"{kind}()"
        _check_keywords(kind, options, allowed)
        check_callable(fn, fn_param, method)
        checked = {key: _CHECKS[key](value, key, method) for key, value in options.items()}
        name = checked.pop("name", None) or self._default_name(kind, fn)
        if "capacity" in checked:
            checked["capacity"] = check_capacity(checked["capacity"], method, name)
        backoff = checked.pop("backoff", None)
        assert fn is not None
        stage = Stage(
            kind=kind,
            fn=fn,
            name=name,
            backoff=backoff or Backoff(),
            **checked,
        )
        _check_combination(stage, method)
        return self._with(stage)

    def _default_name(self, kind: str, fn: Callable[..., Any] | None) -> str:
        base = getattr(fn, "__name__", None) or kind
        if base == "<lambda>":
            base = kind
        name, n = base, 2
        taken = {s.name for s in self._stages}
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    # ``runtime`` is a parameter of its own here: with "async", the outputs are
    # what fn's coroutines return, not the coroutines.
    @overload
    def map(
        self,
        fn: Callable[[T], Awaitable[U]],
        *,
        runtime: Literal["async"],
        **options: Unpack[_MapOptions],
    ) -> Pipeline[U]: ...

    @overload
    def map(
        self,
        fn: Callable[[T], U],
        *,
        runtime: RuntimeName = ...,
        **options: Unpack[_MapOptions],
    ) -> Pipeline[U]: ...

    def map(
        self,
        fn: Callable[[T], Any],
        *,
        runtime: RuntimeName = "thread",
        **options: Unpack[_MapOptions],
    ) -> Pipeline[Any]:
        """Apply ``fn`` to every item; its return value goes on.

        Args:
            fn: the function (a coroutine function with ``runtime="async"``).
            runtime: ``"thread"`` (default), ``"process"``, ``"async"`` or
                ``"interpreter"`` (Python 3.14+).
            **options: the stage's options, keyword-only and optional: see
                `StageOptions` (``workers``, ``retries``, ``timeout``, ...);
                ``map`` also takes ``max_items_per_worker``.

        Returns:
            A new pipeline with the stage added.

        Raises:
            ConfigurationError: an option is out of range.
            ConfigurationTypeError: an option has the wrong type.
            TypeError: an unknown keyword argument.
        """
        return self._stage("map", fn, {"runtime": runtime, **options}, _MAP_KEYS)

    def filter(self, pred: Callable[[T], object], **options: Unpack[StageOptions]) -> Pipeline[T]:
        """Keep the items for which ``pred`` is true. Options: `StageOptions`, as for `map`."""
        return self._stage("filter", pred, options, _STAGE_KEYS, fn_param=_FN_PARAM["filter"])

    # As for map: with "async", the elements are those of what fn's coroutines
    # return, or of what its async generators yield.
    @overload
    def flat_map(
        self,
        fn: Callable[[T], AsyncIterable[U]],
        *,
        runtime: Literal["async"],
        **options: Unpack[_Options],
    ) -> Pipeline[U]: ...

    @overload
    def flat_map(
        self,
        fn: Callable[[T], Awaitable[Iterable[U]]],
        *,
        runtime: Literal["async"],
        **options: Unpack[_Options],
    ) -> Pipeline[U]: ...

    @overload
    def flat_map(
        self,
        fn: Callable[[T], Iterable[U]],
        *,
        runtime: RuntimeName = ...,
        **options: Unpack[_Options],
    ) -> Pipeline[U]: ...

    def flat_map(
        self,
        fn: Callable[[T], Any],
        *,
        runtime: RuntimeName = "thread",
        **options: Unpack[_Options],
    ) -> Pipeline[Any]:
        """Apply ``fn`` to every item; each element of the iterable it returns goes on.

        The iterable is read whole before its elements go on, so an item
        that fails halfway (and is retried) never sends duplicates. The
        elements of one item are therefore in memory together, beside the
        channels' bounds: for a fan-out too big for that (the lines of a
        big file), make it the source instead, which is pulled lazily:
        ``Pipeline(line for path in paths for line in open(path))``.
        With ``runtime="async"``, ``fn`` is a coroutine function returning an
        iterable, or an async generator function (``async def`` with
        ``yield``), whose elements are gathered the same way.
        Options: `StageOptions`, as for `map`.
        """
        stage_fn: Callable[[T], object] = gathered(fn) if inspect.isasyncgenfunction(fn) else fn
        return self._stage("flat_map", stage_fn, {"runtime": runtime, **options}, _STAGE_KEYS)

    def each(self, fn: Callable[[T], object], **options: Unpack[StageOptions]) -> Pipeline[None]:
        """Call ``fn`` on every item for its side effects (the sink); nothing goes on.

        Options: `StageOptions`, as for `map`.
        """
        return self._stage("each", fn, options, _STAGE_KEYS)

    def batch(
        self,
        size: int,
        *,
        interval: float | None = None,
        capacity: int = DEFAULT_CAPACITY,
        name: str | None = None,
    ) -> Pipeline[list[T]]:
        """Group items into lists of up to ``size``, in order.

        Args:
            size: the largest list (>= 1).
            interval: with it, a partial list goes on ``interval`` seconds
                after its first item arrived, so a slow source still flows.
            capacity: the size of the channel in front of this stage.
            name: the stage's name (default ``batch``).
        """
        method = "batch()"
        check_int(size, "size", method, 1)
        interval = check_seconds(interval, "interval", method)
        check_str(name, "name", method, optional=True)
        name = name or self._default_name("batch", None)
        check_capacity(capacity, method, name)
        stage = Stage(
            kind="batch",
            fn=None,
            name=name,
            capacity=capacity,
            batch_size=size,
            interval=interval,
        )
        return self._with(stage)

    # ------------------------------------------------------------------ running

    def _admit(self, method: str, backend: Backend | None = None) -> Pipeline[T]:
        """The gate of every run, on every backend (through `conveyor.backends.admit`):
        refuse a run that cannot work before anything starts, and count it as a run of
        the source. Returns the pipeline to run: an admitted copy, which passes this
        gate again (a backend's ``start`` admits, its ``run`` in a thread too) without
        being counted twice."""
        if not self._stages:
            raise ConfigurationError(
                f"{method}: the pipeline has no stage: add .map(), .each(), ..."
            )
        _check_processes_allowed(self._stages, method)
        if backend is not None:
            backend.check(self)
        if self._admitted:
            return self
        self._refuse_pulled_source(method)
        self._source_runs[0] += 1
        return self._copy(self._stages, admitted=True)

    def _refuse_pulled_source(self, method: str) -> None:
        """Refuse a second run over a source that the first one used up."""
        if not self._source_runs[0]:
            return
        if _is_one_shot(self._source):
            raise ConfigurationError(
                f"{method}: the pipeline's 'source' is a one-shot iterator "
                f"({type(self._source).__name__}) that an earlier run already pulled; "
                f"a second run would get nothing (or the rest). Build the pipeline over a "
                f"re-iterable source (a list, a range, an object whose __iter__ starts "
                f"afresh), or a new Pipeline over a new iterator for each run"
            )
        if _is_drained_channel(self._source):
            raise ConfigurationError(
                f"{method}: the pipeline's 'source' is a Channel that is closed and drained: "
                f"an earlier run took all its items, and a second run would get nothing. "
                f"Put the items in a new Channel and build a Pipeline over it"
            )

    def _new_run(
        self,
        method: str,
        loop: asyncio.AbstractEventLoop | None = None,
        metrics: MetricsExporter | None = None,
        max_bytes: int | None = None,
        start: bool = True,
    ) -> Run:
        """A run of this pipeline, started unless ``start`` is False (then the caller
        starts it inside the ``try`` that ends it: Ctrl-C may land as it starts)."""
        self._admit(method)
        run = Run(self._source, list(self._stages), loop=loop, max_bytes=max_bytes)
        if metrics is not None:
            metrics.watch(run)  # read at scrapes, never on the workers' path
        self._runs.append(run)
        if start:
            run.start()
        return run

    def iterate(
        self,
        *,
        backend: Backend | None = None,
        progress: bool = False,
        metrics: MetricsExporter | None = None,
        max_bytes: int | str | None = None,
    ) -> Iterator[T]:
        """Run the pipeline and yield the last stage's outputs lazily (``for x in
        pipeline`` is ``pipeline.iterate()``).

        Args:
            backend: where to run (default: this process); e.g.
                ``conveyor.RedisBackend(url)``.
            progress: show the run's progress (with a backend that has it).
            metrics: as for `run`.
            max_bytes: as for `run`.

        Breaking out of the loop stops the run and joins its workers; on
        Redis, the run stays there to be resumed with its ``run_id``.
        """
        check_bool(progress, "progress", "iterate()")
        max_bytes = check_max_bytes(max_bytes, "iterate()")
        chosen = _remote(backend, "iterate()", None, metrics, max_bytes)
        if chosen is not None:
            return chosen.iterate(
                self._admit("iterate()", chosen), progress=progress, **budget_option(max_bytes)
            )
        if progress:
            raise ConfigurationError(
                "iterate() 'progress': a run on this machine shows its progress with "
                "run(progress=True) or start(progress=True)"
            )
        return self._iterate("iterate()", metrics, max_bytes)

    def __iter__(self) -> Iterator[T]:
        """Run the pipeline and yield the last stage's outputs lazily.

        Breaking out of the loop stops the run and joins its workers.
        """
        return self._iterate("iterating a pipeline", None, None)

    def _iterate(
        self, method: str, metrics: MetricsExporter | None, max_bytes: int | None
    ) -> Iterator[T]:
        # Admitted here, at the call: a run that cannot work is refused at once, not at
        # the first next().
        return self._admit(method)._outputs(method, metrics, max_bytes)

    def _outputs(
        self, method: str, metrics: MetricsExporter | None, max_bytes: int | None
    ) -> Iterator[T]:
        run = self._new_run(method, metrics=metrics, max_bytes=max_bytes, start=False)
        try:
            run.start()
            for chunk in run.outputs():
                yield from chunk
        except BaseException as exc:  # a break (GeneratorExit), Ctrl-C, an error: end the run here
            _end(run, exc)
            raise
        finally:
            _forget(self._runs, run)

    def run(
        self,
        *,
        collect: bool = False,
        progress: bool = False,
        report: str | PathLike[str] | None = None,
        stall_timeout: float | None = None,
        backend: Backend | None = None,
        metrics: MetricsExporter | None = None,
        max_bytes: int | str | None = None,
    ) -> RunResult[T]:
        """Run to completion and return the per-stage statistics.

        Args:
            collect: keep the last stage's outputs in ``result.outputs``
                (otherwise they are counted and dropped).
            progress: show a live per-stage table on stderr when it is a
                terminal; elsewhere, log a progress line every few seconds
                on the ``conveyor`` logger (INFO).
            report: write a self-contained HTML report of the run to this
                path at the end (also when the run fails).
            stall_timeout: when no item moves for this many seconds, log a
                WARNING on the ``conveyor`` logger naming which worker holds
                which item, for how long, with its stack.
            backend: run elsewhere than in this process, e.g.
                ``conveyor.redis.RedisBackend(url)``: workers anywhere serve
                the stages (see docs/distributed.md). ``progress`` and
                ``report`` work there too (read from the backend's counters);
                ``stall_timeout`` applies to runs in this process only.
            metrics: an exporter that reads the run's counters when it is
                scraped, e.g. ``conveyor.prometheus.PrometheusExporter(port=9000)``
                (see docs/observability.md); runs in this process only (Redis
                workers serve theirs with ``conveyor worker --metrics-port``).
            max_bytes: a memory budget in bytes for the items in flight (an
                int, or a size such as ``"256MiB"`` or ``"1.5GB"``), split
                evenly between the run's channels (the N stages' input
                channels and the output: a share of ``max_bytes // (N + 1)``
                each; see `conveyor.Channel` for
                how items are measured). Besides its channels' shares, the
                run holds per worker (per lane of a process worker) one
                batch within its input channel's share and the batch's
                outputs, the caller's current chunk of outputs within the
                output's share, and the one item the feeder has pulled; an
                item larger than a share moves alone. docs/design.md gives
                the bound in full. With ``backend=RedisBackend(...)`` it bounds
                the bytes the run's Redis streams hold, split the same way
                (see docs/distributed.md); other backends refuse it.

        Raises:
            Exception: the first error of a stage with ``on_error="raise"``,
                with its own type and a note naming the stage and the item.
            PipelineStopped: the run was stopped from elsewhere.
        """
        _check_flags("run()", collect=collect, progress=progress)
        max_bytes = check_max_bytes(max_bytes, "run()")
        remote = _remote(backend, "run()", stall_timeout, metrics, max_bytes)
        if remote is not None:
            return remote.run(
                self._admit("run()", remote), **run_options(collect, progress, report, max_bytes)
            )
        watch = _check_watch("run()", report, stall_timeout)
        outputs: list[Any] | None = [] if collect else None
        monitor: Monitor | None = None
        run = self._new_run("run()", metrics=metrics, max_bytes=max_bytes, start=False)
        try:
            run.start()
            monitor = _start_monitor(run, self._source, progress, *watch)
            for chunk in run.outputs():
                if outputs is not None:
                    outputs.extend(chunk)
        except BaseException as exc:  # also before the outputs (Ctrl-C just after the start)
            _end(run, exc)
            raise
        finally:
            if monitor is not None:
                monitor.close()
            _forget(self._runs, run)
        return run.result(outputs)

    def __aiter__(self) -> AsyncIterator[T]:
        """Run the pipeline from async code; ``async for`` gets the outputs lazily.

        Async stages (and an async source) run on the caller's event loop,
        which is never blocked: thread and process stages run in their
        threads as usual. Leaving the loop early stops the run; use
        `contextlib.aclosing` to have it joined at once rather than when the
        iterator is collected.

        Example:
            >>> import asyncio, conveyor as cv
            >>> async def double(x):
            ...     return 2 * x
            >>> async def main():
            ...     return [x async for x in cv.Pipeline(range(3)).map(double, runtime="async")]
            >>> asyncio.run(main())
            [0, 2, 4]
        """
        admitted = self._admit("iterating a pipeline")  # refused at the call, not at the first item

        def start() -> Run:  # at the first __anext__, from a coroutine on the run's loop
            import asyncio  # loaded by then: a coroutine is running

            return admitted._new_run("iterating a pipeline", loop=asyncio.get_running_loop())

        return AsyncOutputs(start, partial(_forget, admitted._runs))

    async def arun(
        self,
        *,
        collect: bool = False,
        progress: bool = False,
        report: str | PathLike[str] | None = None,
        stall_timeout: float | None = None,
        backend: Backend | None = None,
        metrics: MetricsExporter | None = None,
        max_bytes: int | str | None = None,
    ) -> RunResult[T]:
        """`run` from async code: ``await pipeline.arun()``, on the caller's event loop.

        Async stages (and an async source) run on the caller's loop, which
        keeps serving other tasks meanwhile; thread and process stages run in
        their threads. Cancelling the awaiting task stops the run, cancels the
        stages' coroutines and waits for them to end.

        Args:
            collect: keep the last stage's outputs in ``result.outputs``.
            progress: as for `run`. The watching (``progress``, ``report``,
                ``stall_timeout``) runs in a thread of its own, never on the
                loop.
            report: as for `run`; the report is written when the run ends,
                before ``arun`` returns.
            stall_timeout: as for `run`.
            metrics: as for `run`.
            backend: as for `run`; the loop keeps serving while the backend's
                run goes on (in a thread), and cancelling stops that run.
            max_bytes: as for `run`.

        Raises:
            Exception: as `run` does: the first error of a stage with
                ``on_error="raise"``, with its own type.
            PipelineStopped: the run was stopped from elsewhere.
        """
        _check_flags("arun()", collect=collect, progress=progress)
        max_bytes = check_max_bytes(max_bytes, "arun()")
        remote = _remote(backend, "arun()", stall_timeout, metrics, max_bytes)
        if remote is not None:
            return await remote.arun(
                self._admit("arun()", remote), **run_options(collect, progress, report, max_bytes)
            )
        import asyncio  # loaded by then: a coroutine is running

        watch = _check_watch("arun()", report, stall_timeout)
        run = self._new_run(
            "arun()", loop=asyncio.get_running_loop(), metrics=metrics, max_bytes=max_bytes
        )
        outputs: list[Any] | None = [] if collect else None
        monitor: Monitor | None = None
        try:
            try:
                monitor = _start_monitor(run, self._source, progress, *watch)
            except BaseException:  # the outputs, which end the run, are not reached
                run.abort()
                await run.ajoin()
                raise
            async with aclosing(run.aoutputs()) as chunks:
                async for chunk in chunks:
                    if outputs is not None:
                        outputs.extend(chunk)
        except BaseException as exc:  # cancelled, Ctrl-C, an error: say what was left behind
            run.note_left_behind(exc)
            raise
        finally:
            if monitor is not None:
                monitor.close()
            _forget(self._runs, run)
        return run.result(outputs)

    @overload
    def start(
        self,
        *,
        collect: bool = ...,
        progress: bool = ...,
        report: str | PathLike[str] | None = ...,
        stall_timeout: float | None = ...,
        backend: None = ...,
        metrics: MetricsExporter | None = ...,
        max_bytes: int | str | None = ...,
    ) -> RunHandle[T]: ...

    @overload
    def start(
        self,
        *,
        collect: bool = ...,
        progress: bool = ...,
        report: str | PathLike[str] | None = ...,
        stall_timeout: float | None = ...,
        backend: Backend,
        metrics: MetricsExporter | None = ...,
        max_bytes: int | str | None = ...,
    ) -> RunHandle[T] | BackgroundRun[T]: ...

    def start(
        self,
        *,
        collect: bool = False,
        progress: bool = False,
        report: str | PathLike[str] | None = None,
        stall_timeout: float | None = None,
        backend: Backend | None = None,
        metrics: MetricsExporter | None = None,
        max_bytes: int | str | None = None,
    ) -> RunHandle[T] | BackgroundRun[T]:
        """Start a run in the background and return its handle.

        Options as for `run`. With a backend other than this process, the
        handle is a `conveyor.backends.BackgroundRun`, with the same methods as a
        `RunHandle` (stop, with drain too, done, wait, join, stats, result_so_far).
        """
        _check_flags("start()", collect=collect, progress=progress)
        max_bytes = check_max_bytes(max_bytes, "start()")
        remote = _remote(backend, "start()", stall_timeout, metrics, max_bytes)
        if remote is not None:
            return remote.start(
                self._admit("start()", remote), **run_options(collect, progress, report, max_bytes)
            )
        watch = _check_watch("start()", report, stall_timeout)
        run = self._new_run("start()", metrics=metrics, max_bytes=max_bytes)
        monitor = _start_monitor(run, self._source, progress, *watch)
        handle: RunHandle[T] = RunHandle(run, collect, self._runs, monitor)
        return handle

    def __enter__(self) -> Pipeline[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop and join every run of this pipeline still going."""
        runs = list(self._runs)
        for run in runs:
            run.abort()
        for run in runs:
            run.join()
            # A started run's driver thread outlives the join by a moment: wait for it too.
            if run.driver is not None and run.driver is not threading.current_thread():
                run.driver.join(JOIN_TIMEOUT)
        self._runs.clear()

    def __repr__(self) -> str:
        steps = " -> ".join(f"{s.kind}({s.name})" for s in self._stages) or "(no stage)"
        return f"<Pipeline {steps}>"


def _remote(
    backend: object,
    method: str,
    stall_timeout: object,
    metrics: object = None,
    max_bytes: object = None,
) -> Backend | None:
    """The backend to hand the run to; None for a run in this process (the default)."""
    chosen = check_backend(backend, method)
    _check_metrics(metrics, method, chosen)
    check_max_bytes(max_bytes, method)
    if chosen is None or isinstance(chosen, LocalBackend):
        return None
    if max_bytes is not None and not chosen.bounds_bytes:
        raise ConfigurationError(
            f"{method} 'max_bytes' bounds the memory of a run in this process or in its "
            f"Redis streams; {type(chosen).__name__} does not support it"
        )
    if stall_timeout is not None:
        raise ConfigurationError(
            f"{method} 'stall_timeout' applies to runs in this process, not with a "
            f"backend: `conveyor status` shows where a distributed run stands"
        )
    return chosen


def _check_metrics(metrics: object, method: str, backend: Backend | None) -> None:
    """Refuse a ``metrics=`` that is no exporter, or that is given with a remote backend."""
    if metrics is None:
        return
    if not isinstance(metrics, MetricsExporter):
        raise ConfigurationTypeError(
            f"{method} 'metrics' must be a metrics exporter (an object with a "
            f"watch(source) method, e.g. conveyor.prometheus.PrometheusExporter(port=9000)), "
            f"got {type(metrics).__name__}"
        )
    if backend is not None and not isinstance(backend, LocalBackend):
        raise ConfigurationError(
            f"{method} 'metrics' applies to runs in this process, not with a backend: "
            f"Redis workers serve their metrics (conveyor worker --metrics-port PORT)"
        )


def _check_flags(method: str, **flags: object) -> None:
    """Refuse a run option meant as True/False that is not a bool."""
    for name, value in flags.items():
        check_bool(value, name, method)


def _is_one_shot(source: object) -> bool:
    """True for a source that iterating consumes: an iterator, a generator, an async one."""
    if isinstance(source, Iterator):
        return iter(source) is source
    if isinstance(source, AsyncIterator):
        return source.__aiter__() is source
    return False


def _is_drained_channel(source: object) -> bool:
    """True for a Channel that can give nothing more: closed, and every item taken."""
    return isinstance(source, Channel) and source.closed and source.empty()


def _not_a_source(source: object) -> ConfigurationTypeError:
    # A generator function given for its generator is the likely slip: say to call it.
    hint = ""
    if callable(source):
        name = getattr(source, "__name__", "")
        hint = f"; call it: Pipeline({name if name.isidentifier() else 'source'}())"
    return ConfigurationTypeError(
        f"Pipeline 'source' must be an iterable or async iterable, "
        f"got {type(source).__name__}{hint}"
    )


def _check_processes_allowed(stages: tuple[Stage, ...], method: str) -> None:
    """Refuse process stages in a daemonic process (a process stage's worker):
    multiprocessing forbids it children, and would say so with a bare AssertionError."""
    import multiprocessing

    if not multiprocessing.current_process().daemon:
        return
    for stage in stages:
        if stage.runtime == "process":
            raise ConfigurationError(
                f"{method}: stage {stage.label} has 'runtime'='process', but this code runs "
                f"in a worker process (of a process stage, "
                f"{multiprocessing.current_process().name!r}), which may not start processes "
                f"of its own; give the inner pipeline's stages runtime='thread' (or 'async'), "
                f"or make the outer stage a thread stage"
            )


def _end(run: Run, error: BaseException) -> None:
    """Stop ``run`` and join its threads (no-op for a run that has ended already); note on
    ``error``, the exception ending it, what was left behind stuck in user code."""
    run.abort()
    run.join()
    run.note_left_behind(error)


def _forget(registry: list[Run], run: Run) -> None:
    """Take ``run`` off its pipeline's list, which ``__exit__`` may have cleared already."""
    try:
        registry.remove(run)
    except ValueError:
        pass


def _check_keywords(method: str, options: Mapping[str, Any], allowed: frozenset[str]) -> None:
    """Refuse a keyword argument that is not an option of ``method``, as Python would,
    and say which it takes (the closest first, when one is close)."""
    for key in options:
        if key not in allowed:
            import difflib  # an error path

            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            accepted = ", ".join(sorted(allowed))
            raise TypeError(
                f"{method}() got an unexpected keyword argument {key!r}{hint}; it takes {accepted}"
            )


_Check = Callable[[Any, str, str], Any]
"""An option's check: (value, option, method) -> the value as the stage keeps it."""


def _check_backoff(value: object, param: str, method: str) -> object:
    if value is not None and not isinstance(value, Backoff):
        raise ConfigurationTypeError(
            f"{method} '{param}' must be a conveyor.Backoff, got {type(value).__name__}"
        )
    return value


def _check_hook(value: object, param: str, method: str) -> object:
    if value is not None:
        check_callable(value, param, method)
    return value


def _check_choice_of(choices: tuple[str, ...]) -> _Check:
    def check(value: object, param: str, method: str) -> object:
        check_choice(value, param, method, choices)
        return value

    return check


def _check_runtime(value: object, param: str, method: str) -> object:
    check_runtime(value, param, method)
    return value


def _check_at_least(minimum: int, maximum: int | None = None, *, optional: bool = False) -> _Check:
    def check(value: object, param: str, method: str) -> object:
        if optional and value is None:
            return None
        return check_int(value, param, method, minimum, maximum)

    return check


def _check_workers(value: object, param: str, method: str) -> object:
    # The per-runtime limit is checked with the runtime (_check_combination); the
    # message says it from the start, so that workers=0 does not suggest 100000.
    note = f" (at most {MAX_WORKERS} unless runtime='async')"
    return check_int(value, param, method, 1, MAX_TASKS, note=note)


def _check_stage_name(value: object, param: str, method: str) -> object:
    return check_str(value, param, method, optional=True)


def _check_capacity(value: object, param: str, method: str) -> object:
    # The type and range; the stage's name, known later, goes in check_capacity's message.
    return value


def _check_interval(value: object, param: str, method: str) -> object:
    return check_seconds(value, param, method)


def _check_stop_timeout(value: object, param: str, method: str) -> object:
    return check_seconds(value, param, method, optional=False)


_CHECKS: dict[str, _Check] = {
    # Each raises an error naming the option and the method. One line per option.
    "workers": _check_workers,
    "runtime": _check_runtime,
    "capacity": _check_capacity,
    "ordered": check_bool,
    "retries": _check_at_least(0),
    "backoff": _check_backoff,
    "timeout": check_seconds,
    "on_error": _check_choice_of(ON_ERROR),
    "name": _check_stage_name,
    "on_start": _check_hook,
    "on_stop": _check_hook,
    "stop_timeout": _check_stop_timeout,
    "max_items_per_worker": _check_at_least(1, optional=True),
    # with_stage() of a batch stage
    "batch_size": _check_at_least(1),
    "interval": _check_interval,
}

_BATCH_CHANGES = frozenset({"batch_size", "interval", "capacity", "name"})
_STAGE_CHANGES = {False: _STAGE_KEYS, True: _MAP_KEYS}
"""What `Pipeline.with_stage` may change: a batch stage's, another stage's (a map's?)."""


def _duplicate_name(name: str) -> Exception:
    return ConfigurationError(
        f"stage name {name!r} is already used in this pipeline: give each stage a unique name"
    )


def _check_combination(stage: Stage, method: str) -> None:
    """Refuse options that cannot work together (each valid on its own)."""
    _check_runtime_fits(stage)
    if stage.runtime != "async" and stage.workers > MAX_WORKERS:
        raise ConfigurationError(
            f"{method} 'workers' must be at most {MAX_WORKERS} with runtime={stage.runtime!r} "
            f"(one {stage.runtime} each), got {stage.workers}; an async stage may have up "
            f"to {MAX_TASKS}"
        )
    if stage.runtime == "async" and stage.max_items_per_worker is not None:
        raise ConfigurationError(
            f"{method} 'max_items_per_worker' applies to runtime='thread', 'process' or "
            f"'interpreter' (a worker is recycled after that many items); an async "
            f"stage's workers are coroutines: got runtime='async' with max_items_per_worker="
            f"{stage.max_items_per_worker}"
        )


_GENERATOR_MISUSE = {
    "map": "which would go on unread",
    "filter": "which is always true",
    "each": "which never runs the function's body",
}
"""What a generator function would do as the function of these stages (never what
was meant: only flat_map reads what it yields)."""


_FN_PARAM = {"filter": "pred"}
"""The function's parameter where a stage's method does not call it ``fn``."""


def _check_runtime_fits(stage: Stage) -> None:
    """A coroutine function needs the async runtime, and the async runtime one."""
    param = _FN_PARAM.get(stage.kind, "fn")  # the parameter as the public signature names it
    if inspect.isasyncgenfunction(stage.fn):  # flat_map gathers one (see Pipeline.flat_map)
        raise ConfigurationError(
            f"{stage.kind}() stage {stage.name!r}: {param!r} is an async generator function; "
            f"only flat_map takes one (with runtime='async'), to send on what it yields"
        )
    if inspect.isgeneratorfunction(stage.fn) and stage.kind in _GENERATOR_MISUSE:
        raise ConfigurationError(
            f"{stage.kind}() stage {stage.name!r}: {param!r} is a generator function (it has "
            f"'yield'): each call returns a generator, {_GENERATOR_MISUSE[stage.kind]}; "
            f"use flat_map to send on what it yields"
        )
    if stage.is_async_fn and stage.runtime != "async":
        # flat_map wraps an async generator function (`conveyor.stage.gathered`).
        what = (
            "an async generator function"
            if inspect.isasyncgenfunction(getattr(stage.fn, "__wrapped__", None))
            else "a coroutine function"
        )
        raise ConfigurationError(
            f"{stage.kind}() stage {stage.name!r}: {param!r} is {what}; "
            f"pass runtime='async' to run it (got 'runtime'={stage.runtime!r})"
        )
    if stage.runtime == "async" and not stage.is_async_fn:
        raise ConfigurationError(
            f"{stage.kind}() stage {stage.name!r}: 'runtime'='async' needs a coroutine function "
            f"(async def), got {getattr(stage.fn, '__name__', stage.fn)!r}"
        )
    if stage.runtime == "async":
        return
    # Only the async runtime awaits a hook: elsewhere its coroutine would be the state.
    for hook, fn in (("on_start", stage.on_start), ("on_stop", stage.on_stop)):
        if fn is not None and is_coroutine_function(fn):
            raise ConfigurationError(
                f"{stage.kind}() stage {stage.name!r}: {hook!r} is a coroutine function, "
                f"which only runtime='async' awaits; give a plain function with "
                f"'runtime'={stage.runtime!r}"
            )


def _check_watch(
    method: str, report: str | PathLike[str] | None, stall_timeout: object
) -> tuple[Path | None, float | None]:
    """Validate the watching options before the run starts."""
    from .report import check_report_path

    seconds = check_seconds(stall_timeout, "stall_timeout", method)
    return (None if report is None else check_report_path(report, method)), seconds


def _start_monitor(
    run: Run,
    source: object,
    progress: bool,
    report: Path | None,
    stall_timeout: float | None,
) -> Monitor | None:
    """Watch ``run`` when any of progress, report or stall detection is asked for."""
    if not progress and report is None and stall_timeout is None:
        return None
    from .progress import Monitor

    return Monitor.start(
        run, source=source, progress=progress, report=report, stall_timeout=stall_timeout
    )


class RunHandle(Generic[OutputT]):
    """A run going on in the background: watch it, stop it, wait for its result.

    Generic in the type of the outputs, as `RunResult` is.
    """

    def __init__(
        self, run: Run, collect: bool, registry: list[Run], monitor: Monitor | None = None
    ) -> None:
        self._run = run
        self._monitor = monitor
        self._outputs: list[OutputT] | None = [] if collect else None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._registry = registry
        self._thread = threading.Thread(target=self._drain, name="conveyor-driver", daemon=True)
        run.driver = self._thread
        self._thread.start()

    def _drain(self) -> None:
        try:
            for chunk in self._run.outputs():
                if self._outputs is not None:
                    self._outputs.extend(chunk)
        except BaseException as exc:
            self._error = exc
        finally:
            if self._monitor is not None:
                try:
                    self._monitor.close()
                except BaseException as exc:  # the report could not be written
                    self._error = self._error or exc
            _forget(self._registry, self._run)
            self._done.set()

    def stop(self, drain: bool = False) -> None:
        """Stop the run: at once (default), or, with ``drain``, stop the source and let
        the items already inside finish. A run that has ended stays as it ended.

        With ``drain``, an async source awaiting its next item is cancelled
        there (its cleanup runs; an item it still gives goes in). A plain
        iterator blocked in ``next()`` cannot be interrupted: the run ends once
        that call returns, with its item, or at a ``stop()`` without drain.
        """
        check_bool(drain, "drain", "RunHandle.stop()")
        if self._done.is_set():
            return
        if drain:
            self._run.stop_source()
        else:
            self._run.abort()

    def done(self) -> bool:
        """True once the run has ended (finished, failed or stopped)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the end of the run, without its result or error; True if it ended."""
        check_seconds(timeout, "timeout", "RunHandle.wait()", zero=True)
        return wait_interruptibly(self._done.wait, timeout)

    def join(self, timeout: float | None = None) -> RunResult[OutputT]:
        """Wait for the end of the run and return its result.

        Raises:
            TimeoutError: the run did not end within ``timeout`` seconds.
            Exception: the run's first error, as `Pipeline.run` raises it
                (not after `stop()`).
        """
        check_seconds(timeout, "timeout", "RunHandle.join()", zero=True)
        try:
            ended = wait_interruptibly(self._done.wait, timeout)
        except BaseException as exc:  # Ctrl-C while waiting: the run must not go on behind
            self.stop()
            self._done.wait(JOIN_TIMEOUT)
            self._thread.join(JOIN_TIMEOUT)
            self._run.note_left_behind(exc)
            raise
        if not ended:
            raise TimeoutError(f"the run did not end within {timeout} s")
        self._thread.join(JOIN_TIMEOUT)
        if self._error is not None and not (
            self._run.control.error is None and self._run.control.stopped.is_set()
        ):
            raise self._run.note_left_behind(self._error)
        return self._run.result(self._outputs)

    def stats(self) -> list[StageStats]:
        """Per-stage statistics, live."""
        return self._run.stats()

    def result_so_far(self) -> RunResult[OutputT]:
        """The run's result as it stands: live while it goes on; after a `join` that
        raised, what the run did before it failed or was stopped (statistics,
        failures recorded, outputs collected)."""
        return self._run.result(None if self._outputs is None else list(self._outputs))

    def __enter__(self) -> RunHandle[OutputT]:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self._done.is_set():
            self.stop()
        self._done.wait(JOIN_TIMEOUT)
        self._thread.join(JOIN_TIMEOUT)  # so no conveyor thread is left on exit
