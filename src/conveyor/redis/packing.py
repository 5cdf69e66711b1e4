"""Packed stream entries: several small items carried by one entry.

Every stream entry costs Redis the same work whatever it holds (an XADD, a
share of a read, an acknowledgement) and costs the Python clients a round of
dict building and script arguments; with small items that per-entry work is
most of a run's cost. So items whose encoding is small travel packed::

    entry fields:  p  msgpack [[data, path], ...]   data: the codec's bytes of one
                                                    item (nil: a tombstone), path:
                                                    its sequence path
                   s  HMAC of p                     (the pickle codec only)

One signature covers the whole pack, checked before any item is unpickled.
Each item keeps its own identity (its path) and its own fate: an item that
cannot be decoded, or whose stage raised, leaves the pack alone (to the dead
letters, or back to the stage's input as an entry of its own, see
`streams.HANDOFF`'s ``P`` records), and a packed entry delivered a second
time (its worker died or was too slow) is split into one entry per item, so
that an item that kills its workers ends in the dead letters alone.

A lone item, a large one (over `PACKED_ITEM_MAX` bytes encoded) and every
item of a run without sequence paths travel as before: one entry each, with
fields ``d``, ``s``, ``q`` (`codec.Codec.encode`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .codec import Codec, dump_path
from .state import RunInfo

__all__ = [
    "PACKED_ITEM_MAX",
    "PACK_BYTES",
    "PACK_ITEMS",
    "Packed",
    "PackedItem",
    "is_packed",
    "pack_entries",
    "single_fields",
    "stream_limit",
    "stream_pack",
    "unpack",
]

PACK_ITEMS = 64
"""Most items one packed entry carries."""
PACK_BYTES = 32 * 1024
"""Most bytes of encoded items one packed entry carries."""
PACKED_ITEM_MAX = 4096
"""An item encoded larger than this travels in an entry of its own."""

PackedItem = tuple[bytes | None, list[int]]
"""One item of a pack: its encoded bytes (None: a tombstone) and its sequence path."""


def stream_pack(info: RunInfo, stream: int) -> int:
    """Most items per entry of ``stream`` (its limit's sixteenth, at most `PACK_ITEMS`).

    1 (no packs) for a batch stage's input (it takes entries one by one in
    source order), and in runs without sequence paths (long-lived ones) or
    made by an older version (without ``tombstones_to``).
    """
    n = len(info.stages)
    if not info.paths or not info.tombstones_to or (stream < n and stream in info.tombstones_to):
        return 1
    return max(1, min(PACK_ITEMS, info.limits[stream] // 16))


def stream_limit(info: RunInfo, stream: int, per_entry: int) -> int:
    """``stream``'s limit in entries, for a producer whose entries carry ``per_entry``
    items on average (in its last addition).

    A stream's backlog is measured in entries (its group's lag and pending
    entries, which Redis keeps) and its limit is in items: it holds
    ``limit // per_entry`` entries. While the packs stay alike that is its
    limit in items; when they change size (a stage that slowed down, a
    filter) it can be off by the ratio of the sizes, never by more than
    `PACK_ITEMS` times, so memory stays bounded.
    """
    return max(1, info.limits[stream] // per_entry)


def is_packed(fields: dict[bytes, bytes]) -> bool:
    """Whether an entry is a pack (field ``p``)."""
    return b"p" in fields


def single_fields(codec: Codec, item: PackedItem) -> list[bytes]:
    """One item as the fields of an entry of its own (signed again with pickle)."""
    data, path = item
    if data is None:
        return [b"q", dump_path(path), b"t", b"1"]
    signature = codec.sign(data)
    fields = [b"d", data] if signature is None else [b"d", data, b"s", signature]
    return [*fields, b"q", dump_path(path)]


class Packed(NamedTuple):
    """One stream entry made by `pack_entries`."""

    items: int
    """Items it carries, tombstones included."""
    tombstones: int
    """Tombstones among them."""
    fields: list[bytes]
    """Its fields."""


def pack_entries(codec: Codec, items: list[PackedItem], most: int) -> list[Packed]:
    """``items`` as stream entries: runs of small items packed by up to ``most`` (and
    `PACK_BYTES`), large or lone items on their own."""
    import msgpack

    out: list[Packed] = []
    run: list[PackedItem] = []
    size = gaps = 0

    def flush() -> None:
        nonlocal size, gaps
        if len(run) == 1:
            out.append(Packed(1, gaps, single_fields(codec, run[0])))
        elif run:
            body: bytes = msgpack.packb(run, use_bin_type=True)
            signature = codec.sign(body)
            fields = [b"p", body] if signature is None else [b"p", body, b"s", signature]
            out.append(Packed(len(run), gaps, fields))
        run.clear()
        size = gaps = 0

    for item in items:
        n = 0 if item[0] is None else len(item[0])
        if n > PACKED_ITEM_MAX or most <= 1:
            flush()  # the items keep their order
            out.append(Packed(1, int(item[0] is None), single_fields(codec, item)))
            continue
        if len(run) >= most or size + n > PACK_BYTES:
            flush()
        run.append(item)
        size += n + 8
        gaps += item[0] is None
    flush()
    return out


def unpack(codec: Codec, fields: dict[bytes, bytes]) -> list[PackedItem]:
    """The items of a packed entry, its signature checked first.

    Raises:
        PayloadRejected: a missing or wrong signature (pickle).
        ValueError: the entry is not a pack this version makes.
    """
    import msgpack

    body = fields[b"p"]
    codec.verify(body, fields.get(b"s"))
    items: Any = msgpack.unpackb(body, raw=False, use_list=True)
    if type(items) is not list or not _are_items(items):
        raise ValueError("not a pack of [data, path] items")
    return [(data, path) for data, path in items]


def _are_items(items: list[Any]) -> bool:
    """Whether every element is ``[bytes or None, non-empty list of ints]`` (a loop
    written out: it runs for every item a driver or a worker reads)."""
    for x in items:
        if type(x) is not list or len(x) != 2:
            return False
        data, path = x
        if data is not None and type(data) is not bytes:
            return False
        if type(path) is not list or not path:
            return False
        if len(path) == 1:
            if type(path[0]) is not int:
                return False
        elif not all(type(p) is int for p in path):
            return False
    return True
