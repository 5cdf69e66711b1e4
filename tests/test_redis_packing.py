"""Packed stream entries: small items travel several to an entry, each keeping its own fate."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

import conveyor as cv
from conveyor.errors import PayloadRejected
from conveyor.redis import DeadLettersError, RedisBackend
from conveyor.redis.codec import get_codec, load_path
from conveyor.redis.packing import (
    PACK_BYTES,
    PACKED_ITEM_MAX,
    PackedItem,
    pack_entries,
    unpack,
)
from conveyor.redis.streams import Keys, pipeline_id
from redis_helpers import new_namespace

if TYPE_CHECKING:
    from conftest import RedisServer

SECRET = b"the packing tests' secret key..."
POISONED = 2500
"""The item that fails, far enough in the source that it travels in a pack."""
N_POISONED = 3000
"""Items of the runs with a poisoned item."""


def _fields(made: list[bytes]) -> dict[bytes, bytes]:
    return {made[i]: made[i + 1] for i in range(0, len(made), 2)}


def _items_of(codec: Any, fields: dict[bytes, bytes]) -> list[PackedItem]:
    """The items an entry carries, pack or not."""
    if b"p" in fields:
        return unpack(codec, fields)
    return [(fields.get(b"d"), load_path(fields[b"q"]))]


# ---------------------------------------------------------------------- the format


def test_small_items_are_packed_and_a_large_one_travels_alone_in_its_place() -> None:
    codec = get_codec("msgpack")
    values = [1, "x" * (PACKED_ITEM_MAX + 1), 2, 3]
    items: list[PackedItem] = [(codec.dumps(v), [i]) for i, v in enumerate(values)]
    made = pack_entries(codec, items, most=64)
    assert [(m.items, b"p" in _fields(m.fields)) for m in made] == [
        (1, False),
        (1, False),
        (2, True),
    ]
    assert [x for m in made for x in _items_of(codec, _fields(m.fields))] == items


def test_a_pack_counts_its_tombstones() -> None:
    codec = get_codec("msgpack")
    items: list[PackedItem] = [(codec.dumps(0), [0]), (None, [1]), (None, [2])]
    [made] = pack_entries(codec, items, most=64)
    assert (made.items, made.tombstones) == (3, 2)
    assert unpack(codec, _fields(made.fields)) == items


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 2 * PACKED_ITEM_MAX), max_size=300),
    most=st.integers(1, 80),
    gaps=st.sets(st.integers(0, 299)),
)
def test_packing_keeps_every_item_in_order_within_the_bounds(
    sizes: list[int], most: int, gaps: set[int]
) -> None:
    codec = get_codec("pickle", SECRET)
    items: list[PackedItem] = [
        (None if i in gaps else b"z" * n, [i, 0, 1]) for i, n in enumerate(sizes)
    ]
    made = pack_entries(codec, items, most)
    back = []
    for entry in made:
        fields = _fields(entry.fields)
        carried = _items_of(codec, fields)
        back += carried
        assert entry.items == len(carried) <= most
        assert entry.tombstones == sum(1 for data, _ in carried if data is None)
        if b"p" in fields:
            assert len(carried) >= 2
            assert sum(len(d) for d, _ in carried if d is not None) <= PACK_BYTES
            assert all(d is None or len(d) <= PACKED_ITEM_MAX for d, _ in carried)
    assert back == items


def test_a_pack_whose_signature_is_wrong_or_missing_is_refused_before_unpickling() -> None:
    codec = get_codec("pickle", SECRET)
    items: list[PackedItem] = [(codec.dumps(x), [x]) for x in range(3)]
    [made] = pack_entries(codec, items, most=64)
    fields = _fields(made.fields)
    assert unpack(codec, fields) == items
    tampered = msgpack.packb([[codec.dumps("other"), [0]]], use_bin_type=True)
    with pytest.raises(PayloadRejected):
        unpack(codec, {**fields, b"p": tampered})
    with pytest.raises(PayloadRejected):
        unpack(codec, {b"p": fields[b"p"]})


def test_a_pack_that_is_not_a_list_of_items_is_refused() -> None:
    codec = get_codec("msgpack")
    with pytest.raises(ValueError, match="not a pack"):
        unpack(codec, {b"p": msgpack.packb([[b"x", "not a path"]])})


# ---------------------------------------------------------------------- through Redis


def _xadd_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_xadd", {}).get("calls", 0))


def _value(i: int) -> Any:
    return "y" * (PACKED_ITEM_MAX + 10) if i % 7 == 0 else i


def _shape(x: Any) -> Any:
    return len(x) if isinstance(x, str) else x * 2


@pytest.mark.redis
@pytest.mark.parametrize("ordered", [False, True])
def test_items_of_mixed_sizes_reach_the_caller_through_packs(
    redis_server: RedisServer, ordered: bool
) -> None:
    n = 8000
    pipeline = (
        cv.Pipeline(_value(i) for i in range(n))
        .map(_shape, workers=2, ordered=ordered)
        .filter(lambda x: x % 3 != 0, ordered=ordered)
    )
    expected = [y for y in (_shape(_value(i)) for i in range(n)) if y % 3 != 0]
    backend = RedisBackend(
        redis_server.url,
        namespace=new_namespace(),
        local_workers=True,
        codec="pickle",
        secret_key=SECRET,
    )
    with redis.Redis.from_url(redis_server.url) as client:
        before = _xadd_calls(client)
        result = pipeline.run(collect=True, backend=backend)
        added = _xadd_calls(client) - before
    if ordered:
        assert result.outputs == expected
    else:
        assert Counter(result.outputs) == Counter(expected)
    assert [s.items_in for s in result.stats] == [n, n]
    # Without packs, an entry per item in each stream. With them, the large items
    # still travel alone, and so do the first ones (until the stages' batch sizes
    # are known): far fewer all the same.
    assert added < (2 * n + len(expected)) / 2, "the items did not travel in packs"


class Unloadable:
    """Pickles fine and cannot be unpickled: a poison item for the pickle codec."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_refuse_to_load, ())


def _refuse_to_load() -> None:
    raise RuntimeError("this item cannot be loaded")


def _source(n: int) -> Iterator[Any]:
    for i in range(n):
        yield Unloadable() if i == POISONED else i


def _identity(x: Any) -> Any:
    return x


def _fragile(x: int) -> int:
    if x == POISONED:
        raise ValueError(f"cannot handle {x}")
    return x


def _one_dead_letter(url: str, pipeline: cv.Pipeline[Any], **options: Any) -> dict[bytes, bytes]:
    """Run ``pipeline`` until only the poisoned item is left, in the dead letters; check
    that every other item reached the caller; return that dead letter."""
    namespace, run_id = new_namespace(), "poisoned"
    backend = RedisBackend(url, namespace=namespace, run_id=run_id, local_workers=True, **options)
    outputs: list[Any] = []
    with pytest.raises(DeadLettersError) as caught:
        for x in backend.iterate(pipeline):
            outputs.append(x)
    stage = pipeline.stages[0].name
    assert caught.value.dead == {stage: 1}
    assert sorted(outputs) == [i for i in range(N_POISONED) if i != POISONED]
    keys = Keys(namespace, pipeline_id(pipeline.stages), run_id)
    with redis.Redis.from_url(url) as client:
        [letter] = [fields for _, fields in client.xrange(keys.dead(0))]
    assert load_path(letter[b"q"]) == [POISONED]
    return letter


@pytest.mark.redis
def test_an_item_that_cannot_be_decoded_leaves_its_pack_for_the_dead_letters_alone(
    redis_server: RedisServer,
) -> None:
    pipeline = cv.Pipeline(_source(N_POISONED)).map(_identity, name="same", ordered=False)
    letter = _one_dead_letter(redis_server.url, pipeline, codec="pickle", secret_key=SECRET)
    # Dead-lettered from inside a pack (a lone entry would say "cannot decode the entry"),
    # alone, signed again: a replay carries it as an entry of its own.
    assert b"cannot decode the item" in letter[b"err"]
    assert b"s" in letter and b"d" in letter and b"p" not in letter


@pytest.mark.redis
def test_an_item_whose_stage_keeps_failing_inside_a_pack_is_dead_lettered_alone(
    redis_server: RedisServer,
) -> None:
    pipeline = cv.Pipeline(range(N_POISONED)).map(_fragile, name="fragile", ordered=False)
    letter = _one_dead_letter(redis_server.url, pipeline, visibility_timeout=0.3, max_deliveries=2)
    assert f"cannot handle {POISONED}".encode() in letter[b"err"]
    assert int(letter[b"n"]) == 3  # delivered max_deliveries times, then once more: dead


@pytest.mark.redis
def test_a_resumed_unordered_run_skips_the_items_its_done_bitmap_holds(
    redis_server: RedisServer,
) -> None:
    # The driver writes the bytes of the done bitmap holding the items it completed
    # (one SETRANGE per acknowledgement); a resumed driver must find them there.
    n = 5000
    pipeline = cv.Pipeline(range(n)).map(_identity, name="same", ordered=False)
    namespace, run_id = new_namespace(), "resumed"
    backend = RedisBackend(redis_server.url, namespace=namespace, run_id=run_id, local_workers=True)
    keys = Keys(namespace, pipeline_id(pipeline.stages), run_id)
    first: list[int] = []
    outputs = backend.iterate(pipeline)
    for x in outputs:
        first.append(x)
        if len(first) >= n // 2:
            break
    outputs.close()  # leaves the run in Redis, its last chunk unacknowledged
    with redis.Redis.from_url(redis_server.url) as client:
        bitmap = client.get(keys.done) or b""
    done = {r for r in range(len(bitmap) * 8) if bitmap[r >> 3] >> (7 - (r & 7)) & 1}
    assert done and done <= set(first)
    rest = pipeline.run(collect=True, backend=backend).outputs
    assert rest is not None
    assert not done & set(rest)
    assert set(first) | set(rest) == set(range(n))
    assert max(Counter(first + rest).values()) <= 2  # at most one chunk again


def _grow(x: Any) -> list[Any]:
    """flat_map: a small item fans out into two, a large one passes alone."""
    return [x] if isinstance(x, str) else [x, -x - 1]


def _small(x: Any) -> bool:
    return not isinstance(x, str) or len(x) % 2 == 0


@pytest.mark.redis
@settings(max_examples=8, deadline=None)
@given(
    sizes=st.lists(st.one_of(st.integers(0, 50), st.integers(PACKED_ITEM_MAX, 6000)), max_size=400),
    ordered=st.booleans(),
)
def test_any_mix_of_item_sizes_gives_the_outputs_of_a_plain_loop(
    redis_server: RedisServer, sizes: list[int], ordered: bool
) -> None:
    # Small ints and large strings, through a flat_map and a filter, on Redis with
    # packs of whatever sizes the run's batches make.
    values: list[Any] = [n if n <= 50 else "s" * n for n in sizes]
    pipeline = (
        cv.Pipeline(values)
        .flat_map(_grow, workers=2, ordered=ordered)
        .filter(_small, ordered=ordered)
    )
    expected = [y for x in values for y in _grow(x) if _small(y)]
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    outputs = pipeline.run(collect=True, backend=backend).outputs
    assert outputs is not None
    if ordered:
        assert outputs == expected
    else:
        assert Counter(map(repr, outputs)) == Counter(map(repr, expected))


async def _shape_later(x: Any) -> Any:
    return _shape(x)


def _as_set_when_seven(x: int) -> Any:
    return {x} if x % 7 == 0 else x


@pytest.mark.redis
def test_an_async_stage_of_many_coroutines_hands_on_whole_packs(redis_server: RedisServer) -> None:
    # The coroutine workers of an async stage share one consumer; a pack lent in
    # parts to several coroutines would be handed on twice (or its rest lost).
    n = 3000
    pipeline = cv.Pipeline(_value(i) for i in range(n)).map(
        _shape_later, runtime="async", workers=4, ordered=False
    )
    backend = RedisBackend(redis_server.url, namespace=new_namespace(), local_workers=True)
    with redis.Redis.from_url(redis_server.url) as client:
        before = _xadd_calls(client)
        result = pipeline.run(collect=True, backend=backend)
        added = _xadd_calls(client) - before
    assert Counter(result.outputs) == Counter(_shape(_value(i)) for i in range(n))
    assert result.stats[0].items_in == n
    # An entry per item in and out without packs; how many packs form depends on the
    # coroutines' batch sizes (the load), so only their presence is asserted.
    assert added < 2 * n - 100, "the items did not travel in packs"


@pytest.mark.redis
def test_an_output_the_codec_cannot_carry_inside_a_pack_is_skipped_alone(
    redis_server: RedisServer,
) -> None:
    n = 2000
    pipeline = cv.Pipeline(range(n)).map(_as_set_when_seven, workers=2, on_error="skip")
    backend = RedisBackend(
        redis_server.url, namespace=new_namespace(), local_workers=True, codec="json"
    )
    result = pipeline.run(collect=True, backend=backend)
    assert result.outputs == [x for x in range(n) if x % 7]
    assert sorted(f.item for f in result.failures) == list(range(0, n, 7))
    assert {type(f.error) for f in result.failures} == {cv.SerializationError}
