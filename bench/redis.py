"""Redis Streams: conveyor's distributed backend against hand-written redis-py and Celery.

Every candidate moves small items (ints) through 2 trivial stages (x + 1,
then x * 2) with 2 worker processes per stage, on a redis-server of its own
on loopback (no persistence), end to end: from the first item added to the
last output read back.

* conveyor     ``pipeline.run(backend=RedisBackend(url))``; 4 ``Worker``
               processes (2 per stage, 1 consumer each), started once and
               serving every round's run (they find a new run within 0.1 s);
* hand-written the minimal loop: XREADGROUP COUNT 100, then one MULTI/EXEC
               per batch (XADD each output, XACK the batch); a producer
               pipelines XADDs by 100, a reader takes the final stream;
* celery       a chain of 2 tasks per item, Redis broker, 2 workers with
               ``--pool solo``; completion is counted by the second task
               (INCR), so no result backend is involved. Celery is ~50x
               slower, so it gets fewer items and rounds (said in the output).

conveyor unordered, hand-written and conveyor ordered alternate round by round;
medians are reported, and each conveyor variant's ratio to the hand-written loop
round by round.
``--scaling`` also runs conveyor with 1, 2 and 4 worker processes per stage
and measures redis-server's own CPU time per item, which gives the ceiling
one Redis puts on a pipeline.

Run:  python bench/redis.py [--items 50000] [--rounds 5] [--celery-items 5000]
                            [--celery-rounds 2] [--scaling] [--write] [--json PATH]

--json PATH writes conveyor's throughput (unordered and ordered) and its ratio
to the hand-written loop of the same run. CONVEYOR_BENCH_SRC chooses the
conveyor to import, in this process and in the worker processes (see
bench/_common.py).
"""

from __future__ import annotations

import os
import sys

# This file is named redis.py: keep its folder off sys.path, or `import redis`
# would import this file instead of redis-py.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(_HERE).parent
# $CONVEYOR_BENCH_SRC, else this checkout's src (see bench/_common.py). The worker
# processes (spawn) run this module again and inherit the variable: same tree.
sys.path.insert(0, os.environ.get("CONVEYOR_BENCH_SRC") or str(ROOT / "src"))

import redis  # noqa: E402

import conveyor as cv  # noqa: E402
from conveyor.redis import RedisBackend, Worker  # noqa: E402

BEGIN, END = "<!-- redis:begin -->", "<!-- redis:end -->"
COUNT = 100  # entries per XREADGROUP, for every candidate


def machine() -> str:
    """One line naming the CPU, cores, Python and Redis."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    redis_version = next((v[2:] for v in version if v.startswith("v=")), "?")
    hiredis = "with hiredis" if _has_hiredis() else "without hiredis"
    return (
        f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"redis-server {redis_version}, redis-py {redis.__version__} {hiredis}"
    )


def _has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------- the server


@contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A redis-server on a free loopback port, without persistence; yields (url, pid)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="conveyor-bench-redis-")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:  # wait for the server to answer (bounded)
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.02)
    client.close()
    try:
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def server_cpu(pid: int) -> float:
    """CPU seconds redis-server has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# ---------------------------------------------------------------------- conveyor


def add_one(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return x * 2


def pipeline(n: int = 0) -> cv.Pipeline[int]:
    """The 2 trivial stages (unordered, like the hand-written loop)."""
    return (
        cv.Pipeline(range(n))
        .map(add_one, name="add_one", ordered=False)
        .map(double, name="double", ordered=False)
    )


def ordered_pipeline(n: int = 0) -> cv.Pipeline[int]:
    """The same stages with the default ``ordered=True``: outputs in input order."""
    return cv.Pipeline(range(n)).map(add_one, name="add_one").map(double, name="double")


def chain(stages: int, n: int = 0) -> cv.Pipeline[int]:
    """``stages`` trivial unordered stages (x + 1 each): the Redis core's model."""
    built = cv.Pipeline(range(n))
    for k in range(stages):
        built = built.map(add_one, name=f"s{k}", ordered=False)
    return built


def _serve_chain(url: str, namespace: str, stages: int) -> None:
    Worker(chain(stages), url, workers=1, namespace=namespace).run_forever()


def _serve(url: str, namespace: str, stage: str, ordered: bool) -> None:
    make = ordered_pipeline if ordered else pipeline
    Worker(make(), url, stages=[stage], workers=1, namespace=namespace).run_forever()


@contextmanager
def conveyor_workers(
    url: str, namespace: str, per_stage: int, ordered: bool = False
) -> Iterator[None]:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_serve, args=(url, namespace, stage, ordered), daemon=True)
        for stage in ("add_one", "double")
        for _ in range(per_stage)
    ]
    for p in procs:
        p.start()
    try:
        _wait_for_consumers(url, namespace, len(procs), ordered)
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(30)


def _wait_for_consumers(url: str, namespace: str, count: int, ordered: bool) -> None:
    """Run tiny warm-up runs until every worker process has joined (bounded)."""
    make = ordered_pipeline if ordered else pipeline
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 60
    try:
        while True:
            backend = RedisBackend(url, namespace=namespace, keep=True, run_id="warm")
            make(200).run(backend=backend)
            names: set[bytes] = set()
            for key in client.scan_iter(f"{namespace}:*warm*:s[01]"):
                names |= {c["name"] for c in client.xinfo_consumers(key, "workers")}
            for key in client.scan_iter(f"{namespace}:*warm*"):
                client.delete(key)
            for key in client.scan_iter(f"{namespace}:*:runs"):
                client.srem(key, "warm")
            if len(names) >= count or time.monotonic() > deadline:
                return
    finally:
        client.close()


def run_conveyor(url: str, namespace: str, n: int, ordered: bool = False) -> float:
    make = ordered_pipeline if ordered else pipeline
    t0 = time.perf_counter()
    result = make(n).run(collect=True, backend=RedisBackend(url, namespace=namespace))
    elapsed = time.perf_counter() - t0
    assert result.items_out == n, result.items_out
    if ordered:
        assert result.outputs == [(x + 1) * 2 for x in range(n)]
    else:
        assert sorted(result.outputs or []) == [(x + 1) * 2 for x in range(n)]
    return elapsed


# ---------------------------------------------------------------------- hand-written


def _hand_worker(url: str, source: str, dest: str, fn_name: str, ready: str) -> None:
    """The minimal consumer: XREADGROUP COUNT 100, one MULTI/EXEC per batch."""
    fn: Callable[[int], int] = add_one if fn_name == "add_one" else double
    r = redis.Redis.from_url(url)
    name = uuid.uuid4().hex
    r.incr(ready)
    while True:
        reply = r.xreadgroup("g", name, {source: ">"}, count=COUNT, block=500)
        if not reply:
            continue
        entries = reply[0][1]
        pipe = r.pipeline(transaction=True)
        for _, fields in entries:
            pipe.xadd(dest, {"d": fn(int(fields[b"d"]))})
        pipe.xack(source, "g", *[entry_id for entry_id, _ in entries])
        pipe.execute()


def run_handwritten(url: str, n: int, per_stage: int) -> float:
    tag = uuid.uuid4().hex[:8]
    s0, s1, s2, ready = (f"hw:{tag}:s0", f"hw:{tag}:s1", f"hw:{tag}:s2", f"hw:{tag}:ready")
    r = redis.Redis.from_url(url)
    for key in (s0, s1, s2):
        r.xgroup_create(key, "g", id="0", mkstream=True)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_hand_worker, args=(url, src, dst, fn, ready), daemon=True)
        for src, dst, fn in ((s0, s1, "add_one"), (s1, s2, "double"))
        for _ in range(per_stage)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60
    while int(r.get(ready) or 0) < len(procs):  # every worker connected (bounded wait)
        if time.monotonic() > deadline:
            raise RuntimeError("hand-written workers did not start")
        time.sleep(0.01)
    try:
        t0 = time.perf_counter()

        def produce() -> None:
            p = redis.Redis.from_url(url)
            for start in range(0, n, COUNT):
                pipe = p.pipeline(transaction=False)
                for x in range(start, min(n, start + COUNT)):
                    pipe.xadd(s0, {"d": x})
                pipe.execute()
            p.close()

        producer = threading.Thread(target=produce)
        producer.start()
        got: list[int] = []
        while len(got) < n:
            reply = r.xreadgroup("g", "reader", {s2: ">"}, count=1000, block=500)
            for _, entries in reply or ():
                got += [int(f[b"d"]) for _, f in entries]
                r.xack(s2, "g", *[entry_id for entry_id, _ in entries])
        elapsed = time.perf_counter() - t0
        producer.join()
        assert sorted(got) == [(x + 1) * 2 for x in range(n)]
        return elapsed
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(30)
        r.delete(s0, s1, s2, ready)
        r.close()


# ---------------------------------------------------------------------- celery

CELERY_APP = """
import os
import redis
from celery import Celery

URL = os.environ["CONVEYOR_BENCH_REDIS"]
app = Celery("conveyor_bench_celery", broker=URL)
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=100,
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
counter = redis.Redis.from_url(URL)


@app.task
def add_one(x):
    return x + 1


@app.task
def double(x):
    counter.incr("celery:done")
    return x * 2
"""


def run_celery(url: str, n: int) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-bench-celery-"))
    (workdir / "conveyor_bench_celery.py").write_text(textwrap.dedent(CELERY_APP))
    env = dict(os.environ, CONVEYOR_BENCH_REDIS=url, PYTHONPATH=str(workdir))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "conveyor_bench_celery",
                "worker",
                "--pool",
                "solo",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "ERROR",
                "-n",
                f"w{i}@%h",
            ],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    sys.path.insert(0, str(workdir))
    os.environ["CONVEYOR_BENCH_REDIS"] = url
    try:
        import importlib

        from celery import chain

        module = importlib.import_module("conveyor_bench_celery")
        r = redis.Redis.from_url(url)
        r.delete("celery:done")
        # Warm up: wait until both workers take tasks (bounded).
        chain(module.add_one.s(0), module.double.s()).delay()
        deadline = time.monotonic() + 60
        while int(r.get("celery:done") or 0) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("celery workers did not start")
            time.sleep(0.05)
        r.delete("celery:done")
        t0 = time.perf_counter()
        for x in range(n):
            chain(module.add_one.s(x), module.double.s()).delay()
        while int(r.get("celery:done") or 0) < n:
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("celery did not finish in 10 minutes")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        r.close()
        return elapsed
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        sys.path.remove(str(workdir))
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------- main


def median_rate(n: int, times: list[float]) -> float:
    return n / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--celery-items", type=int, default=5_000)
    parser.add_argument("--celery-rounds", type=int, default=2)
    parser.add_argument("--no-celery", action="store_true")
    parser.add_argument("--scaling", action="store_true", help="also 1, 2, 4 workers per stage")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--json", metavar="PATH", help="write conveyor's figures as JSON")
    parser.add_argument(
        "--commandstats", action="store_true", help="only show redis-server's time by command"
    )
    args = parser.parse_args()
    if args.commandstats:
        with redis_server() as (url, pid):
            commandstats(url, pid, args.items)
        return
    n = args.items
    load = os.getloadavg()[0]
    lines = [
        f"Machine: {machine()}; load average at the start: {load:.1f}.",
        "",
        "Reproduce: `python bench/redis.py --scaling --write` "
        "(`--commandstats` shows redis-server's time by command).",
        "",
    ]
    print(lines[0], flush=True)

    with redis_server() as (url, pid):
        times: dict[str, list[float]] = {"conveyor": [], "hand-written": [], "ordered": []}
        namespace = "bench"
        # Both sets of workers serve every round (idle ones wait in a blocking read), so
        # that the three candidates alternate round by round.
        with (
            conveyor_workers(url, namespace, 2),
            conveyor_workers(url, "bench-ordered", 2, ordered=True),
        ):
            run_conveyor(url, namespace, 2000)  # warm-up
            run_conveyor(url, "bench-ordered", 2000, ordered=True)
            for _ in range(args.rounds):
                times["conveyor"].append(run_conveyor(url, namespace, n))
                times["hand-written"].append(run_handwritten(url, n, 2))
                times["ordered"].append(run_conveyor(url, "bench-ordered", n, ordered=True))
            by_round = []
            for name in ("conveyor", "ordered"):
                ratios = [h / t for h, t in zip(times["hand-written"], times[name], strict=True)]
                by_round.append(
                    f"{name} / hand-written, round by round: "
                    f"{', '.join(f'{r:.2f}' for r in ratios)} "
                    f"(median {statistics.median(ratios):.2f}x, lowest {min(ratios):.2f}x)."
                )
                print(by_round[-1], flush=True)
        rates = {k: median_rate(n, v) for k, v in times.items() if v}
        celery_rate = None
        if not args.no_celery:
            celery_times = [run_celery(url, args.celery_items) for _ in range(args.celery_rounds)]
            celery_rate = median_rate(args.celery_items, celery_times)

        lines += [
            f"{n:,} small items, 2 trivial stages (x + 1, x * 2), 2 worker processes per "
            f"stage, loopback Redis, end to end; medians of {args.rounds} rounds "
            f"(conveyor unordered, hand-written and conveyor ordered alternated round "
            f"by round, each conveyor variant with its own workers). "
            + (
                f"Celery is about 50 times slower, so it ran {args.celery_items:,} "
                f"chains, {args.celery_rounds} rounds."
                if celery_rate
                else "Celery was not run (--no-celery, or not installed)."
            ),
            "",
            "| candidate | items/s | vs hand-written | vs Celery |",
            "| --- | ---: | ---: | ---: |",
        ]
        hand = rates["hand-written"]
        for name, label in (
            ("hand-written", "hand-written redis-py loop (COUNT 100, MULTI/EXEC per batch)"),
            ("conveyor", "conveyor RedisBackend (unordered stages)"),
            ("ordered", "conveyor RedisBackend (ordered, the default)"),
        ):
            rate = rates[name]
            vs_celery = f"{rate / celery_rate:.0f}x" if celery_rate else "-"
            lines.append(f"| {label} | {rate:,.0f} | {rate / hand:.2f}x | {vs_celery} |")
        if celery_rate:
            lines.append(
                f"| Celery, 2-task chain, 2 `--pool solo` workers "
                f"({args.celery_items:,} chains, median of {args.celery_rounds}) "
                f"| {celery_rate:,.0f} | {celery_rate / hand:.3f}x | 1x |"
            )
        lines += ["", *by_round]
        lines.append("")

        if args.scaling:
            lines += scaling(url, pid, n)
    lines.append(f"Load average at the end: {os.getloadavg()[0]:.1f}.")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(text)
    if args.json:
        write_json(args.json, n, times)


def write_json(path: str, n: int, times: dict[str, list[float]]) -> None:
    """conveyor (unordered, ordered) against the hand-written loop, for --json."""
    import importlib.util

    # bench/ is kept off sys.path (see the top): load bench/_common.py by its path.
    spec = importlib.util.spec_from_file_location("_common", os.path.join(_HERE, "_common.py"))
    assert spec is not None and spec.loader is not None
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    hand = [n / t for t in times["hand-written"]]
    workloads = {
        name: common.workload(
            median_rate(n, times[key]),
            "items/s",
            "hand-written redis-py loop",
            median_rate(n, times["hand-written"]),
            [n / t for t in times[key]],
            hand,
        )
        for name, key in (("unordered", "conveyor"), ("ordered", "ordered"))
    }
    common.write_json(path, workloads)


def scaling(url: str, pid: int, n: int) -> list[str]:
    """conveyor with 1, 2 and 4 worker processes per stage, and Redis's CPU per item."""
    out = [
        "Scaling (conveyor, unordered, one round each; redis-server CPU measured from /proc):",
        "",
        "| worker processes per stage | items/s | redis-server CPU per item | Redis busy |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for per_stage in (1, 2, 4):
        namespace = f"scale{per_stage}"
        with conveyor_workers(url, namespace, per_stage):
            run_conveyor(url, namespace, 2000)
            cpu0 = server_cpu(pid)
            elapsed = run_conveyor(url, namespace, n)
            cpu = server_cpu(pid) - cpu0
        out.append(
            f"| {per_stage} | {n / elapsed:,.0f} | {cpu / n * 1e6:.1f} µs | {cpu / elapsed:.0%} |"
        )
    out += model(url, pid, n)
    out += [
        "",
        "On this 2-core machine the worker processes, the driver and redis-server share two "
        "cores, so more workers cannot add throughput; redis-server uses under half a core, "
        "so the Python clients' CPU is the limit (see docs/distributed.md for the ceiling one "
        "Redis puts on a pipeline).",
        "",
    ]
    return out


def model(url: str, pid: int, n: int) -> list[str]:
    """redis-server's CPU per item with 1, 2 and 4 trivial stages (2 worker processes
    serving them all), and the fit ``F + S x stages`` that docs/distributed.md uses."""
    out = [
        "",
        "One Redis core's model (conveyor, unordered, 2 worker processes serving every "
        "stage; redis-server CPU per item, median of 3 runs each):",
        "",
        "| trivial stages | items/s | redis-server CPU per item |",
        "| ---: | ---: | ---: |",
    ]
    points = []
    ctx = multiprocessing.get_context("spawn")
    for stages in (1, 2, 4):
        namespace = f"model{stages}"
        procs = [
            ctx.Process(target=_serve_chain, args=(url, namespace, stages), daemon=True)
            for _ in range(2)
        ]
        for p in procs:
            p.start()
        try:
            for _ in range(2):  # warm-up: the workers join
                chain(stages, 2000).run(backend=RedisBackend(url, namespace=namespace))
            cpus, rates = [], []
            for _ in range(3):
                cpu0, t0 = server_cpu(pid), time.perf_counter()
                result = chain(stages, n).run(backend=RedisBackend(url, namespace=namespace))
                rates.append(n / (time.perf_counter() - t0))
                cpus.append((server_cpu(pid) - cpu0) / n * 1e6)
                assert result.items_out == n, result.items_out
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.join(30)
        cpu = statistics.median(cpus)
        points.append((stages, cpu))
        out.append(f"| {stages} | {statistics.median(rates):,.0f} | {cpu:.1f} µs |")
    slope, fixed = statistics.linear_regression([s for s, _ in points], [c for _, c in points])
    out += [
        "",
        f"Fit: F + S x stages with F = {fixed:.1f} µs, S = {slope:.1f} µs: one Redis core "
        f"carries about {1e3 / (fixed + slope):,.0f}k / {1e3 / (fixed + 2 * slope):,.0f}k / "
        f"{1e3 / (fixed + 4 * slope):,.0f}k items/s for 1 / 2 / 4 trivial stages.",
    ]
    return out


def commandstats(url: str, pid: int, n: int) -> None:
    """Print where redis-server spends its time per item, for conveyor (unordered and
    ordered) and hand-written: every command's calls and time (commands run by a Lua
    script are counted both on their own and in their EVALSHA), and items per entry."""

    def snapshot(client: redis.Redis) -> dict[str, tuple[int, int]]:
        info = client.info("commandstats")
        return {k: (v["calls"], v["usec"]) for k, v in info.items()}

    def show(label: str, before: dict[str, tuple[int, int]], cpu: float, hops: int) -> None:
        after = snapshot(client)
        rows = sorted(
            (
                (after[k][1] - before.get(k, (0, 0))[1], k, after[k][0] - before.get(k, (0, 0))[0])
                for k in after
            ),
            reverse=True,
        )
        print(f"{label}: redis-server CPU {cpu / n * 1e6:.1f} µs per item; by command:")
        print("  | command | calls | µs per call | µs per item |")
        print("  | --- | ---: | ---: | ---: |")
        for usec, name, calls in rows:
            if calls and usec / n >= 0.005:
                print(f"  | {name[8:]} | {calls:,} | {usec / calls:.1f} | {usec / n:.2f} |")
        added = after["cmdstat_xadd"][0] - before.get("cmdstat_xadd", (0, 0))[0]
        print(f"  entries added: {added:,}, {hops * n / max(1, added):.1f} items per entry")

    client = redis.Redis.from_url(url)
    for ordered in (False, True):
        namespace = "stats-ordered" if ordered else "stats"
        with conveyor_workers(url, namespace, 2, ordered=ordered):
            run_conveyor(url, namespace, 2000, ordered=ordered)
            before, cpu0 = snapshot(client), server_cpu(pid)
            run_conveyor(url, namespace, n, ordered=ordered)
            label = "conveyor ordered" if ordered else "conveyor unordered"
            show(label, before, server_cpu(pid) - cpu0, 3)
    before, cpu0 = snapshot(client), server_cpu(pid)
    run_handwritten(url, n, 2)
    show("hand-written", before, server_cpu(pid) - cpu0, 3)
    client.close()


def write_section(text: str) -> None:
    """Replace the redis section of docs/benchmarks.md (create the file if needed)."""
    path = ROOT / "docs" / "benchmarks.md"
    body = f"{BEGIN}\n## Redis Streams backend (bench/redis.py)\n\n{text.strip()}\n{END}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        updated = head + body + tail
    else:
        updated = current.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(updated)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
