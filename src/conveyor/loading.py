"""Finding a pipeline by name, and the ``STAGE=N`` worker overrides.

A process that did not build the pipeline itself (the ``conveyor`` command,
a distributed worker, a worker's child process) finds it by its name,
``MODULE:ATTR``. This is library code: it raises conveyor's errors, never
the command line's, and imports nothing of the CLI; the commands turn its
errors into usage messages and exit codes.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, PipelineLoadError

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["PipelineLoadError", "load_pipeline", "parse_overrides"]


def load_pipeline(path: str) -> Pipeline[Any]:
    """Return the pipeline named by ``path``, ``MODULE:ATTR``, as a user wrote it.

    ``ATTR`` (dots allowed: ``obj.attr``) is a `conveyor.Pipeline`, or a
    function that takes no argument and returns one. The current directory
    comes first on ``sys.path``, as with ``python -m``.

    Raises:
        ConfigurationError: ``path`` is malformed, the module does not exist,
            the attribute is missing or is not a pipeline (or a function
            that needs arguments, or returns something else).
        PipelineLoadError: importing the module or calling the function
            raised (the user's exception is its ``__cause__``).
    """
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise ConfigurationError(
            f"expected MODULE:ATTR, for example app.pipelines:etl; got {path!r}"
        )
    if module_name.endswith(".py"):
        suggestion = module_name[:-3].replace("/", ".").replace(os.sep, ".")
        raise ConfigurationError(f"give a module name, not a file: {suggestion}:{attr_path}")
    if not all(part.isidentifier() for part in module_name.split(".")):
        # A path or a relative name ('../app', '.app') would reach importlib as one.
        raise ConfigurationError(
            f"{module_name!r} is not a module name: give a dotted name such as "
            f"app.pipelines, importable from the current directory or sys.path"
        )
    module = _import(module_name)
    from .pipeline import Pipeline  # after the user's module: `conveyor --help` stays light

    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(_missing_attribute(module, module_name, attr_path)) from None
    if isinstance(target, Pipeline):
        target._target = path
        return target
    if not callable(target):
        raise ConfigurationError(
            f"{path} is {_a_type(target)}, not a conveyor.Pipeline or a function returning one"
        )
    _check_no_arguments(target, path)
    try:
        made = target()
    except Exception as exc:
        raise PipelineLoadError(f"{path}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(made, Pipeline):
        raise ConfigurationError(f"{path}() returned {_a_type(made)}, not a conveyor.Pipeline")
    made._target = path
    return made


def _a_type(value: object) -> str:
    """``an int``, ``a str``: the type of ``value`` with its article."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _import(module_name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        # The module named, or a package it is in, is missing: a bad name. A
        # module that its code imports is missing: the user's code failed.
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ConfigurationError(
                f"no module named {missing!r} (looked in {cwd} and on sys.path)"
            ) from None
        raise PipelineLoadError(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise PipelineLoadError(
            f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def _missing_attribute(module: ModuleType, module_name: str, attr_path: str) -> str:
    from .pipeline import Pipeline

    found = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, Pipeline) and not name.startswith("_")
    )
    hint = f"; pipelines in it: {', '.join(found)}" if found else ""
    return f"module {module_name!r} has no attribute {attr_path!r}{hint}"


def _check_no_arguments(fn: Any, path: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: let the call tell
    required = [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise ConfigurationError(
            f"{path} needs arguments ({', '.join(required)}); conveyor calls it with none"
        )


def parse_overrides(values: Sequence[str]) -> list[tuple[str, int]]:
    """Parse ``STAGE=N`` strings into (stage, workers) pairs.

    >>> parse_overrides(["parse=8", "enrich=2"])
    [('parse', 8), ('enrich', 2)]

    Raises:
        ConfigurationError: a value is not ``STAGE=N`` with N a whole number >= 1,
            or names a stage an earlier value named (which of the two was meant?).
    """
    pairs: dict[str, tuple[int, str]] = {}
    for value in values:
        stage, sep, number = value.rpartition("=")
        if not sep or not stage:
            raise ConfigurationError(f"expected STAGE=N, got {value!r}")
        try:
            workers = int(number)
        except ValueError:
            workers = 0
        if workers < 1:
            raise ConfigurationError(f"N must be a whole number >= 1, got {value!r}")
        if stage in pairs:
            raise ConfigurationError(
                f"stage {stage!r} is given twice ({pairs[stage][1]!r} and {value!r}): "
                "give each stage once"
            )
        pairs[stage] = (workers, value)
    return [(stage, workers) for stage, (workers, _) in pairs.items()]
