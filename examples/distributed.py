"""The CSV -> SQLite load of csv_to_sqlite.py, served by `conveyor worker` processes over Redis.

    python examples/distributed.py [CSV] [--rows N] [--workers N] [--redis URL]
    python examples/distributed.py --rows 50000 --compare   # against the local run and the loop

The pipeline is `csv_to_sqlite.pipeline`, unchanged: this script is only the
driver. It starts ``--workers`` worker processes (``python -m conveyor worker
csv_to_sqlite:pipeline --redis URL``), each of which validates, batches and
writes rows; once each has said it serves, the driver feeds the rows to Redis
and waits for the end. The workers learn where the database is from
``$CONVEYOR_EXAMPLE_DB``. Delivery over Redis is at least once, and the insert
is idempotent (``INSERT OR REPLACE`` on the order id), so a batch written twice
after a worker died is stored once.

Without ``--redis`` a private ``redis-server`` (it must be on PATH; Debian:
``apt-get install redis-server``) is started on a free port of 127.0.0.1 for
the run, without persistence, and stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis

import conveyor as cv
from conveyor.redis import RedisBackend

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # csv_to_sqlite, whether run as a script or imported

import csv_to_sqlite  # noqa: E402  (found through the line above)
from _compare import positive_int  # noqa: E402

STARTUP_TIMEOUT = 15.0  # seconds for redis-server to answer PING, and a worker to serve


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A private redis-server on a free port, without persistence; yield its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "redis-server is not on PATH: install it (Debian: apt-get install redis-server) "
            "or pass --redis URL"
        )
    port = free_port()
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    with (folder / "redis.log").open("wb") as log:
        server = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:  # a bounded wait: redis-server offers nothing to wait on before it listens
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start: see {folder / 'redis.log'}")
            time.sleep(0.05)
        client.close()
        yield url
    finally:
        server.terminate()
        server.wait(10)


@contextlib.contextmanager
def workers(
    url: str, namespace: str, db: Path, count: int, logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` `conveyor worker` processes serving csv_to_sqlite:pipeline; stopped at the end."""
    env = {**os.environ, csv_to_sqlite.DB_ENV: str(db)}
    command = [sys.executable, "-m", "conveyor", "worker", "csv_to_sqlite:pipeline"]
    command += ["--redis", url, "--namespace", namespace]
    procs = []
    try:
        for i in range(count):
            with (logs / f"worker-{i}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        command, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                )
        wait_until_serving(procs, logs)
        yield procs
    finally:
        for proc in procs:
            proc.terminate()  # a worker finishes the batches in hand and exits
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until_serving(procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    """Return once every worker process has said it serves (its first log line), so that
    a run is shared by all of them from its start rather than by those that happened to
    finish starting first; fail with a worker's log if it exits before."""
    pending = dict(enumerate(procs))
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while pending:  # a bounded wait: a worker says it serves only in its log
        for i, proc in list(pending.items()):
            said = (logs / f"worker-{i}.log").read_text(errors="replace")
            if "worker serving" in said:
                del pending[i]
            elif proc.poll() is not None:
                raise SystemExit(f"worker {i} exited with code {proc.returncode}:\n{said}")
        if pending and time.monotonic() > deadline:
            raise SystemExit(f"{len(pending)} worker(s) did not start serving: see {logs}")
        time.sleep(0.05)


# --8<-- [start:driver]
def load(
    path: Path, url: str, namespace: str, procs: list[subprocess.Popen[bytes]]
) -> cv.RunResult:
    """Drive one run of the pipeline on Redis; fail at once if a worker process exits."""
    backend = RedisBackend(url, namespace=namespace, run_id=uuid.uuid4().hex[:8])
    run = csv_to_sqlite.pipeline(path).start(backend=backend)
    while True:
        try:
            return run.join(timeout=0.5)
        except TimeoutError:
            dead = [proc.args for proc in procs if proc.poll() is not None]
            if dead:
                run.stop()
                raise SystemExit(f"a worker exited during the run: {dead[0]}") from None


# --8<-- [end:driver]


def main() -> int:
    """Parse the command line, start Redis and the workers, drive the load, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", nargs="?", type=Path, help="the CSV (default: a generated one)")
    parser.add_argument(
        "--rows", type=positive_int, default=10_000, help="rows of the generated CSV"
    )
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes to start")
    parser.add_argument("--redis", help="a Redis URL (default: a private redis-server)")
    parser.add_argument("--compare", action="store_true", help="time it against a local run")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds of --compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        path = args.csv
        if path is None:
            path = folder / "orders.csv"
            bad = csv_to_sqlite.make_csv(path, args.rows)
            print(f"generated {path.name}: {args.rows} rows, {bad} of them malformed")
        url = args.redis or stack.enter_context(redis_server(folder))
        namespace = f"example-{uuid.uuid4().hex[:8]}"
        db = folder / "orders.db"
        procs = stack.enter_context(workers(url, namespace, db, args.workers, folder))
        result = load(path, url, namespace, procs)
        print(result.report())
        print(f"{csv_to_sqlite.count_rows(db)} rows in the table, {len(result.failures)} rejected")
        if args.compare:
            from _compare import compare, print_comparison

            local_db = folder / "local.db"
            times = compare(
                {
                    f"Redis, {args.workers} workers": lambda: load(path, url, namespace, procs),
                    "conveyor local": lambda: csv_to_sqlite.fresh(
                        csv_to_sqlite.with_conveyor, path, local_db
                    ),
                    "plain Python": lambda: csv_to_sqlite.fresh(
                        csv_to_sqlite.plain_python, path, local_db
                    ),
                },
                rounds=args.rounds,
            )
            code = {
                f"Redis, {args.workers} workers": [load],  # the driver; the pipeline is the same
                "conveyor local": [csv_to_sqlite.with_conveyor],
                "plain Python": [csv_to_sqlite.plain_python],
            }
            print_comparison(times, code, f"{path.name} -> SQLite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
