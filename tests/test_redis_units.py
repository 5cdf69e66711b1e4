"""The Redis backend's pure parts, without a server: codecs, reordering, completion, names."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import conveyor as cv
from conveyor.ordering import TOMBSTONE, Leaf, Tracker
from conveyor.redis.codec import child_path, dump_path, get_codec, key_check, load_path
from conveyor.redis.state import RunState
from conveyor.redis.streams import Keys, Retrier, pipeline_id, redact

pytestmark = pytest.mark.quick

KEY = b"0123456789abcdef-test-key"


# ---------------------------------------------------------------------- codecs


@pytest.mark.parametrize("name", ["msgpack", "json"])
def test_plain_codecs_carry_plain_data(name: str) -> None:
    codec = get_codec(name)
    for value in [None, "THE END", 0, -1.5, [1, [2, "x"]], {"a": [None]}, True]:
        assert codec.decode(dict(_pairs(codec.encode(value)))) == value


def test_msgpack_refuses_an_object_it_cannot_carry_with_a_clear_error() -> None:
    with pytest.raises(cv.SerializationError, match="codec='pickle'"):
        get_codec("msgpack").encode(object())


def test_pickle_needs_a_key_of_sixteen_bytes_or_more() -> None:
    with pytest.raises(cv.ConfigurationError, match="secret key"):
        get_codec("pickle")
    with pytest.raises(cv.ConfigurationError, match="16 bytes"):
        get_codec("pickle", b"short")


def test_pickle_entries_are_signed_and_carry_any_object() -> None:
    codec = get_codec("pickle", KEY)
    fields = dict(_pairs(codec.encode(lambda x: x + 1)))
    assert set(fields) == {b"d", b"s"}
    assert codec.decode(fields)(1) == 2


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda f: {b"d": f[b"d"]}, id="unsigned"),
        pytest.param(lambda f: {b"d": f[b"d"], b"s": b"\0" * 32}, id="wrong signature"),
        pytest.param(
            lambda f: {b"d": f[b"d"], b"s": get_codec("pickle", b"x" * 16).sign(f[b"d"])},
            id="another key",
        ),
    ],
)
def test_a_forged_pickle_entry_is_refused_before_unpickling(forge: Any, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    codec = get_codec("pickle", KEY)
    fields = {b"d": pickle.dumps(_Touch(str(marker))), b"s": b""}
    with pytest.raises(cv.PayloadRejected, match="refused"):
        codec.decode(forge(fields))
    assert not marker.exists()


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_the_key_check_tells_keys_apart_without_revealing_them() -> None:
    assert key_check(None) == ""
    assert key_check(KEY) == key_check(KEY) != key_check(KEY + b"!")
    assert KEY.hex()[:16] not in key_check(KEY)


def _pairs(flat: list[bytes]) -> list[tuple[bytes, bytes]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


# ---------------------------------------------------------------------- reordering


def _tree(draw: st.DrawFn, depth: int) -> Any:
    """A source item's fate: a leaf (an output, or None for nothing) or k children."""
    if depth == 0 or draw(st.booleans()):
        return draw(st.sampled_from(["out", None]))
    return [_tree(draw, depth - 1) for _ in range(draw(st.integers(2, 3)))]


@st.composite
def forests(draw: st.DrawFn) -> list[Any]:
    return [_tree(draw, 3) for _ in range(draw(st.integers(0, 12)))]


def _leaves(tree: Any, path: bytes, label: str) -> list[tuple[bytes, Any]]:
    if not isinstance(tree, list):
        return [(path, label if tree == "out" else TOMBSTONE)]
    k = len(tree)
    return [
        leaf
        for j, child in enumerate(tree)
        for leaf in _leaves(child, child_path(path, j, k), f"{label}.{j}")
    ]


@settings(deadline=None, max_examples=200)
@given(forests(), st.randoms(use_true_random=False), st.booleans())
def test_leaves_in_any_arrival_order_complete_every_root_and_ordered_runs_keep_order(
    forest: list[Any], rng: random.Random, ordered: bool
) -> None:
    leaves = [
        leaf for r, tree in enumerate(forest) for leaf in _leaves(tree, dump_path([r]), str(r))
    ]
    expected = [value for _, value in leaves if value is not TOMBSTONE]
    arrivals = list(enumerate(leaves))
    rng.shuffle(arrivals)
    tracker = Tracker(ordered)
    released: list[Any] = []
    for n, (path, value) in arrivals:
        tracker.add(Leaf(load_path(path), value, str(n).encode()))
        tracker.add(Leaf(load_path(path), value, str(n).encode()))  # read twice: ignored
        out = tracker.release()
        assert out.refused == []
        released += out.values
    if ordered:
        assert released == expected
        assert tracker.next_root == len(forest)
    else:
        assert sorted(released) == sorted(expected)
    assert tracker.completed == len(forest)
    assert len(tracker) == 0


@settings(deadline=None, max_examples=200)
@given(forests(), st.randoms(use_true_random=False), st.data())
def test_a_tracker_resumed_after_a_cursor_releases_exactly_the_leaves_after_it_in_order(
    forest: list[Any], rng: random.Random, data: st.DataObject
) -> None:
    # A batch stage's new lease holder: every leaf up to the cursor was handed on;
    # the others arrive in any order and come out in source order.
    leaves = [
        (load_path(path), value)
        for r, tree in enumerate(forest)
        for path, value in _leaves(tree, dump_path([r]), str(r))
    ]
    cut = data.draw(st.integers(1, len(leaves))) if leaves else 0
    tracker = Tracker(True)
    if cut:
        tracker.resume_after(leaves[cut - 1][0])
    rest = list(enumerate(leaves[cut:]))
    rng.shuffle(rest)
    released: list[Any] = []
    for n, (path, value) in rest:
        tracker.add(Leaf(path, value, str(n).encode()))
        out = tracker.release()
        assert out.refused == []
        released += out.values
    assert released == [value for _, value in leaves[cut:] if value is not TOMBSTONE]
    assert tracker.next_root == len(forest)
    assert tracker.values_held == 0


def test_a_root_is_held_until_its_last_leaf_arrives() -> None:
    tracker = Tracker(True)
    tracker.add(Leaf(load_path(child_path(dump_path([0]), 1, 2)), "b", b"1"))
    tracker.add(Leaf([1], "c", b"2"))
    assert tracker.release()[:2] == ([], [])
    tracker.add(Leaf(load_path(child_path(dump_path([0]), 0, 2)), "a", b"3"))
    assert tracker.release()[:2] == (["a", "b", "c"], [b"3", b"1", b"2"])


@pytest.mark.parametrize("ordered", [True, False])
def test_a_leaf_the_run_did_not_make_is_refused_and_completes_nothing(ordered: bool) -> None:
    tracker = Tracker(ordered)
    tracker.add(Leaf([0], "x", b"1"))
    tracker.add(Leaf([0], "copy of x", b"2"))  # its root is through already
    tracker.add(Leaf([], {b"d": b"stray"}, b"3"))  # no path at all
    tracker.add(Leaf([1, 5, 2], "bad", b"4"))  # child 5 of 2 does not exist
    tracker.add(Leaf([2, 0, 2], "half", b"5"))
    tracker.add(Leaf([2, 0, 2], "the same half again", b"6"))  # over-covers root 2
    out = tracker.release()
    assert out.values == ["x"] if ordered else ["x", "half"]
    assert [leaf.entry_id for leaf in out.refused] == [b"2", b"3", b"4", b"6"]
    assert tracker.completed == 1


def test_an_unordered_trackers_done_bitmap_is_redis_bit_order_and_resumes() -> None:
    tracker = Tracker(False)
    for root in (0, 9):
        tracker.add(Leaf([root], root, str(root).encode()))
    assert tracker.release().completed == [0, 9]
    bits = bytes(tracker._done)
    assert bits == bytes([0b1000_0000, 0b0100_0000])  # SETBIT 0 and 9, as GET returns them
    resumed = Tracker(False, 0, bits)
    assert resumed.completed == 2
    resumed.add(Leaf([9], "again", b"x"))
    assert [leaf.entry_id for leaf in resumed.release().refused] == [b"x"]


# ---------------------------------------------------------------------- completion


def _state(counters: dict[str, int], source_done: bool = True, n: int = 2) -> RunState:
    return RunState.read({k.encode(): str(v).encode() for k, v in counters.items()}, source_done, n)


def test_a_run_is_complete_when_every_stage_consumed_what_its_predecessor_produced() -> None:
    done = {"fed": 10, "in:0": 10, "out:0": 4, "in:1": 4, "out:1": 8, "delivered": 8}
    assert _state(done).complete
    assert not _state(done, source_done=False).complete
    assert not _state({**done, "in:1": 3}).complete
    assert not _state({**done, "delivered": 7}).complete
    # Tombstones (ordered runs) are final-stream entries too.
    assert _state({**done, "tomb": 6, "delivered": 14}).complete


def test_a_run_with_only_dead_letters_left_is_stalled_not_complete() -> None:
    state = _state({"fed": 10, "in:0": 9, "dead:0": 1, "out:0": 9, "in:1": 9, "out:1": 9})
    assert state.stalled()
    assert not state.complete
    assert not _state({"fed": 10, "in:0": 8, "dead:0": 1}).stalled()  # one still in flight


# ---------------------------------------------------------------------- names


def test_tombstones_sent_to_a_batch_stage_are_entries_of_its_input() -> None:
    # Stage 1 is a batch stage: stage 0 filtered 4 of 10 (tombstones to stage 1's input).
    state = _state({"fed": 10, "in:0": 10, "out:0": 6, "tomb:1": 4, "in:1": 10, "out:1": 2})
    assert state.produced(1) == 10
    assert state.through(1)
    assert not _state({"fed": 10, "in:0": 10, "out:0": 6, "tomb:1": 4, "in:1": 6}).through(1)


def test_a_batch_stage_holding_entries_behind_a_dead_letter_leaves_the_run_stalled() -> None:
    # Stage 0 dead-lettered one entry; the batch stage (1) holds the 8 after its place.
    state = _state({"fed": 10, "in:0": 9, "dead:0": 1, "out:0": 9, "in:1": 1})
    assert state.stalled(reordering=[1])
    assert not state.stalled()  # another stage holding entries is still at work
    # While an entry is still on its way to it, the batch stage is not stalled.
    assert not _state({"fed": 10, "in:0": 8, "dead:0": 1, "out:0": 8}).stalled(reordering=[1])


def test_tombstones_go_to_the_next_batch_stage_else_the_final_stream() -> None:
    from conveyor.redis.backend import _tombstone_streams

    pipeline = cv.Pipeline(range(3)).map(str).filter(bool).batch(2).map(len).batch(3).map(sum)
    assert _tombstone_streams(tuple(pipeline.stages)) == (2, 2, 4, 4, 6, 6)
    assert _tombstone_streams(tuple(cv.Pipeline(range(3)).map(str).stages)) == (1,)


def test_keys_of_a_run_share_one_hash_tag() -> None:
    keys = Keys("conveyor", "abc", "r1")
    tags = {k[k.index("{") : k.index("}") + 1] for k in keys.all(3)}
    assert tags == {"{abc.r1}"}
    assert keys.runs == "conveyor:abc:runs"


def test_the_pipeline_id_follows_the_stages_names_and_kinds_only() -> None:
    a = cv.Pipeline(range(3)).map(abs, name="x").filter(bool, name="y")
    b = cv.Pipeline([]).map(str, name="x").filter(callable, name="y", workers=4)
    c = cv.Pipeline([]).map(str, name="x").map(bool, name="y")
    assert pipeline_id(a.stages) == pipeline_id(b.stages) != pipeline_id(c.stages)


@pytest.mark.parametrize(
    "changed",
    [
        {"on_error": "skip"},
        {"retries": 2},
        {"timeout": 5.0},
        {"ordered": False},
    ],
)
def test_the_pipeline_id_changes_with_a_setting_that_changes_what_comes_out(
    changed: dict[str, Any],
) -> None:
    # The repro: a `conveyor worker` still running the old version of a pipeline
    # (batch(5) and on_error="skip" where the driver's had batch(10) and "raise")
    # served the driver's run without a word, and the driver got groups of 5.
    base = cv.Pipeline([]).map(abs, name="x").batch(10, name="b")
    other = cv.Pipeline([]).map(abs, name="x", **changed).batch(10, name="b")
    assert pipeline_id(base.stages) != pipeline_id(other.stages)
    for batch in (
        cv.Pipeline([]).map(abs, name="x").batch(5, name="b"),
        cv.Pipeline([]).map(abs, name="x").batch(10, name="b", interval=1.0),
    ):
        assert pipeline_id(base.stages) != pipeline_id(batch.stages)
    # What only changes how fast it goes keeps the id: workers of any size meet.
    same = cv.Pipeline([]).map(abs, name="x", capacity=8, runtime="process").batch(10, name="b")
    assert pipeline_id(base.stages) == pipeline_id(same.stages)


def test_urls_are_shown_without_their_password() -> None:
    assert redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("rediss://app:pw@host/1") == "rediss://app:***@host/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


# ---------------------------------------------------------------------- command line


def test_worker_workers_option_takes_a_count_or_stage_counts() -> None:
    import click

    from conveyor.redis.cli import _parse_workers

    assert _parse_workers(()) is None
    assert _parse_workers(("3",)) == 3
    assert _parse_workers(("parse=2", "enrich=8")) == {"parse": 2, "enrich": 8}
    with pytest.raises(click.BadParameter):
        _parse_workers(("0",))
    with pytest.raises(click.BadParameter):
        _parse_workers(("parse=none",))


def _accepted_by_the_library(name: str, param: str) -> bool:
    from conveyor.redis import RedisBackend

    try:
        RedisBackend("redis://localhost:6379/0", **{param: name})  # connects on first use
    except cv.ConfigurationError as exc:
        assert f"'{param}' must be a non-empty name without white space" in str(exc)
        return False
    except cv.ConfigurationTypeError as exc:  # an empty str, as for every str option
        assert f"'{param}' must be a non-empty str" in str(exc)
        return False
    return True


def _accepted_by_the_command_line(name: str) -> bool:
    import click

    from conveyor.cliparams import NAME

    try:
        NAME.convert(name, None, None)
    except click.BadParameter:
        return False
    return True


# Regression: RedisBackend took namespaces and run ids with spaces that the CLI refuses.
@given(name=st.text(max_size=12), param=st.sampled_from(["namespace", "run_id"]))
def test_the_library_and_the_command_line_accept_the_same_names(name: str, param: str) -> None:
    assert _accepted_by_the_library(name, param) == _accepted_by_the_command_line(name)


@pytest.mark.parametrize("name", ["my runs", "", "tab\there", "line\n"])
def test_a_namespace_or_run_id_with_white_space_is_refused_naming_it(name: str) -> None:
    assert not _accepted_by_the_library(name, "namespace")
    assert not _accepted_by_the_library(name, "run_id")
    assert not _accepted_by_the_command_line(name)


def test_a_redis_runs_report_counts_its_failed_items_as_skipped_or_dead_lettered() -> None:
    """On Redis an item's error does not end the run: the stages' ``failed`` counts
    the entries skipped and those dead-lettered, and the report says which."""
    from conveyor.redis.backend import RedisRunResult
    from test_metrics import stats

    result = RedisRunResult(stats=[stats("s", failed=5)], dead_letters={"s": 2}, items_out=1)
    assert result.failed_counts() == {"skipped": 3, "dead-lettered": 2}
    assert "1 output in 0.00 s; 5 items failed (3 skipped, 2 dead-lettered)" in result.report()


@pytest.mark.timeout(5)
def test_redis_out_of_memory_is_a_clear_backend_error() -> None:
    # Redis at maxmemory with noeviction refuses writes with OOM: the operation
    # ends with a BackendError naming Redis's memory and what to change, at once
    # (not the client's raw OutOfMemoryError, and no retry loop).
    from redis.exceptions import OutOfMemoryError

    calls = []

    def write() -> None:
        calls.append(1)
        raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")

    retry = Retrier("driver", 10.0, url="redis://:secret@host:6379/0")
    with pytest.raises(cv.BackendError, match="out of memory") as info:
        retry(write)
    assert calls == [1]
    text = str(info.value)
    assert "maxmemory" in text and "max_bytes" in text and "secret" not in text
    assert isinstance(info.value.__cause__, OutOfMemoryError)


@pytest.mark.timeout(10)
def test_a_short_key_in_the_environment_is_refused_naming_the_minimum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conveyor.redis.codec import secret_from

    monkeypatch.setenv("CONVEYOR_SECRET_KEY", "short")
    with pytest.raises(cv.ConfigurationError, match=r"CONVEYOR_SECRET_KEY.*at least 16 bytes"):
        secret_from(None)
    with pytest.raises(cv.ConfigurationError, match="at least 16 bytes"):
        cv.RedisBackend("redis://localhost:1", codec="pickle")
    monkeypatch.setenv("CONVEYOR_SECRET_KEY", "x" * 16)
    assert secret_from(None) == b"x" * 16


def test_conveyor_worker_says_redis_out_of_memory_as_a_run_does() -> None:
    # Regression: `conveyor worker` said "Redis at URL answered OutOfMemoryError: ..."
    # where a run says Redis is out of memory and what to change.
    from redis.exceptions import OutOfMemoryError

    from conveyor.redis.cli import RedisRefused

    error = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    text = RedisRefused.of(error, "redis://:secret@host:6379/0", False).message
    assert text.startswith("Redis at redis://:***@host:6379/0 is out of memory (serving runs)")
    assert "maxmemory" in text and "max_bytes" in text and "secret" not in text
