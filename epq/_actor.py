"""``EpqActor``: a Dramatiq actor that validates its request at the call site."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
from pydantic import ValidationError

from . import bulk
from ._messages import new_id
from .backends.base import Holder, backend_of, display_url
from .backends.errors import CONNECTION_ERRORS, STORE_ERRORS, unreachable_errors
from .checks import Checked, check_request, delay_ms
from .errors import (
    BrokerUnavailable,
    ConfigurationError,
    DuplicateJob,
    EnqueueFailed,
    HandlerNotFound,
    InvalidPayload,
    InvalidRequest,
    StateUnavailable,
    describe_error,
)
from .handlers import get_handler
from .kinds import JobKind
from .middleware import JobRecords, Uniqueness, find_middleware
from .models import JobInsertResult, JobPriority, JobRecord, JobState, _Request
from .records import ARGS_JSON_OPTION


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def make_job_function(kind: JobKind) -> Callable[..., Any]:
    """The function a kind's actor runs in the worker: validate, then call the handler."""

    def run(*args: Any, **payload: Any) -> Any:
        if args:
            raise InvalidPayload(
                f"{kind.name} takes keyword arguments only; the message has {len(args)} positional"
            )
        try:
            request = kind.model.model_validate(payload)
        except ValidationError as exc:
            raise InvalidPayload(str(InvalidRequest.from_validation_error(kind.name, exc))) from exc
        fn = get_handler(kind.name)
        if fn is None:
            raise HandlerNotFound(
                f"no handler registered for {kind.name}; register one with "
                f"@epq.handler({kind.name!r}) in a module named in EPQ_HANDLERS (in a test: "
                f"import that module, or use epq_handlers.register({kind.name!r}, fn))"
            )
        return fn(request)

    run.__name__ = run.__qualname__ = kind.name
    run.__module__ = "epq.actors"
    return run


class EpqActor(dramatiq.Actor[..., Any]):
    """An epq job kind as a Dramatiq actor.

    ``send(**fields)`` (or ``send(request)``) validates the fields into the kind's request
    model first: a bad request raises :class:`epq.InvalidRequest` naming the field, and
    nothing reaches the broker. ``queue_name``, ``priority`` and ``run_at`` in the request
    pick the queue, the priority and the time the job runs.
    """

    def __init__(
        self, kind: JobKind, *, broker: dramatiq.Broker, extra_options: dict[str, Any] | None = None
    ) -> None:
        self.kind = kind
        super().__init__(
            make_job_function(kind),
            broker=broker,
            actor_name=kind.name,
            queue_name=kind.queue,
            priority=int(kind.priority),
            options={
                "max_attempts": kind.max_attempts,
                "max_retries": kind.max_attempts - 1,
                "backoff_ms": list(kind.backoff_ms),
                "throws": (InvalidPayload, HandlerNotFound),
                **(extra_options or {}),
            },
        )

    def validate(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> _Request:
        """Turn ``send``'s arguments into the kind's request model."""
        model = self.kind.model
        if args:
            if len(args) == 1 and isinstance(args[0], model) and not kwargs:
                return args[0]
            raise TypeError(
                f"{self.actor_name}.send() takes keyword arguments (the fields of "
                f"{model.__name__}) or one {model.__name__}, not positional arguments"
            )
        try:
            return model.model_validate(kwargs or {})
        except ValidationError as exc:
            raise InvalidRequest.from_validation_error(self.actor_name, exc) from None

    def message_with_options(
        self, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        return self.message_for(self.validate(args, kwargs), broker=self.broker, **options)

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        return self.enqueue_request(self.validate(args, kwargs), delay=delay, **options)

    def send_many(self, requests: Iterable[_Request | Mapping[str, Any]]) -> list[JobInsertResult]:
        """Enqueue many jobs of this kind in a few round trips: one ``JobInsertResult`` per
        request, in order (``QueueService.enqueue_many`` for mixed kinds). A duplicate is
        reported, not raised; an invalid request raises ``InvalidRequest`` and enqueues nothing."""
        return bulk.enqueue_many(self.broker, [(self, r) for r in requests])

    def message_for(
        self, request: _Request, *, broker: dramatiq.Broker, message_id: str | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        """Build the message for a validated request (queue, priority and payload checked); its
        id is ``message_id``, or a new one."""
        checked = self.check(request, broker)
        options[ARGS_JSON_OPTION] = checked.payload_json  # the record reuses it
        return self.message_from(checked, message_id=message_id, **options)

    def check(self, request: _Request, broker: dramatiq.Broker) -> Checked:
        """What a validated request's message needs, checked against the broker (see
        :func:`epq.checks.check_request`)."""
        return check_request(self.kind, request, broker)

    def message_from(
        self, checked: Checked, *, message_id: str | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        """The message of a checked request (see ``check``)."""
        options.setdefault("epq_priority", checked.priority)
        return dramatiq.Message(
            queue_name=checked.queue,
            actor_name=self.actor_name,
            args=(),
            kwargs=checked.payload,
            options=options,
            message_id=message_id or new_id(),
        )

    def enqueue_request(
        self,
        request: _Request,
        *,
        broker: dramatiq.Broker | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        """Validate-free enqueue of an already validated request; returns the message sent."""
        target = broker or self.broker
        message = self.message_for(request, broker=target, **options)
        backend = backend_of(target)
        now_ms = backend.state.now_ms() if backend is not None else int(time.time() * 1000)
        wait_ms = delay_ms(self.kind.name, request, delay, now_ms)
        try:
            target.enqueue(message, delay=wait_ms)
        except (StateUnavailable, ConfigurationError, EnqueueFailed):
            self._release_after_failed_publish(target, message)
            raise
        except unreachable_errors(target) as exc:
            if not _whole_or_nothing(target, wait_ms, exc):
                self._release_after_failed_publish(target, message)
            raise BrokerUnavailable(
                f"could not enqueue {self.actor_name} on {display_url(target)}: {describe_error(exc)}"
            ) from exc
        finally:
            # the payload JSON went with the copy the broker enqueued; the caller's copy keeps
            # none, so that a message made from it (say with other kwargs) cannot carry it
            message.options.pop(ARGS_JSON_OPTION, None)
        return message

    @staticmethod
    def _release_after_failed_publish(broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> None:
        # If the state store is down too, the record and the lock expire with their TTLs; the
        # first failure ends the cleanup, so a store that does not answer costs one timeout.
        with contextlib.suppress(*STORE_ERRORS):
            records = find_middleware(broker, JobRecords)
            if records is not None:
                records.records.delete(message.message_id)
            uniqueness = find_middleware(broker, Uniqueness)
            key = uniqueness.lock_key(broker, message) if uniqueness is not None else None
            if uniqueness is not None and key is not None:
                uniqueness.release(message, key)

    def record_for(self, message: dramatiq.Message[Any], request: _Request) -> JobRecord:
        """The job record of a message this actor just enqueued."""
        created = datetime.fromtimestamp(message.message_timestamp / 1000, tz=timezone.utc)
        return JobRecord(**self.record_fields(message, request, created))

    def record_fields(
        self, message: dramatiq.Message[Any], request: _Request, created: datetime
    ) -> dict[str, Any]:
        """``record_for``'s fields, unvalidated (``created``: the message's timestamp)."""
        scheduled = request.run_at if request.run_at and request.run_at > created else created
        return {
            "id": message.message_id,
            "kind": self.actor_name,
            "queue": message.queue_name,
            "priority": message.options["epq_priority"],
            "args": message.kwargs,
            "state": JobState.SCHEDULED if scheduled > created else JobState.AVAILABLE,
            "attempt": 0,
            "max_attempts": int(self.options["max_attempts"]),
            "created_at": created,
            "scheduled_at": scheduled,
        }

    def record_for_duplicate(self, dup: DuplicateJob, request: _Request) -> JobRecord:
        """The record of the job that holds ``request``'s unique key, from what its lock records.

        ``args`` are this request's (they agree with the holder's on every unique-key field).
        """
        holder = Holder.parse(dup.holder)
        now = _utcnow()
        if (
            holder.priority in (1, 2, 3, 4)
            and holder.queue is not None
            and holder.created_ms is not None
            and holder.due_ms is not None
        ):
            created, scheduled = _from_ms(holder.created_ms), _from_ms(holder.due_ms)
            queue, priority = holder.queue, JobPriority(holder.priority)
        else:  # (a holder value without its details)
            created = scheduled = now
            queue, priority = (
                request.queue_name or self.kind.queue,
                JobPriority(request.priority or self.kind.priority),
            )
        return JobRecord(
            id=dup.existing_job_id,
            kind=self.actor_name,
            queue=queue,
            priority=priority,
            args=request.model_dump(mode="json"),
            state=JobState.SCHEDULED if scheduled > now else JobState.AVAILABLE,
            max_attempts=int(self.options["max_attempts"]),
            created_at=created,
            scheduled_at=scheduled,
        )


def _whole_or_nothing(broker: dramatiq.Broker, delay_ms: int | None, exc: BaseException) -> bool:
    """Whether a failed enqueue was one script call that took the lock, wrote the record and
    enqueued the message (Redis with epq's state in it, no delay) and failed on the connection:
    the script ran whole, its reply lost, or not at all. Either way there is nothing to take
    back (taking back an enqueued job would leave it without its record and lock), and a server
    that did not answer would not answer the cleanup either."""
    backend = backend_of(broker)
    fused = backend is not None and backend.fused and not delay_ms
    return fused and isinstance(exc, CONNECTION_ERRORS)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
