"""Sequence paths, and the driver's reorder buffer for ordered runs.

Each source item gets a path ``[r]`` (its index). A stage that turns an
entry into exactly one output passes the path on unchanged; into ``k > 1``
outputs, output ``j`` gets the path extended by ``[j, k]``; into none, the
stage sends a *tombstone* with the path to the final stream, so the driver
knows that part of the tree is finished. Root ``r`` is complete when the
weights ``1 / (k1 * k2 * ...)`` of the leaves received for it add up to 1;
complete roots are released in order, their leaves sorted by path.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

__all__ = ["TOMBSTONE", "Reorderer", "child_path", "dump_path", "load_path"]

TOMBSTONE: Any = object()
"""The value of a leaf that carries no output."""
_ZERO = Fraction(0)
_ONE = Fraction(1)
_NO_PATH: list[int] = []


def dump_path(path: list[int]) -> bytes:
    """A path as the bytes of field ``q``."""
    import msgpack

    data: bytes = msgpack.packb(path)
    return data


def load_path(data: bytes) -> list[int]:
    """A path back from field ``q``."""
    import msgpack

    path: list[int] = msgpack.unpackb(data)
    return path


def child_path(parent: bytes, j: int, k: int) -> bytes:
    """The path of output ``j`` of ``k`` (k > 1) produced from the entry at ``parent``."""
    return dump_path([*load_path(parent), j, k])


class Reorderer:
    """Holds received leaves until their root is complete, and releases roots in order.

    The caller bounds how many roots are open at once (the driver's feeder
    waits while ``fed - next_root`` reaches its window).
    """

    def __init__(self, next_root: int = 0) -> None:
        self.next_root = next_root
        self._leaves: dict[int, list[tuple[list[int], Any, bytes]]] = {}
        self._cover: dict[int, Fraction] = {}
        self._held: set[bytes] = set()

    def add(self, path: list[int], value: Any, entry_id: bytes) -> None:
        """Keep a leaf (an output, or TOMBSTONE) received as entry ``entry_id``.

        An entry received again (read once more after a connection loss) is ignored.
        """
        if entry_id in self._held:
            return
        self._held.add(entry_id)
        root = path[0]
        if len(path) == 1:
            # The whole root in one leaf (no fan-out on its way): the common case.
            self._cover[root] = _ONE
            self._leaves[root] = [(_NO_PATH, value, entry_id)]
            return
        weight = 1
        for k in path[2::2]:
            weight *= k
        self._cover[root] = self._cover.get(root, _ZERO) + Fraction(1, weight)
        self._leaves.setdefault(root, []).append((path[1:], value, entry_id))

    def release(self) -> tuple[list[Any], list[bytes]]:
        """The outputs of every complete root in order from ``next_root``, and their entry ids."""
        values: list[Any] = []
        ids: list[bytes] = []
        while self._cover.get(self.next_root) == 1:
            leaves = self._leaves.pop(self.next_root)
            del self._cover[self.next_root]
            if len(leaves) > 1:
                leaves.sort(key=lambda leaf: leaf[0])
            for _, value, entry_id in leaves:
                if value is not TOMBSTONE:
                    values.append(value)
                ids.append(entry_id)
                self._held.discard(entry_id)
            self.next_root += 1
        return values, ids

    def __len__(self) -> int:
        """Leaves held."""
        return sum(len(v) for v in self._leaves.values())
