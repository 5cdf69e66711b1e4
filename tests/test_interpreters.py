"""The interpreter runtime (Python 3.14+): workers in subinterpreters of this process.

What every runtime does is the contract suite's (tests/contract, the
``interpreter-local`` and ``interpreter-redis`` combinations); here, what is
the interpreter runtime's own: where the workers run, what happens to a call
that cannot be stopped, extension modules, the stage's numbers, and the clear
error on older Pythons.

Stage functions are pickled by value (`cloudpickle.register_pickle_by_value`):
a worker interpreter never imports this module.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import conveyor as cv
from conveyor.channel import ACCELERATED

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Quick: the runtime exists from Python 3.14, where only the quick tests run in CI.
pytestmark = pytest.mark.quick

HAS_INTERPRETERS = sys.version_info >= (3, 14)
needs_interpreters = pytest.mark.skipif(
    not HAS_INTERPRETERS,
    reason="runtime='interpreter' needs Python 3.14+ (concurrent.interpreters, PEP 734)",
)

WAIT = 30.0
"""Upper bound of every wait here (seconds)."""
HANG_SECONDS = 10.0
"""The longest a call that hangs waits for its release."""


def interpreter_id() -> int:
    """The id of the interpreter running the caller (0: the main one)."""
    from concurrent import interpreters  # type: ignore[import-not-found,unused-ignore]

    ident: int = interpreters.get_current().id
    return ident


def hang_until_released(folder: str, x: int) -> int:
    """Hang like a stuck call until the test releases it (a bounded polling loop:
    nothing else reaches a call in another interpreter)."""
    Path(folder, "hung").write_text(str(interpreter_id()))
    deadline = time.monotonic() + HANG_SECONDS
    while not Path(folder, "release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def wait_for_file(path: Path) -> None:
    """Wait (bounded) until a worker interpreter writes ``path``: no event reaches here
    from another interpreter's call."""
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never came"
        time.sleep(0.01)


def stop_once_hung(handle: cv.RunHandle, folder: str) -> tuple[cv.RunResult, float]:
    """Stop the run once a call hangs in `hang_until_released`, then release the call;
    return the run's result and how long stop() took to end the run."""
    try:
        wait_for_file(Path(folder, "hung"))
        stopping = time.monotonic()
        handle.stop()
        result = handle.join(WAIT)
        return result, time.monotonic() - stopping
    finally:
        Path(folder, "release").touch()


def fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def only_the_main_interpreter_is_left() -> bool:
    """Whether every interpreter but the main one has been closed."""
    from concurrent import interpreters  # type: ignore[import-not-found,unused-ignore]

    return [i.id for i in interpreters.list_all()] == [interpreters.get_main().id]


def join_new_threads(before: set[threading.Thread], timeout: float = WAIT) -> list[str]:
    """Wait (bounded) for the threads started since ``before``; return those left."""
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - before:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in set(threading.enumerate()) - before]


# ---------------------------------------------------------------------- before 3.14


@pytest.mark.skipif(HAS_INTERPRETERS, reason="Python 3.14+ has the interpreter runtime")
@pytest.mark.parametrize("method", ["map", "filter", "flat_map", "each"])
def test_runtime_interpreter_before_python_3_14_is_refused_when_the_stage_is_defined(
    method: str,
) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    with pytest.raises(cv.ConfigurationError) as info:
        getattr(cv.Pipeline(range(3)), method)(abs, runtime="interpreter")
    message = str(info.value)
    assert f"{method}() 'runtime' 'interpreter' needs Python 3.14 or newer" in message
    assert f"this is Python {version}" in message
    assert "runtime='process'" in message


@pytest.mark.skipif(HAS_INTERPRETERS, reason="Python 3.14+ has the interpreter runtime")
def test_switching_a_stage_to_interpreters_before_python_3_14_is_refused_too() -> None:
    pipeline = cv.Pipeline(range(3)).map(abs, name="square")
    with pytest.raises(cv.ConfigurationError, match=r"needs Python 3\.14 or newer"):
        pipeline.with_stage("square", runtime="interpreter")


# ---------------------------------------------------------------------- 3.14 and later


def where_am_i(x: int) -> tuple[int, int, Any]:
    return os.getpid(), interpreter_id(), cv.worker_state()


@needs_interpreters
def test_each_worker_is_a_subinterpreter_of_this_process_with_its_own_state() -> None:
    result = (
        cv.Pipeline(range(200))
        .map(where_am_i, workers=2, runtime="interpreter", on_start=interpreter_id)
        .run(collect=True)
    )
    outputs = result.outputs or []
    assert len(outputs) == 200
    assert {pid for pid, _, _ in outputs} == {os.getpid()}
    # Not the main interpreter, and each call where its worker's on_start ran.
    assert all(ident != 0 and ident == state for _, ident, state in outputs)
    assert len({ident for _, ident, _ in outputs}) <= 2


def accelerated(x: int) -> bool:
    from conveyor.channel import ACCELERATED

    return ACCELERATED


@needs_interpreters
@pytest.mark.skipif(not ACCELERATED, reason="the C accelerator is not built here")
def test_the_c_accelerator_loads_in_worker_interpreters() -> None:
    # It declares Py_MOD_PER_INTERPRETER_GIL_SUPPORTED; without it the import
    # fails in an interpreter with a GIL of its own, and the channel falls back.
    outputs = list(cv.Pipeline(range(3)).map(accelerated, runtime="interpreter"))
    assert outputs == [True] * 3


def ctypes_loaded(x: int) -> bool:
    return "ctypes" in sys.modules


@needs_interpreters
def test_a_worker_interpreter_does_not_load_ctypes() -> None:
    # Regression: every worker interpreter made ctypes function types as it imported
    # conveyor (NumPy's allocator callbacks, which only a process with NumPy can use:
    # never an interpreter); one CI run segfaulted in _ctypes there while several
    # interpreters started at once. Nothing of ctypes is needed without NumPy.
    outputs = list(cv.Pipeline(range(4)).map(ctypes_loaded, workers=2, runtime="interpreter"))
    assert outputs == [False] * 4


def uses_numpy(x: int) -> int:
    import numpy

    return int(numpy.int64(x))


@needs_interpreters
def test_a_module_without_subinterpreter_support_fails_the_item_with_its_import_error() -> None:
    pytest.importorskip("numpy")  # importable here: the failure is the interpreter's
    with pytest.raises(ImportError) as info:
        cv.Pipeline(range(3)).map(uses_numpy, runtime="interpreter", name="np").run()
    assert "does not support loading in subinterpreters" in str(info.value)
    assert "conveyor: stage 'np' (map) failed on item 0" in info.value.__notes__


@needs_interpreters
def test_an_item_over_its_timeout_gives_up_its_interpreter_and_a_fresh_one_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = str(tmp_path)

    def hang_on_0(x: int) -> tuple[int, int]:
        if x == 0:
            hang_until_released(folder, x)
        return x, interpreter_id()

    before = set(threading.enumerate())
    pipeline = cv.Pipeline(range(6)).map(
        hang_on_0, runtime="interpreter", timeout=0.5, on_error="skip", name="hangs"
    )
    started = time.monotonic()
    try:
        result = pipeline.run(collect=True)
    finally:
        took = time.monotonic() - started
        Path(folder, "release").touch()
    assert took < HANG_SECONDS / 2, f"the run took {took:.1f} s: it waited for the hung call"
    assert "left behind" not in caplog.text  # given up, as a timed-out thread call is
    outputs = result.outputs or []
    assert [x for x, _ in outputs] == [1, 2, 3, 4, 5]
    hung = int(Path(folder, "hung").read_text())
    assert hung not in {ident for _, ident in outputs}, "the rest ran in the given-up interpreter"
    [failure] = result.failures
    assert isinstance(failure.error, TimeoutError)
    assert "its worker interpreter was given up" in str(failure.error)
    # Released, the given-up call returns, and its interpreter ends with it.
    assert join_new_threads(before) == []
    assert only_the_main_interpreter_is_left()


@needs_interpreters
def test_stop_does_not_wait_for_a_call_in_progress_which_ends_on_its_own(tmp_path: Path) -> None:
    folder = str(tmp_path)

    def hang(x: int) -> int:
        return hang_until_released(folder, x)

    before = set(threading.enumerate())
    handle = cv.Pipeline(range(3)).map(hang, runtime="interpreter").start()
    result, took = stop_once_hung(handle, folder)
    assert result.stopped
    assert took < 2.0, f"stop() took {took:.1f} s: it waited for the call"
    assert join_new_threads(before) == []
    assert only_the_main_interpreter_is_left()


def fail_on_0(x: int) -> int:
    if x == 0:
        raise ValueError("no zero")
    return x


@needs_interpreters
@pytest.mark.parametrize("attempt", range(3))
def test_a_stage_error_while_other_interpreters_start_up_claims_nothing_is_stuck(
    attempt: int, caplog: pytest.LogCaptureFixture
) -> None:
    # The first interpreter ready fails the run while the others are still importing
    # conveyor, or idle between calls: none of them is in user code, none is named,
    # and all of them end by themselves.
    before = set(threading.enumerate())
    pipeline = cv.Pipeline(range(100)).map(fail_on_0, workers=3, runtime="interpreter")
    with pytest.raises(ValueError, match="no zero") as info:
        pipeline.run()
    notes = [n for n in info.value.__notes__ if n.startswith("conveyor:")]
    assert notes == ["conveyor: stage 'fail_on_0' (map) failed on item 0"]
    assert "left behind" not in caplog.text
    assert join_new_threads(before) == []
    assert only_the_main_interpreter_is_left()


@needs_interpreters
def test_a_stop_while_the_interpreters_start_up_returns_at_once_naming_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    list(cv.Pipeline(range(3)).map(abs, runtime="interpreter"))  # imports, caches: once
    before, before_fds = set(threading.enumerate()), fds()
    handle = cv.Pipeline(range(100)).map(abs, workers=2, runtime="interpreter").start()
    stopping = time.monotonic()
    handle.stop()  # conveyor's imports in a new interpreter take 0.1 s at least
    result = handle.join(WAIT)
    took = time.monotonic() - stopping
    assert result.stopped
    assert took < 1.0, f"stop() took {took:.2f} s: it waited for the start-up"
    assert "left behind" not in caplog.text
    assert join_new_threads(before) == []
    assert only_the_main_interpreter_is_left()
    assert fds() == before_fds  # the sockets of interpreters that never called the worker too


@needs_interpreters
def test_a_stop_with_on_start_stuck_names_the_stage_as_a_stuck_thread_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = str(tmp_path)

    def start() -> None:
        hang_until_released(folder, 0)

    before = set(threading.enumerate())
    pipeline = cv.Pipeline(range(3)).map(abs, runtime="interpreter", on_start=start, name="slow")
    result, took = stop_once_hung(pipeline.start(), folder)
    assert result.stopped
    assert took < 1.0, f"stop() took {took:.2f} s"
    assert (
        "stage 'slow' (map) is stuck in user code: left behind: conveyor-slow-0-interpreter"
        in caplog.text
    )
    assert join_new_threads(before) == []
    assert only_the_main_interpreter_is_left()


def test_a_stopped_interpreters_socket_ends_at_once_without_the_messages_waiting_in_it() -> None:
    from conveyor.runtime.interpreters import _shut

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(b"a batch the worker has not read")
        _shut(theirs)
        theirs.settimeout(WAIT)  # a failure here is a hang: bounded
        assert theirs.recv(1024) == b""  # the end of its input, not the batch
        with pytest.raises(BrokenPipeError):
            ours.sendall(b"the next batch")


def exit_on_3(x: int) -> int:
    if x == 3:
        sys.exit(3)
    return x


@needs_interpreters
def test_an_exit_in_the_stage_ends_the_run_with_it_as_on_threads() -> None:
    # A stage's SystemExit ends the run with that exception on every runtime (see
    # tests/contract/test_contract_errors.py), no longer as WorkerCrashed here.
    with pytest.raises(SystemExit) as info:
        cv.Pipeline(range(6)).map(exit_on_3, runtime="interpreter", name="quits").run()
    assert info.value.code == 3
    assert "conveyor: stage 'quits' (map) failed on item 3" in info.value.__notes__


def failing_start() -> None:
    raise RuntimeError("no connection")


@needs_interpreters
def test_an_on_start_that_raises_fails_the_run_naming_the_worker_interpreter() -> None:
    pipeline = cv.Pipeline(range(3)).map(abs, runtime="interpreter", on_start=failing_start)
    with pytest.raises(RuntimeError, match="no connection") as info:
        pipeline.run()
    assert "conveyor: on_start of stage 'abs' (map) failed in a worker interpreter" in (
        info.value.__notes__
    )


@needs_interpreters
def test_max_items_per_worker_replaces_the_interpreter(tmp_path: Path) -> None:
    folder = str(tmp_path)

    def start() -> int:
        ident = interpreter_id()
        Path(folder, f"start-{ident}").touch()
        return ident

    def tag(x: int) -> tuple[int, Any]:
        return x, cv.worker_state()

    result = (
        cv.Pipeline(range(10))
        .map(tag, runtime="interpreter", on_start=start, max_items_per_worker=3)
        .run(collect=True)
    )
    outputs = result.outputs or []
    assert [x for x, _ in outputs] == list(range(10))
    idents = [ident for _, ident in outputs]
    # Three items each, then a fresh interpreter: 4 of them, in turn.
    assert [len(list(g)) for g in _runs(idents)] == [3, 3, 3, 1]
    assert len(list(tmp_path.glob("start-*"))) == 4


def _runs(values: list[Any]) -> Iterator[list[Any]]:
    """Consecutive equal values grouped: [1, 1, 2] -> [1, 1], [2]."""
    group: list[Any] = []
    for value in values:
        if group and group[-1] != value:
            yield group
            group = []
        group.append(value)
    if group:
        yield group


def burn_thread_cpu(x: int) -> int:
    """Keep this thread's CPU busy for 3 ms."""
    until = time.thread_time() + 0.003
    while time.thread_time() < until:
        pass
    return x


@needs_interpreters
def test_an_interpreter_stages_cpu_time_and_busy_time_are_its_interpreters() -> None:
    result = cv.Pipeline(range(200)).map(burn_thread_cpu, workers=2, runtime="interpreter").run()
    (stats,) = result.stats
    assert (stats.runtime, stats.items_out) == ("interpreter", 200)
    # The worker threads' own CPU, reported by each interpreter (not the process's).
    assert stats.cpu_seconds is not None and stats.cpu_seconds >= 200 * 0.003
    assert stats.busy_seconds <= stats.workers * stats.elapsed_seconds
    assert stats.latency_p50 >= 0.002  # the stage function's time, not the round trip


@needs_interpreters
def test_runs_leave_no_interpreter_thread_or_file_descriptor_behind() -> None:
    list(cv.Pipeline(range(3)).map(abs, runtime="interpreter"))  # imports, caches: once
    before_threads = set(threading.enumerate())
    before_fds = fds()
    for _ in range(5):
        outputs = list(cv.Pipeline(range(20)).map(abs, workers=2, runtime="interpreter"))
        assert outputs == list(range(20))
    assert only_the_main_interpreter_is_left()
    assert join_new_threads(before_threads) == []
    assert fds() == before_fds


@needs_interpreters
def test_a_stall_in_an_interpreter_stage_names_each_worker_once_its_stack_out_of_reach(
    tmp_path: Path,
) -> None:
    # The repro: each of a worker's two lanes was reported "in the stage function",
    # with the stack of the parent's thread waiting for the interpreter: conveyor's own.
    import logging

    folder = str(tmp_path)
    reported = threading.Event()
    texts: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            texts.append(record.getMessage())
            reported.set()

    def hang(x: int) -> int:
        return hang_until_released(folder, x) if x == 3 else x

    handler = Catch(logging.WARNING)
    logging.getLogger("conveyor").addHandler(handler)
    try:
        p = cv.Pipeline(range(10)).map(hang, runtime="interpreter", name="stuck")
        with p.start(stall_timeout=0.3) as handle:
            try:
                assert reported.wait(WAIT)
            finally:
                Path(folder, "release").touch()
            assert handle.join(WAIT).stats[0].items_out == 10
    finally:
        logging.getLogger("conveyor").removeHandler(handler)
    text = texts[0]
    assert text.count("worker conveyor-stuck-0") == 1, text
    assert (
        "its stack: not available (a worker interpreter's code runs in an interpreter of its own)"
    ) in text, text
    assert "processes.py" not in text
