"""Shared-memory blocks the parent keeps, already faulted in, for the next worker to use.

The first write to a page of a fresh block costs a page fault: here about
0.7 ms per MiB, several times the copy itself (docs/benchmarks.md). A worker
reuses its blocks message after message, but every run starts new workers,
and each would fault its blocks in afresh. So when a worker ends, its free
blocks are not unmapped but kept here, up to ``SPARE_BYTES`` for the whole
process (a setting of `conveyor.runtime.processes`), and the next worker of
any stage or run takes them before making new ones.

A block is named only until its first worker has mapped it (no name is left
behind, whatever happens to the processes), so a spare block is handed to the
next worker by its file descriptor, sent over the worker's pipe (a Unix
socket) with the message that announces it (`conveyor.runtime._wire._BY_FD`).
The parent keeps the descriptor open for that, and only for blocks within
the budget: at most ``SPARE_BYTES`` of blocks (in use or spare) hold one.

Only blocks that no worker can touch any more are kept: no message in flight
names them, and the worker that used them has ended (an interpreter given up
in the middle of a call has not). A block that results in the parent still
view (the last results of a run, which the caller takes after the workers
have ended) is kept too, but handed out only once the last of them is gone:
otherwise every run would lose the blocks of its last results and fault
fresh ones in.
"""

from __future__ import annotations

import os
import threading

from ._wire import _Arena

__all__ = ["SPARES"]


class _Spares:
    """The process's spare blocks, and the budget of blocks that keep a descriptor.

    ``held`` counts the bytes of every block that keeps its descriptor open,
    spare or in use; the spare ones are among them. Lanes of any stage call
    in, so a lock guards both.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: list[_Arena] = []  # the last one kept last
        self.held = 0

    def reserve(self, size: int, limit: int) -> bool:
        """Whether a new block of ``size`` bytes may keep its descriptor (then it is counted),
        ``limit`` being the budget in bytes."""
        with self._lock:
            if self.held + size > limit:
                return False
            self.held += size
            return True

    def take(self, need: int) -> _Arena | None:
        """A spare block of at least ``need`` bytes that no array uses (the last kept
        first), or None."""
        with self._lock:
            for index in range(len(self._blocks) - 1, -1, -1):
                arena = self._blocks[index]
                if arena.size >= need and not arena.in_use():
                    return self._blocks.pop(index)
        return None

    def dispose(self, arena: _Arena, reusable: bool, limit: int) -> None:
        """A block a worker is done with: kept if ``reusable`` (see the module docstring) and
        it has its descriptor, else closed (its arrays, if any, keep it mapped)."""
        if arena.fd is not None and reusable:
            with self._lock:
                if self.held <= limit:  # the budget may have been lowered meanwhile
                    self._blocks.append(arena)
                    return
        if arena.fd is not None:
            with self._lock:
                self.held -= arena.size
        arena.close()

    def forsake(self) -> None:
        """In a process forked from this one: the spare blocks are the parent's (the child
        maps them too), never the child's to hand out; the child lets go of its handles."""
        self._lock = threading.Lock()
        blocks, self._blocks, self.held = self._blocks, [], 0
        for arena in blocks:
            arena.close()

    def clear(self) -> None:
        """Unmap every spare block (tests; a program may call it to give the memory back)."""
        with self._lock:
            blocks, self._blocks = self._blocks, []
            self.held -= sum(a.size for a in blocks)
        for arena in blocks:
            arena.close()


SPARES = _Spares()
"""The spare blocks of this process."""

if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=SPARES.forsake)
