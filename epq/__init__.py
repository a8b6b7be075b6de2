"""epq: the Endpoints service's job queue on Dramatiq.

Five job kinds with River's promises (priorities 1-4, four queues, retries, uniqueness windows,
delayed runs) on Redis, RabbitMQ, an embedded Redis, or Dramatiq's stub broker.

    import epq
    epq.setup("redis://127.0.0.1:6379/0")
    result = epq.QueueService().enqueue_index_endpoint(
        epq.EnqueueIndexEndpointRequest(endpoint_id=uuid4(), source=epq.EndpointIndexSource.API)
    )

Importing ``epq`` connects to nothing and loads little: each public name is imported from its
module on first use (PEP 562), so an application that only builds requests never loads the
broker drivers. ``epq.setup()`` connects; so does the first use of ``epq.actors`` (the five
actors, bound to the broker the settings name: see :mod:`epq.actors`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the one place the version is written (pyproject reads it from here)

#: Where each public name lives, imported on first use.
_LAZY = {
    "setup": "._runtime",
    **dict.fromkeys(
        (
            "BrokerUnavailable",
            "ConfigurationError",
            "DuplicateJob",
            "EpqError",
            "HandlerAlreadyRegistered",
            "HandlerError",
            "HandlerNotFound",
            "InvalidPayload",
            "InvalidRequest",
            "JobNotFound",
            "PayloadUpgradeFailed",
            "StateUnavailable",
        ),
        ".errors",
    ),
    **dict.fromkeys(("handler", "payload_upgrade"), ".handlers"),
    "periodic": ".periodic_jobs",
    **dict.fromkeys(("Discard", "InvalidOutput", "Snooze"), ".controls"),
    **dict.fromkeys(("JobCancelled", "cancel_requested"), ".cancellation"),
    **dict.fromkeys(
        (
            "AttemptError",
            "EndpointIndexSource",
            "EnqueueIndexEndpointRequest",
            "JobInsertResult",
            "JobPage",
            "JobPriority",
            "JobQueue",
            "JobRecord",
            "JobState",
            "RegisterDynamicScheduleRequest",
            "RegisterDynamicTriggerRequest",
            "RegisterJobRequest",
            "RegisterSourceRequest",
        ),
        ".models",
    ),
    "QueueService": ".service",
    "EpqSettings": ".settings",
}

__all__ = [
    "AttemptError",
    "BrokerUnavailable",
    "ConfigurationError",
    "Discard",
    "DuplicateJob",
    "EndpointIndexSource",
    "EnqueueIndexEndpointRequest",
    "EpqError",
    "EpqSettings",
    "HandlerAlreadyRegistered",
    "HandlerError",
    "HandlerNotFound",
    "InvalidOutput",
    "InvalidPayload",
    "InvalidRequest",
    "JobCancelled",
    "JobInsertResult",
    "JobNotFound",
    "JobPage",
    "JobPriority",
    "JobQueue",
    "JobRecord",
    "JobState",
    "PayloadUpgradeFailed",
    "QueueService",
    "RegisterDynamicScheduleRequest",
    "RegisterDynamicTriggerRequest",
    "RegisterJobRequest",
    "RegisterSourceRequest",
    "Snooze",
    "StateUnavailable",
    "__version__",
    "cancel_requested",
    "handler",
    "payload_upgrade",
    "periodic",
    "setup",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use; ``epq.actors`` sets epq up from the settings."""
    if name == "actors":
        # the submodule: importing it calls epq.setup() (the import binds it as epq.actors)
        return importlib.import_module(".actors", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'epq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later uses are plain lookups
    return value


def __dir__() -> list[str]:
    # the public names, and not ``actors``: listing it would let introspection (say
    # inspect.getmembers) set epq up and connect to a broker
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see: the names as if imported here
    from . import actors as actors
    from ._runtime import setup
    from .cancellation import JobCancelled, cancel_requested
    from .controls import Discard, InvalidOutput, Snooze
    from .errors import (
        BrokerUnavailable,
        ConfigurationError,
        DuplicateJob,
        EpqError,
        HandlerAlreadyRegistered,
        HandlerError,
        HandlerNotFound,
        InvalidPayload,
        InvalidRequest,
        JobNotFound,
        PayloadUpgradeFailed,
        StateUnavailable,
    )
    from .handlers import handler, payload_upgrade
    from .models import (
        AttemptError,
        EndpointIndexSource,
        EnqueueIndexEndpointRequest,
        JobInsertResult,
        JobPage,
        JobPriority,
        JobQueue,
        JobRecord,
        JobState,
        RegisterDynamicScheduleRequest,
        RegisterDynamicTriggerRequest,
        RegisterJobRequest,
        RegisterSourceRequest,
    )
    from .periodic_jobs import periodic
    from .service import QueueService
    from .settings import EpqSettings
