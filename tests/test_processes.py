"""The process runtime, with real worker processes.

Worker processes are slow to start (a forkserver child re-imports the main
module), so each test runs few of them, and stage functions are defined at
module level and pickled by value (see `cloudpickle.register_pickle_by_value`
below): a worker then never imports this module (nor hypothesis).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import glob
import json
import mmap
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conveyor as cv
from conveyor.engine import Run
from conveyor.runtime import _spare, _standby, _wire, processes

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# A forkserver child re-runs the main module, here pytest's entry script, which
# imports _pytest: preloading it in the server saves that in every worker.
# (conveyor adds its own module to this list; it only matters before the
# server starts.)
if processes.start_method() == "forkserver":
    multiprocessing.set_forkserver_preload(["__main__", "_pytest.config"])

numpy = pytest.importorskip("numpy")


# ---------------------------------------------------------------------- helpers


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until true; a bounded loop with a short sleep, for
    states another process reaches (a file written, a process gone), which
    no event of this process can signal."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(0.01)


def our_segments(pid: int | None = None) -> list[str]:
    """Shared-memory blocks of process ``pid`` (default: this one) that still have a name."""
    return glob.glob(f"/dev/shm/cv{pid or os.getpid()}_*")


def gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def worker_pids() -> list[int]:
    """Live worker processes of this test process (children of the forkserver, or ours)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            # Not the forkserver, and not a session's redis-server (another test file's).
            if (
                proc.status() != psutil.STATUS_ZOMBIE
                and "forkserver" not in cmdline
                and "redis-server" not in cmdline
            ):
                found.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def no_worker_left() -> bool:
    # The resource tracker and forkserver are long-lived helpers, not workers.
    return not [
        p for p in worker_pids() if "resource_tracker" not in " ".join(psutil.Process(p).cmdline())
    ]


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    wait_until(no_worker_left, 5.0)
    assert our_segments() == []


# Stage functions (module level: pickled by value, see above).


def square(x: int) -> int:
    return x * x


def pid_of(_: Any) -> int:
    return os.getpid()


def echo(x: Any) -> Any:
    return x


def die_on(bad: Any, how: str) -> Callable[[Any], Any]:
    def fn(x: Any) -> Any:
        if x == bad:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif how == "segfault":
                ctypes.string_at(0)
            else:
                os._exit(3)
        return x

    return fn


def die_once(marker: str, bad: Any) -> Callable[[Any], Any]:
    """Kill its worker the first time it sees ``bad`` (a file remembers across workers)."""

    def fn(x: Any) -> Any:
        if x == bad and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 10

    return fn


def announced(folder: Path) -> list[int]:
    """Pids of the workers `announce_and_block` says hold an item."""
    return [int(p.read_text()) for p in folder.iterdir() if p.suffix == ""]


def announce_and_block(folder: str) -> Callable[[Any], Any]:
    """Write the worker's pid to ``folder/<item>`` and block (until killed)."""

    def fn(x: Any) -> Any:
        Path(folder, f"{x}.tmp").write_text(str(os.getpid()))
        os.rename(Path(folder, f"{x}.tmp"), Path(folder, str(x)))
        time.sleep(60)
        return x

    return fn


class NeedsTwoArgs(Exception):
    """An exception that cannot be unpickled (its __init__ takes two arguments)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")
        self.a = a
        self.b = b


def raise_value_error(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def raise_two_args(x: int) -> int:
    raise NeedsTwoArgs("left", "right")


# ---------------------------------------------------------------------- basics


def test_filter_flat_map_and_each_run_in_worker_processes(tmp_path: Path) -> None:
    # Stays outside the contract suite: that the calls run in other processes is
    # the process runtime's own matter. The contract suite checks what every stage
    # kind gives, and that each sees every item once, on every runtime x backend.
    folder = str(tmp_path)

    def where(x: int) -> int:
        Path(folder, f"{x}-{os.getpid()}").touch()
        return x

    (
        cv.Pipeline(range(30))
        .filter(lambda x: where(x) % 3 == 0, runtime="process")
        .flat_map(lambda x: [where(x), x], runtime="process", workers=2)
        .each(where, runtime="process")
        .run()
    )
    pids = {int(p.name.split("-")[1]) for p in tmp_path.iterdir()}
    assert pids and os.getpid() not in pids


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=st.lists(st.integers(-1000, 1000), max_size=300),
    workers=st.integers(1, 2),
    ordered=st.booleans(),
    thread_first=st.booleans(),
)
def test_nothing_is_lost_or_invented_through_process_and_thread_stages(
    items: list[int], workers: int, ordered: bool, thread_first: bool
) -> None:
    pipeline = cv.Pipeline(items)
    if thread_first:
        pipeline = pipeline.map(lambda x: x + 1, workers=2, ordered=ordered)
    else:
        pipeline = pipeline.map(lambda x: x + 1, runtime="process", ordered=ordered)
    pipeline = (
        pipeline.filter(lambda x: x % 5 != 0, runtime="process", workers=workers, ordered=ordered)
        .flat_map(lambda x: [x] * (x % 3), workers=2, ordered=ordered)
        .map(square, runtime="process", workers=workers, ordered=ordered, capacity=7)
    )
    expected = [(x + 1) ** 2 for x in items if (x + 1) % 5 != 0 for _ in range((x + 1) % 3)]
    out = list(pipeline)
    if ordered:
        assert out == expected
    else:
        assert sorted(out) == sorted(expected)


def test_process_stages_mix_with_async_and_thread_stages() -> None:
    async def add_one(x: int) -> int:
        return x + 1

    out = list(
        cv.Pipeline(range(50))
        .map(add_one, runtime="async", workers=4)
        .map(square, runtime="process", workers=2)
        .map(lambda x: -x, workers=2)
    )
    assert out == [-((x + 1) ** 2) for x in range(50)]


@pytest.mark.timeout(60)
def test_an_unpicklable_source_item_is_named_as_the_sources() -> None:
    """Repro: the error said "an item", and the item came from the source, not a stage."""
    items = [1, threading.Lock(), 3]
    with pytest.raises(cv.SerializationError, match=r"'sq' \(map\): a source item of type"):
        list(cv.Pipeline(items).map(square, runtime="process", name="sq"))
    # A later stage's items are the stage before's outputs: that stage is named (it said
    # "an item", which left the user to find where it came from).
    pattern = r"'sq2' \(map\): an output of stage 'locks' \(map\) of type _thread.lock"
    with pytest.raises(cv.SerializationError, match=pattern):
        list(
            cv.Pipeline([1, 2])
            .map(lambda x: threading.Lock() if x == 2 else x, name="locks")
            .map(square, runtime="process", name="sq2")
        )


def test_an_unpicklable_stage_function_is_refused_at_start() -> None:
    lock = threading.Lock()
    with pytest.raises(cv.SerializationError, match=r"'holds_lock' \(map\)"):
        list(cv.Pipeline(range(3)).map(lambda x: lock, runtime="process", name="holds_lock"))


def test_an_unknown_start_method_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVEYOR_START_METHOD", "teleport")
    with pytest.raises(cv.ConfigurationError, match="teleport"):
        list(cv.Pipeline(range(3)).map(echo, runtime="process"))


# ---------------------------------------------------------------------- worker hooks


def test_max_items_per_worker_replaces_the_worker_process(tmp_path: Path) -> None:
    folder = str(tmp_path)

    def on_stop(state: Any) -> None:
        Path(folder, f"stop-{os.getpid()}").touch()

    out = list(
        cv.Pipeline(range(10)).map(
            pid_of, runtime="process", max_items_per_worker=3, on_stop=on_stop
        )
    )
    runs = [out[i : i + 3] for i in range(0, 10, 3)]
    assert all(len(set(run)) == 1 for run in runs)
    assert len({run[0] for run in runs}) == 4
    assert len(list(tmp_path.glob("stop-*"))) == 4


def test_an_on_start_that_raises_fails_the_run_with_its_error() -> None:
    def on_start() -> None:
        raise LookupError("no database")

    with pytest.raises(LookupError, match="no database") as info:
        list(cv.Pipeline(range(3)).map(echo, runtime="process", on_start=on_start))
    assert any("on_start" in note for note in info.value.__notes__)


def test_an_on_stop_that_raises_fails_the_run_with_its_error() -> None:
    def on_stop(state: Any) -> None:
        raise LookupError("cannot close")

    with pytest.raises(LookupError, match="cannot close") as info:
        cv.Pipeline(range(3)).map(echo, runtime="process", on_stop=on_stop).run()
    assert any("on_stop" in note for note in info.value.__notes__)


# ---------------------------------------------------------------------- errors


def test_an_exception_in_a_worker_has_the_workers_traceback_as_its_cause() -> None:
    # Stays outside the contract suite: the worker's traceback arrives as a
    # processes.RemoteTraceback cause, the process runtime's own way. The contract
    # suite checks the error's type, message and note, and that its printed
    # traceback shows the raising line, on every runtime x backend.
    with pytest.raises(ValueError) as info:
        list(cv.Pipeline(range(10)).map(raise_value_error, runtime="process", name="checker"))
    cause = info.value.__cause__
    assert isinstance(cause, processes.RemoteTraceback)
    assert 'raise ValueError(f"bad item {x}")' in str(cause)


def test_an_exception_whose_init_takes_other_arguments_arrives_as_itself() -> None:
    # It cannot be unpickled (pickle calls __init__ with its args): it is rebuilt
    # without calling __init__, its attributes restored (was a generic ConveyorError).
    with pytest.raises(NeedsTwoArgs, match="left/right") as info:
        list(cv.Pipeline(range(3)).map(raise_two_args, runtime="process"))
    assert (info.value.a, info.value.b) == ("left", "right")
    assert isinstance(info.value.__cause__, processes.RemoteTraceback)
    assert "raise NeedsTwoArgs" in str(info.value.__cause__)
    assert any("'raise_two_args' (map)" in note for note in info.value.__notes__)


def test_an_unpicklable_item_raises_a_serialization_error_naming_stage_and_type() -> None:
    items: list[Any] = [1, 2, threading.Lock(), 4]
    with pytest.raises(cv.SerializationError, match=r"'echo' \(map\).*_thread\.lock") as info:
        list(cv.Pipeline(items).map(echo, runtime="process"))
    assert "multiprocessing" not in str(info.value)


def test_an_unpicklable_item_is_recorded_with_skip() -> None:
    lock = threading.Lock()
    result = (
        cv.Pipeline([1, lock, 3]).map(echo, runtime="process", on_error="skip").run(collect=True)
    )
    assert result.outputs == [1, 3]
    [failure] = result.failures
    assert failure.item is lock
    assert isinstance(failure.error, cv.SerializationError)


def test_an_unpicklable_result_is_recorded_with_its_input_item() -> None:
    def fn(x: int) -> Any:
        return threading.Lock() if x == 2 else x

    result = cv.Pipeline(range(5)).map(fn, runtime="process", on_error="skip").run(collect=True)
    assert result.outputs == [0, 1, 3, 4]
    [failure] = result.failures
    assert failure.item == 2
    assert isinstance(failure.error, cv.SerializationError)
    assert "_thread.lock" in str(failure.error)
    with pytest.raises(cv.SerializationError, match=r"result of type _thread\.lock"):
        list(cv.Pipeline(range(5)).map(fn, runtime="process"))


# ---------------------------------------------------------------------- dying workers


@pytest.mark.quick
@pytest.mark.parametrize(
    ("how", "exit_text"),
    [("kill", "SIGKILL"), ("segfault", "SIGSEGV"), ("exit", "exited with code 3")],
)
def test_a_dying_worker_raises_worker_crashed_naming_stage_exit_and_items(
    how: str, exit_text: str
) -> None:
    started = time.monotonic()
    with pytest.raises(cv.WorkerCrashed, match=exit_text) as info:
        list(cv.Pipeline(range(8)).map(die_on(5, how), runtime="process", name="fragile"))
    assert time.monotonic() - started < 10
    error = info.value
    assert error.stage == "fragile"
    assert "'fragile' (map)" in str(error)
    assert any(re.search(r"held: .*\b5\b", note) for note in error.__notes__)


def test_a_worker_killed_from_outside_mid_item_is_detected_at_once(tmp_path: Path) -> None:
    pipeline = cv.Pipeline(range(5)).map(announce_and_block(str(tmp_path)), runtime="process")
    with pipeline.start() as handle:
        wait_until(lambda: bool(announced(tmp_path)))
        os.kill(announced(tmp_path)[0], signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(cv.WorkerCrashed, match="SIGKILL") as info:
            handle.join(timeout=5)
        assert time.monotonic() - killed < 1.0
    assert info.value.exitcode == -signal.SIGKILL


def test_with_retries_a_killed_workers_items_go_to_a_fresh_worker(tmp_path: Path) -> None:
    fn = die_once(str(tmp_path / "marker"), 13)
    result = (
        cv.Pipeline(range(40))
        .map(fn, runtime="process", workers=2, retries=1, backoff=cv.Backoff(initial=0.001))
        .run(collect=True)
    )
    assert result.outputs == [x * 10 for x in range(40)]
    # 13 was called again as a retry if it died alone; dying in a batch of several,
    # the batch's items were sent again one by one, which is no retry.
    assert result.stats[0].retried in (0, 1)
    assert result.failures == []


def test_an_item_that_kills_every_worker_fails_after_its_retries() -> None:
    fn = die_on(13, "kill")
    backoff = cv.Backoff(initial=0.001)
    result = (
        cv.Pipeline(range(20))
        .map(fn, runtime="process", retries=1, backoff=backoff, on_error="skip")
        .run(collect=True)
    )
    assert result.outputs == [x for x in range(20) if x != 13]
    [failure] = result.failures
    assert failure.item == 13 and failure.attempts == 2
    assert isinstance(failure.error, cv.WorkerCrashed)
    with pytest.raises(cv.WorkerCrashed):
        list(cv.Pipeline(range(20)).map(fn, runtime="process", retries=1, backoff=backoff))


# ---------------------------------------------------------------------- timeouts


def test_a_timed_out_item_is_retried_on_a_fresh_worker(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker")

    def slow_once(x: int) -> tuple[int, int]:
        if x == 1 and not os.path.exists(marker):
            Path(marker).touch()
            time.sleep(30)
        return x, os.getpid()

    out = list(
        cv.Pipeline(range(3)).map(
            slow_once, runtime="process", timeout=0.5, retries=1, backoff=cv.Backoff(0.001)
        )
    )
    assert [x for x, _ in out] == [0, 1, 2]
    assert out[0][1] != out[1][1]  # the first worker was killed


# ---------------------------------------------------------------------- shared memory


def big_payloads() -> list[Any]:
    rng = numpy.random.default_rng(7)
    return [
        b"b" * 300_000,
        bytearray(b"a" * 100_000),
        memoryview(b"m" * 70_000),
        rng.random(50_000),  # 400 kB of float64
        numpy.asfortranarray(rng.integers(0, 9, (300, 200))),
        rng.random(200_000)[::2],  # not contiguous: pickled in band
        (1, b"t" * 100_000),
        {"key": bytearray(80_000)},
        memoryview(numpy.arange(20_000, dtype=numpy.int32)).cast("B").cast("i", (100, 200)),
        numpy.arange(10),
        b"tiny",
    ]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, numpy.ndarray):
        return bool(
            type(b) is numpy.ndarray
            and a.dtype == b.dtype
            and a.shape == b.shape
            and numpy.array_equal(a, b)
        )
    if isinstance(a, memoryview):
        return (a.format, a.shape, a.tobytes()) == (b.format, b.shape, b.tobytes())
    return type(a) is type(b) and a == b


@pytest.mark.usefixtures("no_standbys")
def test_big_buffers_and_numpy_arrays_round_trip_through_shared_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    created: list[int] = []
    create = _wire._Arena.create.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, ident: int, size: int, keep_fd: bool = False) -> Any:
        created.append(size)
        return create(cls, ident, size, keep_fd)

    monkeypatch.setattr(_wire._Arena, "create", classmethod(counting))
    _spare.SPARES.clear()  # else earlier runs' blocks serve: nothing is created
    items = big_payloads()
    out = list(cv.Pipeline(items).map(echo, runtime="process", workers=2))
    assert all(same(a, b) for a, b in zip(items, out, strict=True))
    assert created  # they did go through shared memory
    assert out[3].flags.writeable


KEPT: list[Any] = []  # arrays a stage keeps in its worker (module level: sent by value)


def keep_some(a: Any) -> tuple[Any, bool]:
    if int(a[0]) % 7 == 0:
        KEPT.append(a)  # built on the worker's inbox: later batches must not overwrite it
    intact = all(int(k[0]) % 7 == 0 and bool((k == k[0]).all()) for k in KEPT)
    return a * 2, intact


def add_one_in_place(a: Any) -> Any:
    a += 1  # the worker's copy: the caller's array does not change
    return a if int(a[0]) % 2 else a[5:-5]  # the array itself, or a slice of it


def test_arrays_returned_as_they_came_are_not_copied_back_and_stay_intact() -> None:
    arrays = [numpy.full(20_000, i, dtype=numpy.int64) for i in range(200)]
    out = list(cv.Pipeline(arrays).map(add_one_in_place, runtime="process", workers=2))
    for i, (a, b) in enumerate(zip(arrays, out, strict=True)):
        assert numpy.all(a == i), i  # the caller's arrays, unchanged
        assert numpy.array_equal(b, (a + 1) if i % 2 == 0 else (a + 1)[5:-5]), i


def bytes_back_and_changed(x: Any) -> Any:
    if isinstance(x, bytearray):
        x[0] = 255  # the worker's copy: the caller's does not change
        return x
    return (x, x[::-1], {"again": x})  # the bytes it got, twice, and a new one


def test_bytes_returned_as_they_came_are_the_callers_objects_not_copies() -> None:
    items: list[Any] = [bytes([i]) * 100_000 for i in range(12)]
    items += [bytearray(b"x" * 100_000), b"small"]
    out = list(cv.Pipeline(items).map(bytes_back_and_changed, runtime="process", workers=2))
    for i, item in enumerate(items[:12]):
        same_one, reversed_one, nested = out[i]
        # Bytes cannot change: the answer names what the caller sent, nothing comes back.
        assert same_one is item and nested["again"] is item, i
        assert reversed_one == item[::-1] and reversed_one is not item, i
    changed, small = out[12], out[13]
    assert changed == bytearray(b"\xff" + b"x" * 99_999) and items[12] == bytearray(b"x" * 100_000)
    assert small[0] == b"small"


THRESHOLD = _wire.SHM_THRESHOLD


def payload_leaf(kind: str, size: int, seed: int) -> Any:
    """A bytes-like or array of about ``size`` bytes (kind: its type)."""
    data = bytes((seed + i) % 251 for i in range(256)) * (size // 256) + bytes(size % 256)
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "array.array":
        return array.array("i", data[: size - size % 4])
    if kind == "float64":
        return numpy.frombuffer(data[: size - size % 8], numpy.float64).copy()
    return numpy.frombuffer(data, numpy.uint8).reshape(-1, 1).copy()  # 2-D uint8


def remade(x: Any) -> Any:
    """A new object from ``x``, of the same kind, nested the same way (what a stage makes)."""
    if isinstance(x, tuple):
        return tuple(remade(y) for y in x)
    if isinstance(x, dict):
        return {k: remade(v) for k, v in x.items()}
    if isinstance(x, numpy.ndarray):
        return x[::-1] + 1  # a fresh array: allocated in the worker
    if isinstance(x, array.array):
        return array.array(x.typecode, reversed(x))
    if isinstance(x, memoryview):
        return memoryview(x.tobytes()[::-1])
    if isinstance(x, (bytes, bytearray)):
        return x[::-1]
    return x  # an int beside a buffer


def payload_stage(how: str) -> Callable[[Any], Any]:
    def fn(x: Any) -> Any:
        if how == "itself":
            return x
        if how == "new":
            return remade(x)
        return (x, remade(x))  # both: the input and something new

    return fn


def same_nested(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return type(b) is tuple and len(a) == len(b) and all(map(same_nested, a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(same_nested(a[k], b[k]) for k in a)
    return same(a, b)


LEAF_KINDS = ("bytes", "bytearray", "memoryview", "array.array", "float64", "uint8-2d")
# Specs of payloads (built in the test: hypothesis shows the specs of a failure, small).
leaves = st.tuples(
    st.just("leaf"),
    st.sampled_from(LEAF_KINDS),
    st.one_of(
        st.integers(THRESHOLD - 64, THRESHOLD + 64),  # around the threshold
        st.integers(1, 4096),
        st.integers(THRESHOLD, 6 * THRESHOLD),
    ),
    st.integers(0, 250),
)
payloads = st.one_of(
    leaves,
    st.tuples(st.just("tuple"), st.lists(st.one_of(leaves, st.integers()), max_size=3)),
    st.tuples(
        st.just("dict"),
        st.dictionaries(st.sampled_from(["a", "b", "c"]), leaves, min_size=1, max_size=3),
    ),
)


def build(spec: Any) -> Any:
    if not isinstance(spec, tuple):
        return spec
    if spec[0] == "leaf":
        return payload_leaf(*spec[1:])
    if spec[0] == "tuple":
        return tuple(build(x) for x in spec[1])
    return {k: build(v) for k, v in spec[1].items()}


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    specs=st.lists(payloads, min_size=1, max_size=24),
    how=st.sampled_from(["itself", "new", "both"]),
    workers=st.integers(1, 2),
)
def test_payloads_of_any_size_and_kind_come_back_equal_and_leave_no_segment(
    specs: list[Any], how: str, workers: int
) -> None:
    items = [build(spec) for spec in specs]
    fn = payload_stage(how)
    expected = [fn(x) for x in items]
    out = list(cv.Pipeline(items).map(fn, runtime="process", workers=workers))
    assert len(out) == len(expected)
    for i, (a, b) in enumerate(zip(expected, out, strict=True)):
        assert same_nested(a, b), (i, specs[i])
    assert our_segments() == []


CREATED: list[Any] = []  # arrays a stage created and keeps (module level: sent by value)


def create_and_keep_some(a: Any) -> tuple[Any, bool]:
    b = a * 2  # created in the worker: placed in the answer's shared memory
    if int(a[0]) % 5 == 0:
        CREATED.append(b)  # later batches must not overwrite it
    intact = all(bool((k == k[0]).all()) and int(k[0]) % 10 == 0 for k in CREATED)
    return b, intact


@pytest.mark.parametrize(
    "keep", [keep_some, create_and_keep_some], ids=["arrays-it-got", "arrays-it-created"]
)
def test_arrays_built_on_shared_memory_stay_intact_while_anyone_holds_them(
    keep: Callable[[Any], tuple[Any, bool]],
) -> None:
    arrays = [numpy.full(20_000, i, dtype=numpy.int64) for i in range(300)]  # 160 kB each
    out = list(cv.Pipeline(arrays).map(keep, runtime="process", workers=2))
    assert all(intact for _, intact in out)  # what the workers kept
    for i, (a, _) in enumerate(out):  # all the results, held at once by the caller
        assert numpy.array_equal(a, arrays[i] * 2), i
    out[1][0][:] = -1  # results are writable, and independent of each other
    assert numpy.array_equal(out[2][0], arrays[2] * 2)


HELD: list[Any] = []  # what a stage keeps from one call to the next (sent by value)


def hold_what_it_returns(how: str) -> Callable[[Any], Any]:
    def fn(a: Any) -> Any:
        for old in HELD:
            old[:] = -1  # the worker changes what it kept: results must not change with it
        out = a if how == "input" else a * 2
        HELD[:] = [out]
        return out

    return fn


@pytest.mark.parametrize("how", ["input", "created"])
def test_results_are_what_the_stage_returned_even_if_it_keeps_and_changes_them(how: str) -> None:
    arrays = [numpy.full(20_000, i, dtype=numpy.int64) for i in range(1, 9)]  # 160 kB each
    # A timeout sends one item per message: each result crosses before the next call.
    pipeline = cv.Pipeline(arrays).map(hold_what_it_returns(how), runtime="process", timeout=60)
    out = list(pipeline)
    factor = 1 if how == "input" else 2
    for i, (a, b) in enumerate(zip(arrays, out, strict=True)):
        assert numpy.array_equal(b, a * factor), i


def copy_and_say_where(a: Any) -> tuple[Any, str]:
    import importlib

    # The name of the NumPy memory handler that allocated the copy (NEP 49).
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # NumPy 2
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    b = a.copy()
    return b, multiarray.get_handler_name(b)


def test_arrays_the_stage_creates_are_allocated_in_the_answers_shared_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    descs: list[tuple[int, int, int]] = []
    merge = processes._Worker._merge

    def seeing(self: Any, job: Any, child: Any, seq: int, answer: Any, end: int) -> bool:
        descs.extend(answer.descs)
        return bool(merge(self, job, child, seq, answer, end))

    monkeypatch.setattr(processes._Worker, "_merge", seeing)
    arrays = [numpy.full(1 << 17, i, dtype=numpy.float64) for i in range(40)]  # 1 MiB each
    out = list(cv.Pipeline(arrays).map(copy_and_say_where, runtime="process"))
    assert all(numpy.array_equal(a, b) for a, (b, _) in zip(arrays, out, strict=True))
    assert {where for _, where in out} == {"conveyor_shared_memory"}
    # Each result is described where the worker created it: not copied again.
    assert len(descs) == 40 and all(place == _wire._OOB for _, _, place in descs)


def test_the_placer_reuses_freed_room_zeroes_callocs_keeps_realloc_data_and_unmaps_last() -> None:
    # In this process: what the worker does with an outbox, without a worker.
    from conveyor.runtime import _allocator

    placer = _allocator.placer()
    assert placer is not None
    T = THRESHOLD
    box = _wire._Arena.create(0, 6 * THRESHOLD)
    try:
        box.view[:] = b"x" * box.size  # earlier data: calloc must not show it
        with placer.placing(box):
            a = numpy.ones(THRESHOLD // 8)  # placed at 0
            temp = numpy.full(THRESHOLD // 8, 2.0)  # placed after it
            small = numpy.ones(10)  # small: malloc
            del temp  # its room is free again ...
            b = numpy.zeros(THRESHOLD // 8)  # ... and reused, zeroed
            grown = numpy.arange(THRESHOLD // 8, dtype=numpy.float64)
            grown.resize(THRESHOLD // 4, refcheck=False)  # realloc: data kept
        # grown moved on (its old room is free): a, b, grown
        assert placer.spans == [(0, T), (T, 2 * T), (3 * T, 5 * T)]
        assert not b.any() and a.sum() == THRESHOLD // 8 and small.sum() == 10
        assert numpy.array_equal(grown[: THRESHOLD // 8], numpy.arange(THRESHOLD // 8))
        assert placer.offsets(box, buffers_of(a[5:], b)) == [40, THRESHOLD]
        assert placer.kept(box)  # arrays alive: the block is let go, unmapped after them
        del a, b
        assert box._mapping is not None  # still mapped for grown
        del grown
        assert box._mapping is None and not placer.live
    finally:
        box.close()


_PLAIN_DTYPES = ["?", "i1", "<u2", ">i4", "<i8", "<f2", ">f4", "<f8", "<c8", ">c16"]


@st.composite
def batches_of_arrays(draw: st.DrawFn) -> list[Any]:
    """Lists of arrays around the shared-memory threshold: big C-contiguous ones of plain
    kinds (described), and others (pickled): small, Fortran order, strided, datetime or
    void dtypes."""
    batch = []
    for _ in range(draw(st.integers(1, 4))):
        plain = draw(st.booleans())
        kinds = _PLAIN_DTYPES if plain else [*_PLAIN_DTYPES, "M8[s]", "V3"]
        dtype = numpy.dtype(draw(st.sampled_from(kinds)))
        sizes = [THRESHOLD, 2 * THRESHOLD] if plain else [THRESHOLD // 4, THRESHOLD]
        size = draw(st.sampled_from(sizes)) + draw(st.integers(0, 64))
        count = size // dtype.itemsize // 2 * 2  # even: two rows
        rng = numpy.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        flat = rng.integers(0, 256, count * dtype.itemsize, dtype=numpy.uint8).view(dtype)
        shapes = ["flat", "rows"] if plain else ["flat", "rows", "fortran", "strided"]
        shape = draw(st.sampled_from(shapes))
        if shape == "rows":
            flat = flat.reshape(2, count // 2)
        elif shape == "fortran":
            flat = numpy.asfortranarray(flat.reshape(2, count // 2))
        elif shape == "strided":
            flat = flat[::2]
        batch.append(flat)
    return batch


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches_of_arrays())
def test_any_batch_of_arrays_crosses_a_block_as_itself(batch: list[Any]) -> None:
    buffers = _wire._Buffers()
    payload, pids = _wire._dump(batch, buffers)
    box = _wire._Arena.create(0, max(buffers.total, 64))
    try:
        out = _wire._load(payload, pids, box.write(buffers), box)
        assert len(out) == len(batch)
        for a, b in zip(batch, out, strict=True):
            # As pickle carries it (which makes a non-contiguous big-endian array native).
            expected = pickle.loads(pickle.dumps(a, 5))
            assert type(b) is numpy.ndarray and (b.dtype, b.shape) == (expected.dtype, a.shape)
            assert expected.tobytes() == b.tobytes()  # every byte (NaN != NaN for ==)
        del out
    finally:
        box.close()


class _Tagged(numpy.ndarray):  # type: ignore[type-arg]  # a subclass: pickle describes it
    pass


def test_a_batch_of_big_plain_arrays_is_described_not_pickled_and_any_other_as_before() -> None:
    n = THRESHOLD // 4  # int32 and float32 arrays of THRESHOLD bytes
    plain = [
        numpy.arange(n, dtype=">i4"),
        numpy.arange(n, dtype=numpy.float32).reshape(4, n // 4),
        numpy.arange(n, dtype=numpy.complex64),
        numpy.arange(4 * n) % 3 == 0,
    ]
    others = [
        numpy.asfortranarray(numpy.arange(n, dtype=numpy.float32).reshape(4, n // 4)),
        numpy.zeros(n, dtype=[("x", "f4"), ("y", "i4")]),
        numpy.arange(n, dtype=numpy.dtype(numpy.int32, metadata={"unit": "m"})),
        numpy.arange(n).astype("datetime64[s]"),
        numpy.arange(n, dtype=numpy.float32).view(_Tagged),
        numpy.arange(10),
    ]
    for index, one in enumerate(plain + others):
        batch = [one, one.copy()]
        described = _wire._describe_arrays(batch, _wire._Buffers()) is not None
        assert described is (index < len(plain)), one.dtype
        buffers = _wire._Buffers()
        payload, pids = _wire._dump(batch, buffers)
        box = _wire._Arena.create(0, max(buffers.total, 64))
        try:
            out = _wire._load(payload, pids, box.write(buffers), box)
            for a, b in zip(batch, out, strict=True):
                assert type(b) is type(a) and (b.dtype, b.shape) == (a.dtype, a.shape)
                assert b.dtype.metadata == a.dtype.metadata and (b == a).all()
            # Arrays set aside are built on the block itself (no copy), described or
            # pickled; both of a described batch are.
            assert box.in_use() is bool(buffers.views)
            assert len(buffers.views) == 2 or not described
            del out
        finally:
            box.close()
    # A batch of plain arrays with anything else in it is pickled as a whole.
    assert _wire._describe_arrays([plain[0], 1], _wire._Buffers()) is None


@pytest.mark.usefixtures("no_standbys")
@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")
def test_a_block_is_populated_for_writing_once_per_process_and_not_when_the_kernel_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page = mmap.PAGESIZE
    box = _wire._Arena.create(0, 8 * page)
    try:
        box.view[:3] = b"abc"
        box.populate(page + 1)  # rounded up to whole pages, from where it stopped
        assert box._populated == 2 * page and box.view[:3] == b"abc"
        box.populate(page)  # already done: nothing
        assert box._populated == 2 * page
        # An advice the kernel refuses (as one before 5.14 refuses MADV_POPULATE_WRITE):
        # turned off for the process, and the pages then fault in as they are written.
        monkeypatch.setattr(_wire, "_POPULATE_WRITE", [-1])
        box.populate(4 * page)
        assert _wire._POPULATE_WRITE == [None] and box._populated == 2 * page
        box.view[-1:] = b"z"
    finally:
        box.close()


def times_two(a: Any) -> Any:
    return a * 2  # created in the worker: placed in the answer's block


@pytest.fixture
def no_standbys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spare blocks on their own: no standby worker (which takes spare blocks to map
    ahead) is kept or started, and no earlier worker's exit still to give blocks back."""
    monkeypatch.setattr(processes, "STANDBY_PROCESSES", 0)
    processes.settle()
    _standby.STANDBYS.clear()


def counting_spares_taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the spare blocks workers are given from now on."""
    taken: list[int] = []
    take = _spare.SPARES.take

    def counting(need: int) -> Any:
        arena = take(need)
        if arena is not None:
            taken.append(arena.size)
        return arena

    monkeypatch.setattr(_spare.SPARES, "take", counting)
    return taken


@pytest.mark.usefixtures("no_standbys")
@pytest.mark.parametrize("fn", [echo, times_two], ids=["as-they-came", "created"])
def test_a_block_is_never_reused_while_a_result_still_views_it(
    fn: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def arrays(first: int) -> list[Any]:  # 1 MiB each: four to a message
        return [numpy.full(1 << 17, first + i, dtype=numpy.float64) for i in range(24)]

    factor = 1 if fn is echo else 2
    list(cv.Pipeline(arrays(0)).map(fn, runtime="process"))  # leaves spare blocks behind
    processes.settle()  # once its worker has exited
    taken = counting_spares_taken(monkeypatch)
    held = list(cv.Pipeline(arrays(100)).map(fn, runtime="process", workers=2))
    assert taken  # the workers got blocks an earlier run had faulted in
    # Later runs, while the caller holds every result of that one: blocks those results
    # view are neither spare nor reused, so writing new results cannot change them.
    for first in (200, 300):
        for out in cv.Pipeline(arrays(first)).map(fn, runtime="process", workers=2):
            assert numpy.all(out == out[0])
    for i, a in enumerate(held):
        assert numpy.all(a == factor * (100 + i)), i
    held[0][:] = -1  # results are independent of each other
    assert all(numpy.all(a == factor * (100 + i)) for i, a in enumerate(held) if i)
    assert our_segments() == []


def counting_blocks_created(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the shared-memory blocks created from now on."""
    created: list[int] = []
    create = _wire._Arena.create

    def counting(ident: int, size: int, keep_fd: bool = False) -> Any:
        created.append(size)
        return create(ident, size, keep_fd)

    monkeypatch.setattr(_wire._Arena, "create", counting)
    return created


@pytest.mark.usefixtures("no_standbys")
def test_blocks_the_last_results_view_become_spare_once_the_caller_drops_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arrays = [numpy.full(1 << 17, i, dtype=numpy.float64) for i in range(16)]
    _spare.SPARES.clear()
    held = list(cv.Pipeline(arrays).map(echo, runtime="process"))  # views of the blocks
    processes.settle()  # the worker's exit, after which its blocks are spare
    # The workers have ended while the caller holds these: their blocks are kept, in use.
    assert any(a.in_use() for a in _spare.SPARES._blocks)
    taken = counting_spares_taken(monkeypatch)
    out = list(cv.Pipeline(arrays[::-1]).map(echo, runtime="process"))
    assert [int(a[0]) for a in out] == list(range(15, -1, -1))
    assert [int(a[0]) for a in held] == list(range(16))  # never handed out meanwhile
    assert all(numpy.all(a == i) for i, a in enumerate(held))
    del held, out
    taken.clear()
    created = counting_blocks_created(monkeypatch)
    out = list(cv.Pipeline(arrays).map(echo, runtime="process"))
    assert all(numpy.all(a == i) for i, a in enumerate(out))
    assert taken and created == []  # every block came back, faulted in already
    assert _spare.SPARES.held <= processes.SPARE_BYTES


@pytest.mark.usefixtures("no_standbys")
def test_spare_blocks_stay_within_their_budget_and_none_are_kept_with_a_budget_of_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spares = _spare.SPARES
    limit = 3 * processes.SHM_MESSAGE_LIMIT
    monkeypatch.setattr(processes, "SPARE_BYTES", limit)
    spares.clear()
    arrays = [numpy.full(1 << 17, i, dtype=numpy.float64) for i in range(32)]
    out = list(cv.Pipeline(arrays).map(times_two, runtime="process", workers=2))
    processes.settle()  # the workers' exits, after which their blocks are spare
    assert all(numpy.all(b == 2 * i) for i, b in enumerate(out))
    kept = sum(a.size for a in spares._blocks)
    assert 0 < kept <= spares.held <= limit  # descriptors too: only within the budget
    monkeypatch.setattr(processes, "SPARE_BYTES", 0)
    spares.clear()
    assert spares.held == 0
    out = list(cv.Pipeline(arrays).map(times_two, runtime="process", workers=2))
    processes.settle()
    assert all(numpy.all(b == 2 * i) for i, b in enumerate(out))
    assert spares._blocks == [] and spares.held == 0


def in_a_fork(report: Callable[[Any], None]) -> Any:
    """What ``report`` sends back from a process forked from this one."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    child = context.Process(target=report, args=(theirs,))
    child.start()
    try:
        assert ours.poll(30)
        return ours.recv()
    finally:
        child.join(30)


def spares_held(conn: Any) -> None:
    conn.send((len(_spare.SPARES._blocks), _spare.SPARES.held))


@pytest.mark.usefixtures("no_standbys")
@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="POSIX: fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_process_does_not_inherit_the_spare_blocks_to_hand_out() -> None:
    arrays = [numpy.full(1 << 17, i, dtype=numpy.float64) for i in range(8)]
    list(cv.Pipeline(arrays).map(times_two, runtime="process"))
    processes.settle()
    assert _spare.SPARES._blocks  # this process has some
    assert in_a_fork(spares_held) == (0, 0)  # it maps them too: reusing them would share them
    assert _spare.SPARES._blocks


@pytest.mark.usefixtures("no_standbys")
def test_a_killed_worker_leaves_no_spare_block_in_flight_and_no_segment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def die_on_five(a: Any) -> Any:
        if int(a[0]) == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return a + 1

    arrays = [numpy.full(1 << 17, i, dtype=numpy.float64) for i in range(12)]
    list(cv.Pipeline(arrays).map(times_two, runtime="process"))  # spare blocks for the next
    processes.settle()
    taken = counting_spares_taken(monkeypatch)
    out = list(cv.Pipeline(arrays).map(die_on_five, runtime="process", retries=1, on_error="skip"))
    assert taken
    assert [int(b[0]) for b in out] == [i + 1 for i in range(12) if i != 5]
    assert our_segments() == []
    # The next run reuses what is spare, and its results are right.
    out = list(cv.Pipeline(arrays).map(times_two, runtime="process"))
    assert all(numpy.all(b == 2 * i) for i, b in enumerate(out))


def buffers_of(*arrays: Any) -> Any:
    buffers = _wire._Buffers(None)
    for a in arrays:
        buffers.views.append(memoryview(a).cast("B"))
        buffers.persistent.append(False)
    return buffers


def test_no_segment_is_left_after_a_worker_is_killed_while_creating_arrays() -> None:
    def create_then_die(a: Any) -> Any:
        b = a + 1  # placed in the answer's block, which the parent named
        if int(a[0]) == 7:
            os.kill(os.getpid(), signal.SIGKILL)
        return b

    arrays = [numpy.full(1 << 15, i, dtype=numpy.int64) for i in range(20)]
    with pytest.raises(cv.WorkerCrashed):
        list(cv.Pipeline(arrays).map(create_then_die, runtime="process"))
    assert our_segments() == []


def test_no_segment_is_left_after_a_timeout_while_creating_arrays() -> None:
    def create_then_hang(a: Any) -> Any:
        b = a + 1
        if int(a[0]) == 3:
            time.sleep(30)  # killed by the timeout
        return b

    arrays = [numpy.full(1 << 15, i, dtype=numpy.int64) for i in range(8)]
    out = list(
        cv.Pipeline(arrays).map(create_then_hang, runtime="process", timeout=1.0, on_error="skip")
    )
    assert [int(b[0]) for b in out] == [1, 2, 3, 5, 6, 7, 8]
    assert our_segments() == []


def test_no_segment_is_left_after_an_error_in_the_stage() -> None:
    def fail_late(x: Any) -> Any:
        if isinstance(x, bytes) and x == b"tiny":
            raise ValueError("late")
        return x

    with pytest.raises(ValueError, match="late"):
        list(cv.Pipeline(big_payloads()).map(fail_late, runtime="process"))
    assert our_segments() == []


def test_no_segment_is_left_after_a_worker_is_killed() -> None:
    def kill_on_tiny(x: Any) -> Any:
        if isinstance(x, bytes) and x == b"tiny":
            os.kill(os.getpid(), signal.SIGKILL)
        return x

    with pytest.raises(cv.WorkerCrashed):
        list(cv.Pipeline(big_payloads()).map(kill_on_tiny, runtime="process"))
    assert our_segments() == []


# ---------------------------------------------------------------------- stopping


def test_stop_terminates_every_worker_process_promptly(tmp_path: Path) -> None:
    # Stays outside the contract suite: workers stuck inside a call are killed, and
    # within 1.5 s, the process runtime's own way and figure. The contract suite
    # checks stop() on every runtime x backend with workers between calls.
    pipeline = cv.Pipeline(range(10)).map(
        announce_and_block(str(tmp_path)), runtime="process", workers=2, ordered=False
    )
    with pipeline.start() as handle:
        wait_until(lambda: len(announced(tmp_path)) == 2)
        pids = announced(tmp_path)
        stopped = time.monotonic()
        handle.stop()
        handle.join(timeout=5)
        assert time.monotonic() - stopped < 1.5
    assert gone(pids)


def test_join_names_the_workers_still_running_and_close_ends_them(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    folder = str(tmp_path)

    def on_stop(state: Any) -> None:  # hangs: the end of the run must not wait for it
        Path(folder, str(os.getpid())).touch()
        time.sleep(60)

    pipeline = cv.Pipeline(range(3)).map(echo, runtime="process", name="hang", on_stop=on_stop)
    run = Run(pipeline.source, list(pipeline.stages))
    run.start()
    with pytest.raises(cv.ShutDown):
        while True:
            run.channels[-1].get_many(10)
    wait_until(lambda: any(tmp_path.iterdir()))
    [pid] = [int(p.name) for p in tmp_path.iterdir()]
    with caplog.at_level("WARNING", logger="conveyor"):
        run.join(timeout=0.3)
    # The repro: the killed worker process was listed among "daemon threads", with
    # the parent's thread waiting for it, which ends with it.
    left = f"left behind: conveyor-hang-0 (pid {pid}) (a worker process, killed)"
    assert left in caplog.text, caplog.text
    assert "daemon thread" not in caplog.text
    wait_until(lambda: gone([pid]), 5)


SCRIPT_CTRL_C = """
import os, sys, time
from pathlib import Path
import conveyor as cv

def slow(x):
    Path(sys.argv[1], f"{os.getpid()}").touch()
    time.sleep(60)
    return x

if __name__ == "__main__":
    items = ((i, bytes(200_000)) for i in range(100))  # big buffers: shared memory in use
    cv.Pipeline(items).map(slow, runtime="process", workers=2, ordered=False).run()
"""


def run_script(tmp_path: Path, source: str, *args: str, **env: str) -> subprocess.Popen[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def outcome_of(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """The script's stdout and stderr once it has ended (killed after ``timeout`` s)."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


SCRIPT_KILLED_MID_RUN = """
import os, sys, threading
import numpy
import conveyor as cv
from conveyor.runtime import _standby, processes

def pid_of(a):
    return os.getpid()

def block_on_the_second(a):
    if a[0] == 1:
        print("blocked", os.getpid(), flush=True)
        threading.Event().wait()
    return a * 2

if __name__ == "__main__":
    arrays = [numpy.full(1 << 17, i, dtype=numpy.float64) for i in range(8)]  # 1 MiB each
    for _ in range(3):  # from the second run on, ends start standbys
        list(cv.Pipeline(arrays).map(pid_of, runtime="process", workers=2))
    processes.settle()
    print("standbys", *_standby.STANDBYS.pids(), flush=True)
    for _ in cv.Pipeline(arrays).map(block_on_the_second, runtime="process", workers=2):
        pass
"""


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="POSIX")
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_program_killed_mid_run_leaves_no_worker_standby_or_segment(
    tmp_path: Path, method: str
) -> None:
    proc = run_script(tmp_path, SCRIPT_KILLED_MID_RUN, CONVEYOR_START_METHOD=method)
    pids: list[int] = []
    said: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the standbys, then a worker blocked in its item
            said.append(line)
            word, *numbers = line.split()
            pids += [int(n) for n in numbers]
            if word == "blocked":
                break
    finally:
        proc.kill()  # SIGKILL: no handler, no atexit, no finally of the program runs
        _, err = outcome_of(proc, 10)
    assert said and said[-1].startswith("blocked"), (said, err)
    assert len(pids) >= 2, said  # a standby at least, and the blocked worker
    # The workers and standbys see their pipes end and exit; nobody is left to kill them.
    wait_until(lambda: gone(pids), 10.0)
    # multiprocessing's resource tracker, which outlives the program, unlinks its segments.
    wait_until(lambda: our_segments(proc.pid) == [], 10.0)


SCRIPT_KILLED_CREATING_A_BLOCK = """
import os, signal
from multiprocessing import resource_tracker
from conveyor.runtime import _wire

def killed(fd, size):  # the segment exists now, and nothing more is done
    print("created", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

resource_tracker.ensure_running()
_wire.os.ftruncate = killed
_wire._Arena.create(0, 1 << 20)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX shared memory")
def test_a_program_killed_while_it_creates_a_block_leaves_no_segment(tmp_path: Path) -> None:
    # Regression: the name was registered with the resource tracker only after the
    # segment was made and mapped; a kill in between (1 kill mid-run in 30, under load)
    # left the segment for ever. The name is registered first now.
    proc = run_script(tmp_path, SCRIPT_KILLED_CREATING_A_BLOCK)
    out, err = outcome_of(proc, 60)
    assert out == "created\n", err
    assert proc.returncode == -signal.SIGKILL
    wait_until(lambda: our_segments(proc.pid) == [], 10.0)


SCRIPT_EXITS_WITH_STANDBYS_IMPORTING = """
import multiprocessing, os, sys, threading, time
from pathlib import Path

folder = Path(sys.argv[1])
if __name__ == "__mp_main__" and multiprocessing.current_process().name == "conveyor-standby":
    # A spawned standby importing the main module, as one with heavy imports would be
    # for seconds: it reads no pipe meanwhile.
    (folder / f"importing-{os.getpid()}").write_text("")
    threading.Event().wait()

import conveyor as cv
from conveyor.runtime import processes

def same(x):
    return x

if __name__ == "__main__":
    processes.STANDBY_PROCESSES = 4
    for _ in range(2):
        list(cv.Pipeline(range(8)).map(same, runtime="process", workers=4))
    processes.settle()  # the standbys are started, and import the main module
    while len(list(folder.glob("importing-*"))) < 4:
        time.sleep(0.01)
    print("exiting", time.monotonic(), flush=True)
"""


def test_a_program_exits_at_once_with_spawned_standbys_still_importing(tmp_path: Path) -> None:
    # Regression: letting a standby go waited up to a second for it to see its pipe end;
    # a spawned one still importing the main module reads no pipe, so a program's exit
    # waited a second per standby (4 s here). A standby holds nothing: it is killed.
    proc = run_script(
        tmp_path, SCRIPT_EXITS_WITH_STANDBYS_IMPORTING, str(tmp_path), CONVEYOR_START_METHOD="spawn"
    )
    out, err = outcome_of(proc, 60)
    ended = time.monotonic()
    assert proc.returncode == 0, err
    assert err == ""
    said = float(out.split()[-1])  # time.monotonic() is system-wide on Linux
    assert ended - said < 2.0, f"the exit took {ended - said:.2f} s"
    standbys = [int(p.name.split("-")[1]) for p in tmp_path.glob("importing-*")]
    assert len(standbys) == 4
    wait_until(lambda: gone(standbys))


SCRIPT_CTRL_C_CREATING = """
import os, sys, time
from pathlib import Path
import numpy
import conveyor as cv

def create_then_block(a):
    b = a + 1  # allocated in the answer's shared memory
    if int(a[0]) >= 3:
        Path(sys.argv[1], f"{os.getpid()}").touch()
        time.sleep(60)
    return b

if __name__ == "__main__":
    items = (numpy.full(50_000, i) for i in range(100))
    cv.Pipeline(items).map(create_then_block, runtime="process", workers=2, ordered=False).run()
"""


@pytest.mark.parametrize(
    "script", [SCRIPT_CTRL_C, SCRIPT_CTRL_C_CREATING], ids=["bytes", "arrays-created"]
)
def test_ctrl_c_in_a_process_pipeline_leaves_no_process_and_no_segment(
    tmp_path: Path, script: str
) -> None:
    folder = tmp_path / "pids"
    folder.mkdir()
    proc = run_script(tmp_path, script, str(folder))
    try:
        wait_until(lambda: len(list(folder.iterdir())) == 2, 30)
        workers = [int(p.name) for p in folder.iterdir()]
        family = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert our_segments(proc.pid)  # named until the workers answer: they never will
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    wait_until(lambda: gone(workers + family), 5)
    assert our_segments(proc.pid) == []


SCRIPT_NO_GUARD = """
import conveyor as cv

print(list(cv.Pipeline(range(3)).map(abs, runtime="process")))
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_script_without_the_main_guard_gets_a_clear_error(tmp_path: Path, method: str) -> None:
    # forkserver: the server, importing the main module once for all workers, leaves out
    # one that starts a pipeline, silently; the workers still run it, and say why it fails.
    proc = run_script(tmp_path, SCRIPT_NO_GUARD, CONVEYOR_START_METHOD=method)
    _, err = outcome_of(proc, 30)
    assert proc.returncode != 0
    assert "ConfigurationError" in err
    assert 'if __name__ == "__main__":' in err
    assert "bootstrapping" not in err  # not multiprocessing's own message
    assert "MainStartsPipeline" not in err


SCRIPT_IMPORTS_NUMPY_LATE = """
import sys
import conveyor as cv


def same(x):
    return x


if __name__ == "__main__":
    # The first run starts the workers' forkserver, and a standby, before NumPy is loaded.
    assert list(cv.Pipeline(range(3)).map(same, runtime="process")) == [0, 1, 2]
    import numpy

    arrays = [numpy.arange(20_000, dtype=numpy.float64) + i for i in range(6)]
    out = list(cv.Pipeline(arrays).map(same, runtime="process"))
    assert all((a == b).all() and b.dtype == a.dtype for a, b in zip(arrays, out, strict=True))
    print("arrays came back")
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_arrays_reach_a_worker_started_before_the_program_imported_numpy(
    tmp_path: Path, method: str
) -> None:
    # Plain arrays cross described, not pickled (`_wire._describe_arrays`): nothing in
    # the message imports NumPy in the worker, which failed with KeyError: 'numpy'.
    proc = run_script(tmp_path, SCRIPT_IMPORTS_NUMPY_LATE, CONVEYOR_START_METHOD=method)
    out, err = outcome_of(proc, 60)
    assert proc.returncode == 0, err
    assert "arrays came back" in out


SCRIPT_COUNTS_ITS_IMPORTS = """
import os, sys
import conveyor as cv

print(f"imported as {__name__} in {os.getpid()}", file=sys.stderr)
COUNT = int(sys.argv[1])  # the script's arguments, wherever it is imported


def double(x):
    return 2 * x


if __name__ == "__main__":
    for run in range(2):
        print(list(cv.Pipeline(range(COUNT)).map(double, runtime="process", workers=2)))
"""


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="POSIX")
def test_the_forkserver_imports_the_main_module_once_for_all_workers(tmp_path: Path) -> None:
    # Regression: multiprocessing (up to 3.13) leaves the main module out of the
    # forkserver's preload, and each of the four workers ran the script again.
    proc = run_script(tmp_path, SCRIPT_COUNTS_ITS_IMPORTS, "8", CONVEYOR_START_METHOD="forkserver")
    out, err = outcome_of(proc, 60)
    assert proc.returncode == 0, err
    assert out.splitlines() == [str([2 * x for x in range(8)])] * 2
    imports = [line for line in err.splitlines() if line.startswith("imported as")]
    assert len(imports) == 2, err  # the script itself, and the forkserver
    assert imports[0].startswith("imported as __main__ ")
    assert imports[1].startswith("imported as __mp_main__ ")


def test_only_the_forkserver_imports_the_main_module_named_to_it(tmp_path: Path) -> None:
    # The variable is in the parent's environment while it starts the forkserver: another
    # child started meanwhile by some thread of the parent must not import the script
    # (the forkserver does: see the test above).
    script = tmp_path / "named.py"
    script.write_text('print("imported as", __name__)\n')
    entry = {"init_main_from_path": str(script), "sys_argv": [str(script)], "parent": os.getpid()}
    done = subprocess.run(
        [sys.executable, "-c", "import conveyor.runtime._forkserver_main"],
        env={**os.environ, "CONVEYOR_FORKSERVER_MAIN": json.dumps(entry)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_process_pipeline_runs_from_a_program_read_from_stdin(
    tmp_path: Path, method: str
) -> None:
    # Regression: workers ran '<stdin>' as the main module's path, and died.
    source = SCRIPT_NO_GUARD.replace("print(", 'if __name__ == "__main__":\n    print(')
    done = subprocess.run(
        [sys.executable, "-"],
        env={**os.environ, "CONVEYOR_START_METHOD": method},
        input=source,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 1, 2]"


def burn_cpu(x: int) -> int:
    """Keep the CPU busy for 3 ms of this process's CPU time."""
    until = time.process_time() + 0.003
    while time.process_time() < until:
        pass
    return x


def test_a_process_stages_cpu_busy_and_latency_are_its_worker_processes() -> None:
    """Regression: CPU time counted only the parent's threads, and busy time
    the two lanes' round trips (each also waiting behind the other's batch)."""
    result = cv.Pipeline(range(200)).map(burn_cpu, workers=2, runtime="process").run()
    (stats,) = result.stats
    assert stats.items_out == 200
    assert stats.cpu_seconds is not None and stats.cpu_seconds >= 200 * 0.003
    # A worker process does one batch at a time: its busy time fits in the run.
    assert stats.busy_seconds <= stats.workers * stats.elapsed_seconds
    assert stats.latency_p50 >= 0.002  # the stage function's time, not the round trip


_FUNCTION_CLASS = __import__("types").FunctionType  # a class with a __code__ descriptor


def test_a_stage_whose_globals_hold_the_function_class_runs_in_worker_processes() -> None:
    # Regression: restoring file names in the worker followed every global with a
    # __code__ attribute, and failed on types.FunctionType (a class, not a function).
    def is_function(x: int) -> bool:
        return isinstance(x, _FUNCTION_CLASS)

    outputs = list(cv.Pipeline(range(5)).map(is_function, runtime="process"))
    assert outputs == [False] * 5


HOLD_MODULE = """
import os
import time
from pathlib import Path

# The first process to import this module holds here, in its start-up, until the test
# has pressed Ctrl-C on it: the forkserver (preloading it) or a spawned worker.
hold = Path(os.environ["HOLD_DIR"])
if not (hold / "ready").exists():
    (hold / "pid").write_text(str(os.getpid()))
    (hold / "pid").rename(hold / "ready")
    for _ in range(3000):  # bounded polling: 30 s at most
        if (hold / "go").exists():
            break
        time.sleep(0.01)
"""

HELD_AT_START = """
import multiprocessing
import signal
import sys

import conveyor as cv

if __name__ == "__mp_main__" and sys.argv[-1] == "spawn":
    import hold_start  # a spawned worker holds in its start-up


def double(x):
    return 2 * x


if __name__ == "__main__":
    # As in a terminal's job: Ctrl-C not ignored (a shell's background job ignores it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[1] == "forkserver":
        multiprocessing.set_forkserver_preload(["hold_start"])  # the server holds
    print(cv.Pipeline(range(10)).map(double, runtime="process").run(collect=True).outputs)
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_ctrl_c_in_a_worker_process_start_up_neither_kills_it_nor_prints(
    tmp_path: Path, method: str
) -> None:
    # A Ctrl-C in a terminal reaches the whole process group: the forkserver or a
    # spawned worker, interrupted in its imports, died with a KeyboardInterrupt traceback
    # (and the run with WorkerCrashed). Here it reaches that process alone.
    (tmp_path / "held.py").write_text(HELD_AT_START)
    (tmp_path / "hold_start.py").write_text(HOLD_MODULE)
    env = {**os.environ, "HOLD_DIR": str(tmp_path), "CONVEYOR_START_METHOD": method}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "held.py"), method],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,  # where the forkserver finds hold_start (3.11 ignores its sys_path)
        start_new_session=True,  # its own process group, as a terminal's job
    )
    try:
        for _ in range(3000):  # bounded polling for the marker: 30 s at most
            if (tmp_path / "ready").exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert (tmp_path / "ready").exists(), proc.communicate(timeout=30)[0]
        held = int((tmp_path / "ready").read_text())
        assert held != proc.pid
        os.kill(held, signal.SIGINT)
        (tmp_path / "go").touch()
        out, _ = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (proc.returncode, out) == (0, f"{[2 * x for x in range(10)]}\n")


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_a_ctrl_c_landing_as_sigint_is_blocked_for_a_start_leaves_it_unblocked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl-C that came just before a worker's start blocked SIGINT raised from the
    blocking call itself, before the restore was armed: the main thread kept SIGINT
    blocked, and every later Ctrl-C of the program was lost (a later run hung)."""
    from conveyor.runtime import processes

    real = signal.pthread_sigmask

    def handler_runs_after_the_block(how: int, mask: Any) -> Any:
        before = real(how, mask)
        if how == signal.SIG_BLOCK and signal.SIGINT in set(mask):
            raise KeyboardInterrupt  # the pending handler, run as the call returns
        return before

    assert signal.SIGINT not in real(signal.SIG_BLOCK, ())
    monkeypatch.setattr(signal, "pthread_sigmask", handler_runs_after_the_block)
    with pytest.raises(KeyboardInterrupt), processes._sigint_held(None):
        pass
    monkeypatch.undo()
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, ())


# ---------------------------------------------------------------------- standby workers

FORKSERVER_ONLY = pytest.mark.skipif(
    processes.start_method() != "forkserver", reason="standby workers: forkserver only"
)


def own_pid(_: Any) -> tuple[int, str]:
    return os.getpid(), multiprocessing.current_process().name


def standbys_after_a_run(workers: int = 1) -> list[int]:
    """With none kept, run a process stage of ``workers`` workers and wait for the standbys
    its end starts (again if none: a program's first run of worker processes starts none)."""
    processes.settle()  # an earlier run's exit, pending, would start one after the clear
    _standby.STANDBYS.clear()
    for _ in range(2):
        list(cv.Pipeline(range(workers * 4)).map(own_pid, runtime="process", workers=workers))
        processes.settle()
        if _standby.STANDBYS.pids():
            break
    return _standby.STANDBYS.pids()


@FORKSERVER_ONLY
def test_the_next_run_takes_the_standby_the_last_one_left_and_names_it_as_its_worker() -> None:
    [standby] = standbys_after_a_run()
    out = list(cv.Pipeline([1, 2, 3]).map(own_pid, runtime="process", name="ids"))
    assert set(out) == {(standby, "conveyor-ids-0")}
    # That run's end started another, for the next.
    processes.settle()
    assert len(_standby.STANDBYS.pids()) == 1
    assert _standby.STANDBYS.pids() != [standby]


@FORKSERVER_ONLY
def test_a_standby_runs_on_start_and_reports_its_failure_as_a_started_worker_does() -> None:
    def refuse() -> None:
        raise ValueError("no connection")

    assert standbys_after_a_run()
    stage = {"runtime": "process", "name": "opens", "on_start": refuse}
    with pytest.raises(ValueError, match="no connection") as caught:
        cv.Pipeline([1]).map(own_pid, **stage).run()
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "on_start of stage 'opens'" in notes and "failed in a worker process" in notes


@FORKSERVER_ONLY
def test_a_standby_started_in_another_directory_is_let_go_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [standby] = standbys_after_a_run()
    monkeypatch.chdir(tmp_path)  # a worker started now would start there
    out = list(cv.Pipeline([1]).map(lambda _: os.getcwd(), runtime="process"))
    assert out == [str(tmp_path)]
    assert gone([standby]) or (wait_until(lambda: gone([standby])) is None)


@FORKSERVER_ONLY
def test_standbys_are_at_most_STANDBY_PROCESSES_and_none_with_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processes, "STANDBY_PROCESSES", 2)
    assert len(standbys_after_a_run(workers=3)) == 2
    monkeypatch.setattr(processes, "STANDBY_PROCESSES", 0)
    assert standbys_after_a_run(workers=2) == []


@FORKSERVER_ONLY
def test_a_killed_standby_is_not_taken_and_the_run_starts_a_worker() -> None:
    [standby] = standbys_after_a_run()
    os.kill(standby, signal.SIGKILL)
    wait_until(lambda: gone([standby]))
    out = list(cv.Pipeline(range(6)).map(own_pid, runtime="process"))
    assert len(out) == 6 and standby not in {pid for pid, _ in out}


def kill_the_forkserver() -> None:
    """SIGKILL multiprocessing's forkserver and wait for its end (the next start makes
    another): what the OOM killer or a ``pkill`` may do to it."""
    from multiprocessing import forkserver

    pid = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone([pid]))


def mark_then_block(marker: str) -> Callable[[int], int]:
    """A stage: item 0 gives the worker's pid; item 1 writes ``marker`` and never returns."""

    def stage(x: int) -> int:
        if x:
            Path(marker).write_text("in item 1")
            threading.Event().wait()
        return os.getpid()

    return stage


@FORKSERVER_ONLY
def test_a_forkserver_killed_mid_run_fails_the_run_naming_it_and_kills_the_orphaned_worker(
    tmp_path: Path,
) -> None:
    # Regression: the worker, orphaned, still ran; the run said it "exited with code 255"
    # (what multiprocessing reports when the server's status pipe ends), did not stop it,
    # and handed its shared memory to the next worker while it might still write there.
    marker = tmp_path / "busy"
    first_out = threading.Event()

    def source() -> Iterator[int]:
        yield 0
        first_out.wait(30)  # item 1 comes in a batch of its own
        yield 1

    outputs = iter(cv.Pipeline(source()).map(mark_then_block(str(marker)), runtime="process"))
    worker = next(outputs)
    first_out.set()
    wait_until(marker.exists)  # the worker is inside item 1
    kill_the_forkserver()
    with pytest.raises(cv.WorkerCrashed) as caught:
        next(outputs)
    message = str(caught.value)
    assert f"(pid {worker})" in message
    assert "was lost when the forkserver process, which reports its end, ended" in message
    assert "exited with code 255" not in message and "held 1 item(s)" in message
    wait_until(lambda: gone([worker]))
    assert list(cv.Pipeline(range(4)).map(square, runtime="process")) == [0, 1, 4, 9]
    assert our_segments() == []


def exit_255(x: int) -> int:
    if x == 3:
        os._exit(255)  # what multiprocessing also reports when the forkserver's pipe ends
    return x


@FORKSERVER_ONLY
def test_a_worker_exiting_with_255_itself_is_reported_so_and_not_taken_for_orphaned() -> None:
    with pytest.raises(cv.WorkerCrashed, match=r"exited with code 255 while it held"):
        list(cv.Pipeline(range(6)).map(exit_255, runtime="process"))
    assert list(cv.Pipeline(range(3)).map(square, runtime="process")) == [0, 1, 4]


@FORKSERVER_ONLY
def test_standbys_of_a_killed_forkserver_are_stopped_and_the_next_run_starts_anew() -> None:
    [standby] = standbys_after_a_run()
    kill_the_forkserver()
    out = list(cv.Pipeline(range(6)).map(own_pid, runtime="process"))
    assert len(out) == 6 and standby not in {pid for pid, _ in out}
    wait_until(lambda: gone([standby]))  # orphaned too: killed, not left waiting


def pid_and_variable(_: Any) -> tuple[int, str | None]:
    return os.getpid(), os.environ.get("CONVEYOR_TEST_SETTING")


@pytest.fixture
def spawning(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Workers spawned; their standbys let go at the end (spawned, they are this process's
    own children, which the check for leftover workers counts)."""
    monkeypatch.setattr(processes, "START_METHOD", "spawn")
    yield
    processes.settle()
    _standby.STANDBYS.clear()


@pytest.mark.usefixtures("spawning")
def test_spawned_standbys_are_taken_and_let_go_once_the_environment_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With "spawn" a start costs the interpreter's start-up and the main module's imports
    # (about 100 ms here, against 2 to 4 ms for a run given a standby).
    monkeypatch.delenv("CONVEYOR_TEST_SETTING", raising=False)
    [standby] = standbys_after_a_run()
    out = list(cv.Pipeline([1, 2]).map(own_pid, runtime="process", name="ids"))
    assert set(out) == {(standby, "conveyor-ids-0")}
    processes.settle()
    [second] = _standby.STANDBYS.pids()
    # A process spawned now would see this variable; the standby, spawned before, would not.
    monkeypatch.setenv("CONVEYOR_TEST_SETTING", "on")
    [(pid, seen)] = cv.Pipeline([1]).map(pid_and_variable, runtime="process")
    assert seen == "on" and pid != second
    wait_until(lambda: gone([second]))


@pytest.mark.usefixtures("spawning")
def test_a_standby_of_one_start_method_is_not_taken_by_a_run_of_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [standby] = standbys_after_a_run()
    monkeypatch.setattr(processes, "START_METHOD", "fork")  # no standbys: its memory is now's
    out = list(cv.Pipeline(range(3)).map(own_pid, runtime="process"))
    assert standby not in {pid for pid, _ in out}
    processes.settle()
    assert _standby.STANDBYS.pids() == [standby]  # kept for a run that spawns
    monkeypatch.setattr(processes, "START_METHOD", "spawn")
    assert {pid for pid, _ in cv.Pipeline([1]).map(own_pid, runtime="process")} == {standby}
    processes.settle()
    [spawned] = _standby.STANDBYS.pids()
    monkeypatch.setattr(processes, "START_METHOD", "forkserver")  # another kind of process
    out = list(cv.Pipeline(range(3)).map(own_pid, runtime="process"))
    assert spawned not in {pid for pid, _ in out}
    wait_until(lambda: gone([spawned]))  # let go: it could serve this method no more


def standbys_seen(conn: Any) -> None:
    conn.send(_standby.STANDBYS.pids())


@FORKSERVER_ONLY
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_process_does_not_inherit_the_standbys() -> None:
    [standby] = standbys_after_a_run()
    assert in_a_fork(standbys_seen) == []  # they are this process's to hand out
    # The fork closed its copies of the standby's pipe: it still waits, and is ours.
    assert _standby.STANDBYS.pids() == [standby]
    assert not gone([standby])


STANDBY_SCRIPT = """
import os, sys
import conveyor as cv
from conveyor.runtime import _standby, processes

def pid(_):
    return os.getpid()

if __name__ == "__main__":
    first = list(cv.Pipeline([1]).map(pid, runtime="process"))
    processes.settle()
    assert _standby.STANDBYS.pids() == []  # one run: none (a program may run no other)
    second = list(cv.Pipeline([1]).map(pid, runtime="process"))
    processes.settle()
    [standby] = _standby.STANDBYS.pids()
    print(standby, flush=True)
    # The program ends with a standby waiting, its worker exiting, another one starting.
    third = list(cv.Pipeline([1]).map(pid, runtime="process"))
    assert third == [standby], (third, standby)
"""


@FORKSERVER_ONLY
def test_a_program_ending_with_standbys_leaves_no_process_and_prints_nothing(
    tmp_path: Path,
) -> None:
    script = tmp_path / "prog.py"
    script.write_text(STANDBY_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(cv.__file__).parent.parent)},
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    standby = int(done.stdout)
    wait_until(lambda: gone([standby]))


@FORKSERVER_ONLY
def test_a_standby_maps_the_spare_blocks_ahead_and_its_worker_uses_them_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    arrays = [numpy.full(1 << 17, i, dtype=numpy.float64) for i in range(12)]  # 3 messages
    processes.settle()  # as in standbys_after_a_run
    _standby.STANDBYS.clear()
    for _ in range(2):  # as in standbys_after_a_run
        list(cv.Pipeline(arrays).map(times_two, runtime="process"))
        processes.settle()
    [standby] = _standby.STANDBYS._ready
    assert standby.blocks  # the blocks that run's worker left
    created = counting_blocks_created(monkeypatch)
    announced: list[str | None] = []  # how each block the worker used was announced
    new_arena = processes._Child._new_arena

    def recording(child: Any, size: int, flight: Any) -> Any:
        arena, how = new_arena(child, size, flight)
        announced.append(how)
        return arena, how

    monkeypatch.setattr(processes._Child, "_new_arena", recording)
    out = list(cv.Pipeline(arrays).map(times_two, runtime="process"))
    assert all(numpy.all(b == 2 * i) for i, b in enumerate(out))
    # Its first blocks were the standby's (announced as known: None); then spare or new
    # ones, if it needed more (the standby took the blocks free when it started).
    first = announced[: len(standby.blocks)]
    assert first and all(how is None for how in first), announced
    assert len(created) <= len(announced) - len(first)
    assert our_segments() == []
    # A standby let go gives its blocks back to the spares.
    processes.settle()
    [standby] = _standby.STANDBYS._ready
    held = {id(a) for a in standby.blocks}
    _standby.STANDBYS.clear()
    assert held and held <= {id(a) for a in _spare.SPARES._blocks}


def plus_one(x: int) -> int:
    return x + 1


def test_back_to_back_runs_never_race_for_a_workers_exit_status() -> None:
    # Regression: workers exit in the background after a run, standbys start meanwhile,
    # and every Process.start() polls every child: two threads read one forkserver
    # child's exit status (four bytes on its sentinel) and the second waited for ever,
    # hanging a start (1 in 4 of such sequences of 100 runs hung, others lost a worker).
    for _ in range(100):
        result = (
            cv.Pipeline(range(6))
            .map(plus_one, runtime="process", workers=3)
            .map(plus_one, runtime="process", workers=2)
            .run(collect=True)
        )
        assert sorted(result.outputs) == [x + 2 for x in range(6)]
    processes.settle()


# ---------------------------------------------------------------------- lanes' wake-ups


def busy_then_blocked(folder: str, item: tuple[int, bytes]) -> int:
    """A stage busy a few ms per item (a number and 128 KiB, which cross through shared
    memory); item 6 waits for the test's release (a bounded polling loop: nothing else
    reaches another process)."""
    x = item[0]
    if x == 6:
        Path(folder, "blocked").write_text("")
        deadline = time.monotonic() + 30.0
        while not Path(folder, "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        end = time.perf_counter() + 0.003
        while time.perf_counter() < end:
            pass
    return x


def lane_policies() -> list[int]:
    """The scheduling policies of this process's lane threads (the parent's threads
    that feed a worker process)."""
    return [
        os.sched_getscheduler(t.native_id)
        for t in threading.enumerate()
        if t.native_id is not None and t.name.startswith("conveyor-busy_then_blocked-")
    ]


def run_blocked_then_released(
    tmp_path: Path, payload: bytes = bytes(1 << 17)
) -> tuple[list[int], list[int]]:
    """Run `busy_then_blocked` over 8 items, each with ``payload`` (by default big enough
    to cross through shared memory); the lanes' policies while item 6 is held, and the
    outputs."""
    stage = partial(busy_then_blocked, str(tmp_path))
    items = [(i, payload) for i in range(8)]
    pipeline = cv.Pipeline(items).map(stage, runtime="process", name="busy_then_blocked")
    handle = pipeline.start(collect=True)
    try:
        wait_until((tmp_path / "blocked").exists, 30.0)
        policies = lane_policies()
    finally:
        (tmp_path / "release").write_text("")
    result = handle.join(30)
    return policies, result.outputs or []


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_a_lane_waits_for_a_busy_worker_without_preempting_it_and_runs_as_usual_after(
    tmp_path: Path,
) -> None:
    # A lane woken by an answer took the CPU the worker process was on, for the copy of
    # its next message's big buffers, while the worker went on to the next message (see
    # processes._wake_without_preempting): such a lane now waits under SCHED_BATCH.
    policies, outputs = run_blocked_then_released(tmp_path)
    assert sorted(outputs) == list(range(8))
    assert os.SCHED_BATCH in policies, policies  # the lane waiting for item 6's answer
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread: untouched


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_a_lane_of_a_thread_with_a_policy_of_its_own_keeps_it(tmp_path: Path) -> None:
    # Lanes inherit the policy of the thread that starts the run: one the user chose
    # (here SCHED_IDLE) is neither replaced nor reset to the default.
    found: list[tuple[list[int], list[int]]] = []

    def idle_caller() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        found.append(run_blocked_then_released(tmp_path))

    caller = threading.Thread(target=idle_caller)
    caller.start()
    caller.join(60)
    assert found, "the run did not end"
    policies, outputs = found[0]
    assert sorted(outputs) == list(range(8))
    assert policies and set(policies) == {os.SCHED_IDLE}, policies


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_a_lane_of_small_items_keeps_the_usual_wake_ups(tmp_path: Path) -> None:
    # Messages without big buffers: nothing to copy, the usual wake-ups.
    policies, outputs = run_blocked_then_released(tmp_path, b"")
    assert sorted(outputs) == list(range(8))
    assert policies and set(policies) == {os.SCHED_OTHER}, policies


# ---------------------------------------------------------------------- a worker's memory


def faults_making_big_bytes(times: int) -> int:
    """The page faults this process takes making ``times`` batches of four bytes objects
    of 1 MiB from a buffer, then freeing them, as the worker does with the items of a
    message of 4 MiB."""
    import resource

    source = bytearray(1 << 20)
    made = [bytes(source) for _ in range(4)]  # the first ones may grow the heap
    del made
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        made = [bytes(source) for _ in range(4)]
        del made
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_worker_process_reuses_the_memory_of_the_big_objects_it_frees() -> None:
    # Regression: each 1 MiB bytes object a worker made was a fresh mapping, faulted in
    # page by page and unmapped when freed (256 faults per MiB): bytes through a process
    # stage moved at a fifth of the speed they do with the memory kept.
    [faults] = cv.Pipeline([50]).map(faults_making_big_bytes, runtime="process").run(
        collect=True
    ).outputs or [None]
    assert faults is not None and faults < 50 * 4 * 256 // 10, faults  # 51,200 without


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forkserver, and glibc")
def test_the_forkserver_preloads_what_each_worker_needs_at_once() -> None:
    # Regression: once the worker's side imported ctypes and the array placer only when
    # needed, each forkserver worker imported them itself at its start (5 ms more each).
    pytest.importorskip("numpy")  # loaded: its placer is needed too
    from multiprocessing import forkserver

    assert list(cv.Pipeline(range(3)).map(str, runtime="process")) == ["0", "1", "2"]
    preloaded = forkserver._forkserver._preload_modules  # type: ignore[attr-defined]
    assert {"ctypes", "numpy", "conveyor.runtime._allocator"} <= set(preloaded), preloaded
