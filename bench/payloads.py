"""Large payloads through a process stage and back, against memcpy, paired round by round.

Each run sends 512 buffers of 1 MiB (64 distinct ones taken in turn: 64 MiB,
more than the caches) through a fresh pipeline with one process stage of one
worker, start-up included, and takes every result back in the caller. As in
any program that runs pipelines one after the other, a run's worker is the
standby process the previous run's end started (conveyor.runtime._standby);
that start is done in the background, and waited for (``settle``) before the
reference copies, which it would otherwise slow down. What the stage does:

* arrays, as they came    ``lambda a: a``          (NumPy float64 arrays)
* arrays, new             ``a.copy()``             (an array created in the worker)
* arrays, new (ufunc)     ``a * 2``
* bytes, as they came     ``lambda b: b``          (bytes objects)
* bytes, new              ``bytearray(b)``         (a new object made in the worker)

The reference is memcpy bandwidth as it is usually meant, buffers beyond the
caches on both sides: ``np.copyto`` of the same 512 arrays, each into the next
of 64 distinct 1 MiB destination arrays in turn (64 MiB read, 64 MiB written,
neither in the caches). A second reference is kept beside it so that earlier
figures stay comparable: the same copies into one 1 MiB destination array,
which stays in the caches (the reference of this script until 2026-12-04, as
in bench/runtimes.py); it is the faster of the two, 1.4-1.7x here. A round
runs every candidate once, in an order that rotates from round to round,
after a warm-up round; per run, the candidate's share of a memcpy's bandwidth
is that memcpy's time over its own (the same bytes moved), both memcpys
running right before and after it; the table gives the median and the range
over the rounds.

Run:  python bench/payloads.py [--rounds 7] [--floor] [--write] [--json PATH]

--floor also measures, against both memcpys, the parts a run of arrays
returned as they came is made of: the start-up (a run of one array), the
parent's one copy into shared memory (512 arrays into four 4 MiB blocks of
``multiprocessing.shared_memory`` in turn, as the runtime reuses its blocks),
and all the rest (the same run with that copy skipped, less the start-up: a
diagnostic that replaces ``conveyor.runtime._wire._copy``; its results are not
the inputs). Then, for each array candidate, where the time of a run goes,
against the main-memory memcpy: its wall time, the CPU time of the parent
process (all its threads) and of the worker process (which reports its own in
an ``on_stop``) over the run, the stage's own pass measured alone (512 arrays
from one ring of shared-memory blocks into another, in this process), and the
least time two cores allow those two processes: max(worker,
(parent + worker) / 2), the worker's work being done by one thread while the
parent's lanes copy outside the GIL and may use both cores; and the least time
the copies a run cannot do without take when made at the same time, as they
are in a run (the parent's into shared memory in one thread, the stage's own
pass in another): two copies at once share the memory's bandwidth.
Last, the same shape without conveyor (`minimal_pipeline`): a worker process
and two threads passing 4 MiB shared-memory blocks of four arrays with three
numbers through pipes, the worker doing the stage's work into five answer
blocks in turn, and nothing else; what the machine allows a run of this
shape, beside conveyor's share without start-up.

--write replaces this script's section of docs/benchmarks.md; --json PATH
writes, per workload, conveyor's MiB/s and its ratio to memcpy (the peer),
for bench/ab.py (``CONVEYOR_BENCH_SRC`` chooses the conveyor, see
bench/_common.py).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# Worker processes run this module again (as __mp_main__): keep its top level light.
sys.path.insert(0, os.environ.get("CONVEYOR_BENCH_SRC") or str(BENCH.parent / "src"))

import numpy  # noqa: E402  (a NumPy program: conveyor preloads it for its workers)

import conveyor as cv  # noqa: E402

SECTION = "payloads"
MIB = 1 << 20
COUNT, DISTINCT = 512, 64
MEMCPY = "memcpy (np.copyto, source and destination in main memory)"
MEMCPY_CACHED = "memcpy into one cached 1 MiB array (the earlier reference)"


def as_they_came(x: Any) -> Any:
    return x


def array_copy(a: Any) -> Any:
    return a.copy()


def array_times_two(a: Any) -> Any:
    return a * 2


def new_bytearray(b: Any) -> Any:
    return bytearray(b)


# name -> (stage function, payload kind)
CANDIDATES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "arrays, returned as they came": (as_they_came, "array"),
    "arrays, the stage returns `a.copy()`": (array_copy, "array"),
    "arrays, the stage returns `a * 2`": (array_times_two, "array"),
    "bytes, returned as they came": (as_they_came, "bytes"),
    "bytes, the stage returns `bytearray(b)`": (new_bytearray, "bytes"),
}
# What --json names them (bench/ab.py's workloads).
JSON_NAMES = {
    "arrays, returned as they came": "arrays as they came",
    "arrays, the stage returns `a.copy()`": "arrays a.copy()",
    "arrays, the stage returns `a * 2`": "arrays a * 2",
    "bytes, returned as they came": "bytes as they came",
    "bytes, the stage returns `bytearray(b)`": "bytes bytearray(b)",
}


def payloads() -> dict[str, list[Any]]:
    arrays = [numpy.random.default_rng(i).random(MIB // 8) for i in range(DISTINCT)]
    return {"array": arrays, "bytes": [a.tobytes() for a in arrays]}


def through_a_process_stage(fn: Callable[[Any], Any], data: list[Any]) -> Callable[[], float]:
    """A run; it returns the seconds from the first result to the last (no start-up)."""

    def run() -> float:
        source = (data[i % DISTINCT] for i in range(COUNT))
        n = 0
        first = last = 0.0
        for out in cv.Pipeline(source).map(fn, runtime="process"):
            last = time.perf_counter()
            first = first or last
            assert len(memoryview(out).cast("B")) == MIB
            n += 1
        assert n == COUNT
        return last - first

    return run


def memcpy(arrays: list[Any], destinations: int = DISTINCT) -> Callable[[], float]:
    """The 512 copies, each into the next of ``destinations`` 1 MiB arrays in turn:
    DISTINCT of them are beyond the caches like the sources (`MEMCPY`), one stays
    in them (`MEMCPY_CACHED`)."""
    targets = [numpy.ones(MIB // 8) for _ in range(destinations)]  # faulted in

    def run() -> float:
        for i in range(COUNT):
            numpy.copyto(targets[i % destinations], arrays[i % DISTINCT])
        return 0.0

    return run


def references(arrays: list[Any]) -> tuple[Callable[[], float], Callable[[], float]]:
    """Both memcpys: to main memory (`MEMCPY`), and to a cached destination."""
    return memcpy(arrays), memcpy(arrays, 1)


def around(
    run: Callable[[], float], copy: Callable[[], float], cached: Callable[[], float]
) -> tuple[float, float, float, float]:
    """The run timed with both memcpys right before and after it (in mirrored order):
    the run's seconds, what it returned, and the mean time of each memcpy."""
    before, before_cached = timed(copy)[0], timed(cached)[0]
    took, inner = timed(run)
    settle()  # the standby worker the run's end starts: not during the memcpys
    after_cached, after = timed(cached)[0], timed(copy)[0]
    return took, inner, (before + after) / 2, (before_cached + after_cached) / 2


def settle() -> None:
    from _common import settle as wait_for_background  # bench/_common.py

    wait_for_background()


def timed(run: Callable[[], float]) -> tuple[float, float]:
    """Seconds the run took, and what it returned."""
    started = time.perf_counter()
    inner = run()
    return time.perf_counter() - started, inner


Shares = dict[str, tuple[list[float], list[float]]]
"""Per candidate, per run: its share of a memcpy's bandwidth, with start-up and without."""


def measure(
    rounds: int,
) -> tuple[dict[str, list[float]], dict[str, Shares], dict[str, list[float]]]:
    """Per candidate (and memcpy): seconds per run; per reference memcpy (`MEMCPY`,
    `MEMCPY_CACHED`), each candidate's shares of its bandwidth, with start-up and
    without (from the first result to the last, for COUNT - 1 of them); and per
    candidate the seconds from the first result to the last.

    A warm-up round, then ``rounds``; both memcpys run right before and right
    after each candidate's run, and a share is the mean of a memcpy's two
    times over the candidate's time: the load of the machine moves within a round.
    """
    data = payloads()
    copy, cached = references(data["array"])
    runs = {
        name: through_a_process_stage(fn, data[kind]) for name, (fn, kind) in CANDIDATES.items()
    }
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in [MEMCPY, MEMCPY_CACHED, *names]}
    share: dict[str, Shares] = {
        ref: {name: ([], []) for name in names} for ref in (MEMCPY, MEMCPY_CACHED)
    }
    steadies: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            took, steady, reference, reference_cached = around(runs[name], copy, cached)
            if round_:  # round 0 is the warm-up
                times[name].append(took)
                steadies[name].append(steady)
                for ref, seconds in ((MEMCPY, reference), (MEMCPY_CACHED, reference_cached)):
                    times[ref].append(seconds)
                    share[ref][name][0].append(seconds / took)
                    share[ref][name][1].append(seconds * (COUNT - 1) / COUNT / steady)
        print(f"  round {round_}/{rounds} done", file=sys.stderr)
    return times, share, steadies


def copy_into_shared_memory(
    arrays: list[Any],
) -> tuple[Callable[[], float], Callable[[], None]]:
    """The parent's copy alone: every array into shared-memory blocks taken in turn; and
    what frees the blocks."""
    targets, close = shared_ring()

    def run() -> float:
        for i in range(COUNT):
            numpy.copyto(targets[i % len(targets)], arrays[i % DISTINCT])
        return 0.0

    return run, close


def without_the_copy(data: list[Any]) -> Callable[[], float]:
    """A run of arrays returned as they came, the parent's copy into shared memory skipped."""
    from conveyor.runtime import _wire

    whole = through_a_process_stage(as_they_came, data)

    def run() -> float:
        copy = _wire._copy
        _wire._copy = lambda target, source: target.release()
        try:
            return whole()
        finally:
            _wire._copy = copy

    return run


def start_up(data: list[Any]) -> Callable[[], float]:
    """A run of one array: the worker's start, one round trip, the run's end."""

    def run() -> float:
        outputs = list(cv.Pipeline(data[:1]).map(as_they_came, runtime="process"))
        assert len(outputs) == 1
        return 0.0

    return run


def record_cpu(path: str, _state: Any) -> None:
    """A worker's ``on_stop``: write its process's CPU seconds so far (since it was forked)
    to ``path``."""
    Path(path).write_text(repr(time.process_time()))


def cpu_split(fn: Callable[[Any], Any], data: list[Any]) -> Callable[[], tuple[float, float]]:
    """A full run of the stage; it returns the CPU seconds of the parent process (all its
    threads) and of the worker process (which writes them in its ``on_stop``)."""
    import functools
    import tempfile

    def run() -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "worker-cpu")
            on_stop = functools.partial(record_cpu, path)
            started = time.process_time()
            source = (data[i % DISTINCT] for i in range(COUNT))
            n = sum(1 for _ in cv.Pipeline(source).map(fn, runtime="process", on_stop=on_stop))
            parent = time.process_time() - started
            assert n == COUNT
            return parent, float(Path(path).read_text())

    return run


def stage_pass_alone(
    op: Callable[[Any, Any], None] | None, arrays: list[Any]
) -> tuple[Callable[[], float], Callable[[], None]]:
    """What the stage does to 512 arrays, alone in this process, from shared memory into
    shared memory (both rings of four 4 MiB blocks, as the worker's inboxes and outboxes);
    and what frees the blocks."""
    sources, free_sources = shared_ring()
    targets, free_targets = shared_ring()
    for i, target in enumerate(sources):
        numpy.copyto(target, arrays[i % DISTINCT])

    def run() -> float:
        if op is not None:
            for i in range(COUNT):
                op(sources[i % len(sources)], targets[i % len(targets)])
        return 0.0

    def close() -> None:
        free_sources()
        free_targets()

    return run, close


def both_copies_at_once(
    op: Callable[[Any, Any], None] | None, arrays: list[Any]
) -> tuple[Callable[[], float], Callable[[], None]]:
    """The copies a run cannot do without, made at the same time on the two cores: the
    parent's 512 copies into shared memory (a thread) and the stage's own pass (this
    thread), as `copy_into_shared_memory` and `stage_pass_alone` make them alone. Two
    copies at once share the memory's bandwidth: together they take longer than
    either alone (about 1.5-1.7x here for twice the bytes), a bound no overlap of the
    two processes can beat. And what frees the blocks."""
    import threading

    parents_copy, free_parents = copy_into_shared_memory(arrays)
    stage, free_stage = stage_pass_alone(op, arrays)

    def run() -> float:
        thread = threading.Thread(target=parents_copy)
        thread.start()
        stage()
        thread.join()
        return 0.0

    def close() -> None:
        free_parents()
        free_stage()

    return run, close


def shared_ring() -> tuple[list[Any], Callable[[], None]]:
    """16 arrays of 1 MiB on four 4 MiB shared-memory blocks, faulted in; and what frees them."""
    blocks = faulted_blocks(4)
    arrays = [array for block in blocks for array in ring(block)]

    def close() -> None:
        arrays.clear()
        free(blocks)

    return arrays, close


def faulted_blocks(count: int) -> list[Any]:
    """``count`` new shared-memory blocks of one message's size (4 MiB), faulted in, as
    the runtime's reused blocks are."""
    from multiprocessing import shared_memory

    blocks = [shared_memory.SharedMemory(create=True, size=PER_MESSAGE * MIB) for _ in range(count)]
    for block in blocks:
        block.buf[:] = bytes(len(block.buf))
    return blocks


def ring(block: Any) -> list[Any]:
    """A block's four 1 MiB arrays."""
    whole = numpy.ndarray(PER_MESSAGE * MIB // 8, numpy.float64, block.buf)
    return [whole[j * MIB // 8 : (j + 1) * MIB // 8] for j in range(PER_MESSAGE)]


def free(blocks: list[Any]) -> None:
    """Unmap and unlink `faulted_blocks`' blocks (no array left on them)."""
    for block in blocks:
        block.close()
        block.unlink()


# The array candidates, and what their stage does alone (`stage_pass_alone`).
STAGE_PASSES: dict[str, Callable[[Any, Any], None] | None] = {
    "arrays, returned as they came": None,
    "arrays, the stage returns `a.copy()`": lambda a, out: numpy.copyto(out, a),
    "arrays, the stage returns `a * 2`": lambda a, out: numpy.multiply(a, 2, out=out),
}
WALL = "the run (wall time, start-up included)"
PARENT_CPU = "CPU time of the parent process (all its threads)"
WORKER_CPU = "CPU time of the worker process"
STAGE_ALONE = "the stage's own pass alone (512 arrays, shared memory to shared memory)"
LEAST = "the least a run can take on 2 cores: max(worker, (parent + worker) / 2)"
AT_ONCE = (
    "the least the copies take: the parent's and the stage's at once, on two threads "
    "(memory bandwidth shared)"
)


def measure_cpu_floor(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per array candidate, per part (`WALL` ... `LEAST`): its seconds over memcpy's
    (`MEMCPY`, right before and after it), per round."""
    data = payloads()["array"]
    copy = memcpy(data)
    parts: dict[str, dict[str, list[float]]] = {
        name: {part: [] for part in (WALL, PARENT_CPU, WORKER_CPU, STAGE_ALONE, LEAST, AT_ONCE)}
        for name in STAGE_PASSES
    }
    passes = {name: stage_pass_alone(op, data) for name, op in STAGE_PASSES.items()}
    together = {name: both_copies_at_once(op, data) for name, op in STAGE_PASSES.items()}
    runs = {name: cpu_split(CANDIDATES[name][0], data) for name in STAGE_PASSES}
    try:
        for round_ in range(rounds + 1):
            for name in STAGE_PASSES:
                before = timed(copy)[0]
                wall, (parent, worker) = timed(runs[name])
                alone = timed(passes[name][0])[0]
                at_once = timed(together[name][0])[0]
                reference = (before + timed(copy)[0]) / 2
                if round_:
                    least = max(worker, (parent + worker) / 2)
                    for part, seconds in zip(
                        (WALL, PARENT_CPU, WORKER_CPU, STAGE_ALONE, LEAST, AT_ONCE),
                        (wall, parent, worker, alone, least, at_once),
                        strict=True,
                    ):
                        parts[name][part].append(seconds / reference)
    finally:
        for _, close in (*passes.values(), *together.values()):
            close()
    return parts


def cpu_floor_report(parts: dict[str, dict[str, list[float]]]) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f} - {max(values):.2f})"

    names = list(parts)
    rows = [
        f"| {part} | {' | '.join(cell(parts[name][part]) for name in names)} |"
        for part in parts[names[0]]
    ]
    shares = " | ".join(f"{100 / statistics.median(parts[name][LEAST]):.0f}%" for name in names)
    bandwidth = " | ".join(
        f"{100 / statistics.median(parts[name][AT_ONCE]):.0f}%" for name in names
    )
    return "\n".join(
        [
            "Where the time of a run of each array candidate goes, over memcpy's time "
            "(source and destination in main memory), median (min - max) over the rounds: "
            "a run's wall time, the CPU time of each process over it, and the stage's own "
            "pass measured alone. Two cores run both processes, so a run cannot take "
            "less than half their CPU time, nor less than the worker's (one thread does "
            "its work; the parent's lanes copy outside the GIL and may use both cores); "
            "nor less than the copies it cannot do without (the parent's into shared "
            "memory, and the stage's own pass) made at the same time by two threads, "
            "which share the memory's bandwidth: the last rows, bounds, not forecasts.",
            "",
            f"| part (time / memcpy's) | {' | '.join(names)} |",
            "|---|" + "---|" * len(names),
            *rows,
            f"| share of memcpy at the least time of the CPU rows | {shares} |",
            f"| share of memcpy at the least time of the copies made at once | {bandwidth} |",
        ]
    )


# The same shape without conveyor (`minimal_pipeline`).
MINIMAL_LANES = 2  # conveyor's lanes per worker
MINIMAL_ANSWER_BLOCKS = 5  # a run of `a.copy()` takes its answers in 4 to 8 blocks in turn
PER_MESSAGE = 4  # 1 MiB arrays per message: conveyor's 4 MiB message limit
MINIMAL_OPS = {  # the stage's work, by array candidate: a code the worker reads
    "arrays, returned as they came": 0,
    "arrays, the stage returns `a.copy()`": 1,
    "arrays, the stage returns `a * 2`": 2,
}


def minimal_pipeline(op: int, arrays: list[Any]) -> tuple[Callable[[], float], Callable[[], None]]:
    """The shape of a conveyor run, without conveyor: one worker process, two lanes
    (threads), each copying four arrays into its own 4 MiB shared-memory block, then
    sending three numbers through a pipe; the worker does the stage's work into one of
    five answer blocks in turn and answers with the same numbers. Nothing else: no
    pickling, no results built, no channel, nothing per item but the copies. What
    the machine allows a run of this shape (the parent's copies and the worker's
    running at the same time on the two cores); and what frees it all."""
    import multiprocessing
    import struct
    import threading

    requests = faulted_blocks(MINIMAL_LANES)
    answers = faulted_blocks(MINIMAL_ANSWER_BLOCKS)
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe() for _ in range(MINIMAL_LANES)]
    worker = context.Process(
        target=minimal_worker,
        args=([p[1] for p in pipes], [b.name for b in requests], [b.name for b in answers]),
        daemon=True,
    )
    worker.start()
    for _, theirs in pipes:
        theirs.close()
    targets = [ring(block) for block in requests]

    errors: list[BaseException] = []

    def lane(index: int) -> None:
        conn, target = pipes[index][0], targets[index]
        try:
            for message in range(index, COUNT // PER_MESSAGE, MINIMAL_LANES):
                for j in range(PER_MESSAGE):
                    numpy.copyto(target[j], arrays[(PER_MESSAGE * message + j) % DISTINCT])
                conn.send_bytes(struct.pack("3i", index, message % MINIMAL_ANSWER_BLOCKS, op))
                conn.recv_bytes()
        except BaseException as exc:  # the worker died: the run says so
            errors.append(exc)

    def run() -> float:
        lanes = [threading.Thread(target=lane, args=(i,)) for i in range(MINIMAL_LANES)]
        for thread in lanes:
            thread.start()
        for thread in lanes:
            thread.join()
        if errors:
            raise RuntimeError(f"the minimal pipeline's worker failed: {errors[0]!r}")
        return 0.0

    def close() -> None:
        for ours, _ in pipes:
            ours.close()
        worker.join()
        targets.clear()
        free(requests + answers)

    return run, close


def minimal_worker(conns: list[Any], requests: list[str], answers: list[str]) -> None:
    """`minimal_pipeline`'s worker process: the stage's work on each message, until both
    lanes have closed their pipes."""
    import struct
    from multiprocessing import connection, shared_memory

    # Registered again with the resource tracker (the parent's, which spawn shares): a name
    # it already holds, which the parent's unlink removes.
    blocks = [shared_memory.SharedMemory(name=n) for n in (*requests, *answers)]
    sources = [ring(b) for b in blocks[: len(requests)]]
    outputs = [ring(b) for b in blocks[len(requests) :]]
    live = list(conns)
    while live:
        for conn in connection.wait(live):
            try:
                data = conn.recv_bytes()
            except EOFError:
                live.remove(conn)
                continue
            lane, answer, op = struct.unpack("3i", data)
            for source, output in zip(sources[lane], outputs[answer], strict=True):
                if op == 1:
                    numpy.copyto(output, source)
                elif op == 2:
                    numpy.multiply(source, 2, out=output)
            conn.send_bytes(data)
    del sources, outputs
    for block in blocks:
        block.close()


def measure_minimal(rounds: int) -> dict[str, list[float]]:
    """Per array candidate: the share of memcpy of `minimal_pipeline` doing its work,
    per round (memcpy right before and after it)."""
    data = payloads()["array"]
    copy, cached = references(data)
    runs = {name: minimal_pipeline(op, data) for name, op in MINIMAL_OPS.items()}
    shares: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for round_ in range(rounds + 1):
            for name, (run, _) in runs.items():
                took, _, reference, _ = around(run, copy, cached)
                if round_:
                    shares[name].append(reference / took)
    finally:
        for _, close in runs.values():
            close()
    return shares


def minimal_report(minimal: dict[str, list[float]], share: dict[str, Shares]) -> str:
    names = list(minimal)
    conveyor = " | ".join(percent(share[MEMCPY][name][1]) for name in names)
    bare = " | ".join(percent(minimal[name]) for name in names)
    return "\n".join(
        [
            "The same shape without conveyor (`minimal_pipeline`): one worker process, two "
            "threads each copying four arrays into a 4 MiB shared-memory block of its own "
            "and sending three numbers through a pipe, the worker doing the stage's work "
            f"into one of {MINIMAL_ANSWER_BLOCKS} answer blocks in turn; nothing else (no "
            "pickling, no results built, no channel). Its share of memcpy, median (min - "
            "max) over the rounds, beside conveyor's without start-up (the first table): "
            "what the machine allows a run of this shape, and what conveyor's work per "
            "message costs.",
            "",
            f"| share of memcpy | {' | '.join(names)} |",
            "|---|" + "---|" * len(names),
            f"| conveyor, without start-up (the first table) | {conveyor} |",
            f"| the same shape without conveyor | {bare} |",
        ]
    )


START_UP = "start-up (a run of one array)"
COPY = "the parent's copy into shared memory (512 MiB)"
REST = "everything else (the run with that copy skipped, less the start-up)"


def measure_floor(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per reference memcpy, per part: its time over that memcpy's (both memcpys right
    before and after it), per round."""
    data = payloads()["array"]
    copy, cached = references(data)
    copy_alone, free_blocks = copy_into_shared_memory(data)
    parts = {START_UP: start_up(data), COPY: copy_alone, REST: without_the_copy(data)}
    shares: dict[str, dict[str, list[float]]] = {
        ref: {name: [] for name in parts} for ref in (MEMCPY, MEMCPY_CACHED)
    }
    try:
        for round_ in range(rounds + 1):
            for name, part in parts.items():
                took, _, reference, reference_cached = around(part, copy, cached)
                if round_:
                    shares[MEMCPY][name].append(took / reference)
                    shares[MEMCPY_CACHED][name].append(took / reference_cached)
            if round_:  # the run without the copy started a worker too
                for ref in shares.values():
                    ref[REST][-1] -= ref[START_UP][-1]
    finally:
        free_blocks()
    return shares


def floor_report(shares: dict[str, dict[str, list[float]]]) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f} - {max(values):.2f})"

    main, cached = shares[MEMCPY], shares[MEMCPY_CACHED]
    rows = [f"| {name} | {cell(main[name])} | {cell(cached[name])} |" for name in main]
    total = sum(statistics.median(v) for v in main.values())
    total_cached = sum(statistics.median(v) for v in cached.values())
    return "\n".join(
        [
            "What a run of arrays returned as they came is made of, each part's time over "
            "a memcpy's (of the 512 MiB), median (min - max) over the rounds:",
            "",
            "| part | time / memcpy's | time / cached-destination memcpy's |",
            "|---|---|---|",
            *rows,
            f"| sum of the medians | {total:.2f} (share of memcpy: {100 / total:.0f}%) | "
            f"{total_cached:.2f} (share: {100 / total_cached:.0f}%) |",
        ]
    )


def percent(shares: list[float]) -> str:
    """Median (min - max) of shares, in percent."""
    low, mid, high = min(shares), statistics.median(shares), max(shares)
    return f"{100 * mid:.0f}% ({100 * low:.0f} - {100 * high:.0f})"


def report(times: dict[str, list[float]], share: dict[str, Shares], rounds: int) -> str:
    rows = []
    for name, seconds in times.items():
        mibs = COUNT / statistics.median(seconds)
        if name == MEMCPY:
            rows.append(f"| {name} | {mibs:,.0f} MiB/s | 100% | 100% | - | - |")
            continue
        if name == MEMCPY_CACHED:
            rows.append(f"| {name} | {mibs:,.0f} MiB/s | - | - | 100% | 100% |")
            continue
        cells = [percent(s) for ref in (MEMCPY, MEMCPY_CACHED) for s in share[ref][name]]
        rows.append(f"| {name} | {mibs:,.0f} MiB/s | {' | '.join(cells)} |")
    return "\n".join(
        [
            f"{COUNT} buffers of 1 MiB ({DISTINCT} distinct ones in turn) through a fresh "
            "pipeline with one process stage of one worker and back to the caller, "
            f"start-up included; {rounds} rounds after a warm-up, candidates alternated. "
            "memcpy is copying the same arrays with source and destination beyond the caches "
            f"(each into the next of {DISTINCT} distinct 1 MiB arrays); the earlier "
            "reference, into one 1 MiB array that stays in the caches, is kept beside it. "
            "Both run right before and after each run, and a share of memcpy is the mean of "
            "its two times over the run's: median (min - max) over the rounds. "
            "Without start-up: from the first result to the last (511 MiB).",
            "",
            "| through a process stage and back | MiB/s (median) | share of memcpy | "
            "share of memcpy, without start-up | share of the cached-destination memcpy | "
            "the same, without start-up |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


def main() -> None:
    import argparse

    sys.path.insert(0, str(BENCH))
    from _common import machine, workload, write_json, write_section

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--json", metavar="PATH", help="write conveyor's figures as JSON")
    parser.add_argument(
        "--floor", action="store_true", help="also measure the parts a run is made of"
    )
    args = parser.parse_args()
    load = os.getloadavg()[0]
    times, share, steadies = measure(args.rounds)
    floor = ""
    if args.floor:
        floor = (
            f"\n\n{floor_report(measure_floor(args.rounds))}"
            f"\n\n{cpu_floor_report(measure_cpu_floor(args.rounds))}"
            f"\n\n{minimal_report(measure_minimal(args.rounds), share)}"
        )
    text = (
        f"{report(times, share, args.rounds)}{floor}\n\nMachine: {machine()}; load average "
        f"{load:.1f} at the start; {time.strftime('%Y-%m-%d %H:%M')}."
    )
    print(text)
    if args.write:
        title = "## Large payloads through a process stage (bench/payloads.py)"
        write_section(f"{title}\n\n{text}", SECTION)
    if args.json:
        memcpy_rates = [COUNT / t for t in times[MEMCPY]]
        memcpy_rate = COUNT / statistics.median(times[MEMCPY])
        figures = {
            JSON_NAMES[name]: workload(
                COUNT / statistics.median(times[name]),
                "MiB/s",
                MEMCPY,
                memcpy_rate,
                [COUNT / t for t in times[name]],
                memcpy_rates,
            )
            for name in CANDIDATES
        }
        for name in CANDIDATES:  # from the first result to the last: COUNT - 1 MiB
            rates = [(COUNT - 1) / t for t in steadies[name]]
            figures[f"{JSON_NAMES[name]}, without start-up"] = workload(
                statistics.median(rates), "MiB/s", MEMCPY, memcpy_rate, rates, memcpy_rates
            )
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
