"""Every exception conveyor raises.

The hierarchy::

    Exception
     +-- ConveyorError                  base of conveyor's own errors
     |    +-- ConfigurationError        (also ValueError) a bad parameter value
     |    +-- ConfigurationTypeError    (also TypeError) a parameter of the wrong type
     |    +-- PipelineStopped           a run was stopped before it finished
     |    +-- PipelineLoadError         the user's code raised while a pipeline was loaded by name
     |    +-- WorkerCrashed             a worker process died while holding items
     |    +-- SerializationError        (also TypeError) an item could not be pickled
     |    +-- BackendError              the distributed backend failed
     |         +-- BackendUnavailable   Redis could not be reached in time
     |         +-- PayloadRejected      an entry failed signature checks
     |         +-- DeadLettersError     a run can only go on after a dead-letter replay
     |         +-- RunStateLost         Redis lost a run's keys (restart without persistence)
     +-- RemoteError                    (not raised) a remote error whose class is not here
     +-- RemoteTraceback                (not raised) a worker's traceback, as a __cause__
     +-- queue.Empty                    (re-exported as conveyor.Empty)
     +-- queue.Full                     (re-exported as conveyor.Full)
     +-- ShutDown                       queue.ShutDown on 3.13+, else conveyor's own

Errors raised by the user's stage functions are never wrapped: they reach the
caller with their own type, with a PEP 678 note naming the stage and the item.
"""

from __future__ import annotations

import queue
import sys
from typing import Any

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ConfigurationError",
    "ConfigurationTypeError",
    "ConveyorError",
    "DeadLettersError",
    "Empty",
    "Full",
    "PayloadRejected",
    "PipelineLoadError",
    "PipelineStopped",
    "RemoteError",
    "RemoteTraceback",
    "RunStateLost",
    "SerializationError",
    "ShutDown",
    "WorkerCrashed",
]

Empty = queue.Empty
Full = queue.Full

if sys.version_info >= (3, 13):
    ShutDown = queue.ShutDown
else:

    class ShutDown(Exception):
        """Raised when putting on or getting from a channel that was shut down."""


class ConveyorError(Exception):
    """Raised for failures that belong to conveyor itself, not to user code."""


class ConfigurationError(ConveyorError, ValueError):
    """Raised when a parameter has a value outside what it accepts."""


class ConfigurationTypeError(ConveyorError, TypeError):
    """Raised when a parameter has the wrong type, e.g. a stage function that is not callable."""


class PipelineStopped(ConveyorError):
    """Raised when a run is stopped (by `stop()` or Ctrl-C) before it finished."""


class WorkerCrashed(ConveyorError):
    """Raised when a worker process dies (killed, segfault, os._exit) while holding items."""

    def __init__(self, message: str, *, stage: str = "", exitcode: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.exitcode = exitcode


class SerializationError(ConveyorError, TypeError):
    """Raised when an item or result cannot cross to or from a worker process."""


class BackendError(ConveyorError):
    """Raised when the distributed backend fails."""


class BackendUnavailable(BackendError):
    """Raised when Redis cannot be reached within the retry budget."""


class PayloadRejected(BackendError):
    """Raised when an entry is unsigned or its signature does not match."""


class DeadLettersError(BackendError):
    """Raised when a distributed run can go no further because entries sit in dead letters.

    The run stays in Redis: fix the stage, ``conveyor dlq replay`` the
    entries, and run again with the same ``run_id`` to finish it.
    """

    def __init__(self, message: str, *, run_id: str, dead: dict[str, int]) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.dead = dead
        # Any: errors sit below metrics in the layers (a RunResult, or None).
        self.result: Any = None
        """What ``run()`` did before it stopped (a `conveyor.redis.RedisRunResult`):
        counters, failures, and with ``collect=True`` the outputs it collected. The
        driver acknowledged those outputs, so the resumed run does not yield them
        again: they are here. None when raised by ``iterate()``, whose loop had them."""


class RunStateLost(BackendError):
    """Raised when a distributed run's keys vanished from Redis while it was going on.

    Redis restarted without persistence, or someone deleted the keys (a
    ``conveyor cancel``, a ``FLUSHALL``): the items in flight and the
    counters are gone, so the run cannot be resumed, only started afresh.
    """

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class RemoteError(Exception):
    """Never raised: stands for an error from another process or machine whose class
    this process has not imported (in `Failure.error`, or as a cause)."""


class RemoteTraceback(Exception):
    """Never raised: the traceback of an exception raised in another process, as text.

    Set as the ``__cause__`` of the exception that reaches the caller, so a
    printed traceback shows where in the worker it was raised.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


class PipelineLoadError(ConveyorError):
    """Raised when the user's code raised while a pipeline was loaded by name.

    Importing its module, or calling the function that builds it, raised:
    that exception is the ``__cause__``, with its own type and traceback.
    """
