"""Backends: where a pipeline's stages run.

::

    pipeline.run(backend=...)        for x in pipeline.iterate(backend=...)
    pipeline.start(backend=...)      await pipeline.arun(backend=...)
                     |                                   |
            LocalBackend (the default)            RedisBackend(url)
      engine.Run: channels and runtimes      a driver here (feeds the source,
      in this process                        reads the outputs), workers anywhere
                                             (`conveyor worker`) on the one engine

A backend is the one thing a pipeline's run methods hand the pipeline to
(typed ``Any`` here: backends sit below the builder, which they never import):
``Pipeline.run``, ``iterate``, ``start`` and ``arun`` (and the CLI's ``conveyor
run``) take ``backend=`` alike. A new backend implements `Backend.run` and
`Backend.iterate`; `start` and `arun` have generic versions built on a stop
signal (`Backend.run` with ``stop=``) that a backend may replace.

Every entry point, the pipeline's and the backend's own (``backend.run(pipeline)``
called directly), passes the pipeline through `admit` before it starts anything:
the one place that refuses a run that cannot work (no stage, a one-shot source an
earlier run used up, options the backend cannot honour).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from os import PathLike
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, Unpack

from .errors import ConfigurationError, ConfigurationTypeError
from .validate import check_bool, check_seconds

if TYPE_CHECKING:
    from .metrics import RunResult, StageStats

__all__ = [
    "Backend",
    "BackgroundRun",
    "LocalBackend",
    "RunOptions",
    "StopSignal",
    "admit",
    "budget_option",
    "check_backend",
    "check_run_options",
    "run_options",
]

T = TypeVar("T")

JOIN_SECONDS = 30.0
"""How long leaving a background run waits for its thread."""


class RunOptions(TypedDict, total=False):
    """The options of a run that `Backend.run`, `~Backend.start` and `~Backend.arun`
    take besides the pipeline, each optional, as `Pipeline.run` has them.

    Keys:
        collect: keep the last stage's outputs in ``result.outputs``.
        progress: show the run's progress.
        report: write an HTML report of the run there at the end.
        max_bytes: the run's byte budget; given only to a backend that
            sets `Backend.bounds_bytes`.
    """

    collect: bool
    progress: bool
    report: str | PathLike[str] | None
    max_bytes: int


class Backend(ABC):
    """Where a pipeline runs: what ``backend=`` of `Pipeline.run`, ``iterate``,
    ``start`` and ``arun`` takes.

    A backend implements `run` and `iterate`; `start` and `arun` have generic
    versions, built on `run` with a ``stop`` event, that a backend may
    replace. `LocalBackend` (the default) runs in this process;
    ``conveyor.redis.RedisBackend`` drives workers anywhere.

    A backend that honours a run's byte budget sets `bounds_bytes` and takes
    ``max_bytes=`` in `run` and `iterate`; the others are never given it (a
    run with ``max_bytes=`` refuses them).
    """

    bounds_bytes = False
    """Whether `run` and `iterate` take ``max_bytes=`` (a run's byte budget) and honour it."""

    drains = False
    """Whether `run`, given a `StopSignal` as ``stop``, honours its drain (what
    ``stop(drain=True)`` on a `BackgroundRun` asks) and publishes its result so far."""

    @abstractmethod
    def run(
        self, pipeline: Any, *, stop: threading.Event | None = None, **options: Unpack[RunOptions]
    ) -> RunResult:
        """Run ``pipeline`` to completion and return its result.

        ``stop``, when given and set from another thread, ends the run early
        (the result then says ``stopped``).
        """

    def check(self, pipeline: Any) -> None:  # noqa: B027 - optional hook, nothing by default
        """Refuse, before anything starts, a pipeline this backend cannot run as configured.

        Raises:
            ConfigurationError: a stage's options and the backend's cannot work together.
        """

    @abstractmethod
    def iterate(self, pipeline: Any, *, progress: bool = False) -> Iterator[Any]:
        """Run ``pipeline`` and yield its outputs as they come; leaving early stops it."""

    def start(self, pipeline: Any, **options: Unpack[RunOptions]) -> BackgroundRun[Any]:
        """Start a run of ``pipeline`` in a thread and return its handle (``max_bytes``
        only where `bounds_bytes`)."""
        method = f"{type(self).__name__}.start()"
        check_run_options(options, method)
        return BackgroundRun[Any](self, admit(pipeline, method, self), options)

    async def arun(self, pipeline: Any, **options: Unpack[RunOptions]) -> RunResult:
        """`run` from async code: the run goes on in a thread, the loop keeps serving;
        cancelling the awaiting task stops the run and waits for its end."""
        import asyncio

        handle = self.start(pipeline, **options)
        try:
            return await asyncio.to_thread(handle.join)
        except asyncio.CancelledError:
            handle.stop()
            await asyncio.to_thread(handle.wait)
            raise


class StopSignal(threading.Event):
    """The stop event a `BackgroundRun` gives `Backend.run`, with what else the handle
    and the run in its thread share.

    Set, it stops the run as any stop event does (a backend that knows nothing more
    sees only that). A backend that sets `Backend.drains` also registers, once its
    run exists, what a drain does (`on_drain`) and how to read the run's result as it
    stands (`publish`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()  # guards the three fields below
        self._drain_asked = False
        self._drainer: Callable[[], None] | None = None
        self._snapshot: Callable[[], RunResult] | None = None

    def drain(self) -> None:
        """Ask the run to stop pulling its source and finish what is inside it."""
        with self._lock:
            self._drain_asked = True
            drainer = self._drainer
        if drainer is not None:
            drainer()

    def on_drain(self, drainer: Callable[[], None]) -> None:
        """Register what a drain does (the backend, once its run exists); called at
        once if a drain was asked for before."""
        with self._lock:
            self._drainer = drainer
            asked = self._drain_asked
        if asked:
            drainer()

    @property
    def draining(self) -> bool:
        """Whether a drain was asked for."""
        return self._drain_asked

    def publish(self, snapshot: Callable[[], RunResult]) -> None:
        """Register how to read the run's result as it stands (the backend, once its
        run exists)."""
        with self._lock:
            self._snapshot = snapshot

    def snapshot(self) -> RunResult | None:
        """The run's result as it stands; None before the backend published one."""
        with self._lock:
            snapshot = self._snapshot
        return None if snapshot is None else snapshot()


class BackgroundRun(Generic[T]):
    """A run of a backend going on in a thread: watch it, stop it, wait for its result.

    It has the methods of the local `conveyor.pipeline.RunHandle` (``stop``, ``done``,
    ``wait``, ``join``, ``stats``, ``result_so_far``, ``with``), with the same meaning.
    Generic in the type of the pipeline's outputs, as `RunHandle` is: ``join()`` of the
    handle of ``Pipeline[str].start(backend=...)`` is a ``RunResult[str]``.
    """

    def __init__(self, backend: Backend, pipeline: Any, options: RunOptions) -> None:
        self._stop = StopSignal()
        self._drains = backend.drains
        self._result: RunResult[T] | None = None
        self._error: BaseException | None = None
        self._ended = threading.Event()
        self._thread = threading.Thread(
            target=self._drive,
            args=(backend, pipeline, options),
            name="conveyor-driver",
            daemon=True,
        )
        self._thread.start()

    def _drive(self, backend: Backend, pipeline: Any, options: RunOptions) -> None:
        try:
            self._result = backend.run(pipeline, stop=self._stop, **options)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ended.set()

    def stop(self, drain: bool = False) -> None:
        """Stop the run: at once (default), or, with ``drain``, stop the source and let
        the items already inside finish. A run that has ended stays as it ended; a
        distributed run stopped at once stays where it is, to be resumed.

        Raises:
            ConfigurationError: ``drain=True`` with a backend that cannot drain
                (`Backend.drains`).
        """
        if check_bool(drain, "drain", "BackgroundRun.stop()") and not self._drains:
            raise ConfigurationError(
                "stop(drain=True): this backend cannot drain a run; stop() stops it as it is"
            )
        if self._ended.is_set():
            return
        if drain:
            self._stop.drain()
        else:
            self._stop.set()

    def done(self) -> bool:
        """True once the run has ended (finished, failed or stopped)."""
        return self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the end of the run, without its result or error; True if it ended."""
        check_seconds(timeout, "timeout", "BackgroundRun.wait()", zero=True)
        return self._wait(timeout)

    def _wait(self, timeout: float | None) -> bool:
        from .engine import wait_interruptibly

        return wait_interruptibly(self._ended.wait, timeout)

    def join(self, timeout: float | None = None) -> RunResult[T]:
        """Wait for the end of the run and return its result.

        Raises:
            TimeoutError: the run did not end within ``timeout`` seconds.
            Exception: the run's error, with its own type, as `Backend.run`
                raised it.
        """
        check_seconds(timeout, "timeout", "BackgroundRun.join()", zero=True)
        try:
            ended = self._wait(timeout)
        except BaseException:  # Ctrl-C while waiting: the run must not go on behind the caller
            self.stop()
            self._wait(JOIN_SECONDS)
            raise
        if not ended:
            raise TimeoutError(f"the run did not end within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def stats(self) -> list[StageStats]:
        """Per-stage statistics, live (as the backend last read them); none before the
        run has started."""
        return self.result_so_far().stats

    def result_so_far(self) -> RunResult[T]:
        """The run's result as it stands: live while it goes on; after a `join` that
        raised, what the run did before it failed or was stopped (statistics,
        failures recorded, outputs collected), with the error as ``error``."""
        from dataclasses import replace

        from .metrics import RunResult

        if self._ended.is_set() and self._result is not None:
            return self._result
        result = self._stop.snapshot()
        if result is None:  # a backend that publishes nothing, or one not started yet
            result = RunResult(stats=[])
        return result if self._error is None else replace(result, error=self._error)

    def __enter__(self) -> BackgroundRun[T]:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
        self.wait(JOIN_SECONDS)


class LocalBackend(Backend):
    """The default: the pipeline runs in this process, on channels and runtimes."""

    bounds_bytes = True
    drains = True

    def run(
        self, pipeline: Any, *, stop: threading.Event | None = None, **options: Unpack[RunOptions]
    ) -> RunResult:
        pipeline = admit(pipeline, "LocalBackend.run()", self)
        if stop is None:
            result: RunResult = pipeline.run(**options)
            return result
        handle = pipeline.start(**options)
        if isinstance(stop, StopSignal):
            stop.publish(handle.result_so_far)
            stop.on_drain(lambda: handle.stop(drain=True))
        watcher = threading.Thread(
            target=_stop_when, args=(stop, handle), name="conveyor-stop-watch", daemon=True
        )
        watcher.start()
        try:
            joined: RunResult = handle.join()
            return joined
        finally:
            stop.set()  # ends the watcher
            watcher.join()

    def iterate(
        self, pipeline: Any, *, progress: bool = False, max_bytes: int | None = None
    ) -> Iterator[Any]:
        if progress:
            raise ConfigurationError(
                "iterate() 'progress': a run on this machine shows its progress with "
                "run(progress=True) or start(progress=True); iteration has none"
            )
        pipeline = admit(pipeline, "LocalBackend.iterate()", self)
        return iter(pipeline) if max_bytes is None else pipeline.iterate(max_bytes=max_bytes)

    def start(self, pipeline: Any, **options: Unpack[RunOptions]) -> Any:
        return admit(pipeline, "LocalBackend.start()", self).start(**options)

    async def arun(self, pipeline: Any, **options: Unpack[RunOptions]) -> RunResult:
        result: RunResult = await admit(pipeline, "LocalBackend.arun()", self).arun(**options)
        return result


def _stop_when(stop: threading.Event, handle: Any) -> None:
    stop.wait()
    handle.stop()


def admit(pipeline: Any, method: str, backend: Backend) -> Any:
    """The gate every run passes before anything starts; a backend's `Backend.run` and
    `Backend.iterate` call it first, and run what it returns.

    It refuses a pipeline without a stage, a second run over a source the first one
    used up (a generator, a closed and drained Channel), and what `Backend.check`
    refuses; and it counts the run as one of the source's. The pipeline it returns
    stands for that counted run: admitting it again (``start`` admits, then its
    thread calls ``run``) checks it without counting it twice.

    Raises:
        ConfigurationError: the run cannot work; the message names ``method``.
    """
    admit_run = getattr(pipeline, "_admit", None)
    if admit_run is None:
        raise ConfigurationTypeError(
            f"{method} 'pipeline' must be a conveyor.Pipeline, got {type(pipeline).__name__}"
        )
    return admit_run(method, backend)


def budget_option(max_bytes: int | None) -> dict[str, Any]:
    """The keyword that passes a byte budget to a backend's `Backend.run` or
    `Backend.iterate`: none without one, so that a backend that does not bound bytes
    (whose methods do not take it) is called as before."""
    return {} if max_bytes is None else {"max_bytes": max_bytes}


def run_options(
    collect: bool, progress: bool, report: str | PathLike[str] | None, max_bytes: int | None
) -> RunOptions:
    """A run's options for a backend (``max_bytes`` only with a budget: see `budget_option`)."""
    options = RunOptions(collect=collect, progress=progress, report=report)
    if max_bytes is not None:
        options["max_bytes"] = max_bytes
    return options


def check_run_options(options: Mapping[str, object], method: str) -> None:
    """Refuse at once a keyword a backend's run does not take (a typo would
    otherwise be noticed only by the thread that runs it), and a flag that is not
    a bool."""
    unknown = sorted(set(options) - RunOptions.__optional_keys__)
    if unknown:
        accepted = ", ".join(sorted(RunOptions.__optional_keys__))
        raise TypeError(
            f"{method} got an unexpected keyword argument {unknown[0]!r}; it takes {accepted}"
        )
    for flag in ("collect", "progress"):
        if flag in options:
            check_bool(options[flag], flag, method)


def check_backend(backend: object, method: str) -> Backend | None:
    """``backend`` if it is one (None: local); a clear error otherwise."""
    if backend is None or isinstance(backend, Backend):
        return backend
    raise ConfigurationTypeError(
        f"{method} 'backend' must be a conveyor backend (conveyor.LocalBackend(), "
        f"conveyor.RedisBackend(url)) or None, got {type(backend).__name__}"
    )
