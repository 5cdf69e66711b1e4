"""Runner, helpers and the combinations of the contract suite (see conftest.py)."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import multiprocessing
import signal
import sys
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import psutil
import pytest
from process_events import WAIT

import conveyor as cv
from conveyor.metrics import RunResult
from conveyor.runtime import processes
from conveyor.runtime._background import THREAD_NAME as BACKGROUND_THREAD
from conveyor.stage import RuntimeName

if TYPE_CHECKING:
    from conveyor.pipeline import RunHandle
    from conveyor.redis import RedisBackend

# A forkserver child re-runs the main module (pytest's entry script, which
# imports _pytest): preloading it in the server saves that in every worker.
# It only matters before the server starts, so it is harmless when another
# test module set it first.
if processes.start_method() == "forkserver":
    multiprocessing.set_forkserver_preload(["__main__", "_pytest.config"])

RUNTIMES = ("thread", "process", "async", "interpreter")
BACKENDS = ("local", "redis")
COMBOS = tuple(f"{runtime}-{backend}" for backend in BACKENDS for runtime in RUNTIMES)
REDIS_COMBOS = tuple(c for c in COMBOS if c.endswith("-redis"))

# ---------------------------------------------------------------------- the runner


@dataclass
class Runner:
    """How one runtime x backend combination runs a test's pipeline.

    Attributes:
        runtime: the runtime name to give stages (``runtime=runner.runtime``).
        backend: ``"local"`` or ``"redis"``.
        url: the Redis server's URL (redis only).
        namespace: this test's Redis namespace (redis only), shared by its runs.
    """

    runtime: RuntimeName
    backend: str
    url: str = ""
    namespace: str = ""
    _backends: list[RedisBackend] = field(default_factory=list, repr=False)

    @property
    def id(self) -> str:
        return f"{self.runtime}-{self.backend}"

    @property
    def on_redis(self) -> bool:
        return self.backend == "redis"

    def fn(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """``f`` in the form the runtime takes, keeping its name (the stage's default name).

        A plain function becomes an ``async def`` that calls it on the async
        runtime. An ``async def`` (a stage that waits: write it with
        ``await asyncio.sleep``, so it really waits on the async runtime)
        becomes a plain function running it with `asyncio.run` on the thread
        and process runtimes. Otherwise ``f`` itself. The wrappers are
        closures, which cloudpickle sends to process workers by value.
        """
        is_coroutine = inspect.iscoroutinefunction(f)
        if self.runtime == "async" and not is_coroutine:

            @functools.wraps(f)
            async def coroutine(*args: Any) -> Any:
                return f(*args)

            return coroutine
        if self.runtime != "async" and is_coroutine:

            @functools.wraps(f)
            def blocking(*args: Any) -> Any:
                return asyncio.run(f(*args))

            return blocking
        return f

    def backend_for(self, run_id: str | None = None, **options: Any) -> RedisBackend:
        """A Redis backend for one run of this test, serving it from local workers."""
        from conveyor.redis import RedisBackend

        assert self.on_redis, "backend_for() is for the redis combinations"
        backend = RedisBackend(
            self.url, namespace=self.namespace, run_id=run_id, local_workers=True, **options
        )
        self._backends.append(backend)
        return backend

    def direct_backend(self) -> cv.Backend:
        """The backend object, for calling its own ``run``, ``iterate`` and ``start``
        with the pipeline (not through ``pipeline.run(backend=...)``): a
        `conveyor.LocalBackend`, or a Redis backend as `backend_for` makes it."""
        return self.backend_for() if self.on_redis else cv.LocalBackend()

    def run(
        self,
        pipeline: cv.Pipeline[Any],
        *,
        run_id: str | None = None,
        backend_options: dict[str, Any] | None = None,
        **kw: Any,
    ) -> RunResult:
        """Run to completion (``pipeline.run(**kw)``, with a Redis backend on redis).

        ``run_id`` and ``backend_options`` (RedisBackend keyword arguments)
        only apply on redis.
        """
        if not self.on_redis:
            return pipeline.run(**kw)
        return pipeline.run(backend=self.backend_for(run_id, **(backend_options or {})), **kw)

    def iterate(
        self,
        pipeline: cv.Pipeline[Any],
        *,
        run_id: str | None = None,
        backend_options: dict[str, Any] | None = None,
    ) -> Generator[Any, None, None]:
        """The outputs as they come: ``iter(pipeline)``, or ``pipeline.iterate(backend=)``
        with a Redis backend (``run_id`` and ``backend_options`` as for `run`). Both are
        generators: closing one (leaving its loop) ends the run."""
        if not self.on_redis:
            return cast("Generator[Any, None, None]", iter(pipeline))
        backend = self.backend_for(run_id, **(backend_options or {}))
        return cast("Generator[Any, None, None]", pipeline.iterate(backend=backend))

    def start(self, pipeline: cv.Pipeline[Any], **kw: Any) -> RunHandle:
        """Start in the background: ``pipeline.start(**kw)``, with a backend on redis."""
        if not self.on_redis:
            return pipeline.start(**kw)
        start: Any = pipeline.start  # no backend= parameter today: see KNOWN_GAPS
        handle: RunHandle = start(backend=self.backend_for(), **kw)
        return handle

    def close(self) -> None:
        for backend in self._backends:
            backend.close()


def split_combo(combo: str) -> tuple[RuntimeName, str]:
    """``"async-redis"`` -> ``("async", "redis")``."""
    runtime, backend = combo.split("-")
    assert runtime in RUNTIMES and backend in BACKENDS, combo
    return cast("RuntimeName", runtime), backend


INTERPRETERS_SKIP = pytest.mark.skipif(
    sys.version_info < (3, 14),
    reason="runtime='interpreter' needs Python 3.14+ (concurrent.interpreters, PEP 734)",
)


def _combo_param(combo: str) -> Any:
    # The local combinations are quick: nox runs them on every other supported Python.
    marks = [pytest.mark.redis if combo.endswith("-redis") else pytest.mark.quick]
    if combo.startswith("interpreter-"):
        marks.append(INTERPRETERS_SKIP)
    return pytest.param(combo, marks=marks, id=combo)


ALL = [_combo_param(c) for c in COMBOS]
REDIS_ONLY = [_combo_param(c) for c in REDIS_COMBOS]
"""For a redis-only test: ``@pytest.mark.parametrize("runner", REDIS_ONLY, indirect=True)``."""
ASYNC_ONLY = [_combo_param(c) for c in COMBOS if c.startswith("async-")]
"""For a test of coroutine stages: ``@pytest.mark.parametrize("runner", ASYNC_ONLY, ...)``."""
PROCESS_ONLY = [_combo_param(c) for c in COMBOS if c.startswith("process-")]
"""For what only worker processes do (die): ``parametrize("runner", PROCESS_ONLY, ...)``."""
SYNC_ONLY = [_combo_param(c) for c in COMBOS if not c.startswith("async-")]
"""For what only runtimes that call plain functions do (the async runtime refuses a
stage that is not an ``async def``): ``parametrize("runner", SYNC_ONLY, ...)``."""


# ---------------------------------------------------------------------- helpers


def described(exc: BaseException) -> str:
    """Everything an error says: its type, message and notes, down its cause chain."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(f"{type(current).__module__}.{type(current).__qualname__}: {current}")
        parts += [str(n) for n in getattr(current, "__notes__", ())]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


class Settable(Protocol):
    """What `ctrl_c_when` waits on: a `threading.Event`, or a `ProcessEvent`."""

    def wait(self, timeout: float | None = None) -> bool: ...

    def set(self) -> None: ...


class Press:
    """When `ctrl_c_when` pressed Ctrl-C (`time.monotonic`), once it has."""

    at: float | None = None


@contextmanager
def ctrl_c_when(event: Settable) -> Iterator[Press]:
    """Press Ctrl-C once ``event`` is set: inside the block, another thread then
    sends SIGINT to the main thread, where KeyboardInterrupt is raised wherever
    it is, as for a real Ctrl-C. A SIGINT that lands after the block (the block
    ended otherwise) is swallowed, never reaching pytest. Yields a `Press` saying
    when it pressed."""
    assert threading.current_thread() is threading.main_thread(), "SIGINT lands in the main thread"
    armed = True
    ended = threading.Event()
    pressed = Press()

    def on_sigint(signum: int, frame: object) -> None:
        if armed:
            raise KeyboardInterrupt

    def press() -> None:
        event.wait(WAIT)
        if not ended.is_set():
            pressed.at = time.monotonic()
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    presser = threading.Thread(target=press, name="test-ctrl-c")
    presser.start()
    try:
        yield pressed
    finally:
        ended.set()
        armed = False
        event.set()
        presser.join()
        # signal.signal() first runs the handler of a SIGINT still pending: ours, disarmed.
        signal.signal(signal.SIGINT, previous)


def _children() -> dict[int, psutil.Process]:
    """Live descendants of this process, but the multiprocessing helpers that are
    meant to outlive a run (the forkserver and the resource tracker)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "forkserver" in cmdline or "resource_tracker" in cmdline:
            continue
        found[proc.pid] = proc
    return found


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """Wait until the processes ``pids`` have exited; return those still alive after
    ``timeout`` seconds.

    They are the forkserver's children, not ours, so nothing here can wait on
    their exit: poll, bounded by the timeout.
    """
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while True:
        alive = [pid for pid in alive if not gone(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def unclosed_resources() -> list[str]:
    """What garbage collection finds left open now (sockets, files), as the
    ResourceWarnings it gives: said by the test that left it, not in the teardown
    of a later one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return [_where_made(w) for w in caught if issubclass(w.category, ResourceWarning)]


def _where_made(warning: warnings.WarningMessage) -> str:
    """The warning, and where its object was made when tracemalloc traces (run with
    PYTHONTRACEMALLOC=20 to see it)."""
    made = tracemalloc.get_object_traceback(warning.source) if warning.source else None
    return str(warning.message) + ("" if made is None else "\n" + "\n".join(made.format()))


def _run_threads() -> set[threading.Thread]:
    """The live threads, but the process runtime's one background thread, which lives as
    long as the program once started (as the forkserver does: conveyor.runtime._background)."""
    return {t for t in threading.enumerate() if t.name != BACKGROUND_THREAD}


class Leftovers:
    """The threads and processes started since this snapshot; `assert_none` waits
    (bounded) for them to end and fails naming those still there."""

    def __init__(self) -> None:
        self.threads = _run_threads()
        self.processes = set(_children())

    def assert_none(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in _run_threads() - self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        threads = [t.name for t in _run_threads() - self.threads]
        started = set(_children()) - self.processes
        left = wait_gone(started, max(0.0, deadline - time.monotonic()))
        assert not threads and not left, f"left running: threads {threads}, processes {left}"

    def assert_only_daemons_left(self, timeout: float = 10.0) -> list[str]:
        """What a run may leave behind when user code is stuck: daemon threads, which
        do not keep the interpreter from exiting. Waits (bounded) for the new
        non-daemon threads and the child processes to end, fails naming those still
        there; returns the names of the daemon threads left."""
        deadline = time.monotonic() + timeout
        new = _run_threads() - self.threads
        for thread in new:
            if not thread.daemon:
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in new if t.is_alive()]
        started = set(_children()) - self.processes
        left = wait_gone(started, max(0.0, deadline - time.monotonic()))
        others = [t.name for t in alive if not t.daemon]
        assert not others and not left, f"left running: threads {others}, processes {left}"
        return sorted(t.name for t in alive)
