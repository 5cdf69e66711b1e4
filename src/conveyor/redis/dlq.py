"""Dead letters: list them, replay them into their stage, or purge them.

An entry lands in its stage's dead-letter stream (``dlq<i>``) when it was
delivered more than the run's ``max_deliveries`` times without being handed
on (its stage kept raising, or the workers holding it kept dying), or when
it could not be decoded at all (a forged or unsigned pickle entry: never
unpickled). A dead letter keeps the entry's fields, its original id
(``src``), how often it was delivered (``n``) and its last error (``err``).

- replay: the entry goes back to the end of its stage's stream, with a fresh
  delivery budget; the run then finishes normally.
- purge: the entry is dropped and counted as handled (``purged``), so the
  run can finish without it; in an ordered run its place is marked done.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigurationError
from .codec import Codec
from .state import RunInfo
from .streams import Scripts, tombstone_counter

__all__ = ["DeadLetter", "is_json", "list_dead", "move_dead", "present_ids"]


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter, as ``conveyor dlq list`` shows it."""

    run_id: str
    """The run it belongs to."""
    stage: str
    """The stage it failed in."""
    entry_id: str
    """Its id in the dead-letter stream (what ``--id`` takes)."""
    source_id: str
    """Its id in the stage's stream when it failed."""
    deliveries: int
    """How many times it was delivered."""
    error: str
    """The last error (a traceback), or why it was refused."""
    item: Any
    """The item, decoded (None when it cannot be: see ``item_error``)."""
    item_error: str | None = None
    """Why the item could not be decoded (e.g. a bad signature), if it could not."""

    def as_json(self) -> dict[str, Any]:
        """The dead letter as ``conveyor dlq list --json`` prints it: every field, the
        item as itself when JSON carries it unchanged, else its ``repr``, and
        ``item_format`` saying which: ``"json"``, ``"repr"``, or ``"none"`` when it
        could not be decoded (``item`` null, ``item_error`` says why)."""
        data = asdict(self)
        if self.item_error is not None:
            data["item"], data["item_format"] = None, "none"
        elif is_json(self.item):
            data["item_format"] = "json"
        else:
            data["item"], data["item_format"] = repr(self.item), "repr"
        return data


def is_json(value: Any) -> bool:
    """Whether JSON carries ``value`` unchanged: None, bools, ints, finite floats,
    strings, lists of them and dicts with string keys (not bytes, tuples, sets)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_json(v) for k, v in value.items())
    return False


def _stage_indexes(info: RunInfo, stage: str | None) -> list[int]:
    if stage is None:
        return list(range(len(info.stages)))
    if stage not in info.stages:
        known = ", ".join(map(repr, info.stages))
        raise ConfigurationError(f"no stage named {stage!r}; stages: {known}")
    return [info.stages.index(stage)]


def list_dead(
    client: Any, info: RunInfo, codec: Codec | None, stage: str | None = None, count: int = 1000
) -> list[DeadLetter]:
    """The dead letters of a run (of one stage, with ``stage``), oldest first.

    Items are decoded with ``codec`` (a pickle entry only when its signature
    is valid); with no codec, or when decoding fails, ``item`` is None.
    """
    letters = []
    for i in _stage_indexes(info, stage):
        for entry_id, fields in client.xrange(info.keys.dead(i), "-", "+", count=count):
            item, item_error = None, None
            if codec is None:
                item_error = "no codec to decode it"
            else:
                try:
                    item = codec.decode(fields)
                except Exception as exc:
                    item_error = f"{type(exc).__name__}: {exc}"
            letters.append(
                DeadLetter(
                    run_id=info.run_id,
                    stage=info.stages[i],
                    entry_id=entry_id.decode(),
                    source_id=fields.get(b"src", b"").decode(),
                    deliveries=int(fields.get(b"n", b"0")),
                    error=fields.get(b"err", b"").decode(errors="replace"),
                    item=item,
                    item_error=item_error,
                )
            )
    return letters


def move_dead(
    client: Any,
    info: RunInfo,
    mode: str,
    stage: str | None = None,
    ids: list[str] | None = None,
) -> int:
    """Replay (``mode="replay"``) or purge (``"purge"``) dead letters; return how many.

    Args:
        client: a redis-py client.
        info: the run.
        mode: ``"replay"`` or ``"purge"``.
        stage: only this stage's dead letters.
        ids: only these dead-letter ids (default: all of them).
    """
    if mode not in ("replay", "purge"):
        raise ConfigurationError(f"mode must be 'replay' or 'purge'; got {mode!r}")
    script = Scripts(client).dead
    keys = info.keys
    moved = 0
    for i in _stage_indexes(info, stage):
        dead = keys.dead(i)
        chosen = ids if ids is not None else [e[0] for e in client.xrange(dead, "-", "+")]
        to = info.tombstone_stream(i)
        tomb = tombstone_counter(to, len(info.stages))
        for start in range(0, len(chosen), 500):
            moved += script(
                keys=[dead, keys.stream(i), keys.counters, keys.stream(to)],
                args=[i, mode, tomb, *chosen[start : start + 500]],
            )
    return moved


def present_ids(client: Any, info: RunInfo, ids: list[str], stage: str | None = None) -> set[str]:
    """Which of ``ids`` are dead letters of the run (of one stage, with ``stage``):
    so that a mistyped ``--id`` is refused before anything moves."""
    found: set[str] = set()
    for i in _stage_indexes(info, stage):
        dead = info.keys.dead(i)
        found.update(entry_id for entry_id in ids if client.xrange(dead, entry_id, entry_id))
    return found
