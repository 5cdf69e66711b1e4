"""Redis unreachable or lost, and bad options: every command ends within its bound,
with one line (exit code 3), or click's usage error (exit code 2); no traceback.

Commands run as a user runs them, ``python -m conveyor ...`` in a subprocess,
against ``redis://127.0.0.1:1`` (nothing listens on port 1) or a real
redis-server from the fixtures.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis as redis_py

import conveyor as cv
from conveyor.errors import BackendUnavailable
from conveyor.redis import RedisBackend, Worker
from conveyor.redis.cli import DEFAULT_CONNECT_TIMEOUT, EXIT_REDIS_UNREACHABLE
from redis_helpers import new_namespace

if TYPE_CHECKING:  # as a name, `conftest` may be tests/contract's when the whole suite runs
    from conftest import RedisServer, RedisServerFactory

UNREACHABLE = "redis://:secret@127.0.0.1:1/0"
SHOWN = "redis://:***@127.0.0.1:1/0"
STARTUP = 5.0
"""Allowance for starting a Python interpreter and importing conveyor (a loaded
shared machine): a bound is checked as timeout + STARTUP."""
EXIT_USAGE = 2

APP = """
import sys
import conveyor as cv

def inc(x):
    return x + 1

pipeline = cv.Pipeline(range(10)).map(inc)
grouped = cv.Pipeline(range(10)).batch(3).map(len)
print("loaded", file=sys.stderr, flush=True)


def cannot_connect():
    raise OSError("database unreachable")


opens_a_database = cv.Pipeline(range(10)).map(inc, on_start=cannot_connect)


def leave(x):
    if x == 2:
        raise SystemExit(3)
    return x


quits = cv.Pipeline(range(5)).map(leave)


def nap(x):
    import os
    import pathlib
    import time

    pathlib.Path(os.environ["NAPPING"]).touch()
    time.sleep(0.005)
    return x


naps = cv.Pipeline(range(100_000)).map(nap, workers=2)
stageless = cv.Pipeline(range(3))
patient = cv.Pipeline(range(3)).map(inc, timeout=60)


def fragile(x):
    if x == 3:
        raise ValueError("cannot handle 3")
    return x


dead_ends = cv.Pipeline(range(10)).map(fragile)


def hold(x):
    import os
    import pathlib
    import time

    pathlib.Path(os.environ["HOLDING"]).touch()
    time.sleep(120)  # user code that nothing interrupts
    return x


stuck = cv.Pipeline(range(3)).map(hold)
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(APP)
    return tmp_path


def conveyor(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``python -m conveyor ARGS``; return it and how long it took."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, time.monotonic() - started


def lines(stderr: str) -> list[str]:
    """stderr's lines but the pipeline module's own "loaded"."""
    return [line for line in stderr.splitlines() if line != "loaded"]


COMMANDS = [
    ["run", "app:pipeline", "--no-progress"],
    ["worker", "app:pipeline"],
    ["status", "app:pipeline"],
    ["cancel", "app:pipeline", "--run", "r1"],
    ["dlq", "list", "app:pipeline"],
    ["dlq", "replay", "app:pipeline"],
    ["dlq", "purge", "app:pipeline"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_command_facing_an_unreachable_redis_ends_with_one_line_and_exit_3(
    project: Path, command: list[str]
) -> None:
    done, took = conveyor(*command, "--redis", UNREACHABLE, "--connect-timeout", "0.5", cwd=project)
    assert done.returncode == EXIT_REDIS_UNREACHABLE, done.stderr
    (line,) = lines(done.stderr)
    assert line.startswith(f"conveyor: cannot reach Redis at {SHOWN}")
    assert "Connection refused" in line
    assert "secret" not in done.stderr and "Traceback" not in done.stderr
    assert took < 0.5 + STARTUP, f"{command[0]} took {took:.1f} s"


@pytest.mark.parametrize(
    "command",
    [
        ["run", "app:pipeline", "--no-progress"],
        ["status", "app:pipeline"],
        ["dlq", "list", "app:pipeline"],
    ],
)
def test_a_json_command_facing_an_unreachable_redis_prints_a_json_error_on_stdout(
    project: Path, command: list[str]
) -> None:
    """Regression: with ``--json``, stdout was empty when the command failed."""
    result, _ = conveyor(
        *command, "--json", "--redis", UNREACHABLE, "--connect-timeout", "0.5", cwd=project
    )
    assert result.returncode == EXIT_REDIS_UNREACHABLE, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "BackendUnavailable"
    assert error["exit_code"] == EXIT_REDIS_UNREACHABLE
    assert SHOWN in error["message"] and "secret" not in result.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_command_that_redis_answers_with_an_error_ends_with_one_line_and_exit_1(
    project: Path, redis_server: RedisServer, command: list[str]
) -> None:
    """A database number the server does not have: status, cancel and dlq went up to
    Python with redis-py's own traceback; run and worker showed it before their line."""
    url = redis_server.url.rsplit("/", 1)[0] + "/99"
    done, _ = conveyor(*command, "--redis", url, cwd=project)
    assert done.returncode == 1, done.stderr
    (line,) = lines(done.stderr)
    assert line == f"conveyor: Redis at {url} answered ResponseError: DB index is out of range"


def test_a_run_on_redis_refusing_the_password_ends_with_one_line_and_exit_1(
    project: Path, redis_server_factory: RedisServerFactory
) -> None:
    """conveyor's own BackendError went out with the traceback of conveyor's internals."""
    server = redis_server_factory(password="right")
    url = server.url.replace(":right@", ":wrong@")
    done, _ = conveyor("run", "app:pipeline", "--no-progress", "--redis", url, cwd=project)
    assert done.returncode == 1, done.stderr
    (line,) = lines(done.stderr)
    assert line.startswith("conveyor: the run failed: BackendError: Redis at redis://:***@")
    assert "refused the credentials" in line


def test_debug_adds_the_traceback(project: Path) -> None:
    done, _ = conveyor(
        "status", "app:pipeline", "--redis", UNREACHABLE, "--connect-timeout", "0.2", "--debug",
        cwd=project,
    )  # fmt: skip
    assert done.returncode == EXIT_REDIS_UNREACHABLE
    assert "Traceback" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("conveyor: cannot reach Redis")


def test_the_default_bound_is_ten_seconds(project: Path) -> None:
    done, took = conveyor("status", "app:pipeline", "--redis", UNREACHABLE, cwd=project)
    assert done.returncode == EXIT_REDIS_UNREACHABLE, done.stderr
    assert len(lines(done.stderr)) == 1
    assert DEFAULT_CONNECT_TIMEOUT <= took < DEFAULT_CONNECT_TIMEOUT + STARTUP


# ---------------------------------------------------------------------- worker signals


def handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has installed a SIGTERM handler (its SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition()`` (a process's state, which nothing notifies), bounded."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def worker_of(project: Path) -> Iterator[object]:
    started: list[subprocess.Popen[str]] = []

    def start(url: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", "app:pipeline", "--redis", url, *args],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_worker_says_what_it_serves_once_ready(
    worker_of: Callable[..., subprocess.Popen[str]], redis_server: RedisServer
) -> None:
    """It said nothing until something went wrong: was it connected, serving what?"""
    proc = worker_of(redis_server.url, "--workers", "inc=3", "--namespace", "told")
    assert proc.stderr is not None
    line = "loaded"  # the module's own line comes first
    while line == "loaded":
        ready, _, _ = select.select([proc.stderr], [], [], 30.0)
        assert ready, "no line within 30 s"
        line = proc.stderr.readline().rstrip("\n")
    assert line.endswith(
        f"conveyor: worker serving 'inc' x3 from {redis_server.url} (namespace 'told'); "
        "SIGTERM or Ctrl-C stops it"
    ), line
    assert_stops_cleanly_on_sigterm(proc)


def assert_stops_cleanly_on_sigterm(proc: subprocess.Popen[str]) -> None:
    wait_for(lambda: handles_sigterm(proc.pid), "the worker's signal handlers")
    stopping = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - stopping
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert took < 2.0, f"the worker took {took:.1f} s to stop"


def test_a_worker_still_connecting_stops_cleanly_on_sigterm(worker_of: object) -> None:
    proc = worker_of(UNREACHABLE, "--connect-timeout", "60")  # type: ignore[operator]
    assert_stops_cleanly_on_sigterm(proc)


def test_a_serving_worker_stops_cleanly_on_sigterm(
    worker_of: object, redis_server: RedisServer
) -> None:
    client = redis_py.Redis.from_url(redis_server.url)
    before = len(client.client_list())
    proc = worker_of(redis_server.url)  # type: ignore[operator]
    wait_for(lambda: len(client.client_list()) > before, "the worker's connection")
    assert_stops_cleanly_on_sigterm(proc)
    client.close()


def test_a_worker_stopped_while_redis_is_down_stops_cleanly(
    project: Path, redis_server_factory: RedisServerFactory, tmp_path: Path
) -> None:
    # The repro: SIGINT or SIGTERM while Redis was down ended the worker with exit 1,
    # "the worker failed: ConnectionError" and redis-py's traceback: its consumers'
    # hand-off of the batch in hand, cut short by the stop, failed the worker.
    server = redis_server_factory()
    napping = tmp_path / "napping"
    env = {**os.environ, "NAPPING": str(napping)}
    command = [sys.executable, "-m", "conveyor"]
    target = ["app:naps", "--redis", server.url, "--connect-timeout", "60"]
    worker = subprocess.Popen(
        [*command, "worker", *target], cwd=project, env=env, stderr=subprocess.PIPE, text=True
    )
    driver = subprocess.Popen(
        [*command, "run", *target, "--no-progress"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: list[str] = []
    retrying = threading.Event()

    def read_stderr() -> None:  # a thread: select() misses lines already buffered
        assert worker.stderr is not None
        for line in worker.stderr:
            seen.append(line)
            if "Redis unavailable (worker)" in line:
                retrying.set()

    reader = threading.Thread(target=read_stderr)
    reader.start()
    try:
        wait_for(napping.exists, "the worker to work")
        server.stop()
        assert retrying.wait(30.0), f"the worker did not retry; it said: {''.join(seen)}"
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=30)
    finally:
        for proc in (worker, driver):
            proc.kill()
            proc.wait()
        reader.join(30.0)
        assert worker.stderr is not None
        worker.stderr.close()
    said = "".join(seen)
    assert worker.returncode == 0, said
    assert "Traceback" not in said
    assert "Redis worker stopped with Redis unreachable" in said


# ---------------------------------------------------------------------- Redis lost mid-run


def slow(x: int) -> int:
    return x


def test_a_run_whose_redis_is_killed_ends_with_an_error_naming_the_url_within_the_bound(
    redis_server_factory: RedisServerFactory,
) -> None:
    server = redis_server_factory()
    pipeline = cv.Pipeline(iter(range(10**9))).map(slow)
    backend = RedisBackend(server.url, local_workers=True, unavailable_timeout=1.0)
    got = 0
    killed = 0.0
    with pytest.raises(BackendUnavailable) as info:
        for _ in backend.iterate(pipeline):
            got += 1
            if got == 50:
                server.stop()
                killed = time.monotonic()
    took = time.monotonic() - killed
    assert f"cannot reach Redis at {server.url}" in str(info.value)
    assert "Connection refused" in str(info.value) or "Connection reset" in str(info.value)
    assert took < 1.0 + 2.0, f"the run took {took:.1f} s to give up"  # the bound, and the ending
    # The stage's worker lost Redis waiting for entries, holding none: its note said
    # "failed on item None", an item the source never gave.
    notes = getattr(info.value, "__notes__", [])
    assert not [n for n in notes if "failed on item" in n], notes


# ---------------------------------------------------------------------- the user's code


def test_a_worker_whose_on_start_raises_exits_1_with_the_users_traceback_and_one_line(
    project: Path, redis_server: RedisServer
) -> None:
    """It went up through click: Python's own traceback, click's frames and all."""
    done, _ = conveyor("worker", "app:opens_a_database", "--redis", redis_server.url, cwd=project)
    assert done.returncode == 1, done.stderr
    assert 'raise OSError("database unreachable")' in done.stderr
    assert "click" not in done.stderr
    assert lines(done.stderr)[-1] == "conveyor: the worker failed: OSError: database unreachable"


def leave(x: int) -> int:
    """The stage of ``app:quits``, built here too so that the driver meets its worker."""
    if x == 2:
        raise SystemExit(3)
    return x


def test_a_worker_whose_stage_raises_system_exit_says_so_and_exits_1(
    project: Path, redis_server: RedisServer
) -> None:
    # The repro: the worker exited with the stage's code (3) without a word on its
    # stderr, and the driver said only that nothing moved.
    namespace = new_namespace()
    command = ["worker", "app:quits", "--redis", redis_server.url, "--namespace", namespace]
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", *command],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    backend = RedisBackend(redis_server.url, namespace=namespace)
    handle = cv.Pipeline(range(5)).map(leave).start(backend=backend)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        handle.stop()
        handle.wait(30)
    assert proc.returncode == 1, stderr
    assert "raise SystemExit(3)" in stderr
    assert "conveyor: stage 'leave' (map) failed on item 2" in stderr
    assert lines(stderr)[-1] == "conveyor: the worker failed: SystemExit: 3"


# ---------------------------------------------------------------------- option checks

METRICS_ON_A_BAD_ADDRESS = ["--metrics-addr", "999.1.1.1", "--metrics-port", "0"]

BAD_OPTIONS = [
    (["run", "app:pipeline", "--stall-timeout", "0"], "--stall-timeout"),
    (["run", "app:pipeline", "--stall-timeout", "nan"], "--stall-timeout"),
    (["run", "app:pipeline", "--stall-timeout", "inf"], "--stall-timeout"),
    (["run", "app:pipeline", "--workers", "inc=0"], "--workers"),
    (["run", "app:pipeline", "--workers", "inc"], "--workers"),
    (["run", "app:pipeline", "--redis", "http://localhost"], "--redis"),
    (["run", "app:pipeline", "--redis", "redis://localhost:99999"], "--redis"),
    (["run", "app:pipeline", "--redis", "redis://h/0", "--run-id", "a b"], "--run-id"),
    (["run", "app:pipeline", "--connect-timeout", "-1"], "--connect-timeout"),
    (["run", "app:pipeline", "--report", "/no/such/dir/r.html"], "--report"),
    (["worker", "app:pipeline", "--redis", "redis://h", "--workers", "0"], "--workers"),
    (["worker", "app:pipeline", "--redis", "redis://h", "--stage", " "], "--stage"),
    (["worker", "app:pipeline", "--redis", "nope"], "--redis"),
    (["worker", "app:pipeline", "--redis", "redis://h", "--connect-timeout", "0"], "timeout"),
    (["status", "app:pipeline", "--redis", "redis://h", "--namespace", ""], "--namespace"),
    (["status", "app:pipeline", "--redis", "redis://h", "--run", ""], "--run"),
    (["cancel", "app:pipeline", "--redis", "redis://h/db"], "--redis"),
    (["dlq", "list", "app:pipeline", "--redis", "redis://h", "--id", "abc"], "--id"),
    (["dlq", "replay", "app:pipeline", "--redis", "redis://h", "--stage", ""], "--stage"),
    (["dlq", "purge", "app:pipeline", "--redis", "redis://h", "--run", "a b"], "--run"),
    # Options of a run on Redis, given without --redis: they were ignored without a word.
    (["run", "app:pipeline", "--run-id", "abc"], "--run-id"),
    (["run", "app:pipeline", "--namespace", "mine"], "--namespace"),
    (["run", "app:pipeline", "--visibility-timeout", "60"], "--visibility-timeout"),
    (["run", "app:pipeline", "--redis", "redis://h", "--visibility-timeout", "0"], "--visibility"),
    # A batch stage has no workers option: with_stage's TypeError went up as a traceback.
    (["run", "app:grouped", "--workers", "batch=3"], "--workers"),
    # The driver of a run on Redis runs no stage: the count was ignored.
    (["run", "app:pipeline", "--redis", "redis://h", "--workers", "inc=4"], "--workers"),
    # An address to serve metrics on that this machine does not have: named --metrics-port.
    (
        [*["worker", "app:pipeline", "--redis", "redis://h"], *METRICS_ON_A_BAD_ADDRESS],
        "--metrics-addr",
    ),
    # A path or a relative name: it was imported as one, a traceback and exit code 1.
    (["run", "../app:pipeline"], "MODULE:ATTR"),
    (["status", ".app:pipeline", "--redis", "redis://h"], "MODULE:ATTR"),
    # A stage the pipeline does not have: --workers was ignored (the worker served on
    # with its own count), --stage exited with 1 as if the pipeline had failed; then
    # both were named as the Python parameters ("Worker 'stages': ...").
    (["worker", "app:pipeline", "--redis", "redis://h", "--workers", "incc=2"], "'--workers'"),
    (["worker", "app:pipeline", "--redis", "redis://h", "--stage", "incc"], "'--stage'"),
    (
        ["worker", "app:pipeline", "--redis", "redis://h", "--stage", "inc", "--workers", "x=2"],
        "'--workers'",
    ),
    # With no run in Redis a misspelt stage found no dead letters without a word; with
    # runs, it exited 1 as if the pipeline had failed.
    (["dlq", "list", "app:pipeline", "--redis", "redis://h", "--stage", "incc"], "--stage"),
    (["dlq", "replay", "app:pipeline", "--redis", "redis://h", "--stage", "incc"], "--stage"),
    (["dlq", "purge", "app:pipeline", "--redis", "redis://h", "--stage", "incc"], "--stage"),
]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("app:stageless", "start(): the pipeline has no stage"),
        ("app:patient", "'timeout' (60.0 s) is longer than RedisBackend 'visibility_timeout'"),
    ],
)
def test_a_pipeline_that_a_run_on_redis_refuses_is_a_usage_error_without_a_traceback(
    project: Path, target: str, message: str
) -> None:
    """Regression: ``conveyor run --redis`` showed conveyor's own traceback and exited 1
    where the same pipeline run locally is a usage error (exit code 2)."""
    done, _ = conveyor("run", target, "--redis", UNREACHABLE, "--no-progress", cwd=project)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert message in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr


def test_visibility_timeout_lets_a_run_on_redis_have_a_longer_stage_timeout(
    project: Path,
) -> None:
    """``conveyor run --redis`` had no way to give the visibility timeout that a stage's
    longer timeout needs: the check passes, and the run goes on to connect."""
    args = ["--redis", UNREACHABLE, "--connect-timeout", "0.5", "--visibility-timeout", "60"]
    done, _ = conveyor("run", "app:patient", "--no-progress", *args, cwd=project)
    assert done.returncode == EXIT_REDIS_UNREACHABLE, done.stderr


@pytest.mark.parametrize(
    ("workers", "message"),
    [
        (["-1"], "N must be a whole number >= 1 (or STAGE=N), got '-1'"),
        (["0"], "N must be a whole number >= 1 (or STAGE=N), got '0'"),
        (["many"], "N must be a whole number >= 1 (or STAGE=N), got 'many'"),
        (["inc=2", "3"], "give N once (every served stage) or STAGE=N for each stage, not both"),
    ],
)
def test_a_workers_count_says_it_takes_n_or_stage_n(
    project: Path, workers: list[str], message: str
) -> None:
    """Regression: ``conveyor worker --workers -1`` said "expected STAGE=N, got '-1'",
    not that N must be >= 1, and a count among STAGE=N values was taken for a stage."""
    options = [arg for count in workers for arg in ("--workers", count)]
    done, _ = conveyor("worker", "app:pipeline", "--redis", UNREACHABLE, *options, cwd=project)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert message in " ".join(done.stderr.split())


@pytest.mark.parametrize(("args", "option"), BAD_OPTIONS, ids=str)
def test_a_bad_option_value_is_a_usage_error_naming_the_option(
    project: Path, args: list[str], option: str
) -> None:
    done, _ = conveyor(*args, cwd=project)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert option in done.stderr and "Usage:" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_json_run_on_redis_ending_on_dead_letters_prints_its_metrics_with_the_error(
    project: Path, redis_server: RedisServer
) -> None:
    """Regression: the failed run's document held only ``error``, where a run on this
    machine's holds its metrics too (``items_out``, ``stages``...) with the error."""

    def fragile(x: int) -> int:  # the stage of app:dead_ends, served from this process
        if x == 3:
            raise ValueError("cannot handle 3")
        return x

    namespace = new_namespace()
    served = cv.Pipeline[int]([]).map(fragile)
    with Worker(served, redis_server.url, namespace=namespace):
        done, _ = conveyor(
            "run", "app:dead_ends", "--json", "--redis", redis_server.url,
            "--namespace", namespace, "--run-id", "dead-ends", cwd=project,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)
    assert document["error"]["type"] == "DeadLettersError"
    assert document["items_out"] == 3  # 0, 1 and 2; the others wait for 3, in order
    assert [stage["name"] for stage in document["stages"]] == ["fragile"]
    assert document["redis"]["run_id"] == "dead-ends"
    assert document["redis"]["dead_letters"] == {"fragile": 1}


@pytest.mark.parametrize("mode", ["replay", "purge"])
def test_a_dead_letter_id_that_is_not_there_is_refused_naming_it_and_nothing_moves(
    project: Path, redis_server: RedisServer, mode: str
) -> None:
    """Regression: ``conveyor dlq replay --id`` with a mistyped id said "replayed 0 dead
    letters" and exited 0, and with a good id beside it moved that one alone."""

    def fragile(x: int) -> int:  # the stage of app:dead_ends
        if x == 3:
            raise ValueError("cannot handle 3")
        return x

    namespace = new_namespace()
    backend = RedisBackend(
        redis_server.url, namespace=namespace, run_id="r1", max_deliveries=1, local_workers=True
    )
    with pytest.raises(cv.DeadLettersError):
        cv.Pipeline(range(10)).map(fragile).run(backend=backend)
    where = ["--redis", redis_server.url, "--namespace", namespace, "--run", "r1"]
    listed, _ = conveyor("dlq", "list", "app:dead_ends", *where, "--json", cwd=project)
    (letter,) = json.loads(listed.stdout)
    done, _ = conveyor(
        "dlq", mode, "app:dead_ends", *where, "--id", letter["entry_id"], "--id", "1-1",
        cwd=project,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert lines(done.stderr) == [
        "Error: no dead letter with id 1-1 in run 'r1'; `conveyor dlq list` shows them"
    ]
    again, _ = conveyor("dlq", "list", "app:dead_ends", *where, "--json", cwd=project)
    assert json.loads(again.stdout) == [letter]  # still there: nothing moved
    done, _ = conveyor(
        "dlq", mode, "app:dead_ends", *where, "--id", letter["entry_id"], cwd=project
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == {"replay": "replayed", "purge": "purged"}[mode] + " 1 dead letters\n"


@pytest.mark.parametrize("mode", ["replay", "purge"])
def test_a_dead_letter_id_that_two_runs_have_is_refused_without_run_and_nothing_moves(
    project: Path, redis_server: RedisServer, mode: str
) -> None:
    """Regression: ``dlq replay|purge --id ID`` without ``--run`` applied the id to every
    run; ids are made per run from the time in ms, so two runs' ids can be the same."""

    def fragile(x: int) -> int:  # the stage of app:dead_ends
        if x == 3:
            raise ValueError("cannot handle 3")
        return x

    namespace, url = new_namespace(), redis_server.url
    for run_id in ("r1", "r2"):
        backend = RedisBackend(
            url, namespace=namespace, run_id=run_id, max_deliveries=1, local_workers=True
        )
        with pytest.raises(cv.DeadLettersError):
            cv.Pipeline(range(10)).map(fragile).run(backend=backend)
    where = ["--redis", url, "--namespace", namespace]
    listed, _ = conveyor("dlq", "list", "app:dead_ends", *where, "--json", cwd=project)
    first, second = sorted(json.loads(listed.stdout), key=lambda d: d["run_id"])
    # The collision, made here at will: r1's dead letter gets the id of r2's (an id
    # above the stream's last, as the clock would have given it within the same ms).
    with redis_py.Redis.from_url(url) as client:
        (dead,) = client.keys(f"{namespace}:*r1}}:dlq0")
        [(old_id, fields)] = client.xrange(dead)
        client.xadd(dead, fields, id=second["entry_id"])
        client.xdel(dead, old_id)
    before, _ = conveyor("dlq", "list", "app:dead_ends", *where, "--json", cwd=project)
    assert [d["entry_id"] for d in json.loads(before.stdout)] == [second["entry_id"]] * 2

    one_id = ["--id", second["entry_id"]]
    done, _ = conveyor("dlq", mode, "app:dead_ends", *where, *one_id, cwd=project)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert (
        f"Error: dead letter id {second['entry_id']} is in 2 runs ('r1', 'r2'): give --run ID "
        "to say which; nothing was moved"
    ) in done.stderr
    after, _ = conveyor("dlq", "list", "app:dead_ends", *where, "--json", cwd=project)
    assert after.stdout == before.stdout  # nothing moved

    done, _ = conveyor(
        "dlq", mode, "app:dead_ends", *where, "--run", "r1", "--id", second["entry_id"],
        cwd=project,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    left, _ = conveyor("dlq", "list", "app:dead_ends", *where, "--json", cwd=project)
    assert [d["run_id"] for d in json.loads(left.stdout)] == ["r2"]
    assert first["run_id"] == "r1"


SLOW_IMPORT = """
import os
import pathlib
import time

import conveyor as cv

# Importing this module takes as long as the test wants: a command's start-up.
pathlib.Path(os.environ["IMPORTING"]).touch()
deadline = time.monotonic() + 60
while not pathlib.Path(os.environ["IMPORTED"]).exists() and time.monotonic() < deadline:
    time.sleep(0.01)

pipeline = cv.Pipeline(range(3)).map(abs)
"""


@pytest.mark.parametrize(
    ("command", "sig", "code", "line"),
    [
        ("worker", signal.SIGTERM, 0,
         "conveyor: worker stopped (SIGTERM) before it started serving: it took nothing"),
        ("worker", signal.SIGINT, 0,
         "conveyor: worker stopped (Ctrl-C) before it started serving: it took nothing"),
        ("run", signal.SIGTERM, 143, "conveyor: terminated (SIGTERM)"),
        ("run", signal.SIGINT, 130, "conveyor: interrupted"),
    ],
    ids=["worker-sigterm", "worker-sigint", "run-sigterm", "run-sigint"],
)  # fmt: skip
def test_a_signal_while_a_command_starts_is_a_clean_stop_with_one_line(
    project: Path, tmp_path: Path, command: str, sig: signal.Signals, code: int, line: str
) -> None:
    """Regression: a worker sent SIGTERM while it started (importing the pipeline's
    module, before its handlers were installed) died by the signal without a word (143),
    and Ctrl-C there gave a KeyboardInterrupt traceback."""
    (project / "slow_app.py").write_text(SLOW_IMPORT)
    importing, imported = tmp_path / "importing", tmp_path / "imported"
    redis_args = ["--redis", UNREACHABLE] if command == "worker" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", command, "slow_app:pipeline", *redis_args],
        cwd=project, env={**os.environ, "IMPORTING": str(importing), "IMPORTED": str(imported)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(importing.exists, "the command to import the pipeline's module")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        imported.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == code, stderr
    assert lines(stderr) == [line]


def test_a_second_sigterm_stops_a_worker_whose_thread_is_stuck_in_user_code_at_once(
    project: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Regression: the second signal was to stop the consumers without waiting; a thread
    stage in user code (a 120 s call) was still waited for, 30 s, then 5 s more."""
    holding, log = tmp_path / "holding", tmp_path / "worker.log"
    namespace = new_namespace()
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", "app:stuck", "--redis",
             redis_server.url, "--namespace", namespace],
            cwd=project, env={**os.environ, "HOLDING": str(holding)},
            stdout=subprocess.DEVNULL, stderr=stderr, text=True,
        )  # fmt: skip
    backend = RedisBackend(redis_server.url, namespace=namespace, run_id="stuck")
    pipeline = cv.Pipeline(range(3)).map(lambda x: x, name="hold")
    try:
        with pipeline.start(backend=backend):
            wait_for(holding.exists, "the stage to be in user code")
            wait_for(lambda: handles_sigterm(proc.pid), "the worker's signal handlers")
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "stopping:" in log.read_text(), "the first signal to be handled")
            proc.send_signal(signal.SIGTERM)
            stopping = time.monotonic()
            proc.wait(timeout=60)
            took = time.monotonic() - stopping
    finally:
        proc.kill()
        proc.wait()
        backend.cancel(pipeline, "stuck")
    err = log.read_text()
    assert proc.returncode == 0, err
    assert took < 5.0 + STARTUP / 2, f"the worker took {took:.1f} s to stop"
    assert "Traceback" not in err
    assert "a second SIGTERM or Ctrl-C stops at once" in err
    assert "'hold'" in err and "conveyor-hold-0" in err, err  # named as left behind


# ---------------------------------------------------------------------- a stopped driver


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_run_on_redis_stopped_by_a_signal_prints_its_report_and_is_left_resumable(
    project: Path, redis_server: RedisServer, tmp_path: Path, sig: int
) -> None:
    # The repro: `conveyor run --redis` stopped by Ctrl-C said "conveyor: interrupted"
    # and no report; SIGTERM ended it by the signal, without a word.
    napping = tmp_path / "napping"
    env = {**os.environ, "NAPPING": str(napping)}
    namespace, run_id = new_namespace(), f"stopped-{sig}"
    target = ["app:naps", "--redis", redis_server.url, "--namespace", namespace]
    command = [sys.executable, "-m", "conveyor"]
    worker = subprocess.Popen(
        [*command, "worker", *target],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    driver = subprocess.Popen(
        [*command, "run", *target, "--run-id", run_id, "--no-progress"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(napping.exists, "the stage to work")  # the driver's handlers are set by then
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=60)
    finally:
        for proc in (worker, driver):
            proc.kill()
            proc.wait()
    code = 130 if sig == signal.SIGINT else 143
    assert driver.returncode == code, err
    assert "Traceback" not in err, err
    assert "stopped before the end" in out, (out, err)
    assert "nap" in out  # the stage's row
    assert f"run again with run_id={run_id!r} to resume it" in err, err
    # Left in Redis, resumable: cancel finds it.
    done, _ = conveyor("cancel", *target, "--run", run_id, cwd=project)
    assert done.returncode == 0, done.stderr
    assert f"deleted run {run_id}" in done.stdout
