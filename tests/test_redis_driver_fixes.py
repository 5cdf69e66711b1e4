"""Regression tests of the Redis driver: each one is the repro of a defect it once had."""

from __future__ import annotations

import inspect

import pytest

import conveyor as cv
import conveyor.errors
import conveyor.redis
import conveyor.redis.backend

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


# ---------------------------------------------------------------------- where errors live


def test_the_redis_errors_live_in_conveyor_errors_and_are_re_exported() -> None:
    for name in ("DeadLettersError", "RemoteError", "RunStateLost"):
        cls = getattr(conveyor.errors, name)
        assert cls.__module__ == "conveyor.errors"
        assert getattr(conveyor.redis, name) is cls
    assert cv.DeadLettersError is conveyor.errors.DeadLettersError
    assert cv.RunStateLost is conveyor.errors.RunStateLost
    assert issubclass(cv.RunStateLost, cv.BackendError)
    assert issubclass(cv.DeadLettersError, cv.BackendError)


def test_no_exception_class_is_defined_in_the_driver_and_every_one_is_in_the_tree() -> None:
    defined_here = [
        name
        for name, obj in vars(conveyor.redis.backend).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == conveyor.redis.backend.__name__
    ]
    assert defined_here == []
    tree = conveyor.errors.__doc__ or ""
    for name, obj in vars(conveyor.errors).items():
        if inspect.isclass(obj) and obj.__module__ == "conveyor.errors":
            assert f"+-- {name} " in tree, name
            assert (obj.__doc__ or "").strip(), name
