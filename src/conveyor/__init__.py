"""conveyor: producer-consumer pipelines over bounded channels.

Each concept lives in a private-ish module of its own (channel, stage,
pipeline, runtime/, metrics, redis/); this file only re-exports the public
names, so ``import conveyor as cv`` is all a user needs. Each name's module
loads the first time the name is read (``_lazy``): importing stays cheap.
"""

from __future__ import annotations

from ._lazy import lazy_getattr as _lazy_getattr
from .errors import BackendError as BackendError
from .errors import BackendUnavailable as BackendUnavailable
from .errors import ConfigurationError as ConfigurationError
from .errors import ConfigurationTypeError as ConfigurationTypeError
from .errors import ConveyorError as ConveyorError
from .errors import DeadLettersError as DeadLettersError
from .errors import Empty as Empty
from .errors import Full as Full
from .errors import PayloadRejected as PayloadRejected
from .errors import PipelineStopped as PipelineStopped
from .errors import RunStateLost as RunStateLost
from .errors import SerializationError as SerializationError
from .errors import ShutDown as ShutDown
from .errors import WorkerCrashed as WorkerCrashed

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:  # what type checkers and editors see; at run time, `__getattr__`
    from .backends import Backend as Backend
    from .backends import BackgroundRun as BackgroundRun
    from .backends import LocalBackend as LocalBackend
    from .backends import RunOptions as RunOptions
    from .channel import Channel as Channel
    from .channel import ChannelStats as ChannelStats
    from .channel import Producer as Producer
    from .metrics import Bottleneck as Bottleneck
    from .metrics import RunResult as RunResult
    from .metrics import StageStats as StageStats
    from .metrics import Timeline as Timeline
    from .pipeline import Pipeline as Pipeline
    from .pipeline import RunHandle as RunHandle
    from .redis import RedisBackend as RedisBackend
    from .runtime.aio import new_event_loop as new_event_loop
    from .stage import Backoff as Backoff
    from .stage import Failure as Failure
    from .stage import worker_state as worker_state
del TYPE_CHECKING  # not a public name

__version__ = "0.1.0"

# Public names loaded on first use (PEP 562): `import conveyor` loads only the errors,
# so a script or `conveyor --help` does not pay for the engine, asyncio or the extras.
_LAZY = {
    "Backend": "conveyor.backends",
    "BackgroundRun": "conveyor.backends",
    "Backoff": "conveyor.stage",
    "Bottleneck": "conveyor.metrics",
    "Channel": "conveyor.channel",
    "ChannelStats": "conveyor.channel",
    "Failure": "conveyor.stage",
    "LocalBackend": "conveyor.backends",
    "Pipeline": "conveyor.pipeline",
    "Producer": "conveyor.channel",
    "PrometheusExporter": "conveyor.prometheus",
    "RedisBackend": "conveyor.redis",
    "RunHandle": "conveyor.pipeline",
    "RunOptions": "conveyor.backends",
    "RunResult": "conveyor.metrics",
    "StageStats": "conveyor.metrics",
    "Timeline": "conveyor.metrics",
    "new_event_loop": "conveyor.runtime.aio",
    "worker_state": "conveyor.stage",
}


__getattr__ = _lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "BackgroundRun",
    "Backoff",
    "Bottleneck",
    "Channel",
    "ChannelStats",
    "ConfigurationError",
    "ConfigurationTypeError",
    "ConveyorError",
    "DeadLettersError",
    "Empty",
    "Failure",
    "Full",
    "LocalBackend",
    "PayloadRejected",
    "Pipeline",
    "PipelineStopped",
    "Producer",
    "PrometheusExporter",
    "RedisBackend",
    "RunHandle",
    "RunOptions",
    "RunResult",
    "RunStateLost",
    "SerializationError",
    "ShutDown",
    "StageStats",
    "Timeline",
    "WorkerCrashed",
    "__version__",
    "new_event_loop",
    "worker_state",
]
