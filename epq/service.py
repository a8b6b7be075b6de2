"""``QueueService``: the River-style facade the Go package exposes, on Dramatiq."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dramatiq

from ._runtime import actor_for, setup
from .errors import DuplicateJob
from .models import (
    EnqueueIndexEndpointRequest,
    JobInsertResult,
    RegisterDynamicScheduleRequest,
    RegisterDynamicTriggerRequest,
    RegisterJobRequest,
    RegisterSourceRequest,
    _Request,
)


class QueueService:
    """Enqueue the five job kinds and get River's ``JobInsertResult`` back.

    Parameters:
      broker: the broker to enqueue on; defaults to the one :func:`epq.setup` builds.

    Each ``enqueue_*`` method takes the kind's request model (or a mapping of its fields),
    raises :class:`epq.InvalidRequest` naming the field when it is invalid (nothing is
    enqueued), and :class:`epq.BrokerUnavailable` when the broker cannot be reached. A request
    whose unique key is held inside its window enqueues nothing and returns the holding job
    with ``unique_skipped_as_duplicate=True``.
    """

    def __init__(self, broker: dramatiq.Broker | None = None) -> None:
        self._broker = broker

    @property
    def broker(self) -> dramatiq.Broker:
        return self._broker if self._broker is not None else setup()

    def enqueue_index_endpoint(
        self, request: EnqueueIndexEndpointRequest | Mapping[str, Any]
    ) -> JobInsertResult:
        """Index an endpoint (queue ``default``, priority 2, 7 attempts)."""
        return self._enqueue("index_endpoint", request)

    def enqueue_register_job(self, request: RegisterJobRequest | Mapping[str, Any]) -> JobInsertResult:
        """Register a job definition (queue ``default``, priority 2, 3 attempts)."""
        return self._enqueue("register_job", request)

    def enqueue_register_source(self, request: RegisterSourceRequest | Mapping[str, Any]) -> JobInsertResult:
        """Register a source (queue ``default``, priority 2, 3 attempts)."""
        return self._enqueue("register_source", request)

    def enqueue_register_dynamic_trigger(
        self, request: RegisterDynamicTriggerRequest | Mapping[str, Any]
    ) -> JobInsertResult:
        """Register a dynamic trigger (queue ``default``, priority 2, 3 attempts)."""
        return self._enqueue("register_dynamic_trigger", request)

    def enqueue_register_dynamic_schedule(
        self, request: RegisterDynamicScheduleRequest | Mapping[str, Any]
    ) -> JobInsertResult:
        """Register a dynamic schedule (queue ``default``, priority 2, 3 attempts)."""
        return self._enqueue("register_dynamic_schedule", request)

    def enqueue(self, kind: str, request: _Request | Mapping[str, Any]) -> JobInsertResult:
        """Enqueue a job of any kind by name (what ``epq enqueue`` uses)."""
        return self._enqueue(kind, request)

    def _enqueue(self, kind: str, request: _Request | Mapping[str, Any]) -> JobInsertResult:
        broker = self.broker
        actor = actor_for(kind)
        model = actor.kind.model
        if isinstance(request, Mapping):
            validated = actor.validate(kwargs=dict(request))
        elif isinstance(request, model):
            validated = request
        else:
            raise TypeError(f"enqueue of {kind} takes a {model.__name__}, not {type(request).__name__}")
        try:
            message = actor.enqueue_request(validated, broker=broker)
        except DuplicateJob as dup:
            return JobInsertResult(
                job=actor.record_for_duplicate(dup, validated), unique_skipped_as_duplicate=True
            )
        return JobInsertResult(job=actor.record_for(message, validated), unique_skipped_as_duplicate=False)
