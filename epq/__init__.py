"""epq: the Endpoints service's job queue on Dramatiq.

Five job kinds with River's promises (priorities 1-4, four queues, retries, uniqueness windows,
delayed runs) on Redis, RabbitMQ, an embedded Redis, or Dramatiq's stub broker.

    import epq
    epq.setup("redis://127.0.0.1:6379/0")
    result = epq.QueueService().enqueue_index_endpoint(
        epq.EnqueueIndexEndpointRequest(endpoint_id=uuid4(), source=epq.EndpointIndexSource.API)
    )

Importing ``epq`` connects to nothing; ``epq.setup()`` (or ``import epq.actors``) does.
"""

from ._runtime import setup
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
    StateUnavailable,
)
from .handlers import handler
from .models import (
    AttemptError,
    EndpointIndexSource,
    EnqueueIndexEndpointRequest,
    JobInsertResult,
    JobPriority,
    JobQueue,
    JobRecord,
    JobState,
    RegisterDynamicScheduleRequest,
    RegisterDynamicTriggerRequest,
    RegisterJobRequest,
    RegisterSourceRequest,
)
from .service import QueueService
from .settings import EpqSettings

__version__ = "0.1.0"

__all__ = [
    "AttemptError",
    "BrokerUnavailable",
    "ConfigurationError",
    "DuplicateJob",
    "EndpointIndexSource",
    "EnqueueIndexEndpointRequest",
    "EpqError",
    "EpqSettings",
    "HandlerAlreadyRegistered",
    "HandlerError",
    "HandlerNotFound",
    "InvalidPayload",
    "InvalidRequest",
    "JobInsertResult",
    "JobNotFound",
    "JobPriority",
    "JobQueue",
    "JobRecord",
    "JobState",
    "QueueService",
    "RegisterDynamicScheduleRequest",
    "RegisterDynamicTriggerRequest",
    "RegisterJobRequest",
    "RegisterSourceRequest",
    "StateUnavailable",
    "__version__",
    "handler",
    "setup",
]
