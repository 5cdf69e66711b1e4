"""Hash every file under a directory on several workers; print ``sha256  path`` in order.

    python examples/checksums.py [DIRECTORY] [--workers N] [--runtime thread|process|interpreter]
    python examples/checksums.py --compare [--files N --size MIB]   # against a loop and Pool.imap

The walk is the source (pulled lazily: a huge tree is never listed whole in
memory); hashing is a stage of ``--workers`` workers on ``--runtime``
(processes by default: each worker reads and hashes its files, only paths and
digests cross between processes; ``interpreter``, on Python 3.14+, runs them
in subinterpreters of this process). ``ordered=True`` (the default) keeps the
walk's order, so the output is the same from run to run, like ``sha256sum``'s.
The output is ``sha256sum -c`` compatible.

``--compare`` generates ``--files`` files of ``--size`` MiB (unless a
directory is given) and times the pipeline against a plain loop and
`multiprocessing.Pool.imap`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from _compare import positive_int  # examples/, next to this file

import conveyor as cv

CHUNK = 1 << 20


def walk(root: Path) -> Iterator[Path]:
    """Every regular file below ``root`` (or ``root`` itself, a file), in a stable order."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


ALGORITHMS = sorted(a for a in hashlib.algorithms_available if not a.startswith("shake"))
"""hashlib's algorithms of a fixed digest size: SHAKE's need a length to `hexdigest()`."""


def check_algorithm(algorithm: str) -> str:
    """``algorithm`` if it is one of `ALGORITHMS`; a ValueError saying why not otherwise."""
    if algorithm.lower().startswith("shake"):
        raise ValueError(
            f"{algorithm!r} is a SHAKE algorithm, whose digest has no fixed length: "
            f"choose one of {', '.join(ALGORITHMS)}"
        )
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    return algorithm


def algorithm_option(text: str) -> str:
    """``--algorithm``: `check_algorithm`, its refusal a usage error (exit 2)."""
    try:
        return check_algorithm(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def sha256(path: Path, algorithm: str = "sha256") -> tuple[str, Path]:
    """The file's digest (SHA-256 unless another of `ALGORITHMS` is named) and path."""
    digest = hashlib.new(check_algorithm(algorithm))
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest(), path


# --8<-- [start:conveyor]
def with_conveyor(
    root: Path, workers: int, runtime: str = "process", algorithm: str = "sha256"
) -> list[tuple[str, Path]]:
    """The digests of every file, hashed by a pipeline stage."""
    hash_file = functools.partial(sha256, algorithm=check_algorithm(algorithm))
    pipeline = cv.Pipeline(walk(root)).map(hash_file, workers=workers, runtime=runtime)  # type: ignore[call-overload]
    return list(pipeline)


# --8<-- [end:conveyor]


# --8<-- [start:plain]
def plain_loop(root: Path, algorithm: str = "sha256") -> list[tuple[str, Path]]:
    """The digests of every file, one after the other."""
    return [sha256(path, algorithm) for path in walk(root)]


def with_pool(root: Path, workers: int, algorithm: str = "sha256") -> list[tuple[str, Path]]:
    """The digests of every file, hashed by a `multiprocessing.Pool`."""
    hash_file = functools.partial(sha256, algorithm=algorithm)
    with multiprocessing.Pool(workers) as pool:
        return list(pool.imap(hash_file, walk(root), chunksize=4))


# --8<-- [end:plain]


def make_files(root: Path, files: int, size_mib: int) -> None:
    """``files`` files of random bytes, ``size_mib`` MiB each, in two folders."""
    for i in range(files):
        folder = root / f"part-{i % 2}"
        folder.mkdir(exist_ok=True)
        (folder / f"file-{i:04d}.bin").write_bytes(os.urandom(size_mib << 20))


def main() -> int:
    """Parse the command line, hash, print the digests (or the comparison)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", nargs="?", type=Path, help="default: conveyor's source")
    parser.add_argument("--workers", type=positive_int, default=2)
    parser.add_argument("--runtime", default="process", help="thread, process or interpreter")
    parser.add_argument(
        "--algorithm",
        default="sha256",
        type=algorithm_option,
        metavar="{" + ",".join(ALGORITHMS) + "}",
        help="a hashlib algorithm of a fixed digest size (not SHAKE)",
    )
    parser.add_argument("--compare", action="store_true", help="time it against a loop and a Pool")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds of --compare")
    parser.add_argument(
        "--files", type=positive_int, default=64, help="files generated for --compare"
    )
    parser.add_argument("--size", type=positive_int, default=4, help="MiB per generated file")
    args = parser.parse_args()
    if not args.compare:
        root = args.directory or Path(__file__).resolve().parent.parent / "src"
        if not root.exists():  # os.walk would find nothing and say nothing
            parser.error(f"{root}: no such file or directory")
        try:
            for digest, path in with_conveyor(root, args.workers, args.runtime, args.algorithm):
                print(f"{digest}  {path}")
        except BrokenPipeError:  # `| head`: the reader left
            sys.stderr.close()
        except cv.ConfigurationError as error:  # e.g. runtime="interpreter" before Python 3.14
            parser.error(str(error))
        return 0
    from _compare import compare, print_comparison

    with tempfile.TemporaryDirectory() as tmp:
        root = args.directory or Path(tmp)
        if args.directory is None:
            make_files(root, args.files, args.size)
        algorithm = args.algorithm
        expected = plain_loop(root, algorithm)
        candidates = {
            f"conveyor {args.runtime}": lambda: with_conveyor(
                root, args.workers, args.runtime, algorithm
            ),
            "plain loop": lambda: plain_loop(root, algorithm),
            "Pool.imap": lambda: with_pool(root, args.workers, algorithm),
        }
        for name, run in candidates.items():
            assert run() == expected, f"{name} hashed differently"
        times = compare(candidates, rounds=args.rounds)
        code = {
            f"conveyor {args.runtime}": [with_conveyor],
            "plain loop": [plain_loop],
            "Pool.imap": [with_pool],
        }
        print_comparison(
            times, code, f"{algorithm} of {len(expected)} files, {args.workers} workers"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
