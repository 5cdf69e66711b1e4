"""The first-batch work of a NumPy worker, done once in the forkserver instead.

A worker process forked from the forkserver starts with whatever the server
holds in memory. A worker of a NumPy program makes, on its first batch with
an answer block, its `conveyor.runtime._allocator.Placer` (NumPy's
allocator for shared memory: ctypes structures and callbacks, NumPy's C API
table read), which took about 0.7 ms here, longer than the batch of one
array that usually comes first. Imported in the forkserver, this module
makes it there, once, and every worker inherits it (it is made once per
process and kept; nothing in it is tied to a process).

The parent puts this module on the forkserver's preload list after NumPy,
and only when it has imported NumPy itself (see
`conveyor.runtime.processes`); imported anywhere else, it does what a
worker would do anyway.
"""

from __future__ import annotations

from ._allocator import placer

placer()
