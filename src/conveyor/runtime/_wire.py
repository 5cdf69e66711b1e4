"""How a batch crosses between the parent and a worker process of the process runtime.

Both sides use this module: the messages they exchange, how a batch is pickled
(big buffers set aside: `_Buffers`, `_dump`, `_load`) and the shared-memory
blocks those buffers go through (`_Arena`). The data flow, and why it is built this way, is told in
`conveyor.runtime.processes`.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import pickle
import secrets
import sys
from importlib import import_module
from multiprocessing import resource_tracker
from typing import Any, NamedTuple

import cloudpickle

__all__ = ["SHM_THRESHOLD", "shm_prefix"]

SHM_THRESHOLD = 64 * 1024
"""Buffers of at least this many bytes cross through shared memory instead of the pipe."""

# Where a big buffer of a message is (third item of its descriptor): out of band (NumPy)
# or under a persistent id (bytes-likes) in the message's block, or out of band in the
# block of the request an answer is for (an array the stage returned as it got it).
_OOB, _PID, _ECHO = range(3)
_Desc = tuple[int, int, int]  # offset, size, place

# Messages (pickled), parent -> child: a `_BatchMessage`, or (_STOP,); to a standby
# (`_standby`), before those: (_STANDBY_BLOCKS, [(id, size), ...]) (the blocks'
# descriptors follow), then (_STANDBY_STAGE, worker name, stage blob);
# child -> parent, in the order of the batches: an `_OutcomeMessage`, or one of
#   (_READY,), (_FAILED, what, error), (_STARTED,), (_SLEEPING,), (_STOPPED, error | None),
#   (_LOAD_FAILED, error, inbox_kept)
# The first field is always the tag. `_BatchMessage` and `_OutcomeMessage` travel as
# plain tuples (`_pack`; the receiver rebuilds them with ``_make``): a NamedTuple is
# pickled by class, which costs about 4 us more each way, message after message.
_BATCH, _STOP, _READY, _FAILED, _OUTCOME, _LOAD_FAILED, _STARTED, _SLEEPING, _STOPPED = range(9)
_STANDBY_BLOCKS, _STANDBY_STAGE = range(9, 11)

_Block = tuple[int, "str | None", int]
"""A shared-memory block: its id, its name when the receiver has not mapped it yet
(`_BY_FD` when it has no name: its file descriptor follows the message), else None; its size."""
_BY_FD = ""


class _BatchMessage(NamedTuple):
    """Parent -> child: a part of a batch to run through the stage."""

    tag: int  # _BATCH
    payload: bytes  # the items, pickled with their big buffers set aside
    pids: bool  # whether the payload holds persistent ids (bytes-likes in a block)
    descs: list[_Desc]  # where each big buffer is
    inbox: _Block | None  # the block holding the items' big buffers
    outbox: _Block | None  # the block the child may write its results' big buffers into
    forget: list[int]  # ids of blocks the child may unmap
    retries_left: int | None  # retries left to the item (one-item messages after a crash)


class _OutcomeMessage(NamedTuple):
    """Child -> parent: what a `_BatchMessage` produced."""

    tag: int  # _OUTCOME
    payload: bytes  # the outputs, pickled with their big buffers set aside
    pids: bool
    descs: list[_Desc]
    need: int  # bytes of outbox the child lacked (the parent provides a bigger one)
    filtered: int
    retried: int
    processed: int
    busy: float  # seconds the batch took in the child
    cpu: float  # the child's CPU time so far
    counts: list[int]  # outputs of each processed input (`BatchOutcome.counts`)
    failures: list[tuple[int, Any, int]]  # (batch index, packed error, attempts) per failure
    error: Any  # the packed error that ended the batch, or None
    inbox_kept: bool  # arrays the stage kept live on the inbox: it is the child's no more
    outbox_kept: bool = False  # arrays the stage created and kept live on the outbox: the same


def _pack(message: tuple[Any, ...]) -> bytes:
    """A message as sent: its fields as a plain tuple, pickled (see the tags above)."""
    return pickle.dumps(tuple(message), 5)


_STOP_MESSAGE = pickle.dumps((_STOP,), 5)
_STARTED_MESSAGE = pickle.dumps((_STARTED,), 5)
_SLEEPING_MESSAGE = pickle.dumps((_SLEEPING,), 5)

try:  # POSIX: attach shared memory without registering it with the resource tracker again
    _posixshmem: Any = import_module("_posixshmem")
except ImportError:  # Windows
    _posixshmem = None


# ---------------------------------------------------------------------- pickling


def _align(n: int) -> int:
    return (n + 63) & ~63


class _Buffers:
    """The big buffers of one message: set aside while pickling, then placed in shared memory.

    Entry i is referenced either by pickle's out-of-band mechanism (NumPy
    arrays: the i-th buffer of ``pickle.loads(buffers=...)`` among the
    non-persistent ones) or by a persistent id naming i (bytes, bytearray,
    memoryview). ``threshold`` None keeps everything in band.
    """

    __slots__ = ("_addresses", "persistent", "threshold", "total", "views")

    def __init__(self, threshold: int | None = SHM_THRESHOLD) -> None:
        self.threshold = threshold
        self.views: list[memoryview] = []
        self.persistent: list[bool] = []
        self.total = 0
        self._addresses: list[int | None] | None = None

    def take(self, view: memoryview, persistent: bool) -> int:
        """Set ``view`` (1-D, bytes) aside if it is big; its index, or -1 to keep it in band."""
        if self.threshold is None or view.nbytes < self.threshold:
            return -1
        self.views.append(view)
        self.persistent.append(persistent)
        self.total += _align(view.nbytes)
        return len(self.views) - 1

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        """pickle's buffer_callback: False sends the buffer out of band."""
        return self.take(buffer.raw(), False) < 0

    def clear(self) -> None:
        self.views.clear()
        self.persistent.clear()
        self.total = 0
        self._addresses = None

    def addresses(self) -> list[int | None]:
        """Where each out-of-band buffer's bytes are in memory (None for the persistent
        ones, and for all without NumPy, which only arrays need): asked once per answer,
        by both the request's block (`_Arena.echoes`) and the placer."""
        found = self._addresses
        if found is None:
            numpy = sys.modules.get("numpy")
            found = self._addresses = [
                None if persistent or numpy is None else _address_of(numpy, view)
                for view, persistent in zip(self.views, self.persistent, strict=True)
            ]
        return found


class _OutOfBand:
    """Mixed into a pickler: bytes-likes become persistent ids (big ones, out of band).

    bytes and bytearray have no other hook in the C pickler, and memoryview
    cannot be pickled at all otherwise. It costs a Python call per object
    pickled, so it is only used for batches that need it.

    ``echoes`` (an answer): ids of the bytes objects the worker made from the
    request's big buffers, each with its buffer's index. Such an object, returned
    as it came, is named by that index ("e"): bytes cannot change, so the parent
    hands back the object it sent, and nothing is copied back.
    """

    buffers: _Buffers
    echoes: dict[int, int] | None = None

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is bytes and self.echoes:
            index = self.echoes.get(id(obj))
            if index is not None:
                return ("e", index)
        if kind is bytes or kind is bytearray:
            index = self.buffers.take(memoryview(obj), True)
            return None if index < 0 else ("a" if kind is bytearray else "b", index)
        if kind is memoryview:
            flat = obj.cast("B") if obj.c_contiguous else memoryview(obj.tobytes())
            shape = (obj.format, obj.shape, obj.readonly)
            index = self.buffers.take(flat, True)
            return ("M", index, *shape) if index >= 0 else ("m", flat.tobytes(), *shape)
        return None


class _PlainPickler(_OutOfBand, pickle.Pickler):
    pass


class _CloudPickler(_OutOfBand, cloudpickle.Pickler):  # type: ignore[misc]
    pass


def _dump(
    obj: Any, buffers: _Buffers, bytes_likely: bool = False, received: list[Any] | None = None
) -> tuple[bytes, bool]:
    """Pickle ``obj`` (protocol 5), big buffers set aside; return (payload, uses persistent ids).

    ``received`` (an answer): the bytes objects made from the request's big
    buffers, by index (see `_OutOfBand`), which the answer names instead of
    sending them back.

    The plain pickler first (fast), then the one that handles bytes-likes,
    then cloudpickle's (classes and functions by value). ``bytes_likely``
    (the previous message held big bytes): look for them first, rather than
    pickle them in band, which costs a copy of each, for nothing.

    Raises:
        Exception: whatever the last pickler raised when none could do it.
    """
    threshold = buffers.threshold
    described = _describe_arrays(obj, buffers)
    if described is not None:
        return described, False
    if not (bytes_likely and threshold is not None and _has_big_bytes(obj)):
        try:
            payload = pickle.dumps(obj, 5, buffer_callback=buffers)
        except Exception:
            buffers.clear()
        else:
            # Big bytes pickled in band make a big payload: only then look for them.
            if threshold is None or len(payload) < threshold or not _has_big_bytes(obj):
                return payload, False
            buffers.clear()
    error: Exception | None = None
    echoes = None if not received else {id(x): i for i, x in enumerate(received) if x is not None}
    for pickler_class in (_PlainPickler, _CloudPickler):
        out = io.BytesIO()
        pickler = pickler_class(out, 5, buffer_callback=buffers)
        pickler.buffers = buffers
        pickler.echoes = echoes
        try:
            pickler.dump(obj)
        except Exception as exc:
            buffers.clear()
            error = exc
        else:
            return out.getvalue(), True
    assert error is not None
    raise error


_ARRAYS = "conveyor:arrays"
"""First field of the payload of a batch that is only big plain NumPy arrays
(`_describe_arrays`)."""
_PLAIN_KINDS = frozenset("biufc")  # bool, integers, floats, complex: a dtype string says all


def _describe_arrays(obj: Any, buffers: _Buffers) -> bytes | None:
    """The payload of a batch made only of big plain NumPy arrays (exactly
    ``numpy.ndarray``, C-contiguous, of a bool, integer, float or complex dtype
    without metadata, at least ``buffers.threshold`` bytes each), their buffers set
    aside: each array's dtype and shape, pickled as a plain tuple, which
    `_rebuild_arrays` reads; None for any other batch. What crosses and what is
    built are what pickle's out-of-band arrays give; pickling them costs NumPy's
    reduction and the lookup of its rebuilding function per array, about a tenth
    of the handling of a message of four 1 MiB arrays on each side."""
    threshold = buffers.threshold
    numpy = sys.modules.get("numpy")
    if threshold is None or numpy is None or type(obj) is not list or not obj:
        return None
    ndarray = numpy.ndarray
    for array in obj:
        if (
            type(array) is not ndarray
            or array.nbytes < threshold
            or array.dtype.kind not in _PLAIN_KINDS
            or array.dtype.metadata is not None  # a dtype string would not carry it
            or not array.flags.c_contiguous
        ):
            return None
    specs = []
    for array in obj:
        buffers.take(pickle.PickleBuffer(array).raw(), False)
        specs.append((array.dtype.str, array.shape))
    return pickle.dumps((_ARRAYS, specs), 5)


def _rebuild_arrays(description: tuple[str, list[Any]], oob: list[Any]) -> list[Any]:
    """The arrays `_describe_arrays` described, built on their buffers (no copy), as
    NumPy's unpickling builds them. NumPy is imported here if need be, as unpickling
    would: a worker started before its parent imported NumPy has not loaded it."""
    frombuffer = import_module("numpy").frombuffer
    return [
        frombuffer(buffer, dtype).reshape(shape)
        for buffer, (dtype, shape) in zip(oob, description[1], strict=True)
    ]


_SCANNED = frozenset({bytes, bytearray, tuple, list, dict})


def _has_big_bytes(obj: Any) -> bool:
    """Whether the items of a batch hold big bytes/bytearray (themselves, or one level in)."""
    if type(obj) is not list or _SCANNED.isdisjoint(set(map(type, obj))):
        return False
    return any(_big_bytes_in(x, 1) for x in obj)


def _big_bytes_in(x: Any, depth: int) -> bool:
    kind = type(x)
    if kind is bytes or kind is bytearray:
        return len(x) >= SHM_THRESHOLD
    if depth and (kind is tuple or kind is list):
        return any(_big_bytes_in(y, depth - 1) for y in x)
    if depth and kind is dict:
        return any(_big_bytes_in(y, depth - 1) for y in x.values())
    return False


class _Unpickler(pickle.Unpickler):
    """Resolves the persistent ids `_OutOfBand` wrote, copying out of shared memory.

    ``sent`` (an answer): the request's bytes objects by index, which "e" names.
    ``received`` (a request): filled with the bytes objects made, by index.
    """

    def __init__(
        self,
        payload: bytes,
        buffers: list[Any],
        descs: list[_Desc],
        arena: _Arena | None,
        sent: list[Any] | None = None,
        received: list[Any] | None = None,
    ) -> None:
        super().__init__(io.BytesIO(payload), buffers=buffers)
        self.descs = descs
        self.arena = arena
        self.sent = sent
        self.received = received

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "m":
            return _rebuild_memoryview(pid[1], *pid[2:])
        if kind == "e":
            assert self.sent is not None
            return self.sent[pid[1]]
        assert self.arena is not None
        offset, size, _ = self.descs[pid[1]]
        with self.arena.view[offset : offset + size] as source:
            if kind == "b":
                made = bytes(source)
                if self.received is not None:
                    self.received[pid[1]] = made
                return made
            if kind == "a":
                return bytearray(source)
            return _rebuild_memoryview(source, *pid[2:])


def _rebuild_memoryview(data: Any, fmt: str, shape: tuple[int, ...], readonly: bool) -> memoryview:
    view = memoryview(bytes(data) if readonly else bytearray(data))
    if fmt == "B" and len(shape) == 1:
        return view
    try:
        shaped: memoryview = view.cast(fmt, shape)  # type: ignore[call-overload]
    except (TypeError, ValueError):  # a format cast() cannot express: the raw bytes
        return view
    return shaped


def _load(
    payload: bytes,
    pids: bool,
    descs: list[_Desc],
    arena: _Arena | None,
    request: _Arena | None = None,
    sent: list[Any] | None = None,
    received: list[Any] | None = None,
) -> Any:
    """Unpickle a payload whose big buffers sit in ``arena`` (or ``request``) at ``descs``.

    NumPy arrays are built on the block itself; bytes-likes are copied out, bytes
    objects returned as they came are ``sent``'s (see `_Unpickler`).
    """
    if not descs:
        if not pids:
            return pickle.loads(payload)
        return _Unpickler(payload, [], [], None, sent).load()
    if received is not None:
        received[:] = [None] * len(descs)
    oob = []
    for offset, size, place in descs:
        if place != _PID:
            source = request if place == _ECHO else arena
            assert source is not None
            oob.append(source.lend(offset, size))
    if pids:
        return _Unpickler(payload, oob, descs, arena, sent, received).load()
    loaded = pickle.loads(payload, buffers=oob)
    if type(loaded) is tuple and loaded[0] == _ARRAYS:  # batches are lists, never this
        return _rebuild_arrays(loaded, oob)
    return loaded


def _first_unpicklable(items: list[Any]) -> tuple[int, Exception] | None:
    """Index and error of the first item that cannot be pickled on its own."""
    for index, item in enumerate(items):
        try:
            _dump([item], _Buffers(None))
        except Exception as exc:
            return index, exc
    return None


# ---------------------------------------------------------------------- shared memory


def shm_prefix() -> str:
    """How the names of this process's shared-memory blocks begin: ``cv<pid>_``.

    On Linux they show as ``/dev/shm/cv<pid>_<8 hex digits>`` while a worker
    has not mapped them yet; none is left once a run has ended.
    """
    return f"cv{os.getpid()}_"


def _address_of(numpy: Any, buffer: memoryview) -> int:
    """Where ``buffer``'s bytes are in memory (the worker asks for each big buffer of an
    answer: through ctypes, a tenth of NumPy's time, when the buffer is writable)."""
    if not buffer.readonly and buffer.c_contiguous and buffer.nbytes:
        import ctypes  # here: a worker interpreter, which has no NumPy, never loads it

        return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    address: int = numpy.frombuffer(buffer, numpy.uint8).__array_interface__["data"][0]
    return address


def _copy(target: memoryview, source: memoryview) -> None:
    """Copy a big buffer; through NumPy when it is loaded, which lets go of the GIL
    meanwhile: the other lane, and the thread taking the results, go on."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        target[:] = source
    else:
        numpy.copyto(numpy.frombuffer(target, numpy.uint8), numpy.frombuffer(source, numpy.uint8))
    target.release()


# madvise's MADV_POPULATE_WRITE (Linux 5.14+; the mmap module names it from Python 3.13),
# None once the kernel refused it. A list: `_Arena.populate` may turn it off.
_POPULATE_WRITE: list[int | None] = [
    getattr(mmap, "MADV_POPULATE_WRITE", 23) if sys.platform == "linux" else None
]


def _named_mapping(name: str, size: int) -> mmap.mmap:
    """Windows: a named mapping (it lives while some process maps it)."""
    options: dict[str, Any] = {"tagname": name}  # a Windows-only parameter
    return mmap.mmap(-1, size, **options)


def _open_registered() -> tuple[str, int]:
    """Create a new shared-memory name of this process, registered with multiprocessing's
    resource tracker *before* it exists: a process killed at any moment (SIGKILL, the OOM
    killer) leaves no segment that the tracker does not know and unlink. Registered
    after, a kill between the two left the segment for ever (1 kill in 30 under load).
    A kill before the segment exists only has the tracker try to unlink a name that is
    not there. Return the name and the open descriptor."""
    while True:
        name = f"{shm_prefix()}{secrets.token_hex(4)}"
        resource_tracker.register("/" + name, "shared_memory")
        try:
            return name, _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except BaseException as exc:
            # Not ours: another name (exists), or nothing made at all (an error).
            resource_tracker.unregister("/" + name, "shared_memory")
            if not isinstance(exc, FileExistsError):
                raise


class _Arena:
    """A block of shared memory mapped by the parent and one worker, reused message after message.

    The sender copies a message's big buffers in (`write`). The receiver
    builds NumPy arrays right on the block (`lend`: no copy) and copies
    bytes-likes out. A block is written again only once no array built on
    it is left (`in_use`), so what a receiver keeps stays intact; a block
    closed while arrays still use it stays mapped until the last one goes.

    Blocks are POSIX shared memory (what `multiprocessing.shared_memory`
    uses, registered with its resource tracker in the same way, so that even
    a killed parent leaves no name behind), but not `SharedMemory` objects:
    their finalizer unmaps the block, which arrays may still need.
    """

    def __init__(
        self,
        ident: int,
        name: str,
        size: int,
        mapping: mmap.mmap,
        linked: bool,
        fd: int | None = None,
    ) -> None:
        self.ident = ident
        self.name = name
        self.size = size
        self.view = memoryview(mapping)
        self._mapping: mmap.mmap | None = mapping
        self._linked = linked
        # Kept open (parent) so that another worker can map the block once its name is gone.
        self.fd = fd
        self._lent: list[memoryview] = []  # slices arrays were built on, maybe still in use
        self._address: int | None = None  # where the block is mapped (see echoes)
        self._populated = 0  # bytes from the start already mapped for writing (see populate)

    @classmethod
    def create(cls, ident: int, size: int, keep_fd: bool = False) -> _Arena:
        """A new block of ``size`` bytes (pages are only allocated when written); with
        ``keep_fd`` (POSIX), its file descriptor stays open (`fd`) until it is closed."""
        if _posixshmem is None:  # Windows: a named mapping lives while someone maps it
            name = f"{shm_prefix()}{secrets.token_hex(4)}"
            return cls(ident, name, size, _named_mapping(name, size), False)
        name, fd = _open_registered()
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            _posixshmem.shm_unlink("/" + name)
            resource_tracker.unregister("/" + name, "shared_memory")
            os.close(fd)
            raise
        if not keep_fd:
            os.close(fd)
        return cls(ident, name, size, mapping, True, fd if keep_fd else None)

    @classmethod
    def adopt(cls, ident: int, fd: int, size: int) -> _Arena:
        """Map a block whose file descriptor the parent sent (`_BY_FD`); closes ``fd``."""
        try:
            return cls(ident, "", size, mmap.mmap(fd, size), False)
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, ident: int, name: str, size: int) -> _Arena:
        """Map the block the parent created under ``name``."""
        if _posixshmem is None:
            return cls(ident, name, size, _named_mapping(name, size), False)
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, 0o600)
        try:
            return cls(ident, name, size, mmap.mmap(fd, size), False)
        finally:
            os.close(fd)

    def write(
        self,
        buffers: _Buffers,
        placed: list[tuple[int, int] | None] | None = None,
        start: int = 0,
    ) -> list[_Desc]:
        """Copy the buffers in, one after the other from ``start``; return their descriptors.

        ``placed`` (answers): for each buffer, (offset, place) when it is
        already in shared memory -- in the request's block (`echoes`, place
        _ECHO) or allocated in this block by the stage (place _OOB, see
        `conveyor.runtime._allocator`) -- to describe rather than copy.
        """
        descs, copies = self.layout(buffers, placed, start)
        self.fill(copies)
        return descs

    def layout(
        self,
        buffers: _Buffers,
        placed: list[tuple[int, int] | None] | None = None,
        start: int = 0,
    ) -> tuple[list[_Desc], list[tuple[int, memoryview]]]:
        """Where `write` puts each buffer: the descriptors, and the copies to make."""
        descs = []
        copies = []
        offset = start
        for index, (buffer, persistent) in enumerate(
            zip(buffers.views, buffers.persistent, strict=True)
        ):
            size = buffer.nbytes
            there = None if placed is None else placed[index]
            if there is not None:
                descs.append((there[0], size, there[1]))
                continue
            copies.append((offset, buffer))
            descs.append((offset, size, _PID if persistent else _OOB))
            offset += _align(size)
        return descs, copies

    def fill(self, copies: list[tuple[int, memoryview]]) -> None:
        """Make the copies `layout` listed."""
        if copies:
            offset, last = copies[-1]
            self.populate(offset + last.nbytes)
        view = self.view
        for offset, buffer in copies:
            _copy(view[offset : offset + buffer.nbytes], buffer)

    def echoes(self, buffers: _Buffers) -> list[int | None]:
        """For each out-of-band buffer that lies in this block, its offset here.

        A stage that returns an array it got (or a slice of it, or the array
        changed in place) returns memory of the request's block: the answer
        points there instead of copying. Needs NumPy to read addresses (it is
        loaded whenever arrays travel).
        """
        if self._address is None:
            numpy = sys.modules.get("numpy")
            if numpy is None:
                return [None] * len(buffers.views)
            self._address = _address_of(numpy, self.view)
        base, size = self._address, self.size
        found: list[int | None] = []
        for buffer, address in zip(buffers.views, buffers.addresses(), strict=True):
            offset = None if address is None else address - base
            inside = offset is not None and offset >= 0 and offset + buffer.nbytes <= size
            found.append(offset if inside else None)
        return found

    def populate(self, end: int) -> None:
        """Map the block's first ``end`` bytes for writing in one go, where not done yet.

        Writing to a page of shared memory this process has not mapped yet costs
        a fault, even when the page exists (another process wrote it): about
        0.5 ms per MiB here, where one ``MADV_POPULATE_WRITE`` over the range
        costs a third of that. Blocks are filled from their start, so a mark
        says how far this process has gone; done once per block and process
        (doing it again over mapped pages is not free). Linux 5.14+; elsewhere
        the pages fault in as they are written.
        """
        start = self._populated
        if end <= start or _POPULATE_WRITE[0] is None:
            return
        first = start - start % mmap.PAGESIZE
        end = min(self.size, end + (-end) % mmap.PAGESIZE)
        mapping = self._mapping
        if mapping is None:
            return
        try:
            mapping.madvise(_POPULATE_WRITE[0], first, end - first)
        except OSError:  # an older kernel: let the pages fault in
            _POPULATE_WRITE[0] = None
            return
        self._populated = end

    def lend(self, offset: int, size: int) -> pickle.PickleBuffer:
        """Bytes of the block for an array to be built on, without copying.

        Through a PickleBuffer, whoever uses the bytes (NumPy, a read-only
        view pickle makes) holds an export of the slice kept here, which is
        what `in_use` looks at.
        """
        piece = self.view[offset : offset + size]
        self._lent.append(piece)
        return pickle.PickleBuffer(piece)

    def in_use(self) -> bool:
        """Whether an array built on the block is still alive (it then stays as it is)."""
        lent = self._lent
        while lent:
            try:
                lent[-1].release()  # refused while something holds an export of the slice
            except BufferError:
                return True
            lent.pop()
        return False

    def unlink(self) -> None:
        """Remove the block's name (the parent does, once the worker has mapped it)."""
        if self._linked:
            self._linked = False
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink("/" + self.name)
            resource_tracker.unregister("/" + self.name, "shared_memory")

    def close(self) -> None:
        """Unlink the name; unmap the block, or leave that to the arrays still built on it."""
        self.unlink()
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
        mapping, self._mapping = self._mapping, None
        if mapping is None:
            return
        in_use = self.in_use()
        self.view.release()
        if not in_use:
            with contextlib.suppress(BufferError):  # an array built on it since: it unmaps it
                mapping.close()
        # else the arrays' slices keep the mapping alive; it is unmapped after the last one
