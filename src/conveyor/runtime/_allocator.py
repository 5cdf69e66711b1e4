"""NumPy arrays a process stage creates, allocated right in the answer's shared memory.

A worker process answers a batch through a shared-memory block (the
outbox, an `_Arena` of `conveyor.runtime._wire`). An array the stage
creates would be allocated in the worker's own memory, then copied into the
outbox when the answer is pickled. While the stage runs on a batch that has
an outbox, `Placer` is NumPy's data allocator instead (NEP 49's memory
handler, set with ``PyDataMem_SetHandler``, per context): array data of at
least `SHM_THRESHOLD` bytes is placed in the outbox, so an array the stage
returns is already where the answer needs it and is only described, not
copied. Smaller data, and data that no longer fits, go to ``malloc``.

Placing is first fit over the block, so that temporaries the stage frees
make room for later ones. The parent writes the outbox again only once no
array it built on the block is left; on this side, an outbox with an array
still alive after its answer (one the stage kept) is let go: the parent
drops it and the worker unmaps it once the last such array is freed.

Needs NumPy's C API table (``_ARRAY_API``, stable slots since NumPy 1.22);
when it cannot be read, `placer` returns None and answers are copied as
before. The handler is a ctypes structure whose functions call back into
Python: a microsecond or two per allocation, which is why it is only in
force for batches with an outbox (the stage moves big buffers).
"""

from __future__ import annotations

import bisect
import ctypes
import sys
from typing import Any

from ._wire import SHM_THRESHOLD, _address_of, _align, _Arena, _Buffers

__all__ = ["Placer", "placer"]

_SET_HANDLER, _GET_HANDLER = 304, 305  # slots of NumPy's C API table
_CAPSULE_NAME = b"mem_handler"  # what NumPy names (and checks on) a handler's capsule

_MALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_CALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
_REALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class _Allocator(ctypes.Structure):
    """NumPy's ``PyDataMemAllocator`` (version 1)."""

    _fields_ = [
        ("ctx", ctypes.c_void_p),
        ("malloc", _MALLOC),
        ("calloc", _CALLOC),
        ("realloc", _REALLOC),
        ("free", _FREE),
    ]


class _Handler(ctypes.Structure):
    """NumPy's ``PyDataMem_Handler``."""

    _fields_ = [
        ("name", ctypes.c_char * 127),
        ("version", ctypes.c_uint8),
        ("allocator", _Allocator),
    ]


def _libc_functions() -> tuple[Any, Any, Any, Any]:
    """The C library's malloc, calloc, realloc and free (prototypes of our own)."""
    libc = ctypes.CDLL(None)
    pointer, size = ctypes.c_void_p, ctypes.c_size_t
    return (
        ctypes.CFUNCTYPE(pointer, size)(("malloc", libc)),
        ctypes.CFUNCTYPE(pointer, size, size)(("calloc", libc)),
        ctypes.CFUNCTYPE(pointer, pointer, size)(("realloc", libc)),
        ctypes.CFUNCTYPE(None, pointer)(("free", libc)),
    )


class Placer:
    """Places big NumPy array data in the current outbox (see the module docstring).

    Callbacks run with the GIL held (ctypes takes it), so the bookkeeping
    needs no lock. ``spans`` are the live allocations in the current outbox,
    sorted; ``placed`` maps each address handed out to its block and span.
    """

    def __init__(self, set_handler: Any, capsule: Any) -> None:
        self._set_handler = set_handler
        self._capsule = capsule
        self._malloc, self._calloc, self._realloc, self._free = _libc_functions()
        self.arena: _Arena | None = None  # where big data goes now (None: malloc)
        self._base = 0  # the arena's address
        self.spans: list[tuple[int, int]] = []  # (offset, end) in the arena, sorted
        self.placed: dict[int, tuple[_Arena, int, int]] = {}  # address -> arena, offset, end
        self.live: dict[int, int] = {}  # arena ident -> arrays alive on it
        self.retired: dict[int, _Arena] = {}  # let go with arrays alive: unmapped after them
        # The handler and its callbacks must outlive every array allocated through them.
        self.keep: tuple[Any, ...] = ()

    def placing(self, arena: _Arena | None) -> _Placing:
        """Place big array data in ``arena`` while the block runs (nothing if it is None):
        a context manager (a class of its own, not a generator: entered per message)."""
        return _Placing(self, arena)

    def _enter(self, arena: _Arena) -> Any:
        """Make ``arena`` where big data goes, and this placer NumPy's handler; return the
        handler it replaces."""
        if self.arena is not arena:
            self.arena = arena
            self._base = _address_of(sys.modules["numpy"], arena.view)
            self.spans = []  # the parent sends an outbox only once it is free again
        return self._set_handler(self._capsule)

    def high(self, arena: _Arena | None) -> int:
        """Where free room begins in ``arena``, after every live allocation on it."""
        if arena is None or arena is not self.arena or not self.spans:
            return 0
        return self.spans[-1][1]

    def offsets(self, arena: _Arena | None, buffers: _Buffers) -> list[int | None]:
        """For each out-of-band buffer that lies in an allocation placed in ``arena``,
        its offset there: the answer describes it instead of copying it."""
        found: list[int | None] = [None] * len(buffers.views)
        if arena is None or arena is not self.arena or not self.spans:
            return found
        base, spans = self._base, self.spans
        for index, (view, address) in enumerate(
            zip(buffers.views, buffers.addresses(), strict=True)
        ):
            if address is None:
                continue
            offset = address - base
            span = _containing(spans, offset)
            if span is not None and offset + view.nbytes <= span[1]:
                found[index] = offset
        return found

    def alive(self, arena: _Arena | None, offsets: list[int]) -> bool:
        """Whether one of ``offsets`` lies in an allocation of ``arena`` still alive."""
        if arena is None or arena is not self.arena:
            return False
        return any(_containing(self.spans, offset) is not None for offset in offsets)

    def kept(self, arena: _Arena) -> bool:
        """After an answer: whether arrays placed in ``arena`` are still alive. Then the
        block is let go here (unmapped once they are gone) and the parent must drop it."""
        if not self.live.get(arena.ident):
            return False
        self.retired[arena.ident] = arena
        if arena is self.arena:
            self.arena, self.spans = None, []
        return True

    def close(self, arena: _Arena) -> None:
        """Unmap ``arena``, or leave that to the last array placed in it."""
        if self.live.get(arena.ident):
            self.retired[arena.ident] = arena
        else:
            arena.close()
        if arena is self.arena:
            self.arena, self.spans = None, []

    # ------------------------------------------------------------------ NumPy's callbacks

    def malloc(self, size: int) -> int | None:
        """NumPy's malloc: in the outbox when big and there is room, else the C library's."""
        address = self._place(size)
        if address is None:
            address = self._malloc(size)
        return address

    def calloc(self, count: int, size: int) -> int | None:
        """NumPy's calloc (zeroed memory), placed as `malloc` places."""
        address = self._place(count * size)
        if address is None:
            return self._calloc(count, size)  # type: ignore[no-any-return]
        ctypes.memset(address, 0, count * size)  # a block is reused: it holds earlier data
        return address

    def realloc(self, address: int | None, size: int) -> int | None:
        """NumPy's realloc: data placed in the outbox moves (to a new place, or to malloc)."""
        span = None if address is None else self.placed.get(address)
        if address is None or span is None:
            return self._realloc(address, size)  # type: ignore[no-any-return]
        moved = self.malloc(size)
        if moved is not None:
            ctypes.memmove(moved, address, min(size, span[2] - span[1]))
            self.free(address)
        return moved

    def _place(self, size: int) -> int | None:
        """An address in the outbox for ``size`` bytes; None: not big, no outbox, no room."""
        arena = self.arena
        if arena is None or size < SHM_THRESHOLD:
            return None
        need = _align(size)
        offset = self._fit(arena.size, need)
        if offset is None:
            return None
        bisect.insort(self.spans, (offset, offset + need))
        arena.populate(offset + need)  # the stage is about to write it: map it in one go
        address = self._base + offset
        self.placed[address] = (arena, offset, offset + need)
        self.live[arena.ident] = self.live.get(arena.ident, 0) + 1
        return address

    def _fit(self, capacity: int, need: int) -> int | None:
        """First offset with ``need`` bytes free between the live spans."""
        start = 0
        for offset, end in self.spans:
            if offset - start >= need:
                return start
            start = end
        return start if capacity - start >= need else None

    def free(self, address: int | None) -> None:
        """NumPy's free: placed data frees its span (and its block, if it was let go)."""
        if address is None:
            return
        span = self.placed.pop(address, None)
        if span is None:
            self._free(address)
            return
        arena, offset, end = span
        if arena is self.arena:
            index = bisect.bisect_left(self.spans, (offset, end))
            del self.spans[index]
        left = self.live[arena.ident] - 1
        if left:
            self.live[arena.ident] = left
            return
        del self.live[arena.ident]
        retired = self.retired.pop(arena.ident, None)
        if retired is not None:
            retired.close()


class _Placing:
    """`Placer.placing`'s context manager."""

    __slots__ = ("arena", "placer", "previous")

    def __init__(self, placer: Placer, arena: _Arena | None) -> None:
        self.placer = placer
        self.arena = arena
        self.previous: Any = None

    def __enter__(self) -> None:
        if self.arena is not None:
            self.previous = self.placer._enter(self.arena)

    def __exit__(self, *_: object) -> None:
        if self.arena is not None:
            self.placer._set_handler(self.previous)


def _containing(spans: list[tuple[int, int]], offset: int) -> tuple[int, int] | None:
    """The span holding ``offset`` (a buffer may be a slice of an allocation)."""
    index = bisect.bisect_right(spans, (offset, sys.maxsize)) - 1
    if index >= 0 and offset < spans[index][1]:
        return spans[index]
    return None


# Prototypes of our own (setting argtypes on ctypes.pythonapi's would change them for all).
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)
_new_capsule = ctypes.PYFUNCTYPE(
    ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p
)(("PyCapsule_New", ctypes.pythonapi))


def _set_handler_function() -> Any:
    """NumPy's PyDataMem_SetHandler, or None if it cannot be found (or not trusted)."""
    core = sys.modules.get("numpy._core._multiarray_umath") or sys.modules.get(
        "numpy.core._multiarray_umath"
    )
    multiarray = sys.modules.get("numpy._core.multiarray") or sys.modules.get(
        "numpy.core.multiarray"
    )
    table = getattr(core, "_ARRAY_API", None)
    handler_name = getattr(multiarray, "get_handler_name", None)
    if table is None or handler_name is None:
        return None
    slots = (ctypes.c_void_p * (_GET_HANDLER + 1)).from_address(_capsule_pointer(table, None))
    set_at, get_at = slots[_SET_HANDLER], slots[_GET_HANDLER]
    if not set_at or not get_at:
        return None
    get_handler = ctypes.PYFUNCTYPE(ctypes.py_object)(get_at)
    # Check the slots: the handler in force must be the one NumPy names.
    current = _Handler.from_address(_capsule_pointer(get_handler(), _CAPSULE_NAME))
    if current.name != str(handler_name()).encode():
        return None
    return ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(set_at)


_PLACER: list[Placer | None] = []  # made once per process, kept for ever (NumPy keeps handlers)


def placer(make: bool = True) -> Placer | None:
    """This process's `Placer`, or None when NumPy is not loaded or its handler API not
    found (or, with ``make`` False, when none was made yet)."""
    if _PLACER:
        return _PLACER[0]
    if not make or "numpy" not in sys.modules:
        return None  # maybe later: NumPy may be imported by the stage
    found = None
    try:
        set_handler = _set_handler_function()
        if set_handler is not None:
            found = _make_placer(set_handler)
    except (AttributeError, OSError, TypeError, ValueError):  # no such NumPy, no C library
        found = None
    _PLACER.append(found)
    return found


def _make_placer(set_handler: Any) -> Placer:
    handler = _Handler()
    handler.name = b"conveyor_shared_memory"
    handler.version = 1
    capsule = _new_capsule(ctypes.addressof(handler), _CAPSULE_NAME, None)
    placer = Placer(set_handler, capsule)
    placer.keep = callbacks = (
        _MALLOC(lambda _ctx, size: placer.malloc(size)),
        _CALLOC(lambda _ctx, count, size: placer.calloc(count, size)),
        _REALLOC(lambda _ctx, address, size: placer.realloc(address, size)),
        _FREE(lambda _ctx, address, _size: placer.free(address)),
    )
    handler.allocator = _Allocator(None, *callbacks)
    placer.keep += (handler,)
    return placer
