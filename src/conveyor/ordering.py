"""Ordering by sequence path: which source items are through, and their order.

Each source item gets a path ``[r]`` (its index). A stage that turns an item
into exactly one output passes the path on unchanged; into ``k > 1`` outputs,
output ``j`` gets the path extended by ``[j, k]``; into none, it sends a
*tombstone* with the path, so that the place is known to stay empty. Root
``r`` is complete when the weights ``1 / (k1 * k2 * ...)`` of the leaves
received for it add up to 1; complete roots are released in order, their
leaves sorted by path.

Completion is decided by these identities, not by counting: a run is through
when every root it fed is complete, and a leaf it did not make (a root already
complete, a weight beyond 1, a path of a root never fed) is refused rather
than released.

Nothing here knows where leaves come from. The Redis backend uses a `Tracker`
in its driver (the final stream) and in a batch stage's port (which restores
source order before making groups); ``conveyor.redis.codec`` carries paths
in the entries. Within one machine, ordered stages keep order by tickets
instead (``runtime.ports.Sequencer``): their input arrives in order already.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, NamedTuple

__all__ = ["TOMBSTONE", "Leaf", "Released", "Tracker"]

TOMBSTONE: Any = object()
"""The value of a leaf that carries no output."""
_ZERO = Fraction(0)
_ONE = Fraction(1)


class Leaf(NamedTuple):
    """A received output or tombstone: its path, its value (or TOMBSTONE), and the
    id of what carried it (a stream entry's, for Redis)."""

    path: list[int]
    value: Any
    entry_id: bytes


class Released(NamedTuple):
    """What `Tracker.release` hands over."""

    values: list[Any]
    """Outputs for the caller (in source order for an ordered run)."""
    ids: list[bytes]
    """Ids of the leaves done with: to acknowledge once the caller has the values."""
    completed: list[int]
    """Roots completed since the last release (unordered runs persist them)."""
    refused: list[Leaf]
    """Leaves the run did not make: to dead-letter (and acknowledge)."""


class Tracker:
    """Which roots are complete; for an ordered run, also the reorder buffer.

    Ordered: leaves are held until their root is complete, and complete roots
    are released in order from ``next_root``. Unordered: every leaf's value
    is released at once, and completed roots are remembered in a bitmap
    (persisted by the driver, so that a resumed driver knows them). The
    caller bounds how many roots are open at once (ordered: the driver's
    feeder waits while ``fed - next_root`` reaches its window).
    """

    def __init__(self, ordered: bool, next_root: int = 0, done: bytes = b"") -> None:
        self.ordered = ordered
        self.next_root = next_root
        """Ordered: every root below it is released."""
        self._done = bytearray(done)  # unordered: bit r set when root r is complete
        self.completed = next_root + sum(bin(b).count("1") for b in done)
        """Roots complete (and released) so far."""
        self._leaves: dict[int, list[Leaf]] = {}
        self._cover: dict[int, Fraction] = {}
        self._seen: dict[int, set[tuple[int, ...]]] = {}  # leaf paths of the open roots
        self._held: set[bytes] = set()
        self._out: list[Any] = []
        self._ids: list[bytes] = []
        self._new: list[int] = []
        self._refused: list[Leaf] = []
        self.values_held = 0
        """Ordered: leaves with a value held for a root not released yet."""

    def resume_after(self, path: list[int]) -> None:
        """Start an ordered tracker just past ``path``: every leaf up to it in source
        order was handed on already (a batch stage resuming at its persisted cursor),
        so its root is complete once the leaves after it arrive."""
        root, cover = path[0], _consumed(path)
        if cover >= 1:
            self.next_root = root + 1
        else:
            self.next_root = root
            self._cover[root] = cover

    def add(self, leaf: Leaf) -> None:
        """Take a received leaf.

        A leaf received again with the same id (read once more after a
        connection loss) is ignored; a leaf the run did not make is kept aside
        as refused.
        """
        if leaf.entry_id in self._held:
            return
        self._held.add(leaf.entry_id)
        path = leaf.path
        if len(path) == 1 and path[0] not in self._cover:
            self._add_whole(leaf, path[0])
            return
        root = path[0] if path else -1
        weight = _weight(path)
        cover = self._cover.get(root, _ZERO) + weight
        seen = self._seen.get(root)
        place = tuple(leaf.path)
        if (
            root < 0
            or weight == 0
            or cover > 1
            or self._is_done(root)
            or (seen is not None and place in seen)  # a copy of a leaf of an open root
        ):
            self._refused.append(leaf)
            return
        if cover < 1:
            self._seen.setdefault(root, set()).add(place)
        else:
            self._seen.pop(root, None)
        if self.ordered:
            self._leaves.setdefault(root, []).append(leaf)
            self.values_held += leaf.value is not TOMBSTONE
        else:
            if leaf.value is not TOMBSTONE:
                self._out.append(leaf.value)
            self._ids.append(leaf.entry_id)
        if cover == 1:
            self._cover.pop(root, None)
            if not self.ordered:
                self._mark_done(root)
        else:
            self._cover[root] = cover

    def _add_whole(self, leaf: Leaf, root: int) -> None:
        """A leaf that is its root's only one (no fan-out on its way): the common case,
        without fractions."""
        if root < 0 or self._is_done(root):
            self._refused.append(leaf)
        elif self.ordered:
            self._leaves[root] = [leaf]
            self.values_held += leaf.value is not TOMBSTONE
        else:
            if leaf.value is not TOMBSTONE:
                self._out.append(leaf.value)
            self._ids.append(leaf.entry_id)
            self._mark_done(root)

    def release(self) -> Released:
        """Everything ready since the last call (see `Released`)."""
        if self.ordered:
            while self.next_root in self._leaves and self.next_root not in self._cover:
                leaves = self._leaves.pop(self.next_root)
                if len(leaves) > 1:
                    leaves.sort(key=lambda leaf: leaf.path)
                for leaf in leaves:
                    if leaf.value is not TOMBSTONE:
                        self._out.append(leaf.value)
                        self.values_held -= 1
                    self._ids.append(leaf.entry_id)
                self.next_root += 1
                self.completed += 1
        released = Released(self._out, self._ids, self._new, self._refused)
        self._out, self._ids, self._new, self._refused = [], [], [], []
        return released

    def acknowledged(self, ids: list[bytes]) -> None:
        """Forget the ids of leaves that cannot be received again (acknowledged in Redis).
        Until then, a leaf received again is recognised by its id and ignored."""
        self._held.difference_update(ids)

    def _is_done(self, root: int) -> bool:
        if self.ordered:
            # Released, or complete and waiting for an earlier root.
            return root < self.next_root or (root in self._leaves and root not in self._cover)
        byte = root >> 3
        return byte < len(self._done) and bool(self._done[byte] >> (7 - (root & 7)) & 1)

    def _mark_done(self, root: int) -> None:
        byte = root >> 3
        if byte >= len(self._done):
            self._done.extend(bytes(byte + 1 - len(self._done)))
        # Redis's bit order (SETBIT, GET), so the driver can persist the bitmap as it is:
        # bit 0 is the most significant of byte 0.
        self._done[byte] |= 1 << (7 - (root & 7))
        self.completed += 1
        self._new.append(root)

    def done_bytes(self, roots: list[int]) -> tuple[int, bytes]:
        """Unordered: the bitmap's bytes that hold ``roots`` (from the first one's to the
        last one's, Redis's bit order), and the offset of the first: to persist them."""
        first, last = min(roots) >> 3, max(roots) >> 3
        return first, bytes(self._done[first : last + 1])

    def __len__(self) -> int:
        """Leaves held (ordered runs)."""
        return sum(len(v) for v in self._leaves.values())


def _consumed(path: list[int]) -> Fraction:
    """The share of its root covered by every leaf up to ``path`` in source order: at
    each fan-out level, the siblings before it (whole), then the leaf itself."""
    cover, scale = _ZERO, 1
    for j, k in zip(path[1::2], path[2::2], strict=True):
        cover += Fraction(j, scale * k)
        scale *= k
    return cover + Fraction(1, scale)


def _weight(path: list[int]) -> Fraction:
    """The share of its root that a leaf at ``path`` covers (0 for a malformed path)."""
    if len(path) == 1:
        return _ONE
    if len(path) % 2 == 0:
        return _ZERO
    weight = 1
    for j, k in zip(path[1::2], path[2::2], strict=True):
        if not 0 <= j < k:
            return _ZERO
        weight *= k
    return Fraction(1, weight)
