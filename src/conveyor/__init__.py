"""conveyor: producer-consumer pipelines over bounded channels.

Each concept lives in a private-ish module of its own (channel, stage,
pipeline, runtime/, metrics, redis/); this file only re-exports the public
names, so ``import conveyor as cv`` is all a user needs.
"""

from __future__ import annotations

from .backends import Backend as Backend
from .backends import BackgroundRun as BackgroundRun
from .backends import LocalBackend as LocalBackend
from .channel import Channel as Channel
from .channel import ChannelStats as ChannelStats
from .channel import Producer as Producer
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
from .metrics import Bottleneck as Bottleneck
from .metrics import RunResult as RunResult
from .metrics import StageStats as StageStats
from .metrics import Timeline as Timeline
from .pipeline import Pipeline as Pipeline
from .pipeline import RunHandle as RunHandle
from .stage import Backoff as Backoff
from .stage import Failure as Failure
from .stage import worker_state as worker_state

__version__ = "0.1.0"

# Loaded on first use, so `import conveyor` stays light and the `redis` and
# `metrics` extras optional.
_LAZY = {"PrometheusExporter": "conveyor.prometheus", "RedisBackend": "conveyor.redis"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'conveyor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


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
    "RunResult",
    "RunStateLost",
    "SerializationError",
    "ShutDown",
    "StageStats",
    "Timeline",
    "WorkerCrashed",
    "__version__",
    "worker_state",
]
