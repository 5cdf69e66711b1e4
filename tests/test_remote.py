"""Exceptions as plain data: conveyor.remote.capture/rebuild."""

from __future__ import annotations

import json

import pytest

from conveyor.errors import RemoteError, RemoteTraceback
from conveyor.remote import ExceptionRecord, capture, rebuild

pytestmark = pytest.mark.quick


class BadRow(Exception):
    """An exception whose __init__ takes other arguments than its args."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"row {row}: {reason}")
        self.row = row
        self.reason = reason


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_an_exception_with_its_own_init_comes_back_as_itself_with_its_attributes() -> None:
    error = _raised(BadRow(7, "no name"))
    error.add_note("conveyor: stage 'parse' (map) failed on item 7")
    record = ExceptionRecord.from_dict(json.loads(json.dumps(capture(error, json.dumps).as_dict())))
    back = rebuild(record)
    assert type(back) is BadRow
    assert (back.row, back.reason, str(back)) == (7, "no name", "row 7: no name")  # type: ignore[attr-defined]
    assert back.__notes__ == ["conveyor: stage 'parse' (map) failed on item 7"]
    assert isinstance(back.__cause__, RemoteTraceback)
    assert "BadRow: row 7: no name" in back.__cause__.text


def test_a_class_the_receiver_has_not_imported_becomes_a_remote_error_with_the_text() -> None:
    record = ExceptionRecord(type="no_such_module_here:Oops", message="it broke", args=["x"])
    back = rebuild(record)
    assert type(back) is RemoteError
    assert str(back) == "no_such_module_here.Oops: it broke"


def test_a_name_that_is_not_an_exception_class_is_never_called() -> None:
    record = ExceptionRecord(type="builtins:print", message="hello", args=["x"])
    assert type(rebuild(record)) is RemoteError


def test_arguments_the_codec_cannot_carry_are_dropped_and_the_text_stays() -> None:
    error = _raised(ValueError(object()))
    record = capture(error, json.dumps)
    assert record.args is None
    back = rebuild(record)
    assert type(back) is RemoteError
    assert str(back).startswith("ValueError: <object object")


def test_builtin_exceptions_come_back_as_themselves() -> None:
    back = rebuild(capture(_raised(ZeroDivisionError("division by zero")), json.dumps))
    assert type(back) is ZeroDivisionError
    assert back.args == ("division by zero",)
