"""Request models, constants and job records (the contract with the Go package).

Field names are snake_case; everything travels as JSON.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, JsonValue


class JobPriority(enum.IntEnum):
    """River-style priorities: 1 runs first, 4 last."""

    HIGH = 1
    NORMAL = 2
    LOW = 3
    VERY_LOW = 4


class _TextEnum(str, enum.Enum):
    """An enum of strings that prints as its value (``enum.StrEnum`` from Python 3.11 on)."""

    def __str__(self) -> str:
        return str(self.value)


class JobQueue(_TextEnum):
    """The four queues the Go package separates work into."""

    DEFAULT = "default"
    EXECUTION = "execution"
    EVENTS = "events"
    MAINTENANCE = "maintenance"


class EndpointIndexSource(_TextEnum):
    """What triggered an endpoint indexing."""

    MANUAL = "MANUAL"
    API = "API"
    INTERNAL = "INTERNAL"
    HOOK = "HOOK"


class JobState(_TextEnum):
    """River's job states. ``pending``: committed through the outbox (``tx=``) and not yet moved
    to the broker by a relay; no record exists for it yet (``QueueService.get_job`` reads the
    outbox row)."""

    AVAILABLE = "available"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    RETRYABLE = "retryable"
    COMPLETED = "completed"
    DISCARDED = "discarded"
    CANCELLED = "cancelled"
    PENDING = "pending"


def _reject_bool(value: Any) -> Any:
    # bool is an int subclass; True must not silently become priority 1.
    if isinstance(value, bool):
        raise ValueError("priority must be an integer 1..4, not a boolean")
    return value


Priority = Annotated[JobPriority, BeforeValidator(_reject_bool)]
JsonObject = dict[str, JsonValue]

#: The names of the enqueue options every request carries besides its own fields.
ENQUEUE_OPTION_FIELDS = ("queue_name", "run_at", "priority")


class _Request(BaseModel):
    """Fields shared by every request: the enqueue options."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    queue_name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    run_at: AwareDatetime | None = None
    priority: Priority | None = None


class EnqueueIndexEndpointRequest(_Request):
    """Index an endpoint (kind ``index_endpoint``)."""

    endpoint_id: UUID
    source: EndpointIndexSource
    reason: str = ""
    source_data: JsonObject = Field(default_factory=dict)


class RegisterJobRequest(_Request):
    """Register or update a job definition (kind ``register_job``)."""

    endpoint_id: UUID
    job_id: Annotated[str, Field(min_length=1)]
    job_metadata: JsonObject


class RegisterSourceRequest(_Request):
    """Register or update a source (kind ``register_source``)."""

    endpoint_id: UUID
    source_id: Annotated[str, Field(min_length=1)]
    source_metadata: JsonObject


class RegisterDynamicTriggerRequest(_Request):
    """Register a dynamic trigger (kind ``register_dynamic_trigger``)."""

    endpoint_id: UUID
    trigger_id: Annotated[str, Field(min_length=1)]
    trigger_metadata: JsonObject


class RegisterDynamicScheduleRequest(_Request):
    """Register a dynamic schedule (kind ``register_dynamic_schedule``)."""

    endpoint_id: UUID
    schedule_id: Annotated[str, Field(min_length=1)]
    schedule_metadata: JsonObject


class AttemptError(BaseModel):
    """One failed attempt of a job."""

    model_config = ConfigDict(frozen=True)

    attempt: int
    at: datetime
    error_type: str
    message: str
    traceback: str = ""


class JobRecord(BaseModel):
    """What is known of one job. ``id`` is the Dramatiq message id (a UUID string)."""

    model_config = ConfigDict(frozen=True)

    id: str
    kind: str
    queue: str
    priority: JobPriority
    args: dict[str, Any]
    state: JobState
    attempt: int = 0
    max_attempts: int
    snoozes: int = 0
    errors: list[AttemptError] = Field(default_factory=list)
    created_at: datetime
    scheduled_at: datetime
    attempted_at: datetime | None = None
    finalized_at: datetime | None = None
    #: When ``QueueService.cancel_job`` asked the worker running the job to stop it (the job is
    #: then ``cancelled``, or ended as it was ending if the request came too late).
    cancel_requested_at: datetime | None = None
    #: What the handler returned, when it completed (JSON; None when it returned None).
    output: Any = None


class JobInsertResult(BaseModel):
    """What an enqueue returns, as River's ``JobInsertResult``."""

    model_config = ConfigDict(frozen=True)

    job: JobRecord
    unique_skipped_as_duplicate: bool = False


class JobPage(BaseModel):
    """A page of ``QueueService.list_jobs``: its jobs, and the cursor of the next page (None when
    this page is the last)."""

    model_config = ConfigDict(frozen=True)

    jobs: list[JobRecord]
    next_cursor: str | None = None


class QueueInfo(BaseModel):
    """What ``QueueService.queues`` says of one queue (``epq queues``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    #: Paused (``QueueService.pause_queue``): no worker process starts its jobs; they wait.
    paused: bool
    #: Jobs waiting to start (``available``), per priority (1..4, every priority listed).
    depth: dict[int, int]
    #: How long the oldest waiting job has waited since it became due, in seconds (0 when none
    #: waits): the ``epq_oldest_waiting_seconds`` metric's figure, the largest over the priorities.
    lag_seconds: float
    #: Jobs running now.
    running: int
    #: Jobs of the queue waiting in the durable schedule for their time (delayed runs, retries).
    scheduled: int
