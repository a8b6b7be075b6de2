"""The five job kinds and what each declares: queue, priority, attempts, backoff, uniqueness."""

from __future__ import annotations

from dataclasses import dataclass

from .models import (
    EnqueueIndexEndpointRequest,
    JobPriority,
    JobQueue,
    RegisterDynamicScheduleRequest,
    RegisterDynamicTriggerRequest,
    RegisterJobRequest,
    RegisterSourceRequest,
    _Request,
)

_MINUTE_MS = 60_000


@dataclass(frozen=True)
class JobKind:
    """One job kind.

    Attributes:
      name: the actor name (River's job kind).
      model: the request model its payload is validated into.
      queue: the default queue.
      priority: the default priority.
      max_attempts: attempts River-style: the first run plus ``max_attempts - 1`` retries.
      backoff_ms: delay before retry n (1-based) is ``backoff_ms[min(n, len) - 1]``, ±25 % jitter.
      unique_window_setting: the ``EpqSettings`` field holding the uniqueness window.
      time_limit_setting: the ``EpqSettings`` field holding how long its handler may run.
      unique_by: the request fields that make up the unique key.
      serial_by: the request field whose value is the job's serial key when its kind has serial
        keys on (``EPQ_SERIAL_KINDS``, ``epq.serial``): one sequence per value, across kinds.
      unique_mode_setting / debounce_delay_setting / debounce_max_wait_setting: the
        ``EpqSettings`` fields holding what a duplicate does inside the window and, for
        ``debounce``, how far each moves the waiting job and how long it may wait at most
        (``epq.middleware.modes``).
    """

    name: str
    model: type[_Request]
    queue: str
    priority: JobPriority
    max_attempts: int
    backoff_ms: tuple[int, ...]
    unique_window_setting: str
    unique_by: tuple[str, ...]
    time_limit_setting: str
    unique_mode_setting: str
    debounce_delay_setting: str
    debounce_max_wait_setting: str
    serial_by: str = "endpoint_id"


def _registration(name: str, model: type[_Request], *unique_by: str) -> JobKind:
    """A registration kind: queue ``default``, priority 2, 3 attempts backed off 10 s then 20 s,
    unique per endpoint and the registered thing (its id and metadata) for the registration
    window."""
    return JobKind(
        name=name,
        model=model,
        queue=JobQueue.DEFAULT.value,
        priority=JobPriority.NORMAL,
        max_attempts=3,
        backoff_ms=(10_000, 20_000),
        unique_window_setting="register_unique_for",
        unique_by=("endpoint_id", *unique_by),
        time_limit_setting="register_time_limit",
        unique_mode_setting="register_unique_mode",
        debounce_delay_setting="register_debounce_delay",
        debounce_max_wait_setting="register_debounce_max_wait",
    )


KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind(
            name="index_endpoint",
            model=EnqueueIndexEndpointRequest,
            queue=JobQueue.DEFAULT.value,
            priority=JobPriority.NORMAL,
            max_attempts=7,
            backoff_ms=tuple(m * _MINUTE_MS for m in (1, 2, 4, 8, 16, 30)),
            unique_window_setting="index_unique_for",
            unique_by=("endpoint_id", "source"),
            time_limit_setting="index_time_limit",
            unique_mode_setting="index_unique_mode",
            debounce_delay_setting="index_debounce_delay",
            debounce_max_wait_setting="index_debounce_max_wait",
        ),
        _registration("register_job", RegisterJobRequest, "job_id", "job_metadata"),
        _registration("register_source", RegisterSourceRequest, "source_id", "source_metadata"),
        _registration(
            "register_dynamic_trigger", RegisterDynamicTriggerRequest, "trigger_id", "trigger_metadata"
        ),
        _registration(
            "register_dynamic_schedule", RegisterDynamicScheduleRequest, "schedule_id", "schedule_metadata"
        ),
    )
}


def get_kind(name: str) -> JobKind:
    """Return the kind called ``name``; a clear ``KeyError`` listing the known kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown job kind {name!r}; known kinds: {', '.join(KINDS)}") from None
