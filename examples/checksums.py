"""Hash every file under a directory with several workers; print ``sha256  path`` in order.

    python examples/checksums.py [DIRECTORY] [--workers N]

The walk is the source (pulled lazily: a huge tree is never listed whole in
memory), hashing is a thread stage (hashlib releases the GIL on large
buffers), and `ordered=True` (the default) keeps the walk's order, so the
output is the same from run to run, like ``sha256sum``'s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import conveyor as cv

CHUNK = 1 << 20


def walk(root: Path) -> Iterator[Path]:
    """Every regular file below ``root``, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def sha256(path: Path) -> tuple[str, Path]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest(), path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", nargs="?", default=str(Path(__file__).parent.parent / "src"))
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    pipeline = cv.Pipeline(walk(Path(args.directory))).map(
        sha256, workers=args.workers, name="sha256"
    )
    try:
        for digest, path in pipeline:
            print(f"{digest}  {path}")
    except BrokenPipeError:  # `| head`: the reader left; breaking the loop stopped the run
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
