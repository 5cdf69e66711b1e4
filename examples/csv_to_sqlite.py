"""Load a CSV of orders into SQLite: validate each row, count the malformed ones, insert in batches.

    python examples/csv_to_sqlite.py [CSV] [--db FILE] [--batch N]
    python examples/csv_to_sqlite.py --rows 20000           # on a generated CSV
    python examples/csv_to_sqlite.py --rows 200000 --compare  # against the plain loop

Without a CSV, one of ``--rows`` orders is generated (with about 2% malformed
rows) in a temporary folder. A malformed row is not fatal: the validating
stage runs with ``on_error="skip"``, so the row is recorded in
``result.failures`` (with its line number and the reason) and the load goes on.
Rows are inserted 500 at a time by one writer, which owns the connection
(``on_start``/``on_stop``). The insert is idempotent (``INSERT OR REPLACE`` on
the order id), so the same pipeline can run on Redis, where delivery is at
least once: see examples/distributed.py, which runs `pipeline` unchanged.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import os
import random
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import NamedTuple

from _compare import new_file, positive_int  # examples/, next to this file

import conveyor as cv

COLUMNS = ("id", "customer", "email", "amount", "date")
BATCH = 500
# Where the writer stage's workers open the database when none is given: a
# `conveyor worker` process (examples/distributed.py) gets its path this way.
DB_ENV = "CONVEYOR_EXAMPLE_DB"


class Order(NamedTuple):
    """One valid row."""

    id: int
    customer: str
    email: str
    amount_cents: int
    date: str


class Line(NamedTuple):
    """One CSV record and its line number, as the source yields them."""

    number: int
    fields: list[str]


# --------------------------------------------------------------------- the job's parts


def read_lines(path: Path) -> Iterator[Line]:
    """The data rows of the CSV, lazily, after checking the header."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{path}: the header must be {','.join(COLUMNS)}; got {header}")
        for fields in reader:
            yield Line(reader.line_num, fields)


def validate(line: Line) -> Order:
    """The row as an `Order`, or ValueError saying what is wrong with it.

    ``line`` may also be a plain ``[number, fields]`` list: over Redis, items
    travel as msgpack, which has no tuples.
    """
    number, fields = line
    if len(fields) != len(COLUMNS):
        raise ValueError(f"line {number}: {len(fields)} fields, expected {len(COLUMNS)}")
    id_, customer, email, amount, date = (field.strip() for field in fields)
    if not id_.isdigit():
        raise ValueError(f"line {number}: id {id_!r} is not a positive integer")
    if not customer:
        raise ValueError(f"line {number}: the customer is empty")
    if email.count("@") != 1 or "." not in email.split("@")[1]:
        raise ValueError(f"line {number}: {email!r} is not an email address")
    try:
        cents = Decimal(amount) * 100
    except InvalidOperation:
        raise ValueError(f"line {number}: amount {amount!r} is not a number") from None
    if cents < 0 or cents != cents.to_integral_value():
        raise ValueError(f"line {number}: amount {amount!r} is not a sum of money")
    try:
        dt.date.fromisoformat(date)
    except ValueError:
        raise ValueError(f"line {number}: date {date!r} is not YYYY-MM-DD") from None
    return Order(int(id_), customer, email, int(cents), date)


def connect(db: str | os.PathLike[str]) -> sqlite3.Connection:
    """A connection to ``db`` with the ``orders`` table created."""
    # A second writer (another worker process) waits for the lock instead of failing.
    conn = sqlite3.connect(db, timeout=30)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL,"
        " email TEXT NOT NULL, amount_cents INTEGER NOT NULL, date TEXT NOT NULL)"
    )
    return conn


def insert(conn: sqlite3.Connection, orders: list[Order]) -> None:
    """Insert (or replace: the same order twice is stored once) and commit."""
    with conn:
        conn.executemany("INSERT OR REPLACE INTO orders VALUES (?, ?, ?, ?, ?)", orders)


# --------------------------------------------------------------------- with conveyor


# --8<-- [start:pipeline]
def open_writer(db: str | os.PathLike[str] | None = None) -> sqlite3.Connection:
    """``on_start`` of the writer: each writer worker opens its own connection.

    Without ``db``, the file named by ``$CONVEYOR_EXAMPLE_DB``: how a
    `conveyor worker` process, which builds the pipeline without arguments,
    learns where to write.
    """
    return connect(db if db is not None else os.environ[DB_ENV])


def write(orders: list[Order]) -> None:
    """The sink: insert one batch through this worker's connection."""
    insert(cv.worker_state(), orders)


def pipeline(path: Path | None = None, db: Path | None = None) -> cv.Pipeline[None]:
    """The load as a pipeline: read -> validate (bad rows skipped) -> batch -> SQLite.

    Without ``path`` the source is empty: a worker needs only the stages, the
    run's driver brings the rows.
    """
    return (
        cv.Pipeline(read_lines(path) if path is not None else iter(()))
        .map(validate, on_error="skip")
        .batch(BATCH)
        .each(
            write,
            on_start=functools.partial(open_writer, db),
            on_stop=sqlite3.Connection.close,
            name="sqlite",
        )
    )


def with_conveyor(path: Path, db: Path) -> tuple[int, list[str]]:
    """Run the pipeline; return the rows loaded and the reasons rows were rejected."""
    result = pipeline(path, db).run()
    loaded = sum(s.items_out for s in result.stats if s.name == "validate")
    return loaded, [str(f.error) for f in result.failures]


# --8<-- [end:pipeline]


# --------------------------------------------------------------------- plain Python


# --8<-- [start:plain]
def plain_python(path: Path, db: Path) -> tuple[int, list[str]]:
    """The same load as one loop: validate, collect a batch, insert it."""
    conn = connect(db)
    loaded, rejected, batch = 0, [], []
    try:
        for line in read_lines(path):
            try:
                batch.append(validate(line))
            except ValueError as error:
                rejected.append(str(error))
                continue
            if len(batch) == BATCH:
                insert(conn, batch)
                loaded, batch = loaded + len(batch), []
        if batch:
            insert(conn, batch)
            loaded += len(batch)
    finally:
        conn.close()
    return loaded, rejected


# --8<-- [end:plain]


# --------------------------------------------------------------------- sample data


def make_csv(path: Path, rows: int, seed: int = 1) -> int:
    """Write ``rows`` orders, about 2% of them malformed; return how many are malformed."""
    rng = random.Random(seed)
    breakers = [
        lambda r: [*r[:4]],  # a field missing
        lambda r: [r[0], r[1], "not-an-email", r[3], r[4]],
        lambda r: [r[0], r[1], r[2], "12,50", r[4]],
        lambda r: [r[0], r[1], r[2], r[3], "2026-13-01"],
        lambda r: ["x" + r[0], *r[1:]],
    ]
    malformed = 0
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for i in range(1, rows + 1):
            row = [
                str(i),
                f"customer {rng.randrange(1000)}",
                f"c{rng.randrange(1000)}@example.com",
                f"{rng.randrange(100_000) / 100:.2f}",
                (dt.date(2026, 1, 1) + dt.timedelta(days=rng.randrange(365))).isoformat(),
            ]
            if rng.random() < 0.02:
                row = rng.choice(breakers)(row)
                malformed += 1
            out.writerow(row)
    return malformed


def fresh(load: Callable[[Path, Path], object], path: Path, db: Path) -> object:
    """``load`` into an empty database."""
    db.unlink(missing_ok=True)
    return load(path, db)


def count_rows(db: Path) -> int:
    """How many orders the database holds."""
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM orders").fetchone()[0])
    finally:
        conn.close()


def main() -> int:
    """Parse the command line, load the CSV (or a generated one), print what happened."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", nargs="?", type=Path, help="the CSV (default: a generated one)")
    parser.add_argument("--db", type=new_file, help="the SQLite file (default: in a temp folder)")
    parser.add_argument(
        "--rows", type=positive_int, default=10_000, help="rows of the generated CSV"
    )
    parser.add_argument("--compare", action="store_true", help="time it against the plain loop")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds of --compare")
    args = parser.parse_args()
    if args.csv is not None and not args.csv.is_file():
        parser.error(f"{args.csv}: no such file")
    if args.csv is not None:
        with args.csv.open(newline="") as f:  # the source would fail on it, after start-up
            header = next(csv.reader(f), None)
        if header is None or tuple(header) != COLUMNS:
            parser.error(f"{args.csv}: the header must be {','.join(COLUMNS)}; got {header}")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.csv
        if path is None:
            path = Path(tmp, "orders.csv")
            bad = make_csv(path, args.rows)
            print(f"generated {path.name}: {args.rows} rows, {bad} of them malformed")
        db = args.db or Path(tmp, "orders.db")
        loaded, rejected = with_conveyor(path, db)
        print(f"loaded {loaded} orders into {db.name} ({count_rows(db)} rows in the table)")
        print(f"skipped {len(rejected)} malformed rows", *rejected[:3], sep="\n  ")
        if args.db is None:
            print(f"({db.name} was in a temporary folder, now deleted: --db PATH keeps it)")
        if args.compare:
            from _compare import compare, print_comparison

            times = compare(
                {
                    "conveyor": functools.partial(fresh, with_conveyor, path, db),
                    "plain Python": functools.partial(fresh, plain_python, path, db),
                },
                rounds=args.rounds,
            )
            code = {
                "conveyor": [open_writer, write, pipeline, with_conveyor],
                "plain Python": [plain_python],
            }
            print_comparison(times, code, f"{path.name} -> SQLite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
