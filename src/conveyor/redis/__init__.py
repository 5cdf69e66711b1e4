"""The distributed backend: the same pipeline, its stages served by workers anywhere.

::

    driver (pipeline.run(backend=RedisBackend(url)))             workers (conveyor worker mod:pipe)
    ------------------------------------------------             ---------------------------------
    source --feed (Lua: XADD + HINCRBY fed)--+
              waits while backlog >= limit   |
                                             v
                     [stream s0] --XREADGROUP group "workers" COUNT n--> stage 0 consumers
                         ^                                                  |  process_batch
                         |  XAUTOCLAIM after the visibility timeout         |  (policy.py)
                         |  (entries of dead or stuck consumers)            v
                         |                 one Lua hand-off per batch: XADD outputs to s1,
                         |                 XACK inputs (+ XTRIM MINID of the acked head,
                         |                 every 0.1 s per consumer),
                         |                 HINCRBY counters
                         |                 (more than max_deliveries -> [dlq0] + its error)
                     [stream s1] --XREADGROUP--> stage 1 consumers --hand-off--> ...
                                                                                   |
                     [final stream sN] <-- outputs (and tombstones, ordered runs) -+
    (a batch stage's input also gets the tombstones of the stages before it; one of
    its consumers at a time, holding the run's lease<i>, puts entries in source order
    and makes the groups; its hand-off records its cursor in meta)
                         |
    outputs <--reorder-- XREADGROUP group "driver" (its own pending first, when resumed)
       |
       +-- the caller comes back for more --> XACK + XTRIM + HINCRBY delivered (Lua)
    done when the source is done and every item it fed is complete by its sequence
    paths (conveyor.ordering; no sentinel, no counting: an entry the run did not make
    is dead-lettered); the run's meta gone (Redis restarted without persistence)
    -> RunStateLost

Small items travel several to an entry (``packing``: field ``p``, one signature
per pack), up to the consuming stage's batch size; each keeps its own path, its
own dead letter and its own retries (it leaves the pack to be delivered again).

Keys of one run share a hash tag: ``conveyor:{<pipeline id>.<run id>}:`` + ``meta``
(settings), ``counters``, ``s<i>`` (streams), ``e<i>`` (last errors of entries
waiting for redelivery), ``dlq<i>`` (dead letters), ``lease<i>`` (the consumer
making a batch stage's groups), ``driver`` (the one driver's lease), ``failures``; live runs are
listed in ``conveyor:<pipeline id>:runs``, which workers poll.

Modules: `streams` (keys, connections, retries, Lua scripts), `codec` (items
and sequence paths as entry fields), `packing` (several items to an entry),
`state` (settings, counters), `port` (a
stage's consumers), `worker`, `backend` (the driver), `dlq`, `status`, `cli`.
Completion and reordering by sequence path are `conveyor.ordering`'s.
"""

from __future__ import annotations

from .._lazy import lazy_getattr as _lazy_getattr
from ..errors import DeadLettersError as DeadLettersError
from ..errors import RemoteError as RemoteError
from ..errors import RunStateLost as RunStateLost

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:  # at run time, `__getattr__` below
    from .backend import LiveRun as LiveRun
    from .backend import RedisBackend as RedisBackend
    from .backend import RedisRunResult as RedisRunResult
    from .worker import Worker as Worker
del TYPE_CHECKING  # not a public name

# Loaded on first use (PEP 562): `conveyor --help` and `conveyor.redis.cli` need
# neither redis-py nor the driver.
_LAZY = {
    "LiveRun": "conveyor.redis.backend",
    "RedisBackend": "conveyor.redis.backend",
    "RedisRunResult": "conveyor.redis.backend",
    "Worker": "conveyor.redis.worker",
}


__getattr__ = _lazy_getattr(__name__, _LAZY)


__all__ = [
    "DeadLettersError",
    "LiveRun",
    "RedisBackend",
    "RedisRunResult",
    "RemoteError",
    "RunStateLost",
    "Worker",
]
