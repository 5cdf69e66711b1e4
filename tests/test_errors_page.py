"""docs/errors.md has a section for every exception class of conveyor.errors, and
names no class that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import conveyor as cv
from conveyor import errors

PAGE = Path(__file__).resolve().parent.parent / "docs" / "errors.md"

pytestmark = pytest.mark.quick


def _sections() -> list[str]:
    return re.findall(r"^### (\w+)\s*$", PAGE.read_text(encoding="utf-8"), flags=re.MULTILINE)


def _exception_classes() -> set[str]:
    return {
        name
        for name in errors.__all__
        if isinstance(getattr(errors, name), type)
        and issubclass(getattr(errors, name), BaseException)
    }


def test_every_exception_class_of_conveyor_errors_has_a_section() -> None:
    assert _exception_classes() - set(_sections()) == set()


def test_every_section_names_a_class_that_exists() -> None:
    sections = _sections()
    assert sections, "no '### ClassName' section found"
    assert [name for name in sections if name not in _exception_classes()] == []
    assert len(sections) == len(set(sections)), "a class has two sections"


def test_the_tree_on_the_page_draws_exactly_the_classes_of_conveyor_errors() -> None:
    tree = PAGE.read_text(encoding="utf-8").split("```", 2)[1]
    # Each line's class names, its comment in parentheses left out.
    named = {
        word
        for line in tree.splitlines()
        for word in re.findall(r"\b[A-Z]\w+\b", line.split("(")[0])
    }
    assert named - {"Exception"} == _exception_classes()


def test_the_classes_the_page_says_conveyor_exports_are_there() -> None:
    text = PAGE.read_text(encoding="utf-8")
    (listed,) = re.findall(r"re-exported from `conveyor`: (.*?)\.\n", text, flags=re.DOTALL)
    names = re.findall(r"`(\w+)`", listed)
    assert set(names) == {n for n in _exception_classes() if hasattr(cv, n)}


def test_the_page_is_linked_from_the_readme() -> None:
    readme = PAGE.parent.parent / "README.md"
    assert "(docs/errors.md)" in readme.read_text(encoding="utf-8")
