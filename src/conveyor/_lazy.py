"""Public names a package loads on first use (PEP 562), so importing it stays cheap.

``import conveyor`` would otherwise load the engine, the runtimes and the
metrics before a script or ``conveyor --help`` has done anything; with these,
a name's module is imported the first time the name is read.
"""

from __future__ import annotations

import importlib
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: each name of ``names`` comes from its module.

    Args:
        package: the package's ``__name__`` (it is being imported: it is in
            ``sys.modules`` already).
        names: public name -> the module that defines it.

    Returns:
        The function to bind to ``__getattr__`` in the package. A name it
        loads is stored in the package, so later reads are plain lookups.
    """
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> object:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
