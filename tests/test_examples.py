"""The scripts of examples/ do their jobs: each is run as a real command on small data.

Each example is also imported here (examples/ is put on sys.path) to check
that its plain-Python counterpart, which its docs page times it against, does
the same job.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # a runtime import would find tests/contract/conftest.py first
    from conftest import RedisServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUN_TIMEOUT = 50.0  # seconds for one example command (the test's own timeout is 60)

pytestmark = pytest.mark.timeout(60)


def run_example(script: str, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """``python examples/SCRIPT ARGS`` in a child process, with its output."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, after checking that it exited 0."""
    assert result.returncode == 0, (
        f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


Importer = Callable[[str], ModuleType]


@pytest.fixture
def example() -> Iterator[Importer]:
    """Import an example by name: ``example("crawler")`` (examples/ is on sys.path meanwhile)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(EXAMPLES))


def rows_in(db: Path) -> dict[int, tuple[object, ...]]:
    """The orders table, by id."""
    conn = sqlite3.connect(db)
    try:
        return {row[0]: row for row in conn.execute("SELECT * FROM orders")}
    finally:
        conn.close()


# --------------------------------------------------------------------- csv_to_sqlite.py


def test_csv_to_sqlite_loads_the_valid_rows_and_counts_the_malformed_ones(
    tmp_path: Path, example: Importer
) -> None:
    csv_to_sqlite = example("csv_to_sqlite")
    csv_path, db = tmp_path / "orders.csv", tmp_path / "orders.db"
    malformed = csv_to_sqlite.make_csv(csv_path, 3000, seed=5)
    assert malformed > 20  # the sample has every kind of bad row

    out = succeeded(run_example("csv_to_sqlite.py", csv_path, "--db", db))

    assert f"skipped {malformed} malformed rows" in out
    assert f"loaded {3000 - malformed} orders" in out
    rows = rows_in(db)
    assert len(rows) == 3000 - malformed
    expected = {
        order.id: tuple(order)
        for line in csv_to_sqlite.read_lines(csv_path)
        for order in _valid(csv_to_sqlite, line)
    }
    assert rows == expected


def _valid(module: ModuleType, line: object) -> list[object]:
    try:
        return [module.validate(line)]
    except ValueError:
        return []


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (["1", "a", "a@b.c", "1.00"], "4 fields, expected 5"),
        (["x1", "a", "a@b.c", "1.00", "2026-01-01"], "id 'x1' is not a positive integer"),
        (["1", " ", "a@b.c", "1.00", "2026-01-01"], "the customer is empty"),
        (["1", "a", "a.b.c", "1.00", "2026-01-01"], "'a.b.c' is not an email address"),
        (["1", "a", "a@b.c", "12,50", "2026-01-01"], "amount '12,50' is not a number"),
        (["1", "a", "a@b.c", "0.001", "2026-01-01"], "amount '0.001' is not a sum of money"),
        (["1", "a", "a@b.c", "-1", "2026-01-01"], "amount '-1' is not a sum of money"),
        (["1", "a", "a@b.c", "1.00", "2026-13-01"], "date '2026-13-01' is not YYYY-MM-DD"),
    ],
)
def test_csv_to_sqlite_names_the_line_and_the_reason_of_a_malformed_row(
    example: Importer, fields: list[str], reason: str
) -> None:
    csv_to_sqlite = example("csv_to_sqlite")
    with pytest.raises(ValueError, match=re.escape(f"line 7: {reason}")):
        csv_to_sqlite.validate(csv_to_sqlite.Line(7, fields))


def test_csv_to_sqlite_and_its_plain_loop_load_the_same_rows(
    tmp_path: Path, example: Importer
) -> None:
    csv_to_sqlite = example("csv_to_sqlite")
    csv_path = tmp_path / "orders.csv"
    csv_to_sqlite.make_csv(csv_path, 2000)
    by_pipeline = csv_to_sqlite.with_conveyor(csv_path, tmp_path / "a.db")
    by_loop = csv_to_sqlite.plain_python(csv_path, tmp_path / "b.db")
    assert by_pipeline[0] == by_loop[0] > 1900
    assert sorted(by_pipeline[1]) == sorted(by_loop[1])
    assert rows_in(tmp_path / "a.db") == rows_in(tmp_path / "b.db")


def test_csv_to_sqlite_compare_prints_both_timings_and_line_counts() -> None:
    out = succeeded(run_example("csv_to_sqlite.py", "--rows", "500", "--compare"))
    assert re.search(r"conveyor +[\d.]+ s +1\.00x +\d+ lines", out), out
    assert re.search(r"plain Python +[\d.]+ s +[\d.]+x +\d+ lines", out), out


# --------------------------------------------------------------------- crawler.py


@pytest.fixture(autouse=True)
def _crawler_needs_aiohttp(request: pytest.FixtureRequest) -> None:
    """The crawler's tests fail at once, saying what to install, without its HTTP client
    (rather than on an assertion about the example's output)."""
    if "crawl" in request.node.name:
        assert importlib.util.find_spec("aiohttp") is not None, (
            "aiohttp is not installed: pip install -e '.[examples]'"
        )


def test_crawler_fetches_every_page_retries_5xx_and_reports_broken_links() -> None:
    out = succeeded(run_example("crawler.py", "--pages", "60", "--latency", "0.002"))
    # Pages 0-59 but 13 (always 500), and the home page. Pages 3, 23, 33, 43 and 53
    # answer 503 twice before they work; page 13 is tried 1 + 3 times.
    assert "60 pages fetched, 13 retries after 5xx answers" in out
    assert re.search(r"failed after 3 retries: http://127\.0\.0\.1:\d+/page/13 \(.*500\)", out)
    broken = re.findall(r"broken link: \S+/page/(\d+) \(404\), on \S+/page/(\d+)", out)
    assert sorted(broken, key=lambda pair: int(pair[0])) == [
        ("67", "7"),
        ("92", "32"),
        ("117", "57"),
    ]


def test_a_crawl_that_fetches_nothing_exits_1_saying_why() -> None:
    """Regression: a site that could not be reached gave "0 pages fetched" and exit 0."""
    done = run_example("crawler.py", "--url", "http://127.0.0.1:1/")  # nothing listens there
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 pages fetched" in done.stdout
    assert "crawler: nothing was fetched from http://127.0.0.1:1/: " in done.stderr
    assert "Connect" in done.stderr  # aiohttp's error, kept with the URL


def test_the_crawler_and_its_plain_asyncio_version_find_the_same(
    example: Importer,
) -> None:
    crawler = example("crawler")
    with crawler.serve(crawler.Site(40, latency=0.001)) as root:
        by_pipeline = crawler.crawl_with_conveyor(root, 8)
        by_gather = crawler.crawl_plain(root, 8)
    assert by_pipeline.pages == by_gather.pages
    assert by_pipeline.failed == by_gather.failed
    assert by_pipeline.broken() == by_gather.broken()
    assert by_pipeline.retries == by_gather.retries == 3 * 2 + 3


def test_csv_to_sqlite_refuses_a_missing_csv_and_a_negative_row_count(tmp_path: Path) -> None:
    """A missing CSV was a FileNotFoundError traceback; --rows -5 "generated -5 rows"."""
    missing = run_example("csv_to_sqlite.py", tmp_path / "nowhere.csv")
    assert missing.returncode == 2, missing.stderr
    assert "nowhere.csv: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    negative = run_example("csv_to_sqlite.py", "--rows", "-5")
    assert negative.returncode == 2, negative.stderr
    assert "argument --rows: must be at least 1, got -5" in negative.stderr


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("checksums.py", ["--workers", "0"], "argument --workers: must be at least 1, got 0"),
        ("checksums.py", ["--compare", "--files", "-3"], "argument --files: must be at least 1"),
        ("crawler.py", ["--pages", "0"], "argument --pages: must be at least 1, got 0"),
        ("crawler.py", ["--workers", "-1"], "argument --workers: must be at least 1, got -1"),
        ("csv_to_sqlite.py", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
        ("csv_to_sqlite.py", ["--db", "no/such/folder/x.db"], "the folder 'no/such/folder'"),
        ("distributed.py", ["--workers", "0"], "argument --workers: must be at least 1, got 0"),
    ],
)
def test_examples_refuse_a_count_below_one_and_a_db_in_a_missing_folder(
    script: str, args: list[str], message: str
) -> None:
    """Repro: --workers 0 hung or was a conveyor traceback; --db in a missing folder
    was sqlite3.OperationalError's traceback after the whole load."""
    result = run_example(script, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_csv_to_sqlite_refuses_a_csv_with_another_header_as_a_usage_error(
    tmp_path: Path,
) -> None:
    """Repro: a CSV without the orders header was a ValueError traceback from the source."""
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    result = run_example("csv_to_sqlite.py", other)
    assert result.returncode == 2, result.stderr
    assert "the header must be id,customer,email,amount,date" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("algorithm", ["shake_128", "shake_256"])
def test_checksums_refuses_shake_algorithms_which_have_no_fixed_digest_size(
    algorithm: str, tmp_path: Path, example: Importer
) -> None:
    """Repro: --algorithm shake_128 was offered, then hexdigest() raised a TypeError
    in every worker."""
    result = run_example("checksums.py", tmp_path, "--algorithm", algorithm)
    assert result.returncode == 2, result.stderr
    assert f"{algorithm!r} is a SHAKE algorithm" in result.stderr
    assert "Traceback" not in result.stderr
    assert "shake" not in run_example("checksums.py", "--help").stdout
    with pytest.raises(ValueError, match="SHAKE"):
        example("checksums").with_conveyor(tmp_path, 1, "thread", algorithm)


# --------------------------------------------------------------------- checksums.py


@pytest.fixture
def files(tmp_path: Path) -> dict[Path, str]:
    """A few files in nested folders, with their SHA-256."""
    made = {}
    for i in range(12):
        path = tmp_path / f"d{i % 3}" / f"f{i}.bin"
        path.parent.mkdir(exist_ok=True)
        data = os.urandom(1000 * i + 1)
        path.write_bytes(data)
        made[path] = hashlib.sha256(data).hexdigest()
    return made


@pytest.mark.parametrize("runtime", ["process", "thread"])
def test_checksums_prints_every_digest_in_walk_order(
    files: dict[Path, str], tmp_path: Path, runtime: str
) -> None:
    out = succeeded(run_example("checksums.py", tmp_path, "--runtime", runtime))
    expected = [f"{files[path]}  {path}" for path in sorted(files)]
    assert out.splitlines() == expected


def test_checksums_of_a_missing_path_is_an_error_and_of_a_file_its_digest(
    files: dict[Path, str], tmp_path: Path
) -> None:
    """A missing directory printed nothing and exited 0; a file printed nothing."""
    missing = run_example("checksums.py", tmp_path / "nowhere", "--runtime", "thread")
    assert missing.returncode == 2, missing.stderr
    assert "nowhere: no such file or directory" in missing.stderr
    path, digest = next(iter(files.items()))
    out = succeeded(run_example("checksums.py", path, "--runtime", "thread"))
    assert out.splitlines() == [f"{digest}  {path}"]


def test_checksums_on_subinterpreters_works_or_says_which_runtimes_exist(
    files: dict[Path, str], tmp_path: Path
) -> None:
    result = run_example("checksums.py", tmp_path, "--runtime", "interpreter")
    if result.returncode == 0:  # a Python and a conveyor with runtime="interpreter"
        assert len(result.stdout.splitlines()) == len(files)
    else:
        # conveyor's own error, shown as a usage error: it names the runtime.
        assert result.returncode == 2, result.stderr
        assert "interpreter" in result.stderr.splitlines()[-1]


def test_checksums_compare_checks_that_all_three_ways_agree() -> None:
    out = succeeded(run_example("checksums.py", "--compare", "--files", "6", "--size", "1"))
    for name in ("conveyor process", "plain loop", "Pool.imap"):
        assert re.search(rf"{name} +[\d.]+ s +[\d.]+x +\d+ lines", out), out


# --------------------------------------------------------------------- distributed.py


@pytest.mark.redis
def test_distributed_loads_the_csv_through_two_worker_processes(
    redis_server: RedisServer, tmp_path: Path, example: Importer
) -> None:
    csv_to_sqlite = example("csv_to_sqlite")
    csv_path = tmp_path / "orders.csv"
    malformed = csv_to_sqlite.make_csv(csv_path, 2000, seed=3)
    out = succeeded(run_example("distributed.py", csv_path, "--redis", redis_server.url))
    assert f"{2000 - malformed} rows in the table, {malformed} rejected" in out
    # The workers column counts the worker processes that served the stage (validate
    # has one worker in each). Both serve from the start (the example waits for them),
    # but a run of 0.1 s can end before the second finds it (workers look for new runs
    # every 0.1 s): 1 or 2 here. That it counts each process is checked, with the
    # processes held until both have met, by test_redis_processes.py's
    # test_a_runs_report_counts_the_workers_that_served_it_in_every_process.
    assert re.search(rf"validate +map +[12] +2,000 +{2000 - malformed:,}", out), out


@pytest.mark.redis
def test_distributed_starts_a_private_redis_server_without_a_url(
    redis_server: RedisServer,  # only to skip (or fail on CI) where redis-server is missing
) -> None:
    out = succeeded(run_example("distributed.py", "--rows", "500"))
    malformed = int(re.search(r"500 rows, (\d+) of them malformed", out)[1])  # type: ignore[index]
    assert f"{500 - malformed} rows in the table, {malformed} rejected" in out


# --------------------------------------------------------------------- lesson.py


def test_lesson_moves_every_number_through_a_channel_and_a_pipeline() -> None:
    out = succeeded(run_example("lesson.py"))
    assert "check: 20 produced, 20 consumed, none lost or duplicated" in out
